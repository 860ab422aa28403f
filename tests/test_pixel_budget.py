"""One pixel budget: the builders' box coordinates, the collator, training and evaluation resize images
with the same `min_pixels` / `max_pixels`, by default the loaded processor's."""

from __future__ import annotations

import json
import runpy
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from iadgpt.data.records import StageInfo, TrainingRecord, read_records
from iadgpt.data.tasks import ResizeRule
from iadgpt.model.checkpoint import PRESETS, load_processor, pixel_limits, preset_image_processor

REPO = Path(__file__).resolve().parents[1]
LARGE = (3400, 4000)  # height, width: 13.6 M pixels, above the released processor's 12,845,056
DEFECTS = ((300, 500, 900, 1300), (2000, 2600, 2350, 3900))  # (y0, x0, y1, x1) rectangles of the mask


def build(stage: int, *args) -> str:
    """Run a builder recipe in this process (as `python data_builders/stageN.py ...`); its error line or ''."""
    argv = sys.argv
    sys.argv = [f"stage{stage}.py", *map(str, args)]
    try:
        runpy.run_path(str(REPO / "data_builders" / f"stage{stage}.py"), run_name="__main__")
    except SystemExit as exit_:
        return str(exit_.code or "")
    finally:
        sys.argv = argv
    return ""


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def large_defect(tmp_path_factory) -> Path:
    """MVTec layout: small normals, one defective query larger than max_pixels, its two-region mask."""
    root = tmp_path_factory.mktemp("large") / "plate"
    rng = np.random.default_rng(0)
    for index in range(4):
        save(rng.integers(90, 110, (64, 80, 3), dtype=np.uint8), root / "train" / "good" / f"{index:03d}.png")
    save(rng.integers(90, 110, (64, 80, 3), dtype=np.uint8), root / "test" / "good" / "000.png")
    query = np.full((*LARGE, 3), 100, np.uint8)
    mask = np.zeros(LARGE, np.uint8)
    for y0, x0, y1, x1 in DEFECTS:
        query[y0:y1, x0:x1] = 230
        mask[y0:y1, x0:x1] = 255
    save(query, root / "test" / "scratch" / "000.png")
    save(mask, root / "ground_truth" / "scratch" / "000_mask.png")
    return root.parent


def processor_boxes(image_processor, mask: np.ndarray) -> tuple[tuple[int, int], list[list[int]]]:
    """The frame (width, height) the processor resizes the query to, and the mask's regions' boxes
    after the processor's own resize of the mask (x1, y1 inclusive)."""
    query_grid = image_processor(images=[Image.fromarray(np.stack([mask] * 3, -1))])["image_grid_thw"][0]
    frame = (int(query_grid[2]) * image_processor.patch_size, int(query_grid[1]) * image_processor.patch_size)
    resized = image_processor.resize(np.stack([mask] * 3).astype(np.float32), size=image_processor.size,
                                     resample=image_processor.resample,
                                     factor=image_processor.patch_size * image_processor.merge_size)
    assert resized.shape[1:] == (frame[1], frame[0])  # the resize the processor's preprocessing runs
    regions, _ = ndimage.label(resized[0] > 127)
    return frame, [[s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1] for s in ndimage.find_objects(regions)]


def localization_boxes(folder: Path) -> list[list[list[int]]]:
    answers = [r.messages[-1]["content"][0]["text"] for r in read_records(folder) if r.task == "localization"]
    assert answers, "the build holds localization records"
    return [[box["bbox_2d"] for box in json.loads(answer)] for answer in answers]


def test_builder_boxes_are_in_the_7b_processors_resize_of_a_large_image(large_defect, tmp_path):
    """Without --model the builder computes boxes for the released processor (the 7B's: at most
    12,845,056 pixels): each box is the processor's own resize of the mask region, to a pixel, in
    the frame the processor's preprocessing gives the query."""
    assert build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 16, "--shots", 1, 2,
                 "--out", tmp_path / "s3") == ""
    image_processor = preset_image_processor(PRESETS["qwen2.5-vl-7b"])
    assert pixel_limits(image_processor) == (3136, 12845056)
    assert StageInfo.read(tmp_path / "s3").pixels == asdict(ResizeRule.of_processor(image_processor))

    mask = np.asarray(Image.open(large_defect / "plate" / "ground_truth" / "scratch" / "000_mask.png"))
    (width, height), expected = processor_boxes(image_processor, mask)
    assert width * height <= 12845056 < LARGE[0] * LARGE[1] and (width, height) != (LARGE[1], LARGE[0])
    for boxes in localization_boxes(tmp_path / "s3"):
        assert len(boxes) == len(expected) == 2
        for box, reference in zip(sorted(boxes), sorted(expected)):
            assert np.abs(np.subtract(box, reference)).max() <= 1, (box, reference)  # interpolation at the edge
            assert 0 <= box[0] < box[2] < width and 0 <= box[1] < box[3] < height


