"""The training recipe end to end: single process, resume after a kill and LoRA merging (DeepSpeed on
2 CPU processes and the shipped stage chain: test_recipe_as_shipped.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toy_stages import write_stage

REPO = Path(__file__).resolve().parents[2]
BASE = ["learning_rate=1.0e-3", "global_batch_size=4", "mixed_precision=no", "gradient_checkpointing=false",
        "num_workers=0", "warmup_ratio=0.0", "save_every=2"]


def run_train(config_overrides, launcher=None, env=None, check=True, resume=False):
    command = [sys.executable, str(REPO / "train" / "train.py")]
    if launcher:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "configs" / "accelerate" / launcher), str(REPO / "train" / "train.py")]
    command += ["--config", str(REPO / "configs" / "stage3.yaml"), *BASE, *config_overrides]
    if resume:
        command.append("--resume")
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def losses(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"  # resumes cut the log back
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses_and_weights(tiny_checkpoint, toy_stage, tmp_path):
    common = [f"model={tiny_checkpoint}", f"data={toy_stage}", "max_steps=6", "per_device_batch_size=2",
              "freeze_vision=false"]
    run_train([*common, f"output_dir={tmp_path / 'straight'}"])
    straight = losses(tmp_path / "straight")
    assert straight[6] < straight[1] - 0.5  # it learns

    killed = run_train([*common, f"output_dir={tmp_path / 'killed'}"], env={"IADGPT_FAULT_AFTER_STEP": "5"},
                       check=False)
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-0000002",
                                                                                       "step-0000004"]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    run_train([*common, f"output_dir={tmp_path / 'killed'}"], resume=True)
    resumed = losses(tmp_path / "killed")
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_missing_previous_stage_and_unknown_key_fail_before_training(tmp_path, toy_stage, tiny_checkpoint):
    result = run_train([f"model={tmp_path / 'out2'}", f"data={toy_stage}", f"output_dir={tmp_path / 'o'}"],
                       check=False)
    assert result.returncode != 0
    assert "does not exist (the output of stage 2? run it first)" in result.stderr
    result = run_train(["learning_rat=1e-5"], check=False)
    assert "unknown key 'learning_rat'; did you mean 'learning_rate'" in result.stderr
    # A file that cannot be read is one line naming it, not a traceback.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy_stage, broken)
    (broken / "shard-00001.jsonl").unlink()
    result = run_train([f"model={tiny_checkpoint}", f"data={broken}", f"output_dir={tmp_path / 'o'}"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"train.py: {broken / 'shard-00001.jsonl'}: No such file or directory"


@pytest.mark.slow
def test_lora_training_merges_into_a_plain_checkpoint_with_the_same_outputs(tiny_checkpoint, toy_stage, tmp_path,
                                                                            tiny_processor, random_image):
    common = [f"model={tiny_checkpoint}", f"data={toy_stage}", "max_steps=3", "per_device_batch_size=2",
              "lora.enabled=true", "lora.r=4", "learning_rate=1.0e-2"]
    run_train([*common, f"output_dir={tmp_path / 'merged'}"])
    run_train([*common, f"output_dir={tmp_path / 'adapter'}", "lora.merge=false"])
    from peft import PeftModel

    from iadgpt.model import detection_inputs, load_model

    merged = load_model(tmp_path / "merged").eval()
    unmerged = PeftModel.from_pretrained(load_model(tiny_checkpoint), tmp_path / "adapter").eval()
    base = load_model(tiny_checkpoint).eval()
    inputs = detection_inputs(tiny_processor, [[random_image(), random_image()]], [random_image()])
    with torch.no_grad():
        a, b, c = merged(**inputs).logits, unmerged(**inputs).logits, base(**inputs).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the adapters did learn something


def test_gpu_launch_config_on_a_cpu_machine_is_refused(monkeypatch):
    from iadgpt.training.trainer import TrainingSetupError, check_launch_matches_machine

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(TrainingSetupError, match="asks for GPUs .* but no CUDA device is visible"):
        check_launch_matches_machine()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    check_launch_matches_machine()
