"""Shared fixtures: one offline tiny Qwen2.5-VL checkpoint per test session, and small images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from iadgpt.model import init_model

    return init_model(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from iadgpt.model import load_processor

    return load_processor(tiny_checkpoint)


@pytest.fixture()
def random_image():
    rng = np.random.default_rng(1234)

    def make(height: int = 112, width: int | None = None) -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (height, width or height, 3), dtype=np.uint8))

    return make


def _run_recipe(path, argv):
    """Call a data_builders/ recipe's main() in this process (as `python path argv` would)."""
    import runpy

    runpy.run_path(str(path), run_name="recipe")["main"](argv)


@pytest.fixture(scope="session")
def built_stages(tmp_path_factory, tiny_checkpoint):
    """Stage folders 1-3 written by the project's own builders from a small synthetic factory, as a
    user builds them (README "Data"): stage 2 replays stage 1, stage 3 replays 80 % stage 2, so stage 3
    mixes captions, odd-one-out, difference regions, irregular regions, detection and reasoning (boxes
    in the tiny model's pixel frame, `--model`)."""
    from pathlib import Path

    from iadgpt.data.factory import main as make_synthetic

    root = tmp_path_factory.mktemp("built")
    builders = Path(__file__).resolve().parents[1] / "data_builders"
    make_synthetic([str(root / "factory"), "--categories", "3", "--image-size", "112", "--train-normals", "6",
                    "--test-normals", "2", "--test-anomalies-per-kind", "1", "--seed", "3"])
    _run_recipe(builders / "stage1.py", ["--captions", f"factory={root / 'factory' / 'captions.jsonl'}",
                                         "--out", str(root / "stage1")])
    _run_recipe(builders / "stage2.py", ["--dataset", f"factory=mvtec:{root / 'factory'}", "--records", "24",
                                         "--model", str(tiny_checkpoint),
                                         "--replay", str(root / "stage1"), "--replay-ratio", "0.5",
                                         "--out", str(root / "stage2")])
    _run_recipe(builders / "stage3.py", ["--dataset", f"factory=mvtec:{root / 'factory'}", "--records", "24",
                                         "--model", str(tiny_checkpoint),
                                         "--replay", str(root / "stage2"), "--replay-ratio", "0.8",
                                         "--out", str(root / "stage3")])
    return root


def _plan_step(tmp_path_factory, tiny_checkpoint, built_stages, accelerate_config: str) -> dict:
    """`eval/speed.py plan-step` (the training loop's set-up, two steps, a census at step 2) on 2 CPU
    processes with a shipped accelerate config and the shipped stage-3 settings; the merged JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("plan_step")
    out = tmp / "census.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo / "configs" / "accelerate" / accelerate_config), str(repo / "eval" / "speed.py"),
               "plan-step", "--config", str(repo / "configs" / "stage3.yaml"), "--out", str(out),
               f"model={tiny_checkpoint}", f"data={built_stages / 'stage3'}", f"output_dir={tmp / 'run'}",
               "per_device_batch_size=1", "global_batch_size=2", "num_workers=0", "max_steps=2"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def zero3_step_census(tmp_path_factory, tiny_checkpoint, built_stages):
    return _plan_step(tmp_path_factory, tiny_checkpoint, built_stages, "cpu_2proc_zero3.yaml")


@pytest.fixture(scope="session")
def zero2_step_census(tmp_path_factory, tiny_checkpoint, built_stages):
    return _plan_step(tmp_path_factory, tiny_checkpoint, built_stages, "cpu_2proc_zero2.yaml")
