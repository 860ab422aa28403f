"""Is the model ahead of the nearest-patch baseline? The same trained models, on a wider held-out set.

A quickstart run's own benchmark (9 held-out categories, 2 draws) pairs the model with the baseline
over 18 category-draws with few queries each, so its paired difference has a standard error of 1-2
AUROC points. This recipe scores each finished run's final model and the baseline on more held-out
categories, queries and draws (`run_wider_benchmark` below; by default 36 categories, 16 normal and 4
of each defect type per category, 3 draws: about 8 minutes per run on one core) and prints the
paired differences per run and pooled over the runs.

    python research/wider_benchmark.py runs/qs_s0 runs/qs_s1                  # finished quickstart runs
    python research/wider_benchmark.py runs/qs_s0/ablations/no_stage2         # a variant (shares qs_s0's baseline)
    python research/wider_benchmark.py runs/qs_s* --json wider.json

Each run's result is kept in RUN/wider/result.json; a rerun resumes from the cached scores.

Why: a quickstart benchmarks 9 held-out categories with 8 normal queries and 2 of each defect type,
in 2 few-shot draws. Most categories are scored perfectly by both the model and the nearest-patch
baseline, one swapped pair of queries moves a category's image AUROC by about a point, and so a
run's paired difference (model minus baseline, per draw and category) has a standard error of 1-2
points: too coarse to tell a one-point lead from none. This benchmark scores the same trained model
and the baseline on more held-out categories, more queries per category and more draws, on the very
same references and queries, and pairs them the same way (`paired_differences`).

The categories are the factory's categories from the run's `first_held_out_category` (index 10000)
on, with the run's seed: the first ones are the run's own held-out products (their first images are
the run's; the rest are new images of them), the others are new products. No training category is
among them (training uses indices below 10000).

Layout, under the main run's folder (an ablation variant RUN/ablations/<name> shares the main run's
data and baseline, and keeps its own model benchmark under its folder):

    RUN/<folder>/settings.json   the benchmark's settings and the main run's weights digest (others
                                 are refused: another --folder, or remove it)
    RUN/<folder>/data/           the wider held-out factory (MVTec layout, images.jsonl)
    RUN/<folder>/baseline/       the nearest-patch baseline, drawing the references
    RUN/<folder>/model/          the run's final model on the baseline's manifest (the same draws);
                                 weights.json: the digest of the weights its cached scores belong to
    RUN/<folder>/result.json     kind metrics, local defects by type and the paired differences

Every step resumes: the factory rewrites identical files, the benchmark caches every scored query,
and a run whose result.json is written is not benchmarked again (pooling many runs is instant).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from iadgpt.evaluation.by_kind import KIND_METRICS
from iadgpt.evaluation.reports import json_ready
from iadgpt.quickstart import (PAIRED_NAMES, Quickstart, QuickstartError, QuickstartPaths, QuickstartSettings, RunState,
                               pooled_paired_table)


@dataclass(frozen=True)
class WiderBenchmarkSettings:
    """How much wider than the quickstart's own benchmark (9 categories, 8 normal queries, 2 per
    defect type, 2 draws): with the defaults 4 times the normal-defect query pairs per category and
    draw, and 6 times the category-draws (108), in about 8 minutes per run on one core."""

    categories: int = 36
    """Held-out categories (4 of each of the 9 product families)."""
    test_normals: int = 16
    """Normal queries per category."""
    anomalies_per_kind: int = 4
    """Defective queries per defect type and category."""
    draws: int = 3
    """Few-shot draws of the references."""
    k: int = 2
    """Normal references per query (the targets' k)."""
    folder: str = "wider"
    """Folder under the run for this benchmark."""

    def validate(self) -> None:
        for name, low in (("categories", 1), ("test_normals", 1), ("anomalies_per_kind", 1), ("draws", 1), ("k", 1)):
            if getattr(self, name) < low:
                raise QuickstartError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not self.folder or os.sep in self.folder or self.folder in (".", ".."):
            raise QuickstartError(f"folder must be a plain folder name, got {self.folder!r}")


def _run_settings(out: Path) -> QuickstartSettings:
    document = json.loads((out / "state.json").read_text())["settings"]
    return QuickstartSettings(**document)


def weights_digest(model: Path) -> str:
    """SHA-256 of a checkpoint's safetensors files: which trained model a folder's scores belong to
    (a rerun of the quickstart in the same folder has the same path but other weights)."""
    digest = hashlib.sha256()
    for path in sorted(model.glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _claim(path: Path, wanted: dict) -> None:
    """Write `wanted` to `path`, or refuse if it already holds something else: a benchmark with other
    settings, or scores of other weights, must not be mixed with or reused for this one."""
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            raise QuickstartError(f"{path.parent} holds a wider benchmark of other settings or weights ({found}, "
                                  f"now {wanted}): remove it or choose another folder name")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=2) + "\n")


