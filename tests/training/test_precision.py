"""Training without DeepSpeed under `mixed_precision=bf16`: fp32 weights, bf16 autocast, and a
stage-3-sized learning rate (2e-6) that moves the weights (in bf16 weights it would round away)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
LEARNING_RATE = 2e-6


def train_one_step(checkpoint, data, out, mixed_precision):
    command = [sys.executable, str(REPO / "train" / "train.py"), "--config", str(REPO / "configs" / "stage3.yaml"),
               f"model={checkpoint}", f"data={data}", f"output_dir={out}", f"learning_rate={LEARNING_RATE}",
               "global_batch_size=2", "per_device_batch_size=2", "max_steps=1", f"mixed_precision={mixed_precision}",
               "gradient_checkpointing=false", "num_workers=0", "warmup_ratio=0.0", "freeze_vision=false"]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    [row] = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return row["loss"], load_file(Path(out) / "model.safetensors")


@pytest.mark.slow
def test_bf16_training_keeps_fp32_weights_and_small_updates_land(tiny_checkpoint, toy_stage, tmp_path):
    before = load_file(tiny_checkpoint / "model.safetensors")
    loss_bf16, after = train_one_step(tiny_checkpoint, toy_stage, tmp_path / "bf16", "bf16")
    loss_fp32, _ = train_one_step(tiny_checkpoint, toy_stage, tmp_path / "fp32", "no")

    # The forward ran under bf16 autocast: the same first batch gives a slightly different loss.
    assert loss_bf16 != loss_fp32 and abs(loss_bf16 - loss_fp32) < 0.02 * loss_fp32

    assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    moved = total = survives_in_bf16 = 0
    steps = []
    for name, old in before.items():
        delta = after[name] - old
        changed = delta != 0
        moved += int(changed.sum())
        total += old.numel()
        steps.append(delta[changed].abs())
        # What bf16 weights would have kept of the same update: most of it rounds away.
        half = old.to(torch.bfloat16)
        survives_in_bf16 += int(((half.float() + delta).to(torch.bfloat16) != half)[changed].sum())
    steps = torch.cat(steps)
    # AdamW's first step moves every weight with a gradient by lr (m / sqrt(v) = sign of the gradient);
    # only the embedding rows of tokens absent from the batch (and the like) have none.
    assert moved > 0.5 * total
    assert torch.allclose(steps.median(), torch.tensor(LEARNING_RATE), rtol=0.01)
    assert steps.max() < 1.05 * LEARNING_RATE  # fp32 spacing near 1 (norm weights) is 1.2e-7
    assert survives_in_bf16 < 0.1 * moved, (survives_in_bf16, moved)