def test_builder_reads_the_models_processor_and_limits_override_it(large_defect, tiny_checkpoint, tmp_path):
    tiny = load_processor(tiny_checkpoint)
    assert build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 16, "--shots", 1, "--model",
                 tiny_checkpoint, "--out", tmp_path / "tiny") == ""
    mask = np.asarray(Image.open(large_defect / "plate" / "ground_truth" / "scratch" / "000_mask.png"))
    (width, height), expected = processor_boxes(tiny.image_processor, mask)
    assert width * height <= pixel_limits(tiny)[1]
    assert StageInfo.read(tmp_path / "tiny").pixels == {"factor": 28, "min_pixels": 3136, "max_pixels": 50176}
    for boxes in localization_boxes(tmp_path / "tiny"):
        for box, reference in zip(sorted(boxes), sorted(expected)):
            assert np.abs(np.subtract(box, reference)).max() <= 1, (box, reference)

    assert build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--shots", 1, "--model",
                 tiny_checkpoint, "--max-pixels", 100_000, "--out", tmp_path / "capped") == ""
    assert StageInfo.read(tmp_path / "capped").pixels == {"factor": 28, "min_pixels": 3136, "max_pixels": 100_000}
    error = build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--shots", 1, "--min-pixels", 5000,
                  "--max-pixels", 4000, "--out", tmp_path / "bad")
    assert error == "stage3.py: min_pixels=5000 is above max_pixels=4000."
    error = build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--shots", 1, "--model",
                  tmp_path / "nowhere",
                  "--out", tmp_path / "bad2")
    assert error.startswith(f"stage3.py: --model {tmp_path / 'nowhere'}: cannot read its processor's pixel limits")


def test_replay_of_a_stage_built_for_another_resize_is_refused(large_defect, tmp_path):
    assert build(2, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--max-pixels", 1003520,
                 "--out", tmp_path / "s2") == ""
    error = build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--shots", 1,
                  "--replay", tmp_path / "s2", "--out", tmp_path / "s3")
    assert error == (f"stage3.py: {tmp_path / 's2'} was built for images resized with {{'factor': 28, 'min_pixels': "
                     "3136, 'max_pixels': 1003520}, this stage with {'factor': 28, 'min_pixels': 3136, 'max_pixels': "
                     "12845056}: their box coordinates are in different pixel frames. Build both with the same "
                     "--model / --min-pixels / --max-pixels.")
    assert build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 4, "--shots", 1,
                 "--replay", tmp_path / "s2", "--max-pixels", 1003520, "--out", tmp_path / "s3") == ""


def test_training_resizes_with_its_settings_and_refuses_a_stage_in_another_frame(large_defect, tiny_checkpoint,
                                                                                 tmp_path):
    """TrainConfig's limits reach the processor, hence the collator (and the saved model's processor);
    a stage built for other limits fails before any step, naming both."""
    from iadgpt.training.collator import RecordCollator
    from iadgpt.training.config import TrainConfig
    from iadgpt.training.trainer import TrainingSetupError, build_model, load_stage_data

    assert build(3, "--dataset", f"plate=mvtec:{large_defect}", "--records", 8, "--shots", 1, "--model",
                 tiny_checkpoint, "--max-pixels", 20_000, "--out", tmp_path / "s3") == ""
    cfg = TrainConfig(model=str(tiny_checkpoint), data=str(tmp_path / "s3"), mixed_precision="no",
                      gradient_checkpointing=False, max_length=100_000)
    _, processor = build_model(cfg, main_process=False)
    with pytest.raises(TrainingSetupError, match=(
            r"was built with boxes in images resized by \{'factor': 28, 'min_pixels': 3136, 'max_pixels': 20000\}, "
            r"but the model's processor \(with min_pixels / max_pixels\) resizes by \{'factor': 28, 'min_pixels': "
            r"3136, 'max_pixels': 50176\}.* Set min_pixels=3136 max_pixels=20000")):
        load_stage_data(cfg, processor, main_process=False)

    cfg.max_pixels = 20_000
    _, processor = build_model(cfg, main_process=False)
    assert pixel_limits(processor) == (3136, 20_000)
    info, dataset, _ = load_stage_data(cfg, processor, main_process=False)
    rows = [row for row in dataset.records if row["task"] == "localization"]
    batch = RecordCollator(processor, info)(rows[:1])
    query = Image.open(info.image_path(TrainingRecord.from_dict(rows[0]), rows[0]["images"][-1]))
    height, width = smart_resize(query.height, query.width, 28, 3136, 20_000)
    assert batch["image_grid_thw"][-1].tolist() == [1, height // 14, width // 14]

    cfg.max_pixels = 0
    with pytest.raises(TrainingSetupError, match=r"max_pixels=0: a pixel limit is a positive whole number"):
        build_model(cfg, main_process=False)


def test_evaluation_scores_at_the_processors_limits_and_caches_per_limits(large_defect, tiny_checkpoint, tmp_path):
    from iadgpt.evaluation.detection import DetectionSettings, run_detection

    # The dataset's defect is 13.6 M pixels: the limits decide its token grid.
    def run(**limits) -> list[dict]:
        run_detection(DetectionSettings(model=str(tiny_checkpoint), dataset="mvtec", root=str(large_defect),
                                        out=str(tmp_path / "out"), shots=[1], seeds=1, map_size=64, **limits))
        return [json.loads(line) for path in sorted((tmp_path / "out" / "cache").glob("*.jsonl"))
                for line in path.read_text().splitlines()]

    first = run()
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert (info["min_pixels"], info["max_pixels"]) == (3136, 50176)  # the tiny processor's own
    large = [line for line in first if line["query"].endswith("scratch/000.png")]
    height, width = smart_resize(*LARGE, 28, 3136, 50176)
    assert [np.shape(line["token_map"]) for line in large] == [(height // 28, width // 28)]
    assert len(run()) == len(first)  # the same limits: everything from the cache

    second = run(max_pixels=12_000)
    rescored = second[len(first):]
    assert len(rescored) == len(first)  # other limits: nothing reused
    height, width = smart_resize(*LARGE, 28, 3136, 12_000)
    assert [np.shape(line["token_map"]) for line in rescored if line["query"].endswith("scratch/000.png")] == [
        (height // 28, width // 28)]
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["max_pixels"] == 12_000