def run_wider_benchmark(run: str | os.PathLike, settings: WiderBenchmarkSettings | None = None) -> dict:
    """Benchmark a finished quickstart run (or ablation variant) and the baseline on a wider held-out set.

    Returns (and writes to the run's `<folder>/result.json`) {"k", "settings", "model", "baseline":
    `metrics_by_kind` at k, "by_defect": {method: `metrics_by_defect` at k}, "paired": {metric:
    `summarize_differences` plus its "differences"}} (all from `compare_benchmarks`, one pass over the
    maps), every number rounded to 4 decimals, NaN as None.
    """
    from iadgpt.evaluation.baseline import NearestPatchInspector
    from iadgpt.evaluation.by_kind import compare_benchmarks, summarize_differences
    from iadgpt.evaluation.detection import DetectionSettings
    from iadgpt.data.factory import make_synthetic
    from iadgpt.inspection import Inspector

    settings = settings or WiderBenchmarkSettings()
    settings.validate()
    paths, _ = QuickstartPaths.of_finished_run(run)
    main_out = paths.data_dir.parent
    main_settings, run_settings = _run_settings(main_out), _run_settings(paths.out)
    shared = main_out / settings.folder
    main = Quickstart(main_settings, QuickstartPaths(main_out), RunState(main_out / "state.json", {}))
    quickstart = Quickstart(run_settings, paths, RunState(paths.state, {}))
    model_dir = paths.out / settings.folder / "model"
    _claim(shared / "settings.json", {**asdict(settings), "seed": main_settings.seed,
                                      "image_size": main_settings.image_size,
                                      "main_model": weights_digest(main.final_model)})
    _claim(model_dir / "weights.json", {"model": weights_digest(quickstart.final_model)})
    finished = paths.out / settings.folder / "result.json"
    if finished.is_file():  # written last, for these settings and weights (claimed above)
        return json.loads(finished.read_text())
    data = shared / "data"
    # Drawn once (factory.json is written last; settings.json above pins what it was drawn for): drawing
    # again would give the same pixels new modification times, which key the detection caches.
    if not (data / "factory.json").is_file():
        make_synthetic(data, settings.categories, seed=main_settings.seed, image_size=main_settings.image_size,
                       train_normals=main_settings.held_out_train_normals, test_normals=settings.test_normals,
                       test_anomalies_per_kind=settings.anomalies_per_kind,
                       first_category=main_settings.first_held_out_category, workers=2)

    def benchmark(run: Quickstart, out: Path, inspector, desc: str, manifest: Path | None = None) -> None:
        # `model` names what the cache's lines were scored for: the main run's model for the shared baseline.
        detection = DetectionSettings(model=str(run.final_model.resolve()), dataset="mvtec", root=str(data.resolve()),
                                      out=str(out), shots=[settings.k], seeds=settings.draws,
                                      manifest=str(manifest) if manifest else None, batch_size=8,
                                      map_size=main_settings.image_size, overlays_per_category=0)
        run.run_benchmark(detection, inspector, desc)

    baseline_dir = shared / "baseline"
    benchmark(main, baseline_dir, NearestPatchInspector(), "wider benchmark (baseline)")
    inspector = Inspector.from_pretrained(quickstart.final_model, batch_size=8, iadgpt=run_settings.eval_iadgpt or None)
    benchmark(quickstart, model_dir, inspector, "wider benchmark (model)", manifest=baseline_dir / "manifest.json")

    compared = compare_benchmarks(model_dir, baseline_dir, data, data / "images.jsonl",
                                  map_size=main_settings.image_size, shots=[settings.k])[str(settings.k)]
    result = {"k": settings.k, "settings": asdict(settings), "model": compared["model"],
              "baseline": compared["baseline"], "by_defect": compared["by_defect"],
              "paired": {name: {**summarize_differences(values), "differences": values}
                         for name, values in compared["paired"].items()}}
    result = json_ready(result, 4)
    finished.write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = WiderBenchmarkSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished quickstart output folders (or ablation variants)")
    parser.add_argument("--categories", type=int, default=defaults.categories, help="held-out categories")
    parser.add_argument("--test-normals", type=int, default=defaults.test_normals, help="normal queries per category")
    parser.add_argument("--anomalies-per-kind", type=int, default=defaults.anomalies_per_kind,
                        help="defective queries per defect type and category")
    parser.add_argument("--draws", type=int, default=defaults.draws, help="few-shot draws of the references")
    parser.add_argument("--k", type=int, default=defaults.k, help="normal references per query")
    parser.add_argument("--folder", default=defaults.folder, help="folder under each run for this benchmark")
    parser.add_argument("--json", help="also write every run's result and the pooled summaries here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = WiderBenchmarkSettings(categories=args.categories, test_normals=args.test_normals,
                                      anomalies_per_kind=args.anomalies_per_kind, draws=args.draws, k=args.k,
                                      folder=args.folder)
    results = {}
    for run in args.runs:
        try:
            results[run] = run_wider_benchmark(run, settings)
        except QuickstartError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    print(f"\nWider held-out benchmark, k = {args.k}: {args.categories} categories, {args.test_normals} normal and "
          f"{args.anomalies_per_kind} per defect type queries each, {args.draws} draws. AUROC %, model / baseline:\n")
    print("| run | " + " | ".join(PAIRED_NAMES[name] for name in KIND_METRICS) + " |")
    print("|---|" + "---:|" * len(KIND_METRICS))
    for run, result in results.items():
        cells = [f"{percent(result['model'][name])} / {percent(result['baseline'][name])}" for name in KIND_METRICS]
        print(f"| {run} | " + " | ".join(cells) + " |")
    table, summaries = pooled_paired_table([(run, {name: paired["differences"] for name, paired in result["paired"].items()})
                                            for run, result in results.items()])
    print("\nModel minus baseline, paired over draws x categories (mean ± standard error, points; pairs ahead / "
          "behind / all):\n")
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "runs": results, "pooled": summaries}, handle, indent=2)
    return 0


def percent(summary: dict) -> str:
    return "n/a" if summary["mean"] is None else f"{100 * summary['mean']:.1f}"


if __name__ == "__main__":
    sys.exit(main())
