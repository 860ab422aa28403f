"""Dataset and instruction-data readers, on tiny trees written in each real layout.

Each fixture writes a handful of real PNG/JPG files (a few pixels each) in the layout the reader
expects, so counts, labels and mask pairing are checked against known ground truth, and every
kind of bad input is checked for its error message (which must name the offending file).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadgpt.data import (
    Conversation,
    DataError,
    DetectionItem,
    FolderReader,
    LLaVAConversationReader,
    MetaJsonReader,
    MMADReader,
    MVTecReader,
    RealIADReader,
    ReasoningItem,
    Sample,
    VisAReader,
    VisaDRReader,
    load_image,
    load_mask,
    load_sample,
    open_dataset,
    resolve_under_root,
)

IMAGE_SIZE = (8, 6)  # (width, height): not square, so a transposed mask would be caught


def write_image(path: Path, size: tuple[int, int] = IMAGE_SIZE, value: int = 120, empty: bool = False) -> Path:
    """A small real image (format from the suffix), or a zero-byte file when `empty`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if empty:
        path.write_bytes(b"")
        return path
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = IMAGE_SIZE, foreground: int = 255, empty: bool = False) -> Path:
    """A greyscale mask with a 2x2 defect at the top-left corner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if empty:
        path.write_bytes(b"")
        return path
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[:2, :2] = foreground
    Image.fromarray(values).save(path)
    return path


def tally(samples) -> Counter:
    return Counter((s.category, s.split, s.defect_type) for s in samples)


@pytest.fixture()
def no_image_decoding(monkeypatch):
    """Make any attempt to open an image fail: readers must work from paths alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reader opened an image")

    monkeypatch.setattr(Image, "open", refuse)


# --------------------------------------------------------------------------------------------------
# samples.py


def test_sample_checks_label_consistency_and_is_frozen(tmp_path):
    sample = Sample(tmp_path / "a.png", "bottle", True, "crack", tmp_path / "a_mask.png", "test")
    assert sample.label == "anomalous"
    assert {sample, Sample(tmp_path / "a.png", "bottle", True, "crack", tmp_path / "a_mask.png", "test")} == {sample}
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.category = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="contradicts"):
        Sample(tmp_path / "a.png", "bottle", False, "crack", None, "test")
    with pytest.raises(ValueError, match="contradicts"):
        Sample(tmp_path / "a.png", "bottle", True, "good", None, "test")
    with pytest.raises(ValueError, match="split"):
        Sample(tmp_path / "a.png", "bottle", False, "good", None, "val")  # type: ignore[arg-type]
    assert isinstance(Sample(str(tmp_path / "a.png"), "b", False, "good").image_path, Path)


def test_load_image_returns_rgb_and_scales_16_bit(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((6, 8), 77, dtype=np.uint8)).save(grey)
    image = load_image(grey)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.asarray(image)[0, 0].tolist() == [77, 77, 77]

    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 100 * 256, 65535]], dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert np.asarray(load_image(deep))[0, :, 0].tolist() == [0, 100, 255]


def test_load_image_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "000.png"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*does not exist"):
        load_image(missing)


def test_load_image_zero_byte_file_names_it(tmp_path):
    empty = write_image(tmp_path / "empty.png", empty=True)
    with pytest.raises(DataError, match=re.escape(str(empty)) + ".*not a readable image"):
        load_image(empty)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_load_image_truncated_file_fails_at_decode_with_its_name(tmp_path, suffix):
    path = tmp_path / f"truncated{suffix}"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    Image.open(path).close()  # the header still parses: only a real decode (.load()) finds the damage
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt or truncated"):
        load_image(path)


def test_load_mask_binarises_any_nonzero_value(tmp_path):
    visa_style = write_mask(tmp_path / "ids.png", foreground=3)
    mask = load_mask(visa_style, IMAGE_SIZE)
    assert mask.dtype == bool and mask.shape == (6, 8)
    assert mask.sum() == 4 and mask[:2, :2].all()

    rgb = tmp_path / "rgb.png"
    values = np.zeros((6, 8, 3), dtype=np.uint8)
    values[5, 7, 2] = 9
    Image.fromarray(values).save(rgb)
    assert np.argwhere(load_mask(rgb, IMAGE_SIZE)).tolist() == [[5, 7]]

    with_alpha = tmp_path / "rgba.png"
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque but black everywhere: no defect
    Image.fromarray(rgba).save(with_alpha)
    assert not load_mask(with_alpha, IMAGE_SIZE).any()


def test_load_mask_of_wrong_size_names_file_and_sizes(tmp_path):
    mask = write_mask(tmp_path / "000_mask.png", size=(6, 8))
    with pytest.raises(DataError, match=re.escape(str(mask)) + r".*6x8.*differs.*8x6"):
        load_mask(mask, IMAGE_SIZE)


