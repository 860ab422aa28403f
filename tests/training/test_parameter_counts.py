"""Parameter counts and the memory estimate under DeepSpeed, where ZeRO-3 partitions the weights
(numel() 0) while they load: `build_model` under a real DeepSpeed Accelerator, one CPU process in a
gloo group of one, against the same checkpoint loaded plainly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BUILD_UNDER_DEEPSPEED = """
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from iadgpt.training.config import TrainConfig
from iadgpt.training.trainer import build_model, model_state_gib, parameter_counts

ds_config, zero3_init, checkpoint = sys.argv[1], sys.argv[2] == "true", sys.argv[3]
Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=zero3_init),
            mixed_precision="bf16", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
model, _ = build_model(TrainConfig(model=checkpoint, freeze_vision=True, gradient_checkpointing=False), True)
params = list(model.parameters())
print("RESULT " + json.dumps({
    "numel": sum(p.numel() for p in params), "counts": parameter_counts(model),
    "partitioned": all(hasattr(p, "ds_numel") for p in params), "dtypes": sorted({str(p.dtype) for p in params}),
    "gib": model_state_gib(model, 8, 3)}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def plain_counts(tiny_checkpoint):
    from iadgpt.model import load_model
    from iadgpt.training.trainer import freeze_vision_encoder

    model = load_model(tiny_checkpoint, dtype="float32")
    freeze_vision_encoder(model)  # as build_model does with freeze_vision=true
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total
    return total, trainable


@pytest.mark.parametrize("zero", [3, 2])
def test_counts_and_memory_under_deepspeed_bf16(tiny_checkpoint, plain_counts, zero):
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", BUILD_UNDER_DEEPSPEED, f"configs/deepspeed/zero{zero}.json",
                           "true" if zero == 3 else "false", str(tiny_checkpoint)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    total, trainable = plain_counts

    # DeepSpeed's bf16 is on (resolved from mixed_precision): the weights load in bf16 for it.
    assert result["dtypes"] == ["torch.bfloat16"]
    if zero == 3:  # zero.Init partitioned every weight as it loaded: numel() says 0 for all of them
        assert result["partitioned"] and result["numel"] == 0
    else:
        assert not result["partitioned"] and result["numel"] == total
    assert result["counts"] == [total, trainable]
    assert f"{total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable" in done.stdout
    gib = 1024 ** 3  # bf16 weights and gradients, fp32 master weights and Adam moments, 8 processes, ZeRO-3
    assert result["gib"] == pytest.approx({"weights": 2 * total / 8 / gib, "gradients": 2 * trainable / 8 / gib,
                                           "optimizer": 12 * trainable / 8 / gib})
