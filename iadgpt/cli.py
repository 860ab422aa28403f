"""The `iadgpt` command: one sub-command per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys


def _init_model(args: argparse.Namespace) -> None:
    from .model.checkpoint import PRESETS, init_model

    if args.preset not in PRESETS:
        raise SystemExit(f"iadgpt init-model: unknown preset {args.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    out = init_model(args.out, args.preset, seed=args.seed)
    print(f"Wrote a random-weight Qwen2.5-VL ({args.preset}) IADGPT checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iadgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a random-weight Qwen2.5-VL checkpoint of a preset size (offline)")
    p.add_argument("out", help="output folder (a Hugging Face checkpoint)")
    p.add_argument("--preset", default="tiny", help="tiny (unit tests, <1M params) or small (demo learner)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.set_defaults(func=_init_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