def test_load_sample_pairs_mask_with_image(tmp_path):
    image = write_image(tmp_path / "000.png")
    good = load_sample(Sample(image, "c", False, "good", None, "test"))
    assert good.mask is not None and good.mask.shape == (6, 8) and not good.mask.any()
    unknown = load_sample(Sample(image, "c", True, "scratch", None, "test"))
    assert unknown.mask is None
    mask = write_mask(tmp_path / "000_mask.png")
    assert load_sample(Sample(image, "c", True, "scratch", mask, "test")).mask.sum() == 4
    wrong = write_mask(tmp_path / "001_mask.png", size=(4, 4))
    with pytest.raises(DataError, match=re.escape(str(wrong)) + ".*differs.*" + re.escape(str(image))):
        load_sample(Sample(image, "c", True, "scratch", wrong, "test"))


def test_resolve_under_root_refuses_escapes(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    assert resolve_under_root(root, "a/b.png") == root / "a" / "b.png"
    assert resolve_under_root(root, "a/../b.png") == root / "b.png"
    assert resolve_under_root(root, str(root / "c.png")) == root / "c.png"
    for escaping in ["../secret.png", "a/../../secret.png", "/etc/passwd", str(tmp_path / "dataset2" / "x.png")]:
        pattern = re.escape(repr(escaping)) + ".*escapes the dataset root " + re.escape(str(root))
        with pytest.raises(DataError, match=pattern):
            resolve_under_root(root, escaping)


def test_resolve_under_root_keeps_symlinked_folders_inside_the_root(tmp_path):
    elsewhere = tmp_path / "other_disk" / "bottle"
    elsewhere.mkdir(parents=True)
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "bottle").symlink_to(elsewhere, target_is_directory=True)
    assert resolve_under_root(root, "bottle/000.png") == root / "bottle" / "000.png"
    linked_root = tmp_path / "dataset_link"
    linked_root.symlink_to(root, target_is_directory=True)
    # An absolute path spelled through the real folder is inside a root given through a symlink.
    assert resolve_under_root(linked_root, str(root / "x.png")) == root / "x.png"


# --------------------------------------------------------------------------------------------------
# MVTec-AD


