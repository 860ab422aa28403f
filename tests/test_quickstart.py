"""The quickstart end to end at test size (tiny preset, a tiny factory, seconds of training): the
report's structure, that training moved the model (losses; in-context AUROC above the random
model's), resuming, and the refusals of bad input.

The full-length run (`iadgpt quickstart`, 15 minutes, small preset) is a benchmark, not a test.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from iadgpt.quickstart import (
    BudgetTooShortError,
    QuickstartError,
    QuickstartSettings,
    prepare_output,
    read_losses,
    run_quickstart,
)

SHOTS = (0, 2)


def test_size_settings(**changes) -> QuickstartSettings:
    """A whole quickstart in about a minute: 9 training and 3 held-out categories at 64 px.

    Fixed step counts, not fitted to the minutes: a busy CI machine trains the same steps as an idle
    one (a run fitted to its minutes trained 400 stage-3 steps instead of 640 under load and learned
    nothing measurable)."""
    values = dict(
        minutes=2.0, preset="tiny", image_size=64, train_categories=9, train_normals=5, train_test_normals=1,
        in_context_categories=3, in_context_anomalies_per_kind=1,
        held_out_categories=3, held_out_train_normals=4, held_out_test_normals=3, held_out_anomalies_per_kind=1,
        stage1_records=40, stage2_records=24, stage3_records=300, shots=SHOTS, seeds=1,
        learning_rates=(2e-3, 2e-3, 2e-3), batch_size=4, stage_steps=(150, 60, 400))
    values.update(changes)
    return QuickstartSettings(**values)


test_size_settings.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    messages: list[str] = []
    report = run_quickstart(out, test_size_settings(), say=messages.append)
    return out, report, messages


def test_report_has_every_k_method_and_metric(finished_run):
    out, report, _ = finished_run
    assert report == json.loads((out / "report.json").read_text())
    assert set(report) == {"k", "minutes", "by_defect", "paired"}
    assert sorted(report["k"]) == [str(k) for k in SHOTS]
    for k in report["k"].values():
        assert set(k) == {"model", "baseline"}
        for metrics in k.values():
            assert set(metrics) == {"image_auroc_local", "image_auroc_in_context", "pixel_auroc"}
            assert all(value is None or 0.0 <= value <= 1.0 for value in metrics.values())
    # Without references the baseline has nothing to compare with: chance, by construction.
    assert report["k"]["0"]["baseline"]["image_auroc_local"] == 0.5
    assert 0 < report["minutes"] < 5
    for name in ("report.md", "chat.md", "chat_query.png", "eval/model/manifest.json", "eval/baseline/results.json",
                 "configs/stage3.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "eval" / "model" / "overlays").rglob("*.png"))
    assert "| k | model: in-context image AUROC" in (out / "report.md").read_text()


def test_report_breaks_local_defects_down_by_type(finished_run):
    """Every local defect type of the held-out queries has its row, for the model and the baseline.
    The factory gives every category the same number of images of each type, and the types share
    the normal images, so the kind's image AUROC is exactly the mean of the types' (a type scored
    with another's images, or with the wrong normals, breaks the equality)."""
    out, report, _ = finished_run
    items = [json.loads(line) for line in (out / "data" / "held_out" / "images.jsonl").read_text().splitlines()]
    types = {item["defect"] for item in items if item["defect_class"] == "local" and item["split"] == "test"}
    assert len(types) >= 5
    assert sorted(report["by_defect"]) == ["2"]  # the targets' k only (the types cost time)
    for method in ("model", "baseline"):
        by_type = report["by_defect"]["2"][method]
        assert set(by_type) == types
        assert all(set(v) == {"image_auroc", "pixel_auroc"} for v in by_type.values())
        assert all(0.0 <= v["pixel_auroc"] <= 1.0 for v in by_type.values())
        mean_of_types = sum(v["image_auroc"] for v in by_type.values()) / len(by_type)
        assert mean_of_types == pytest.approx(report["k"]["2"][method]["image_auroc_local"], abs=2e-4)
    assert "## Local defects by type (k = 2)" in (out / "report.md").read_text()


def test_report_pairs_the_model_with_the_baseline(finished_run, tmp_path, capsys):
    """The paired differences (model minus baseline per draw and category) average to the difference
    of the two methods' means when every category has every metric, as here; the recipe pools runs
    (the same run twice: twice the pairs, the same mean) and refuses folders that are not runs; a
    baseline that scored other draws is refused, not paired."""
    import importlib.util
    import shutil
    from pathlib import Path

    from iadgpt.evaluation.by_kind import paired_differences

    out, report, _ = finished_run
    settings = test_size_settings()
    paired = report["paired"]["2"]
    for name, summary in paired.items():
        assert summary["n"] == settings.held_out_categories * settings.seeds == len(summary["differences"]), name
        assert summary["ahead"] + summary["behind"] <= summary["n"]
        expected = report["k"]["2"]["model"][name] - report["k"]["2"]["baseline"][name]
        assert summary["mean"] == pytest.approx(expected, abs=2e-4), name
    assert "## Model minus baseline, paired (k = 2)" in (out / "report.md").read_text()

    spec = importlib.util.spec_from_file_location("paired_recipe", Path(__file__).parents[1] / "research" / "paired_comparison.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main([str(out), str(out), "--json", str(tmp_path / "paired.json")]) == 0
    pooled = json.loads((tmp_path / "paired.json").read_text())["pooled"]
    for name, summary in paired.items():
        assert pooled[name]["n"] == 2 * summary["n"]
        assert pooled[name]["mean"] == pytest.approx(summary["mean"], abs=1e-4)
    assert "| local pixel AUROC |" in capsys.readouterr().out
    assert recipe.main([str(tmp_path)]) == 2
    assert "is not a finished quickstart run" in capsys.readouterr().err

    other = tmp_path / "other_baseline"
    shutil.copytree(out / "eval" / "baseline", other)
    manifest = json.loads((other / "manifest.json").read_text())
    dropped = sorted(manifest["categories"])[0]
    del manifest["categories"][dropped]
    (other / "manifest.json").write_text(json.dumps(manifest))
    held_out = out / "data" / "held_out"
    with pytest.raises(ValueError, match="did not score the same runs.*" + re.escape(repr(dropped))):
        paired_differences(out / "eval" / "model", other, held_out, held_out / "images.jsonl",
                           map_size=settings.image_size, shots=[2])


def test_training_moved_the_model(finished_run):
    """Every stage's loss fell: the answers' template alone takes a random model from ~ln(vocab) to
    a fraction of it within the first steps, so this cannot flake the way an AUROC of a few
    held-out images could."""
    out, _, _ = finished_run
    for stage in (1, 2, 3):
        losses = read_losses(out / "runs" / f"stage{stage}" / "metrics.jsonl")
        assert len(losses) >= 2, stage
        assert sum(losses[-2:]) / 2 < 0.8 * losses[0], (stage, losses)


def test_training_beats_the_random_model_on_in_context_defects(finished_run, tmp_path):
    """The comparison with the references was learned: at k = 2 the trained model ranks in-context-only
    defects (normal-looking on their own) above the normal queries far better than the random model
    it started from, scored on the same manifest (measured: 1.00 vs 0.22 here; seeds 1, 2, 3: 1.00 vs
    0.67, 0.94 vs 0.56, 0.89 vs 0.67)."""
    from iadgpt.evaluation.by_kind import metrics_by_kind
    from iadgpt.quickstart import Quickstart, QuickstartPaths, RunState

    out, report, _ = finished_run
    settings = test_size_settings()
    run = Quickstart(settings, QuickstartPaths(out), RunState(tmp_path / "state.json", settings.document()))
    run.evaluate(tmp_path / "random", manifest=out / "eval" / "model" / "manifest.json", model=run.paths.init_model)
    held_out = run.paths.held_out
    random = metrics_by_kind(tmp_path / "random", held_out, held_out / "images.jsonl", settings.image_size, shots=[2])
    trained = report["k"]["2"]["model"]["image_auroc_in_context"]
    assert trained >= random["2"]["image_auroc_in_context"]["mean"] + 0.25, (trained, random)


def test_rerun_skips_finished_phases_and_resumes_an_interrupted_one(finished_run):
    out, report, _ = finished_run
    messages: list[str] = []
    assert run_quickstart(out, test_size_settings(), say=messages.append) == report
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == len(json.loads((out / "state.json").read_text())["phases"]) > 8

    # An interruption before the report: only the report runs again.
    state = json.loads((out / "state.json").read_text())
    del state["phases"]["report"]
    (out / "state.json").write_text(json.dumps(state))
    (out / "report.json").unlink()
    messages.clear()
    again = run_quickstart(out, test_size_settings(), say=messages.append)
    ran = [m.split(":")[0] for m in messages if "skipped" not in m and m.startswith("[quickstart]")]
    assert ran == ["[quickstart] report"]
    assert again["k"] == report["k"]


def test_a_different_run_in_the_folder_is_refused(finished_run):
    out, _, _ = finished_run
    with pytest.raises(QuickstartError, match=r"holds a different quickstart run \(seed: 0 -> 1\).*--overwrite"):
        run_quickstart(out, test_size_settings(seed=1))


def test_overwrite_removes_only_what_a_quickstart_writes(tmp_path):
    out = tmp_path / "run"
    (out / "runs" / "stage1").mkdir(parents=True)
    (out / "state.json").write_text(json.dumps({"settings": {"seed": 5}, "phases": {}, "plan": {}}))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QuickstartError, match="different quickstart run"):
        prepare_output(out, test_size_settings(), overwrite=False)
    prepare_output(out, test_size_settings(), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(QuickstartError, match="is not empty and holds no quickstart run"):
        prepare_output(other, test_size_settings(), overwrite=False)


def test_fixed_step_counts_are_trained_and_bad_ones_refused(finished_run):
    out, _, _ = finished_run
    for stage, steps in zip((1, 2, 3), test_size_settings().stage_steps):
        assert json.loads((out / "runs" / f"stage{stage}" / "train_summary.json").read_text())["steps"] == steps
    with pytest.raises(QuickstartError, match=r"stage_steps must be three positive step counts .* got \(10, 0, 5\)"):
        test_size_settings(stage_steps=(10, 0, 5))


def test_frozen_stages_leave_the_vision_encoder_as_it_was(finished_run):
    """Stages 1 and 2 freeze the encoder (patch embedding and blocks), not the merger or the
    fusion weights; stage 3 trains it."""
    from safetensors.torch import load_file

    out, _, _ = finished_run
    assert test_size_settings().frozen_vision_stages == (1, 2)

    def vision(folder):
        return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("visual.")}

    init, stage1, stage2, stage3 = (vision(out / "model" / "init"), *(vision(out / "runs" / f"stage{i}") for i in (1, 2, 3)))
    encoder = [k for k in init if k.startswith(("visual.patch_embed.", "visual.blocks."))]
    trainable = [k for k in init if k.startswith(("visual.merger.", "visual.layer_fusion."))]
    assert encoder and trainable
    for weights in (stage1, stage2):
        assert all(torch.equal(weights[k], init[k]) for k in encoder)
    assert not all(torch.equal(stage2[k], init[k]) for k in trainable)
    assert not all(torch.equal(stage3[k], stage2[k]) for k in encoder)
    with pytest.raises(QuickstartError, match=r"frozen_vision_stages must be a subset of 1, 2, 3; got \(0, 2\)"):
        test_size_settings(frozen_vision_stages=(0, 2))


def test_a_budget_too_short_to_train_is_refused_before_any_work(tmp_path):
    with pytest.raises(BudgetTooShortError, match=r"a budget of 0.2 minutes is too short to train anything.*--minutes"):
        run_quickstart(tmp_path / "run", test_size_settings(minutes=0.2))
    assert not (tmp_path / "run").exists()


def test_command_line_reports_a_short_budget_in_one_line(tmp_path):
    from iadgpt.cli import main

    with pytest.raises(SystemExit, match="iadgpt quickstart: a budget of 0.1 minutes is too short"):
        main(["quickstart", "--out", str(tmp_path / "run"), "--minutes", "0.1"])


def test_command_line_refuses_bad_ablation_variants_before_any_work(tmp_path):
    from iadgpt.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"unknown ablation variants \['no_stage4'\]; allowed: \['attention_in_map', 'last_layer_map'"):
        main(["quickstart", "--out", str(out), "--ablations", "--variants", "no_fusion,no_stage4"])
    with pytest.raises(SystemExit, match="--variants chooses ablation variants: add --ablations"):
        main(["quickstart", "--out", str(out), "--variants", "no_fusion"])
    assert not out.exists()


