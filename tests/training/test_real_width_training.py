"""One stage-3 training step at the released 3B model's widths, as shipped in configs/stage3.yaml.

Random weights of the exact Qwen2.5-VL-3B-Instruct config at 2 text layers and 4 vision blocks
(`iadgpt init-model --preset qwen2.5-vl-3b`), Qwen2.5's own tokenizer, a 4-shot detection record
with a defect mask made by data_builders/stage3.py: gradient checkpointing on, exemplar
compression, the pixel loss. About 9.2 GB of memory (fp32 weights, gradients and AdamW states of
the 502 M trainable parameters) and 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from iadgpt.data.factory import make_synthetic
from iadgpt.data.records import ShardWriter, StageInfo, read_records

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{command[:4]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def build_stage3(factory: Path, out: Path) -> None:
    argv = sys.argv
    sys.argv = ["stage3.py", "--dataset", f"fac=mvtec:{factory}", "--records", "12", "--shots", "4", "--out", str(out)]
    try:
        runpy.run_path(str(REPO / "data_builders" / "stage3.py"), run_name="__main__")
    finally:
        sys.argv = argv


def tensor(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return weights.get_tensor(name).float()


def test_one_stage3_step_at_3b_width(tmp_path):
    model = tmp_path / "qwen2.5-vl-3b"
    run([sys.executable, "-m", "iadgpt.cli", "init-model", str(model), "--preset", "qwen2.5-vl-3b",
         "--text-layers", "2", "--vision-layers", "4"])
    config = json.loads((model / "config.json").read_text())
    assert (config["text_config"]["hidden_size"], config["vision_config"]["out_hidden_size"]) == (2048, 2048)
    assert config["tie_word_embeddings"] is True

    # The builder's 4-shot records; the step trains on those with a defect mask (the pixel loss).
    make_synthetic(tmp_path / "factory", categories=1, seed=0, image_size=224, train_normals=5, test_normals=1,
                   test_anomalies_per_kind=1)
    build_stage3(tmp_path / "factory", tmp_path / "built")
    built = StageInfo.read(tmp_path / "built")
    masked = [r for r in read_records(tmp_path / "built") if r.task == "detection" and r.mask]
    assert masked and all(r.image_roles == ["exemplar"] * 4 + ["query"] for r in masked)
    writer = ShardWriter(tmp_path / "stage3", StageInfo(stage=3, roots=built.roots, config=built.config))
    writer.write(masked)
    writer.close()

    # As shipped (gradient checkpointing, exemplar retention 0.2), with only what this CPU needs changed,
    # and no warm-up: a warm-up's first step has learning rate 0 and would move nothing.
    output = tmp_path / "run"
    run([sys.executable, str(REPO / "train" / "train.py"), "--config", str(REPO / "configs" / "stage3.yaml"),
         f"model={model}", f"data={tmp_path / 'stage3'}", f"output_dir={output}", "max_steps=1", "warmup_ratio=0.0",
         "global_batch_size=1", "per_device_batch_size=1", "mixed_precision=no", "num_workers=0"])
    [step] = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1
    for part in ("lm_loss", "focal_loss", "dice_loss"):  # the pixel loss ran on the query's mask
        assert math.isfinite(step[part]) and step[part] > 0, part
    trained = json.loads((output / "config.json").read_text())
    assert trained["iadgpt"]["exemplar_retention"] == 0.2
    assert trained["text_config"]["vocab_size"] == 151936
    # The step moved the trained weights (tied embedding, merger) and left the frozen vision blocks alone.
    # (Saved in the released layout: `model.embed_tokens`, `visual.*`.)
    for name, moved in (("model.embed_tokens.weight", True), ("visual.merger.mlp.0.weight", True),
                        ("visual.blocks.0.mlp.gate_proj.weight", False)):
        assert (not torch.equal(tensor(model, name), tensor(output, name))) == moved, name