def make_mvtec(root: Path, empty_images: bool = False) -> Path:
    """bottle: 3 train, 2 good + 2 broken_large test; screw: 2 train, 1 scratch test."""
    for name in ["000", "001", "002"]:
        write_image(root / "bottle" / "train" / "good" / f"{name}.png", empty=empty_images)
    for name in ["000", "001"]:
        write_image(root / "bottle" / "test" / "good" / f"{name}.png", empty=empty_images)
        write_image(root / "bottle" / "test" / "broken_large" / f"{name}.png", empty=empty_images)
        write_mask(root / "bottle" / "ground_truth" / "broken_large" / f"{name}_mask.png", empty=empty_images)
    for name in ["000", "001"]:
        write_image(root / "screw" / "train" / "good" / f"{name}.png", empty=empty_images)
    write_image(root / "screw" / "test" / "scratch" / "007.png", empty=empty_images)
    write_mask(root / "screw" / "ground_truth" / "scratch" / "007_mask.png", empty=empty_images)
    # Clutter every real download has: none of it is a sample.
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (root / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    (root / "bottle" / "train" / "good" / "._000.png").write_bytes(b"\0")
    (root / "bottle" / "readme.md").write_text("x")
    return root


def test_mvtec_counts_labels_and_masks(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    reader = MVTecReader(root)
    assert reader.categories() == ["bottle", "screw"]
    samples = list(reader.samples())
    assert tally(samples) == Counter({
        ("bottle", "train", "good"): 3,
        ("bottle", "test", "good"): 2,
        ("bottle", "test", "broken_large"): 2,
        ("screw", "train", "good"): 2,
        ("screw", "test", "scratch"): 1,
    })
    for sample in samples:
        if sample.is_anomalous:
            defect_folder = root / sample.category / "ground_truth" / sample.defect_type
            assert sample.mask_path == defect_folder / f"{sample.image_path.stem}_mask.png"
            assert sample.image_path.parent.name == sample.defect_type
        else:
            assert sample.mask_path is None
    assert len(list(reader.samples(split="train"))) == 5
    assert {s.split for s in reader.samples(split="test")} == {"test"}
    assert [s.image_path.name for s in reader.samples("test", category="screw")] == ["007.png"]
    assert reader.skipped == Counter()


def test_mvtec_accepts_a_single_category_folder(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    reader = MVTecReader(root / "screw")
    assert reader.categories() == ["screw"]
    assert len(list(reader.samples())) == 3


def test_mvtec_rejects_bad_arguments(tmp_path):
    reader = MVTecReader(make_mvtec(tmp_path / "mvtec"))
    with pytest.raises(ValueError, match="no category 'cable'.*bottle, screw"):
        reader.samples(category="cable")
    with pytest.raises(ValueError, match="split"):
        reader.samples(split="validation")
    with pytest.raises(DataError, match="does not exist"):
        MVTecReader(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="no MVTec-AD category"):
        MVTecReader(tmp_path / "plain").categories()


def test_mvtec_is_lazy_until_load_image(tmp_path, no_image_decoding):
    root = make_mvtec(tmp_path / "mvtec", empty_images=True)
    samples = MVTecReader(root).samples()
    assert iter(samples) is samples  # a generator, not a list built up front
    assert len(list(samples)) == 10


def test_mvtec_zero_byte_images_fail_only_when_loaded(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", empty_images=True)
    first = next(iter(MVTecReader(root).samples(split="train")))
    with pytest.raises(DataError, match=re.escape(str(first.image_path))):
        load_image(first.image_path)


def test_mvtec_missing_mask_is_an_error_naming_the_image(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    image = root / "bottle" / "test" / "broken_large" / "001.png"
    with pytest.raises(DataError, match=re.escape(str(image)) + ".*has no mask"):
        list(MVTecReader(root).samples())

    skipping = MVTecReader(root, skip_bad=True)
    samples = list(skipping.samples())
    assert len(samples) == 9 and image not in {s.image_path for s in samples}
    assert skipping.skipped == Counter({"missing mask": 1})
    assert str(image) in skipping.skipped_examples["missing mask"][0]
    # A second pass starts its own count.
    list(skipping.samples(split="train"))
    assert skipping.skipped == Counter()

    no_masks_needed = list(MVTecReader(root, require_masks=False).samples(category="bottle"))
    assert [s.mask_path for s in no_masks_needed if s.image_path == image] == [None]


def test_mvtec_accepts_mask_named_like_the_image(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    masks = root / "screw" / "ground_truth" / "scratch"
    (masks / "007_mask.png").rename(masks / "007.png")
    [sample] = MVTecReader(root).samples("test", category="screw")
    assert sample.mask_path == masks / "007.png"


def test_mvtec_empty_category_names_the_folder(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "cable" / "train" / "good").mkdir(parents=True)
    (root / "cable" / "test" / "cut").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(root / "cable")) + ": category folder contains no images"):
        list(MVTecReader(root).samples())
    skipping = MVTecReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 10
    assert skipping.skipped == Counter({"empty folder": 1})


# --------------------------------------------------------------------------------------------------
# VisA


VISA_COLUMNS = ["object", "split", "label", "image", "mask"]


def make_visa(root: Path, extra_rows: list[list[str]] = (), empty_images: bool = False) -> Path:
    """candle: 2 train normal, 1 test normal, 2 test anomaly; pcb1: 1 train normal, 1 test anomaly."""
    rows = []

    def add(obj, split, label, name):
        folder = "Normal" if label == "normal" else "Anomaly"
        image = f"{obj}/Data/Images/{folder}/{name}.JPG"
        write_image(root / image, empty=empty_images)
        mask = ""
        if label == "anomaly":
            mask = f"{obj}/Data/Masks/Anomaly/{name}.png"
            write_mask(root / mask, foreground=1, empty=empty_images)
        rows.append([obj, split, label, image, mask])

    add("candle", "train", "normal", "0000")
    add("candle", "train", "normal", "0001")
    add("candle", "test", "normal", "0002")
    add("candle", "test", "anomaly", "000")
    add("candle", "test", "anomaly", "001")
    add("pcb1", "train", "normal", "0000")
    add("pcb1", "test", "anomaly", "000")
    rows.extend(extra_rows)
    split_csv = root / "split_csv" / "1cls.csv"
    split_csv.parent.mkdir(parents=True, exist_ok=True)
    with split_csv.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(VISA_COLUMNS)
        writer.writerows(rows)
    with (root / "candle" / "image_anno.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label", "mask"])
        writer.writerow(
            ["candle/Data/Images/Anomaly/000.JPG", "chunk of wax missing", "candle/Data/Masks/Anomaly/000.png"]
        )
        writer.writerow(["candle/Data/Images/Normal/0000.JPG", "normal", ""])
    return root


def test_visa_counts_labels_masks_and_defect_names(tmp_path):
    root = make_visa(tmp_path / "visa")
    reader = open_dataset("visa", root)
    assert isinstance(reader, VisAReader)
    assert reader.categories() == ["candle", "pcb1"]
    samples = list(reader.samples())
    assert tally(samples) == Counter({
        ("candle", "train", "good"): 2,
        ("candle", "test", "good"): 1,
        ("candle", "test", "chunk_of_wax_missing"): 1,
        ("candle", "test", "anomaly"): 1,
        ("pcb1", "train", "good"): 1,
        ("pcb1", "test", "anomaly"): 1,
    })
    for sample in samples:
        assert sample.image_path.is_file() and sample.image_path.is_absolute()
        if sample.is_anomalous:
            masks = root / sample.category / "Data" / "Masks" / "Anomaly"
            assert sample.mask_path == masks / f"{sample.image_path.stem}.png"
            assert load_mask(sample.mask_path, IMAGE_SIZE).sum() == 4  # VisA's id 1 counts as defect
        else:
            assert sample.mask_path is None
    assert len(list(reader.samples("train", category="candle"))) == 2


def test_visa_is_lazy(tmp_path, no_image_decoding):
    root = make_visa(tmp_path / "visa", empty_images=True)
    assert len(list(VisAReader(root).samples())) == 7


def test_visa_row_with_missing_file_names_csv_line_and_path(tmp_path):
    missing = "pcb1/Data/Images/Normal/9999.JPG"
    root = make_visa(tmp_path / "visa", extra_rows=[["pcb1", "test", "normal", missing, ""]])
    split_csv = root / "split_csv" / "1cls.csv"
    # Header is line 1, the seven good rows are lines 2-8, the bad one is line 9.
    pattern = re.escape(f"{split_csv}:9") + ".*" + re.escape(str(root / missing)) + " does not exist"
    with pytest.raises(DataError, match=pattern):
        list(VisAReader(root).samples())
    skipping = VisAReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 7
    assert skipping.skipped == Counter({"missing file": 1})
    assert len(list(VisAReader(root, check_files=False).samples())) == 8


def test_visa_bad_rows(tmp_path):
    root = make_visa(
        tmp_path / "visa",
        extra_rows=[
            ["pcb1", "test", "defective", "pcb1/Data/Images/Anomaly/000.JPG", ""],
            ["pcb1", "test", "anomaly", "../../outside.JPG", ""],
            ["pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", ""],
        ],
    )
    split_csv = root / "split_csv" / "1cls.csv"
    with pytest.raises(DataError, match=re.escape(f"{split_csv}:9") + ": label 'defective'"):
        list(VisAReader(root).samples())
    skipping = VisAReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 7
    assert skipping.skipped == Counter({"invalid record": 1, "path escapes dataset root": 1, "missing mask": 1})
    [escape_message] = skipping.skipped_examples["path escapes dataset root"]
    assert re.search(re.escape(f"{split_csv}:10") + ".*escapes the dataset root", escape_message)
    assert f"{split_csv}:11" in skipping.skipped_examples["missing mask"][0]


def test_visa_split_file_without_required_columns(tmp_path):
    root = make_visa(tmp_path / "visa")
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DataError, match=r"1cls\.csv:1: missing column\(s\) label, mask"):
        VisAReader(root).categories()
    with pytest.raises(DataError, match="VisA split file does not exist"):
        VisAReader(root, split_csv="split_csv/2cls_fewshot.csv")


# --------------------------------------------------------------------------------------------------
# Real-IAD


def make_realiad(root: Path, json_folder: str = "realiad_jsons", test_items: list | None = None) -> Path:
    """audiojack: 2 train OK, test: 1 OK + 1 AK (pit) with mask + 1 HS (scratch) with mask."""
    images = root / "realiad_1024" / "audiojack"
    ok = [f"OK/S0001/audiojack_0001_OK_C{view}_20230922.jpg" for view in (1, 2, 3)]
    ng = ["NG/AK/S0101/audiojack_0101_NG_AK_C1_20230922.jpg", "NG/HS/S0102/audiojack_0102_NG_HS_C2_20230922.jpg"]
    for relative in ok + ng:
        write_image(images / relative)
    for relative in ng:
        write_mask(images / relative.replace(".jpg", "_mask.png"))

    def item(relative, anomaly_class, mask=None):
        return {"category": "audiojack", "anomaly_class": anomaly_class, "image_path": relative, "mask_path": mask}

    document = {
        "meta": {"prefix": "", "normal_class": "OK", "pre_transform": False},
        "train": [item(ok[0], "OK"), item(ok[1], "OK")],
        "test": test_items
        if test_items is not None
        else [item(ok[2], "OK")] + [item(r, r.split("/")[1], r.replace(".jpg", "_mask.png")) for r in ng],
    }
    json_file = root / json_folder / "audiojack.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(document, indent=1))
    return root


@pytest.mark.parametrize("json_folder", ["realiad_jsons", "realiad_jsons/realiad_jsons"])
def test_realiad_counts_defect_names_and_masks(tmp_path, json_folder, no_image_decoding):
    root = make_realiad(tmp_path / "Real-IAD", json_folder)
    reader = open_dataset("realiad", root)
    assert isinstance(reader, RealIADReader) and reader.categories() == ["audiojack"]
    samples = list(reader.samples())
    assert tally(samples) == Counter({
        ("audiojack", "train", "good"): 2,
        ("audiojack", "test", "good"): 1,
        ("audiojack", "test", "pit"): 1,
        ("audiojack", "test", "scratch"): 1,
    })
    for sample in samples:
        assert sample.image_path.is_relative_to(root / "realiad_1024" / "audiojack")
        if sample.is_anomalous:
            assert sample.mask_path == sample.image_path.with_name(sample.image_path.stem + "_mask.png")
        else:
            assert sample.mask_path is None


def test_realiad_accepts_paths_prefixed_with_the_category(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD")
    json_file = root / "realiad_jsons" / "audiojack.json"
    document = json.loads(json_file.read_text())
    for item in document["train"]:
        item["image_path"] = "audiojack/" + item["image_path"]
    json_file.write_text(json.dumps(document))
    train = list(RealIADReader(root).samples("train"))
    assert len(train) == 2 and all(s.image_path.is_file() for s in train)


def test_realiad_bad_items_name_json_file_and_index(tmp_path):
    root = make_realiad(
        tmp_path / "Real-IAD",
        test_items=[
            {"anomaly_class": "OK", "image_path": "OK/S0001/audiojack_0001_OK_C3_20230922.jpg", "mask_path": None},
            {"anomaly_class": "AK", "mask_path": None},
            {"anomaly_class": "AK", "image_path": "NG/AK/S0101/audiojack_0101_NG_AK_C1_20230922.jpg"},
            {"anomaly_class": "OK", "image_path": "OK/S0009/missing.jpg", "mask_path": None},
        ],
    )
    json_file = root / "realiad_jsons" / "audiojack.json"
    with pytest.raises(DataError, match=re.escape(f"{json_file} [test][1]: missing or empty 'image_path'")):
        list(RealIADReader(root).samples())
    skipping = RealIADReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 3
    assert skipping.skipped == Counter({"invalid record": 1, "missing mask": 1, "missing file": 1})
    assert "[test][3]" in skipping.skipped_examples["missing file"][0]


def test_realiad_malformed_json_names_line_and_column(tmp_path):
    root = make_realiad(tmp_path / "Real-IAD")
    json_file = root / "realiad_jsons" / "audiojack.json"
    json_file.write_text('{\n "train": [\n  {"image_path": "a.jpg",}\n ]\n}\n')
    with pytest.raises(DataError, match=re.escape(str(json_file)) + r":3:\d+: malformed JSON"):
        list(RealIADReader(root).samples())


def test_realiad_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no Real-IAD JSON files"):
        RealIADReader(tmp_path)
    root = make_realiad(tmp_path / "Real-IAD")
    pattern = re.escape(str(root / "realiad_256")) + ": Real-IAD image folder does not exist"
    with pytest.raises(DataError, match=pattern):
        RealIADReader(root, resolution=256)


# --------------------------------------------------------------------------------------------------
# meta.json (CLIP-based repos)


def meta_item(relative: str, defect: str, anomaly, category: str = "bottle", mask: str = "") -> dict:
    return {"img_path": relative, "mask_path": mask, "cls_name": category, "specie_name": defect, "anomaly": anomaly}


def make_meta(root: Path, extra_test_items: list | None = None, empty_images: bool = False) -> Path:
    """bottle: 2 train good, 1 test good, 1 test broken_large; pcb: 1 train good, 1 test missing."""

    def item(category, relative, defect, anomaly):
        write_image(root / relative, empty=empty_images)
        mask = ""
        if anomaly:
            mask = relative.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            write_mask(root / mask, empty=empty_images)
        return meta_item(relative, defect, anomaly, category, mask)

    document = {
        "train": {
            "bottle": [item("bottle", f"bottle/train/good/00{i}.png", "good", 0) for i in range(2)],
            "pcb": [item("pcb", "pcb/train/good/000.png", "good", 0)],
        },
        "test": {
            "bottle": [
                item("bottle", "bottle/test/good/000.png", "good", 0),
                item("bottle", "bottle/test/broken_large/000.png", "broken_large", 1),
            ]
            + list(extra_test_items or []),
            "pcb": [item("pcb", "pcb/test/missing/000.png", "missing", 1)],
        },
    }
    (root / "meta.json").write_text(json.dumps(document, indent=2))
    return root


def test_meta_json_counts_and_masks(tmp_path, no_image_decoding):
    root = make_meta(tmp_path / "mvtec_meta", empty_images=True)
    reader = open_dataset("meta", root)
    assert isinstance(reader, MetaJsonReader) and reader.categories() == ["bottle", "pcb"]
    samples = list(reader.samples())
    assert tally(samples) == Counter({
        ("bottle", "train", "good"): 2,
        ("bottle", "test", "good"): 1,
        ("bottle", "test", "broken_large"): 1,
        ("pcb", "train", "good"): 1,
        ("pcb", "test", "missing"): 1,
    })
    broken = next(s for s in samples if s.defect_type == "broken_large")
    assert broken.mask_path == root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    assert all(s.mask_path is None for s in samples if not s.is_anomalous)


def test_meta_json_bad_items(tmp_path):
    extra = [
        meta_item("bottle/test/good/404.png", "good", 0),  # missing file
        meta_item("bottle/test/crack/000.png", "crack", 1),  # anomalous, empty mask_path
        meta_item("../../../etc/passwd", "good", 0),  # escapes the root
        meta_item("bottle/test/good/000.png", "good", "no"),  # anomaly not 0/1
        meta_item("bottle/test/good/000.png", "good", 0, category="cable"),  # cls_name disagrees with its key
    ]
    root = make_meta(tmp_path / "m", extra_test_items=extra)
    write_image(root / "bottle" / "test" / "crack" / "000.png")
    meta = root / "meta.json"
    pattern = re.escape(f"{meta} [test][bottle][2]") + ".*" + re.escape(str(root / "bottle/test/good/404.png"))
    with pytest.raises(DataError, match=pattern):
        list(MetaJsonReader(root).samples())
    skipping = MetaJsonReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 6  # the six good items of make_meta; all five extras are bad
    assert skipping.skipped == Counter(
        {"missing file": 1, "missing mask": 1, "path escapes dataset root": 1, "invalid record": 2}
    )
    lenient = MetaJsonReader(root, skip_bad=True, require_masks=False)
    crack = [s for s in lenient.samples() if s.defect_type == "crack"]
    assert len(crack) == 1 and crack[0].mask_path is None


def test_meta_json_malformed_file(tmp_path):
    (tmp_path / "meta.json").write_text('{"train": {"bottle": [}\n')
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "meta.json")) + r":1:\d+: malformed JSON"):
        MetaJsonReader(tmp_path)
    (tmp_path / "meta.json").write_text('{"train": ["x"]}')
    with pytest.raises(DataError, match="must map class names"):
        MetaJsonReader(tmp_path)


