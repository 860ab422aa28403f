"""`iadgpt quickstart`: the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from .pipeline import run_quickstart
from .settings import QuickstartError, QuickstartSettings

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="output folder (rerunning the same command resumes)")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-time budget (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and few-shot draws")
    parser.add_argument("--overwrite", action="store_true", help="replace a different quickstart run in --out")
    parser.add_argument("--ablations", action="store_true",
                        help="after the quickstart, train and evaluate the ablation variants (each takes about "
                             "the quickstart's own time; then 6 rows evaluated only: the answer-only image score and 5 "
                             "exemplar retentions)")
    parser.add_argument("--variants", default=None,
                        help="with --ablations: only these comma-separated variants (to share the work between "
                             "processes; a final --ablations without it writes the whole table)")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (default 1, see docs)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .ablations import check_variants, run_ablations

    settings = QuickstartSettings(minutes=args.minutes, seed=args.seed, threads=args.threads)
    variants = args.variants.split(",") if args.variants else None
    try:
        if variants is not None and not args.ablations:
            raise QuickstartError("--variants chooses ablation variants: add --ablations")
        check_variants(variants)  # before the quickstart, not after its minutes
        report = run_quickstart(args.out, settings, overwrite=args.overwrite)
        if args.ablations:
            run_ablations(Path(args.out), settings, variants=variants)
    except QuickstartError as err:
        raise SystemExit(f"iadgpt quickstart: {err}") from None
    print(f"Report: {Path(args.out) / 'report.md'} ({report['minutes']:.1f} min)")
    return 0
