"""Is the model ahead of the nearest-patch baseline? Paired over draws, categories and runs.

One quickstart run scores 2 few-shot draws of 9 held-out categories; its AUROC moves by a point or
two from one training seed to the next, so comparing two means says little. Both methods score the
very same references and queries, though, so the difference per (run, draw, category) is what to
average: this recipe pools those differences over every run given and prints, per metric, their
mean ± standard error in AUROC points and how many pairs are ahead and behind.

    python research/paired_comparison.py runs/qs_s0 runs/qs_s1 runs/qs_s2       # quickstart outputs
    python research/paired_comparison.py runs/qs_s0/ablations/no_stage2 --k 2   # an ablation variant
    python research/paired_comparison.py runs/qs_s* --json paired.json

A run is a finished `iadgpt quickstart --out RUN` folder, or one of its ablation variants
(RUN/ablations/<name>, compared with RUN's baseline on the same draws).
"""

from __future__ import annotations

import argparse
import json
import sys

from iadgpt.evaluation.by_kind import paired_differences, summarize_differences
from iadgpt.quickstart import QuickstartError, QuickstartPaths, pooled_paired_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished quickstart output folders (or ablation variants)")
    parser.add_argument("--k", type=int, default=2, help="number of normal references compared (default 2)")
    parser.add_argument("--json", help="also write the pooled differences and their summaries here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    differences_by_run = []
    for run in args.runs:
        try:
            paths, baseline = QuickstartPaths.of_finished_run(run)
        except QuickstartError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        size = json.loads(paths.state.read_text())["settings"]["image_size"]
        differences = paired_differences(paths.model_eval, baseline, paths.held_out, paths.held_out / "images.jsonl",
                                         map_size=size, shots=[args.k]).get(str(args.k))
        if differences is None:
            print(f"error: {run} has no {args.k}-shot benchmark", file=sys.stderr)
            return 2
        differences_by_run.append((run, differences))

    table, summaries = pooled_paired_table(differences_by_run)
    print(f"Model minus baseline, k = {args.k}, AUROC points, paired over {len(args.runs)} run(s) x draws x "
          "categories (mean ± standard error; pairs ahead / behind / all)\n")
    print(table)
    if args.json:
        per_run = {run: {name: summarize_differences(values) for name, values in differences.items()}
                   for run, differences in differences_by_run}
        pooled = {name: [v for _, d in differences_by_run for v in d[name]] for name in summaries}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"k": args.k, "runs": args.runs, "pooled": summaries, "per_run": per_run,
                       "differences": pooled}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