# --------------------------------------------------------------------------------------------------
# Plain folder


def make_parts(root: Path, empty_images: bool = False) -> Path:
    """widget (test only): 3 good, 2 scratch (one masked), 1 dent; gadget: 2 train, 1 good, 1 crack."""
    for name in ["a", "b", "c"]:
        write_image(root / "widget" / "good" / f"{name}.jpg", empty=empty_images)
    write_image(root / "widget" / "scratch" / "s1.jpg", empty=empty_images)
    write_image(root / "widget" / "scratch" / "s2.jpg", empty=empty_images)
    write_mask(root / "widget" / "masks" / "scratch" / "s1.png", empty=empty_images)
    write_mask(root / "widget" / "masks" / "scratch" / "s10.png", empty=empty_images)  # not s1's mask's twin
    write_image(root / "widget" / "dent" / "d1.png", empty=empty_images)
    write_image(root / "gadget" / "train" / "good" / "t1.png", empty=empty_images)
    write_image(root / "gadget" / "train" / "good" / "t2.png", empty=empty_images)
    write_image(root / "gadget" / "good" / "g1.png", empty=empty_images)
    write_image(root / "gadget" / "crack" / "c1.png", empty=empty_images)
    write_mask(root / "gadget" / "masks" / "crack" / "c1_mask.png", empty=empty_images)
    (root / "widget" / "notes.txt").write_text("loose files are ignored")
    return root