@pytest.mark.slow
def test_ablations_write_one_row_per_variant_and_retention(finished_run):
    from iadgpt.quickstart.ablations import INFERENCE_VARIANTS, RETENTIONS, TRAINED_VARIANTS, run_ablations

    out, _, _ = finished_run
    messages: list[str] = []
    document = run_ablations(out, test_size_settings(), say=messages.append)
    names = [row["name"] for row in document["rows"]]
    assert names == ["full", *TRAINED_VARIANTS, *INFERENCE_VARIANTS,
                     *(f"retention_{round(r * 100)}" for r in RETENTIONS)]
    assert document == json.loads((out / "ablations" / "ablations.json").read_text())
    table = (out / "ablations" / "ablations.md").read_text()
    assert table.count("\n| ") == len(names) + 1  # header + one line per row
    # Every variant trained from the shared data, for the quickstart's training minutes, in its own folder.
    for name, (_, changes) in TRAINED_VARIANTS.items():
        state = json.loads((out / "ablations" / name / "state.json").read_text())
        assert set(changes) <= set(state["settings"]), name
        assert not (out / "ablations" / name / "data").exists(), name
    full = document["rows"][0]
    for row in document["rows"]:
        assert row["training_minutes"] == full["training_minutes"]
    # Split work: a subset reuses the finished variant runs; an unknown name is refused by name.
    subset = run_ablations(out, test_size_settings(), say=messages.append, variants=["no_fusion"])
    assert [row["name"] for row in subset["rows"]] == ["full", "no_fusion"]
    assert subset["rows"][1] | {"wall_minutes": 0} == document["rows"][3] | {"wall_minutes": 0}
    assert document == json.loads((out / "ablations" / "ablations.json").read_text())  # the whole table stays
    with pytest.raises(ValueError, match=r"unknown ablation variants \['no_stage4'\]"):
        run_ablations(out, test_size_settings(), variants=["no_stage4"])


