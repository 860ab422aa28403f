"""Is the model ahead of the nearest-patch baseline? The same trained models, on a wider held-out set.

A quickstart run's own benchmark (9 held-out categories, 2 draws) pairs the model with the baseline
over 18 category-draws with few queries each, so its paired difference has a standard error of 1-2
AUROC points. This recipe scores each finished run's final model and the baseline on more held-out
categories, queries and draws (`iadgpt.wider_benchmark`; by default 36 categories, 16 normal and 4
of each defect type per category, 3 draws: about 8 minutes per run on one core) and prints the
paired differences per run and pooled over the runs.

    python eval/wider_benchmark.py runs/qs_s0 runs/qs_s1                  # finished quickstart runs
    python eval/wider_benchmark.py runs/qs_s0/ablations/no_stage2         # a variant (shares qs_s0's baseline)
    python eval/wider_benchmark.py runs/qs_s* --json wider.json

Each run's result is kept in RUN/wider/result.json; a rerun resumes from the cached scores.
"""

from __future__ import annotations

import argparse
import json
import sys

from iadgpt.evaluation.by_kind import KIND_METRICS
from iadgpt.quickstart import PAIRED_NAMES, QuickstartError, pooled_paired_table
from iadgpt.wider_benchmark import WiderBenchmarkSettings, run_wider_benchmark


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