def test_folder_counts_splits_and_optional_masks(tmp_path):
    root = make_parts(tmp_path / "parts")
    reader = open_dataset("folder", root)
    assert isinstance(reader, FolderReader) and reader.categories() == ["gadget", "widget"]
    samples = list(reader.samples())
    assert tally(samples) == Counter({
        ("gadget", "train", "good"): 2,
        ("gadget", "test", "good"): 1,
        ("gadget", "test", "crack"): 1,
        ("widget", "test", "good"): 3,
        ("widget", "test", "scratch"): 2,
        ("widget", "test", "dent"): 1,
    })
    masks = {s.image_path.name: s.mask_path for s in samples if s.is_anomalous}
    assert masks == {
        "c1.png": root / "gadget" / "masks" / "crack" / "c1_mask.png",
        "s1.jpg": root / "widget" / "masks" / "scratch" / "s1.png",
        "s2.jpg": None,
        "d1.png": None,
    }
    assert list(reader.samples(split="train", category="widget")) == []
    strict = FolderReader(root, require_masks=True, skip_bad=True)
    assert len(list(strict.samples())) == 8 and strict.skipped == Counter({"missing mask": 2})
    with pytest.raises(DataError, match=re.escape(str(root / "widget" / "dent" / "d1.png")) + ".*has no mask"):
        list(FolderReader(root, require_masks=True).samples(category="widget"))


