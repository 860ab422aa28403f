"""The detection benchmark end to end on a synthetic MVTec-layout dataset: results, manifest replay,
resume after an interruption, bad input, the folder layout, and 2 processes under accelerate."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iadgpt.data.samples import DataError
from iadgpt.evaluation.detection import (
    DetectionSettings,
    DetectionSetupError,
    draw_references,
    plan_benchmark,
    run_detection,
)
from iadgpt.evaluation.metrics import METRIC_NAMES
from synthetic_mvtec import write_folder_dataset, write_mvtec

REPO = Path(__file__).resolve().parents[2]
RUNS = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
QUERIES_PER_RUN = 12  # 2 categories x (3 good + 3 scratch)


class CountingInspector:
    """The real Inspector, counting the queries it scores; `fail_after_calls` simulates a Ctrl-C."""

    def __init__(self, inspector, fail_after_calls: int | None = None):
        self.inspector, self.fail_after_calls = inspector, fail_after_calls
        self.calls = self.queries = 0

    def inspect(self, queries, normals, **kwargs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt
        self.calls += 1
        self.queries += len(queries)
        return self.inspector.inspect(queries, normals, **kwargs)


def settings(model, root, out, **overrides) -> DetectionSettings:
    values = dict(model=str(model), dataset="mvtec", root=str(root), out=str(out), shots=[0, 1, 2], seeds=2,
                  batch_size=4, map_size=128)  # 128, not the default 256: a quicker evaluation
    values.update(overrides)
    return DetectionSettings(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs as fast on one thread, and does not crawl when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inspector(tiny_checkpoint):
    from iadgpt.inspection import Inspector

    return Inspector.from_pretrained(tiny_checkpoint, batch_size=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def baseline(tiny_checkpoint, dataset, inspector, tmp_path_factory):
    """One complete run: shots 0 1 2, two seeds, nothing cached."""
    out = tmp_path_factory.mktemp("baseline")
    counter = CountingInspector(inspector)
    results = run_detection(settings(tiny_checkpoint, dataset, out), inspector=counter)
    return out, results, counter


def cache_lines(out: Path) -> int:
    return sum(len(path.read_text().splitlines()) for path in (out / "cache").glob("*.jsonl"))


def assert_results_close(a: dict, b: dict, tolerance: float, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_results_close(a[key], b[key], tolerance, f"{where}/{key}")
    elif a is not None:
        assert a == pytest.approx(b, abs=tolerance), where


# -- a complete run -------------------------------------------------------------------------------
def test_results_json_has_the_promised_shape_and_values_in_range(baseline):
    out, results, counter = baseline
    document = json.loads((out / "results.json").read_text())
    assert list(document) == ["k"] and list(document["k"]) == ["0", "1", "2"]
    for k, entry in document["k"].items():
        assert set(entry) == {"categories", "mean"} and set(entry["categories"]) == {"disc", "tile"}
        for summary in [*entry["categories"].values(), entry["mean"]]:
            assert list(summary) == list(METRIC_NAMES)
            for cell in summary.values():
                assert set(cell) == {"mean", "std"}
                assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] >= 0.0
                if k == "0":
                    assert cell["std"] == 0.0  # one deterministic run
        for metric in METRIC_NAMES:  # the mean row is the mean over categories
            categories = [entry["categories"][name][metric]["mean"] for name in ("disc", "tile")]
            assert entry["mean"][metric]["mean"] == pytest.approx(np.mean(categories))
    # One forward pass per query of every run, batched.
    assert counter.queries == len(RUNS) * QUERIES_PER_RUN
    assert counter.calls == len(RUNS) * 2 * 2  # per run and category: 6 queries = batches of 4 + 2


def test_reports_manifest_overlays_and_plots_are_written(baseline, dataset, tiny_checkpoint):
    from iadgpt.model.checkpoint import load_processor, pixel_limits

    out, _, _ = baseline
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("k,category,image_auroc_mean,image_auroc_std") and len(rows) == 1 + 3 * 3
    markdown = (out / "results.md").read_text()
    assert "| Category | 0-shot I-AUROC | 0-shot P-AUROC | 1-shot I-AUROC" in markdown
    assert "| disc |" in markdown and "| tile |" in markdown and "| **Mean** |" in markdown
    # The protocol note states this run's draw, resolution, normalisation and AUPRO definition.
    protocol = markdown[markdown.index("## Protocol"):]
    low, high = pixel_limits(load_processor(tiny_checkpoint))
    assert "k normal images drawn without replacement from the category's train split" in protocol
    assert f"between {low} and {high} pixels" in protocol and "upsampled bilinearly to 128 px on the long" in protocol
    assert "min-max normalised together" in protocol
    assert "8-connected components" in protocol and "from 0 to FPR 0.3" in protocol and "divided by 0.3" in protocol
    for category in ("disc", "tile"):
        overlays = sorted((out / "overlays" / category).glob("k2_seed0_*.png"))
        assert len(overlays) == 4
        assert Image.open(overlays[0]).size == (3 * 112, 84 + 16)
    for k in (0, 1, 2):
        for kind in ("roc", "pro"):
            assert Image.open(out / "plots" / f"{kind}_k{k}.png").size == (720, 560)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == {"kind": "mvtec", "root": str(dataset)}
    for category, entry in manifest["categories"].items():
        assert entry["reference_split"] == "train" and len(entry["queries"]) == 6
        assert entry["references"]["0"] == {"0": []}
        for k in ("1", "2"):
            assert list(entry["references"][k]) == ["0", "1"]
            for refs in entry["references"][k].values():
                assert len(set(refs)) == int(k)
                assert all(ref.startswith(f"{category}/train/good/") for ref in refs)


# -- reproducibility --------------------------------------------------------------------------------
def test_the_same_manifest_gives_identical_results(baseline, tiny_checkpoint, dataset, inspector, tmp_path):
    out, _, _ = baseline
    # Shots and seeds given on the command line are overridden by the manifest.
    replay = settings(tiny_checkpoint, dataset, tmp_path, manifest=str(out / "manifest.json"), shots=[4], seeds=1)
    run_detection(replay, inspector=CountingInspector(inspector))
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()
    assert (tmp_path / "manifest.json").read_text() == (out / "manifest.json").read_text()
    assert f"replayed from the manifest {out / 'manifest.json'}" in (tmp_path / "results.md").read_text()


def test_reference_draws_are_fixed_by_seed(tiny_checkpoint, dataset, tmp_path):
    first = plan_benchmark(settings(tiny_checkpoint, dataset, tmp_path)).manifest()
    again = plan_benchmark(settings(tiny_checkpoint, dataset, tmp_path)).manifest()
    assert first == again
    normals = plan_benchmark(settings(tiny_checkpoint, dataset, tmp_path, shots=[0])).categories["disc"].queries
    draws = {tuple(s.image_path for s in draw_references(normals, 2, seed, "disc")) for seed in range(10)}
    assert len(draws) > 1  # the seed matters


def test_a_query_cap_keeps_both_classes_and_the_same_queries_for_every_run(tiny_checkpoint, dataset, tmp_path):
    plan = plan_benchmark(settings(tiny_checkpoint, dataset, tmp_path, max_queries_per_category=3))
    for category in plan.categories.values():
        labels = [sample.is_anomalous for sample in category.queries]
        assert len(labels) == 3 and any(labels) and not all(labels)
        assert all(category.run_queries(*run) == category.queries for run in plan.runs())


# -- resume ------------------------------------------------------------------------------------------
def test_an_interrupted_run_resumes_without_scoring_finished_queries(baseline, tiny_checkpoint, dataset, inspector,
                                                                      tmp_path):
    run = settings(tiny_checkpoint, dataset, tmp_path)
    with pytest.raises(KeyboardInterrupt):  # after 7 batches: run (0, 0) complete, 10 queries of run (1, 0)
        run_detection(run, inspector=CountingInspector(inspector, fail_after_calls=7))
    assert cache_lines(tmp_path) == 12 + 10
    assert not (tmp_path / "results.json").exists()
    with (tmp_path / "cache" / "k1_seed0.rank0.jsonl").open("a") as stream:
        stream.write('{"query": "tile/test/go')  # a line torn by a kill mid-write

    resumed = CountingInspector(inspector)
    results = run_detection(run, inspector=resumed)
    assert resumed.queries == len(RUNS) * QUERIES_PER_RUN - 22
    assert_results_close(results, baseline[1], tolerance=1e-6)

    finished = CountingInspector(inspector)
    assert run_detection(run, inspector=finished) == results
    assert finished.queries == 0


def test_the_cache_is_keyed_by_the_model_files_the_root_and_each_image_file(tiny_checkpoint, dataset, inspector,
                                                                             tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    run = settings(model, dataset, tmp_path / "out", shots=[1], seeds=1)

    def scored(run_settings=run) -> int:
        counter = CountingInspector(inspector)
        run_detection(run_settings, inspector=counter)
        return counter.queries

    assert scored() == QUERIES_PER_RUN
    assert scored() == 0
    # New weights at the same path: nothing is reused.
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert scored() == QUERIES_PER_RUN
    # So are other IADGPT settings in config.json.
    config = json.loads((model / "config.json").read_text())
    config["iadgpt"]["exemplar_retention"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    assert scored() == QUERIES_PER_RUN
    assert scored() == 0
    # The same relative paths under another root are other images.
    other_root = tmp_path / "copy"
    shutil.copytree(dataset, other_root)
    assert scored(settings(model, other_root, tmp_path / "out", shots=[1], seeds=1)) == QUERIES_PER_RUN
    # An edited query is scored again, alone; an edited reference re-scores its category.
    query = next((other_root / "disc" / "test" / "good").glob("*.png"))
    os.utime(query, ns=(query.stat().st_atime_ns, query.stat().st_mtime_ns + 10**9))
    assert scored(settings(model, other_root, tmp_path / "out", shots=[1], seeds=1)) == 1
    plan = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reference = other_root / plan["categories"]["tile"]["references"]["1"]["0"][0]
    os.utime(reference, ns=(reference.stat().st_atime_ns, reference.stat().st_mtime_ns + 10**9))
    assert scored(settings(model, other_root, tmp_path / "out", shots=[1], seeds=1)) == QUERIES_PER_RUN // 2


# -- datasets without a train split --------------------------------------------------------------------
def test_folder_layout_draws_references_from_test_normals_and_does_not_score_them(tiny_checkpoint, inspector,
                                                                                  tmp_path):
    root = write_folder_dataset(tmp_path / "parts")
    run = settings(tiny_checkpoint, root, tmp_path / "out", dataset="folder", shots=[0, 2])
    plan = plan_benchmark(run)
    widget = plan.categories["widget"]
    assert widget.reference_split == "test" and len(widget.queries) == 7
    assert len(widget.run_queries(0, 0)) == 7
    for seed in (0, 1):
        references = widget.references[2][seed]
        assert all(not s.is_anomalous and s.split == "test" for s in references)
        assert set(widget.run_queries(2, seed)) == set(widget.queries) - set(references)
    counter = CountingInspector(inspector)
    results = run_detection(run, inspector=counter)
    assert counter.queries == 7 + 5 + 5
    assert 0.0 <= results["k"]["2"]["mean"]["image_auroc"]["mean"] <= 1.0
    # All 5 normals as references would leave no normal query to score.
    with pytest.raises(DetectionSetupError, match="5-shot needs 5 normal reference images and one normal query "
                                                  "besides them, but its test split has only 5"):
        plan_benchmark(settings(tiny_checkpoint, root, tmp_path / "out", dataset="folder", shots=[5]))


# -- bad input -----------------------------------------------------------------------------------------
@pytest.fixture()
def fresh_dataset(tmp_path):
    return write_mvtec(tmp_path / "data", train=2, test_good=2, defects=2)


def run_expecting(error_type, match, run_settings, inspector):
    counter = CountingInspector(inspector)
    with pytest.raises(error_type, match=match):
        run_detection(run_settings, inspector=counter)
    return counter


def test_too_few_normals_for_k_names_category_k_and_count(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    counter = run_expecting(DetectionSetupError, r"category 'disc': 3-shot needs 3 normal reference images, but its "
                            r"train split has only 2 \(.*disc/train/good\)",
                            settings(tiny_checkpoint, fresh_dataset, tmp_path / "out", shots=[1, 3]), inspector)
    assert counter.queries == 0


def test_an_unreadable_image_is_named_before_any_scoring(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    bad = fresh_dataset / "tile" / "test" / "good" / "001.png"
    bad.write_bytes(b"this is not a PNG")
    counter = run_expecting(DataError, re.escape(f"{bad}: not a readable image"),
                            settings(tiny_checkpoint, fresh_dataset, tmp_path / "out"), inspector)
    assert counter.queries == 0


def test_a_truncated_image_stops_the_run_keeping_finished_work(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    bad = fresh_dataset / "tile" / "test" / "scratch" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header reads, the pixels do not
    out = tmp_path / "out"
    run_expecting(DataError, re.escape(f"{bad}: cannot decode image"), settings(tiny_checkpoint, fresh_dataset, out),
                  inspector)
    assert cache_lines(out) == 4  # the disc queries of the first run, scored before tile's batch failed


def test_a_missing_mask_is_named(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    (fresh_dataset / "disc" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    image = fresh_dataset / "disc" / "test" / "scratch" / "001.png"
    run_expecting(DataError, re.escape(f"{image}: anomalous test image has no mask"),
                  settings(tiny_checkpoint, fresh_dataset, tmp_path / "out"), inspector)


def test_a_mask_of_the_wrong_size_is_named(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    mask = fresh_dataset / "tile" / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (50, 40)).save(mask)
    run_expecting(DataError, re.escape(str(mask)) + r": mask size 50x40 .* differs from its image's 112x84",
                  settings(tiny_checkpoint, fresh_dataset, tmp_path / "out"), inspector)


def test_an_empty_dataset_is_named(tiny_checkpoint, inspector, tmp_path):
    (tmp_path / "empty").mkdir()
    run_expecting(DataError, re.escape(f"{tmp_path / 'empty'}: no MVTec-AD category folders"),
                  settings(tiny_checkpoint, tmp_path / "empty", tmp_path / "out"), inspector)


def test_a_malformed_manifest_is_named(tiny_checkpoint, fresh_dataset, inspector, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"format": "iadgpt-detection-manifest/1",\n "categories": {')
    run_expecting(DataError, re.escape(f"{manifest}:2:") + ".*malformed JSON",
                  settings(tiny_checkpoint, fresh_dataset, tmp_path / "out", manifest=str(manifest)), inspector)


def test_a_folder_that_is_not_a_qwen_checkpoint_is_named_by_the_recipe(fresh_dataset, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("detection_recipe", REPO / "eval" / "detection.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    not_qwen = tmp_path / "bert"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for model, message in ((not_qwen, f"{not_qwen} holds a 'bert' model"),
                           (tmp_path / "missing", f"Model folder {tmp_path / 'missing'} does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            recipe.main(["--model", str(model), "--dataset", "mvtec", "--root", str(fresh_dataset),
                         "--out", str(tmp_path / "out")])
        assert str(exit_info.value).startswith("detection.py: ") and message in str(exit_info.value)


# -- several processes -----------------------------------------------------------------------------------
def test_two_cpu_processes_under_accelerate_launch_match_one_process(baseline, tiny_checkpoint, dataset, tmp_path):
    out, results, _ = baseline
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(REPO / "eval" / "detection.py"), "--model", str(tiny_checkpoint), "--dataset", "mvtec",
               "--root", str(dataset), "--manifest", str(out / "manifest.json"), "--map-size", "128",
               "--out", str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "2 process(es)" in finished.stdout
    for run in RUNS:  # both ranks scored a share of every run
        for rank in (0, 1):
            assert (tmp_path / "cache" / f"k{run[0]}_seed{run[1]}.rank{rank}.jsonl").stat().st_size > 0
    assert_results_close(json.loads((tmp_path / "results.json").read_text()), json.loads(
        (out / "results.json").read_text()), tolerance=1e-6)
