"""Train one IADGPT stage.

    accelerate launch --config_file configs/accelerate/<setup>.yaml train/train.py \\
        --config configs/stage<N>.yaml [key=value ...] [--resume]

Reads the stage's records, trains with AdamW + cosine schedule under whatever accelerate/DeepSpeed
setup launched it, logs every step to metrics.jsonl and TensorBoard, writes resumable checkpoints
every `save_every` steps, and ends with a Hugging Face folder the next stage, evaluation and chat
load directly. Plain `python train/train.py ...` runs one process.
"""

from __future__ import annotations

import argparse
import sys

from iadgpt.config import load_config
from iadgpt.training.config import TrainConfig
from iadgpt.training.loop import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML (configs/stage1.yaml ...)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. learning_rate=1e-5 lora.enabled=true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        train(cfg, resume=args.resume)
    except OSError as err:  # a file or folder that cannot be read or written: one line naming it
        where = f"{err.filename}: " if err.filename else ""
        sys.exit(f"train.py: {where}{err.strerror or err}")
    except ValueError as err:  # a setting, record or checkpoint that does not fit (ConfigError, DataError, ...)
        sys.exit(f"train.py: {err}")


if __name__ == "__main__":
    main()