def test_folder_is_lazy_and_accepts_a_single_category(tmp_path, no_image_decoding):
    root = make_parts(tmp_path / "parts", empty_images=True)
    assert len(list(FolderReader(root).samples())) == 10
    single = FolderReader(root / "widget")
    assert single.categories() == ["widget"] and len(list(single.samples())) == 6


def test_folder_empty_category_names_the_folder(tmp_path):
    root = make_parts(tmp_path / "parts")
    (root / "sprocket" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(root / "sprocket")) + ": category folder contains no images"):
        list(FolderReader(root).samples())
    skipping = FolderReader(root, skip_bad=True)
    assert len(list(skipping.samples())) == 10
    assert skipping.skipped == Counter({"empty folder": 1})


def test_folder_refuses_an_mvtec_tree(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(DataError, match="kind='mvtec'"):
        list(FolderReader(root).samples())


def test_open_dataset_lists_allowed_kinds(tmp_path):
    with pytest.raises(DataError, match="unknown dataset kind 'coco'.*mvtec, visa, realiad, meta, folder"):
        open_dataset("coco", tmp_path)
    assert isinstance(open_dataset("MVTec", make_mvtec(tmp_path / "m")), MVTecReader)


# --------------------------------------------------------------------------------------------------
# LLaVA-style conversations


def chat(*texts: str) -> list[dict]:
    """LLaVA turns alternating human/gpt."""
    return [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(texts)]


def llava_records() -> list[dict]:
    return [
        {
            "id": "single",
            "image": "mvtec/bottle/000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs there a defect?"},
                {"from": "gpt", "value": "Yes, a crack at the rim."},
                {"from": "human", "value": "Where?"},
                {"from": "gpt", "value": "Top left."},
            ],
        },
        {
            "id": 7,
            "image": ["mvtec/bottle/001.png", "mvtec/bottle/002.png"],
            "conversations": [
                {"from": "human", "value": "<image> is normal. Compare with <image>."},
                {"from": "gpt", "value": "The second is scratched."},
            ],
        },
        {"id": "text-only", "conversations": chat("What is a burr?", "A ridge.")},
    ]


@pytest.fixture()
def instruct_root(tmp_path):
    images = tmp_path / "images"
    for name in ["000", "001", "002"]:
        write_image(images / "mvtec" / "bottle" / f"{name}.png", empty=True)
    return images


