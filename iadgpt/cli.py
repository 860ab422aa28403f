"""The `iadgpt` command: one sub-command per job, each a thin call into the library."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "init-model": ("iadgpt.model.cli", "write a random-weight Qwen2.5-VL checkpoint of a preset size (offline)"),
    "make-synthetic": ("iadgpt.data.factory", "draw a synthetic industrial dataset (MVTec-AD layout, captions)"),
    "inspect": ("iadgpt.evaluation.inspect_cli", "score query images against normal references, write heatmaps"),
    "chat": ("iadgpt.chat", "talk with the model about a query image and its normal references"),
    "product": ("iadgpt.product_cli", "store a product's reference images for a line, calibrate its threshold"),
    "serve": ("iadgpt.serving.cli", "the HTTP inspection service (FastAPI): inspect, products, metrics"),
    "plan": ("iadgpt.planning.cli", "GPU memory, tokens per sample and time of a training stage, before launching it"),
    "quickstart": ("iadgpt.quickstart", "train and evaluate the whole pipeline on synthetic products, on a CPU, "
                   "within a time budget"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iadgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module of the command being run
            module = importlib.import_module(module)
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    result = args.run(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