def test_wider_benchmark_pairs_the_same_model_and_baseline_on_more_held_out_images(finished_run, tmp_path, capsys):
    """The wider benchmark scores the run's own final model and the baseline on a wider factory that
    starts with the run's held-out products (the same first images), pairs them like the report
    (the mean difference is the difference of the means; every number equal to the separate
    by-kind, by-type and paired computations), resumes from its cache, benchmarks an ablation
    variant against the main run's data and baseline, and refuses other settings in its folder,
    scores of other weights, and folders that are not runs."""
    import importlib.util
    import shutil
    from pathlib import Path

    from iadgpt.quickstart.ablations import run_ablations
    from iadgpt.evaluation.by_kind import metrics_by_defect, metrics_by_kind, paired_differences
    from iadgpt.evaluation.reports import json_ready

    spec = importlib.util.spec_from_file_location("wider_recipe", Path(__file__).parents[1] / "research" / "wider_benchmark.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up there
    spec.loader.exec_module(recipe)
    WiderBenchmarkSettings, run_wider_benchmark = recipe.WiderBenchmarkSettings, recipe.run_wider_benchmark

    def finite(document):
        return json_ready(document, 4)

    out, _, _ = finished_run
    settings = WiderBenchmarkSettings(categories=2, test_normals=2, anomalies_per_kind=1, draws=2, folder="wider_test")
    result = run_wider_benchmark(out, settings)
    data = out / "wider_test" / "data"
    # One pass over the maps gives what the three separate computations give.
    folders = {"model": out / "wider_test" / "model", "baseline": out / "wider_test" / "baseline"}
    for method, folder in folders.items():
        assert result[method] == finite(metrics_by_kind(folder, data, data / "images.jsonl", map_size=64,
                                                        shots=[2])["2"]), method
        assert result["by_defect"][method] == finite(metrics_by_defect(folder, data, data / "images.jsonl",
                                                                       map_size=64, shots=[2])["2"]), method
    separately = paired_differences(folders["model"], folders["baseline"], data, data / "images.jsonl", map_size=64,
                                    shots=[2])["2"]
    assert {name: paired["differences"] for name, paired in result["paired"].items()} == finite(separately)
    first = sorted(p.name for p in (out / "data" / "held_out").iterdir() if p.is_dir())[0]
    assert (data / first / "train" / "good" / "000.png").read_bytes() == \
        (out / "data" / "held_out" / first / "train" / "good" / "000.png").read_bytes()
    assert len({p.name for p in data.iterdir() if p.is_dir()}) == 2
    for name, paired in result["paired"].items():
        assert paired["n"] == settings.categories * settings.draws == len(paired["differences"]), name
        expected = result["model"][name]["mean"] - result["baseline"][name]["mean"]
        assert paired["mean"] == pytest.approx(expected, abs=2e-4), name
    assert json.loads((out / "wider_test" / "result.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["by_defect"]["model"]) == set(result["by_defect"]["baseline"])

    cache = sorted((out / "wider_test" / "model" / "cache").glob("*.jsonl"))
    lines = [path.read_text() for path in cache]
    assert run_wider_benchmark(out, settings) == result
    assert [path.read_text() for path in cache] == lines  # nothing scored twice

    with pytest.raises(QuickstartError, match="holds a wider benchmark of other settings"):
        run_wider_benchmark(out, WiderBenchmarkSettings(categories=3, test_normals=2, anomalies_per_kind=1, draws=2,
                                                        folder="wider_test"))
    weights = out / "wider_test" / "model" / "weights.json"
    saved = weights.read_text()
    weights.write_text(json.dumps({"model": "0" * 64}))
    with pytest.raises(QuickstartError, match="other settings or weights"):
        run_wider_benchmark(out, settings)
    weights.write_text(saved)

    # An ablation variant: its own model's scores, on the main run's wider data and baseline draws.
    run_ablations(out, test_size_settings(), variants=["no_fusion"])  # reuses a variant trained before
    variant = out / "ablations" / "no_fusion"
    baseline_cache = {path: path.read_text() for path in (folders["baseline"] / "cache").glob("*.jsonl")}
    varied = run_wider_benchmark(variant, settings)
    assert sorted(p.name for p in (variant / "wider_test").iterdir()) == ["model", "result.json"]
    assert {path: path.read_text() for path in (folders["baseline"] / "cache").glob("*.jsonl")} == baseline_cache
    assert varied["baseline"] == result["baseline"]
    assert json.loads((variant / "wider_test" / "model" / "manifest.json").read_text()) == \
        json.loads((folders["baseline"] / "manifest.json").read_text())
    assert json.loads((variant / "wider_test" / "model" / "weights.json").read_text()) != \
        json.loads(weights.read_text())
    for name, paired in varied["paired"].items():
        expected = varied["model"][name]["mean"] - result["baseline"][name]["mean"]
        assert paired["mean"] == pytest.approx(expected, abs=2e-4), name

    arguments = ["--categories", "2", "--test-normals", "2", "--anomalies-per-kind", "1", "--draws", "2",
                 "--folder", "wider_test"]
    assert recipe.main([str(out), *arguments, "--json", str(tmp_path / "wider.json")]) == 0
    pooled = json.loads((tmp_path / "wider.json").read_text())["pooled"]
    assert pooled["pixel_auroc"]["mean"] == pytest.approx(result["paired"]["pixel_auroc"]["mean"], abs=1e-4)
    assert "| local pixel AUROC |" in capsys.readouterr().out
    assert recipe.main([str(tmp_path), *arguments]) == 2
    assert "is not a finished quickstart run" in capsys.readouterr().err
    shutil.rmtree(out / "wider_test")
    shutil.rmtree(variant / "wider_test")