def write_jsonl(path: Path, records: list, broken_line: int | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    if broken_line is not None:
        lines.insert(broken_line - 1, '{"id": "broken", "conversations": [')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_llava_jsonl_and_json_array_give_the_same_conversations(tmp_path, instruct_root, no_image_decoding):
    jsonl = write_jsonl(tmp_path / "instruct.jsonl", llava_records())
    array = tmp_path / "instruct.json"
    array.write_text(json.dumps(llava_records(), indent=2))
    from_jsonl = list(LLaVAConversationReader(jsonl, image_root=instruct_root))
    from_array = list(LLaVAConversationReader(array, image_root=instruct_root).conversations())
    for conversations in (from_jsonl, from_array):
        assert [c.record_id for c in conversations] == ["single", "7", "text-only"]
        assert all(isinstance(c, Conversation) for c in conversations)
        assert conversations[0].images == (instruct_root / "mvtec" / "bottle" / "000.png",)
        assert [t.role for t in conversations[0].turns] == ["human", "gpt", "human", "gpt"]
        assert conversations[0].turns[1].text == "Yes, a crack at the rim."
        assert len(conversations[1].images) == 2 and conversations[1].placeholder_count == 2
        assert conversations[2].images == ()
    assert [c.source for c in from_jsonl] == [f"{jsonl}:1", f"{jsonl}:2", f"{jsonl}:3"]
    # Array records know the line they start on, too.
    item_starts = [number for number, line in enumerate(array.read_text().splitlines(), start=1) if line == "  {"]
    assert [c.source for c in from_array] == [f"{array}:{line} (item {i})" for i, line in enumerate(item_starts)]


def test_llava_malformed_json_line_names_file_and_line(tmp_path, instruct_root):
    jsonl = write_jsonl(tmp_path / "instruct.jsonl", llava_records(), broken_line=2)
    with pytest.raises(DataError, match=re.escape(f"{jsonl}:2: malformed JSON line")):
        list(LLaVAConversationReader(jsonl, image_root=instruct_root).conversations())
    skipping = LLaVAConversationReader(jsonl, image_root=instruct_root, skip_bad=True)
    assert [c.source for c in skipping.conversations()] == [f"{jsonl}:1", f"{jsonl}:3", f"{jsonl}:4"]
    assert skipping.skipped == Counter({"malformed JSON": 1})

    array = tmp_path / "broken.json"
    array.write_text(
        '[\n {"id": 1, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},\n'
        ' {"id": 2,, }\n]\n'
    )
    with pytest.raises(DataError, match=re.escape(str(array)) + r":3:\d+: malformed JSON"):
        list(LLaVAConversationReader(array, image_root=instruct_root).conversations())


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": 1, "conversations": [{"from": "gpt", "value": "Yes"}]}, r"turn 0 must be \{'from': 'human'"),
        (
            {"id": 1, "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "turn 1 must be .*'gpt'",
        ),
        ({"id": 1, "conversations": [{"from": "human", "value": "Any defect?"}]}, "no answer"),
        (
            {"id": 1, "image": "mvtec/bottle/000.png", "conversations": chat("<image><image>", "No")},
            "2 <image> placeholder",
        ),
        ({"id": 1, "conversations": "hello"}, "'conversations' must be a non-empty list"),
        (
            {"id": 1, "image": "../../secret.png", "conversations": chat("<image>", "No")},
            "escapes the dataset root",
        ),
        (
            {"id": 1, "image": "mvtec/bottle/404.png", "conversations": chat("<image>", "No")},
            "404.png does not exist",
        ),
    ],
)
def test_llava_invalid_records_name_file_and_line(tmp_path, instruct_root, record, message):
    jsonl = write_jsonl(tmp_path / "instruct.jsonl", llava_records()[:1] + [record])
    with pytest.raises(DataError, match=re.escape(f"{jsonl}:2") + ".*" + message):
        list(LLaVAConversationReader(jsonl, image_root=instruct_root).conversations())


def test_llava_check_files_can_be_turned_off(tmp_path, instruct_root):
    record = {"id": 1, "image": "elsewhere/9.png", "conversations": chat("<image>", "No")}
    jsonl = write_jsonl(tmp_path / "instruct.jsonl", [record])
    [conversation] = LLaVAConversationReader(jsonl, image_root=instruct_root, check_files=False).conversations()
    assert conversation.images == (instruct_root / "elsewhere" / "9.png",)


# --------------------------------------------------------------------------------------------------
# VisA-D&R


def test_visa_dr_detection_and_reasoning_items(tmp_path, instruct_root):
    records = [
        {"image": "mvtec/bottle/000.png", "anomaly": True, "category": "bottle"},
        {"image": "mvtec/bottle/001.png", "anomaly": 0},
        {
            "image": "mvtec/bottle/002.png",
            "questions": ["Is there a defect?", "Describe it."],
            "answers": ["Yes.", "A crack near the rim."],
            "anomaly": True,
        },
        {"image": "mvtec/bottle/000.png", "questions": ["What is shown?"]},
    ]
    path = tmp_path / "visa_dr.json"
    path.write_text(json.dumps(records))
    reader = VisaDRReader(path, image_root=instruct_root)
    items = list(reader.items())
    assert [type(i) for i in items] == [DetectionItem, DetectionItem, ReasoningItem, ReasoningItem]
    assert [i.is_anomalous for i in reader.detection_items()] == [True, False]
    assert items[0].category == "bottle" and items[1].category is None
    reasoning = list(reader.reasoning_items())
    assert reasoning[0].answers == ("Yes.", "A crack near the rim.") and reasoning[0].is_anomalous is True
    assert reasoning[1].answers == () and reasoning[1].is_anomalous is None
    assert reasoning[0].image == instruct_root / "mvtec" / "bottle" / "002.png"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"image": "mvtec/bottle/000.png", "questions": ["a", "b"], "answers": ["x"]}, "2 questions but 1 answers"),
        ({"image": "mvtec/bottle/000.png", "anomaly": "yes"}, "'anomaly' must be true/false"),
        ({"image": "mvtec/bottle/000.png"}, "neither a detection item"),
        ({"anomaly": False}, "image path must be a non-empty string"),
    ],
)
def test_visa_dr_invalid_items(tmp_path, instruct_root, record, message):
    path = write_jsonl(tmp_path / "visa_dr.jsonl", [{"image": "mvtec/bottle/000.png", "anomaly": False}, record])
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*" + message):
        list(VisaDRReader(path, image_root=instruct_root).items())
    skipping = VisaDRReader(path, image_root=instruct_root, skip_bad=True)
    assert len(list(skipping.items())) == 1 and skipping.skipped == Counter({"invalid record": 1})


