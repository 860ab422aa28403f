"""Run folders that cannot be mixed up: the output_dir lock, fresh runs refused over an earlier run,
resumes refused from another run's checkpoint or from files that changed since they were saved
(SHA-256 manifest), pruning of the run's own checkpoints only, and metrics.jsonl cut back to the
resumed step. In-process where the mechanics allow, one short
subprocess run of train/train.py for what only a real run shows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from iadgpt.training.config import TrainConfig
from iadgpt.training.trainer import (
    LOCK_FILE,
    MANIFEST,
    MetricsLog,
    TrainingSetupError,
    claimed_output_dir,
    prune_checkpoints,
    run_identity,
    verify_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def config(tmp_path, **changes) -> TrainConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    values = dict(model=str(tmp_path / "model"), data=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                  seed=0, global_batch_size=4, per_device_batch_size=2)
    return TrainConfig(**{**values, **changes})


def fake_checkpoint(output_dir: Path, step: int, run: dict | None) -> Path:
    """A checkpoint folder as save_checkpoint leaves it (weights replaced by a placeholder file)."""
    folder = Path(output_dir) / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    state = {"step": step, "epoch": 0, "batches_in_epoch": step}
    if run is not None:
        state["run"] = run
    (folder / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(folder)
    return folder


def test_a_second_claim_of_a_folder_is_refused_until_the_first_ends(accelerator, tmp_path):
    cfg = config(tmp_path)
    with claimed_output_dir(accelerator, cfg, resume=False):
        with pytest.raises(TrainingSetupError, match=r"output_dir .*run is in use by another training run \(pid "):
            with claimed_output_dir(accelerator, cfg, resume=False):
                pass
    with pytest.raises(RuntimeError, match="crash"):  # a run that fails inside the block releases the folder
        with claimed_output_dir(accelerator, cfg, resume=False):
            raise RuntimeError("crash")
    with claimed_output_dir(accelerator, cfg, resume=False):
        pass


def test_a_killed_holder_releases_the_lock(accelerator, tmp_path):
    cfg = config(tmp_path)
    out = Path(cfg.output_dir)
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"handle = open({str(out / LOCK_FILE)!r}, 'a+')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingSetupError, match="is in use by another training run"):
            with claimed_output_dir(accelerator, cfg, resume=False):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    with claimed_output_dir(accelerator, cfg, resume=False):
        pass


def test_fresh_run_over_an_earlier_run_needs_overwrite(accelerator, tmp_path):
    cfg = config(tmp_path)
    out = Path(cfg.output_dir)
    fake_checkpoint(out, 4, run_identity(cfg))
    with pytest.raises(TrainingSetupError, match=r"holds another run \(checkpoints/step-0000004\)\. Continue it with "
                                                 r"--resume, replace it with overwrite=true"):
        with claimed_output_dir(accelerator, cfg, resume=False):
            pass
    assert (out / "checkpoints" / "step-0000004").is_dir()  # nothing was touched

    # A final model without checkpoints counts too, also for --resume (nothing to resume from).
    finished = config(tmp_path, output_dir=str(tmp_path / "finished"))
    Path(finished.output_dir).mkdir()
    (Path(finished.output_dir) / "config.json").write_text("{}")
    (Path(finished.output_dir) / "model.safetensors").write_bytes(b"weights")
    for resume in (False, True):
        with pytest.raises(TrainingSetupError, match=r"holds another run \(config.json, model.safetensors\)"):
            with claimed_output_dir(accelerator, finished, resume=resume):
                pass

    # overwrite=true removes the earlier run's checkpoints, model and logs, and nothing else.
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("mine too")
    with claimed_output_dir(accelerator, config(tmp_path, overwrite=True), resume=False):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, "checkpoints", "notes.txt"])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["README"]


def test_the_starting_model_folder_is_never_the_output(accelerator, tmp_path):
    cfg = config(tmp_path, output_dir=str(tmp_path / "model"), overwrite=True)
    with pytest.raises(TrainingSetupError, match="is the starting model's folder"):
        with claimed_output_dir(accelerator, cfg, resume=False):
            pass


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, "seed=0 in the checkpoint but 1 now"),
    ({"global_batch_size": 8}, "global_batch_size=4 in the checkpoint but 8 now"),
    ({"per_device_batch_size": 1}, "per_device_batch_size=2 in the checkpoint but 1 now"),
    ({"data": "other"}, "data='.*/data' in the checkpoint but '.*other' now"),
    ({"model": "other"}, "model='.*/model' in the checkpoint but '.*other' now"),
])
def test_resume_refuses_a_checkpoint_of_other_settings(accelerator, tmp_path, change, message):
    cfg = config(tmp_path)
    fake_checkpoint(Path(cfg.output_dir), 2, run_identity(cfg))
    if change.get("data") or change.get("model"):
        (tmp_path / "other").mkdir()
        change = {key: str(tmp_path / value) for key, value in change.items()}
    with pytest.raises(TrainingSetupError, match=r"cannot resume from .*step-0000002: " + message):
        with claimed_output_dir(accelerator, config(tmp_path, **change), resume=True):
            pass
    with claimed_output_dir(accelerator, cfg, resume=True):  # its own settings resume
        pass


def test_resume_refuses_a_checkpoint_that_records_no_run(accelerator, tmp_path):
    cfg = config(tmp_path)
    fake_checkpoint(Path(cfg.output_dir), 2, run=None)
    with pytest.raises(TrainingSetupError, match="records no run settings"):
        with claimed_output_dir(accelerator, cfg, resume=True):
            pass


def test_only_the_runs_own_checkpoints_are_pruned(tmp_path):
    cfg = config(tmp_path)
    out = Path(cfg.output_dir)
    mine = [fake_checkpoint(out, step, run_identity(cfg)) for step in (2, 4, 6)]
    other = fake_checkpoint(out, 1, {**run_identity(cfg), "seed": 7})
    foreign = out / "checkpoints" / "step-0000003"  # a folder of someone else's, no trainer_state.json
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"keep")
    (out / "checkpoints" / "notes.txt").write_text("keep")
    assert prune_checkpoints(out, run_identity(cfg), keep=2) == [mine[0]]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "notes.txt", other.name, foreign.name, mine[1].name, mine[2].name]
    # A file someone put into the run's own checkpoint survives its pruning, and so does its folder.
    (mine[1] / "notes.txt").write_text("keep")
    assert prune_checkpoints(out, run_identity(cfg), keep=1) == [mine[1]]
    assert [p.name for p in mine[1].iterdir()] == ["notes.txt"]


def test_a_checkpoint_loads_only_with_the_files_it_was_saved_with(tmp_path):
    # A real accelerate checkpoint (pickled optimizer and RNG states) of a small module.
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path / "step-0000001"
    accelerator.save_state(str(folder))
    write_manifest(folder)
    listed = json.loads((folder / MANIFEST).read_text())["sha256"]
    assert {"optimizer.bin", "random_states_0.pkl"} <= set(listed)
    verify_manifest(folder)
    accelerator.load_state(str(folder))

    rng = folder / "random_states_0.pkl"
    original = rng.read_bytes()
    rng.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(TrainingSetupError, match=f"{rng} does not match the SHA-256 recorded when it was saved"):
        verify_manifest(folder)
    rng.write_bytes(original)
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"not ours")
    with pytest.raises(TrainingSetupError, match="custom_checkpoint_0.pkl is not in its manifest"):
        verify_manifest(folder)
    (folder / "custom_checkpoint_0.pkl").unlink()
    (folder / "optimizer.bin").unlink()
    with pytest.raises(TrainingSetupError, match="optimizer.bin is missing"):
        verify_manifest(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(TrainingSetupError, match=f"has no {MANIFEST}"):
        verify_manifest(folder)


def test_metrics_are_cut_back_to_the_resumed_step(accelerator, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 6))
                    + '{"step": 6, "lo')  # the line a kill cut short
    MetricsLog(accelerator, tmp_path, resume_step=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    MetricsLog(accelerator, tmp_path, resume_step=None)
    assert not path.exists()


@pytest.mark.slow
def test_train_py_refuses_a_locked_folder_and_another_runs_checkpoint(tiny_checkpoint, toy_stage, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    command = [sys.executable, str(REPO / "train" / "train.py"), "--config", str(REPO / "configs" / "stage3.yaml"),
               f"model={tiny_checkpoint}", f"data={toy_stage}", f"output_dir={out}", "max_steps=2", "save_every=2",
               "global_batch_size=2", "per_device_batch_size=2", "mixed_precision=no", "gradient_checkpointing=false",
               "num_workers=0"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"handle = open({str(out / LOCK_FILE)!r}, 'a+')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "handle.write(f'pid {os.getpid()} on a test\\n'); handle.flush()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"train.py: output_dir {out} is in use by another training run (pid {holder.pid} on a test holds "
        f"{out / LOCK_FILE}); wait for it to end or choose another output_dir.")
    assert not (out / "checkpoints").exists()

    started = time.monotonic()
    subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    assert (out / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    print(f"training took {time.monotonic() - started:.1f} s")
    checkpoint = out / "checkpoints" / "step-0000002"
    resumed = subprocess.run([*command, "seed=3", "--resume"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"train.py: cannot resume from {checkpoint}: seed=0 in the checkpoint but 3 now. "
        "Resume with the run's own settings, or start a new run (another output_dir, or overwrite=true to replace "
        "this one).")
    # A pickle swapped after the save is never loaded.
    with (checkpoint / "optimizer.bin").open("ab") as handle:
        handle.write(b"\0")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"train.py: cannot resume from {checkpoint}: {checkpoint / 'optimizer.bin'} does not match the SHA-256 "
        "recorded when it was saved (changed since). Resume only from checkpoints your own runs wrote; start a new "
        "run otherwise.")
