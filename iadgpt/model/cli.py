"""`iadgpt init-model`: an offline Qwen2.5-VL checkpoint of the real architecture, random weights."""

from __future__ import annotations

import argparse

from .checkpoint import PRESETS, init_model


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out", help="output folder (a Hugging Face checkpoint)")
    parser.add_argument("--preset", default="tiny",
                        help=f"one of {', '.join(sorted(PRESETS))}: tiny for unit tests (<1 M parameters), "
                             "small for the demo learner (a few million)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise SystemExit(f"iadgpt init-model: unknown preset {args.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    out = init_model(args.out, args.preset, seed=args.seed)
    print(f"Wrote a random-weight Qwen2.5-VL ({args.preset}) IADGPT checkpoint to {out}")
    return 0
