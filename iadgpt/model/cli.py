"""`iadgpt init-model`: an offline Qwen2.5-VL checkpoint of the real architecture, random weights."""

from __future__ import annotations

import argparse

from .checkpoint import PRESETS, init_model


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out", help="output folder (a Hugging Face checkpoint)")
    parser.add_argument("--preset", default="tiny",
                        help=f"one of {', '.join(sorted(PRESETS))}: tiny for unit tests (<1 M parameters), "
                             "small for the demo learner (a few million), qwen2.5-vl-3b / qwen2.5-vl-7b for the "
                             "released models' exact config, tokenizer and processor at a shallow depth (2 text "
                             "layers, 4 vision blocks by default; bf16 weights: about 1.2 / 3.4 GB)")
    parser.add_argument("--text-layers", type=int, metavar="N",
                        help="language-model layers instead of the preset's (released: 28 for 7B, 36 for 3B)")
    parser.add_argument("--vision-layers", type=int, metavar="M",
                        help="vision blocks instead of the preset's (released: 32); the full-attention blocks "
                             "follow the depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise SystemExit(f"iadgpt init-model: unknown preset {args.preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    try:
        out = init_model(args.out, args.preset, seed=args.seed, text_layers=args.text_layers,
                         vision_layers=args.vision_layers)
    except ValueError as err:
        raise SystemExit(f"iadgpt init-model: {err}") from err
    print(f"Wrote a random-weight Qwen2.5-VL ({args.preset}) IADGPT checkpoint to {out}")
    return 0