# --------------------------------------------------------------------------------------------------
# MMAD


def mmad_document() -> dict:
    return {
        "mvtec/bottle/000.png": {
            "image_path": "mvtec/bottle/000.png",
            "mask_path": "mvtec/bottle/000_mask.png",
            "similar_templates": ["mvtec/bottle/001.png"],
            "random_templates": ["mvtec/bottle/002.png", "mvtec/bottle/001.png"],
            "conversation": [
                {
                    "Question": "Is there any defect in the object?",
                    "Answer": "A",
                    "Options": {"A": "Yes.", "B": "No."},
                    "type": "Anomaly Detection",
                },
                {
                    "Question": "What kind of defect?",
                    "Answer": "C",
                    "Options": ["Scratch.", "Dent.", "Crack."],  # a list: lettered A, B, C
                    "type": "Defect Classification",
                },
            ],
        },
        "mvtec/bottle/001.png": {
            "mask_path": "",
            "similar_templates": [],
            "random_templates": [],
            "conversation": [{"Question": "Is there any defect?", "Answer": "B", "Options": {"A": "Yes.", "B": "No."}}],
        },
    }


def test_mmad_items(tmp_path, instruct_root, no_image_decoding):
    write_mask(instruct_root / "mvtec" / "bottle" / "000_mask.png", empty=True)
    path = tmp_path / "mmad.json"
    path.write_text(json.dumps(mmad_document(), indent=2))
    items = list(MMADReader(path, image_root=instruct_root).items())
    assert len(items) == 2
    first, second = items
    bottle = instruct_root / "mvtec" / "bottle"
    assert first.image == bottle / "000.png" and first.mask == bottle / "000_mask.png"
    assert first.similar_templates == (bottle / "001.png",)
    assert first.random_templates == (bottle / "002.png", bottle / "001.png")
    assert [q.question_type for q in first.questions] == ["Anomaly Detection", "Defect Classification"]
    assert first.questions[0].answer_text == "Yes."
    assert first.questions[1].options == (("A", "Scratch."), ("B", "Dent."), ("C", "Crack."))
    assert first.questions[1].answer_text == "Crack."
    assert second.mask is None and second.questions[0].question_type == "unspecified"
    assert first.source.startswith(f"{path}:2 ")


def test_mmad_invalid_items_name_file_key_and_question(tmp_path, instruct_root):
    document = mmad_document()
    document["mvtec/bottle/001.png"]["conversation"][0]["Answer"] = "E"
    document["mvtec/bottle/000.png"]["mask_path"] = ""
    path = tmp_path / "mmad.json"
    path.write_text(json.dumps(document, indent=2))
    pattern = (
        re.escape(f"{path}:")
        + r"\d+ \['mvtec/bottle/001.png'\] question 0: 'Answer' 'E' is not one of the options A, B"
    )
    with pytest.raises(DataError, match=pattern):
        list(MMADReader(path, image_root=instruct_root).items())
    skipping = MMADReader(path, image_root=instruct_root, skip_bad=True)
    assert len(list(skipping.items())) == 1 and skipping.skipped == Counter({"invalid record": 1})

    document = mmad_document()
    document["mvtec/bottle/000.png"]["similar_templates"] = ["/etc/hostname"]
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"\['mvtec/bottle/000.png'\].*'/etc/hostname' escapes the dataset root"):
        list(MMADReader(path, image_root=instruct_root).items())

    path.write_text('{"a.png": {"conversation": []}\n "b.png": {}}')
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*'conversation' must be a non-empty list"):
        list(MMADReader(path, image_root=instruct_root).items())
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON")):
        list(MMADReader(path, image_root=instruct_root, skip_bad=True).items())
