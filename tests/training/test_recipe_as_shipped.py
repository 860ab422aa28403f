"""The training recipe as users launch it: gradient checkpointing on with pixel maps and the pixel loss,
every kind of batch running the same modules in the same order (what ZeRO-3 needs of every rank),
DeepSpeed ZeRO-2/3 on 2 CPU processes over a stage that replays stage 2, and the three shipped stage
configs in a chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from iadgpt.data.records import StageInfo, TrainingRecord, read_records
from iadgpt.model import load_model
from iadgpt.training.collator import RecordCollator
from iadgpt.training.trainer import enable_gradient_checkpointing

REPO = Path(__file__).resolve().parents[2]
# What configs/stage3.yaml ships, and its commented beyond-the-paper block switched on.
SHIPPED_STAGE3 = yaml.safe_load((REPO / "configs" / "stage3.yaml").read_text())["iadgpt"]
RESIDUALS = {**SHIPPED_STAGE3, "score_loss_weight": 1.0,
             "residuals": {"tokens": True, "scores": True, "shifted_exemplars": True, "shifted_query": True,
                           "map_attention": False}}
SETTINGS = {"shipped": SHIPPED_STAGE3, "no_compression": {**SHIPPED_STAGE3, "exemplar_retention": 1.0},
            "residuals": RESIDUALS}


def records_by_task(folder: Path) -> dict[str, list[dict]]:
    found = defaultdict(list)
    for record in read_records(folder):
        found[record.task].append(json.loads(record.to_json()))
    return found


def detection_records(folder: Path, shots: int) -> tuple[dict, dict]:
    """A defective record with a mask and a normal one, both with `shots` exemplars."""
    detection = [r for r in records_by_task(folder)["detection"] if r["image_roles"].count("exemplar") == shots]
    defective = next(r for r in detection if r["mask"])
    normal = next(r for r in detection if r["label"] == 0)
    return defective, normal


def loss_and_gradients(model, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    parts = {name: float(getattr(output, name)) for name in ("loss", "lm_loss", "focal_loss", "dice_loss", "score_loss")
             if getattr(output, name) is not None}
    return parts, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("settings", SETTINGS)
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_checkpoint, tiny_processor, built_stages,
                                                                   settings):
    folder = built_stages / "stage3"
    info = StageInfo.read(folder)
    model = load_model(tiny_checkpoint, iadgpt=SETTINGS[settings], processor=tiny_processor).train()
    defective, normal = detection_records(folder, shots=4)
    batches = {  # the normal query with an all-zero mask, then with no mask (no map, no pixel loss)
        "masks": RecordCollator(tiny_processor, info, pixel_loss_on_normals=True)([defective, normal]),
        "one_mask": RecordCollator(tiny_processor, info, pixel_loss_on_normals=False)([defective, normal]),
    }
    assert batches["one_mask"]["pixel_masks"][1] is None
    for name, batch in batches.items():
        model.gradient_checkpointing_disable()
        plain_parts, plain_grads = loss_and_gradients(model, batch)
        enable_gradient_checkpointing(model)
        checkpointed_parts, checkpointed_grads = loss_and_gradients(model, batch)
        assert {"focal_loss", "dice_loss"} <= set(plain_parts), name
        assert checkpointed_parts == pytest.approx(plain_parts, rel=1e-4), name
        assert checkpointed_grads.keys() == plain_grads.keys()
        for key, grad in plain_grads.items():
            torch.testing.assert_close(checkpointed_grads[key], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-12,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
        # The pixel loss reaches the attention-map layers through their recomputation.
        layer = model.iadgpt.attention_map_layers[0] - 1
        assert checkpointed_grads[f"model.language_model.layers.{layer}.self_attn.q_proj.weight"].abs().max() > 0


def call_and_gradient_order(model, batch) -> tuple[list[str], list[str]]:
    """The modules that own parameters, in the order their forward runs (recomputations included), and
    the parameters in the order their gradients are ready: what ZeRO-3 gathers and reduces, in order."""
    calls, ready = [], []
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
               for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]
    handles += [param.register_post_accumulate_grad_hook(lambda p, name=name: ready.append(name))
                for name, param in model.named_parameters() if param.requires_grad]
    try:
        model.zero_grad()
        model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return calls, ready


def first_difference(a: list[str], b: list[str]) -> str:
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at {index}: {a[index:index + 3]} vs {b[index:index + 3]} (lengths {len(a)}, {len(b)})"


@pytest.mark.parametrize("settings, freeze_vision", [("shipped", True), ("residuals", False)])
def test_every_kind_of_batch_runs_the_same_modules_in_the_same_order(tiny_checkpoint, tiny_processor, built_stages,
                                                                     settings, freeze_vision):
    """A rank's batch may hold any task of a replay-mixed stage, or no image at all: under ZeRO-3 the
    ranks gather every module's weights and reduce every gradient together, so the order must not
    depend on the batch."""
    from iadgpt.training.trainer import freeze_vision_encoder

    folder = built_stages / "stage3"
    collator = RecordCollator(tiny_processor, StageInfo.read(folder))
    model = load_model(tiny_checkpoint, iadgpt=SETTINGS[settings], processor=tiny_processor).train()
    enable_gradient_checkpointing(model)
    if freeze_vision:
        freeze_vision_encoder(model)
    tasks = records_by_task(folder)
    assert {"caption", "odd_one_out", "difference_regions", "irregular_region", "detection", "reasoning"} <= set(tasks)
    defective, normal = detection_records(folder, shots=2)
    text_only = TrainingRecord(id="text", task="reasoning", root="factory", images=[], image_roles=[], messages=[
        {"role": "user", "content": [{"type": "text", "text": "What makes a scratch a defect?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It breaks the surface."}]}])
    batches = {task: collator(records[:1]) for task, records in tasks.items()}
    batches.update({"detection with mask": collator([defective]), "normal detection": collator([normal]),
                    "mixed": collator([defective, tasks["caption"][0]]),
                    "no image": collator([json.loads(text_only.to_json())])})
    assert "dummy_pixel_values" in batches["no image"]
    reference_name, reference = None, None
    for name, batch in batches.items():
        calls, ready = call_and_gradient_order(model, batch)
        if reference is None:
            reference_name, reference = name, (calls, ready)
            assert any(".merger." in c for c in calls) and any("q_proj" in c for c in calls)
            continue
        assert calls == reference[0], f"module calls of {name!r} differ from {reference_name!r} " + \
            first_difference(calls, reference[0])
        assert ready == reference[1], f"gradient order of {name!r} differs from {reference_name!r} " + \
            first_difference(ready, reference[1])


def launch(launcher: str, config: str, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / launcher), str(REPO / "train" / "train.py"),
               "--config", str(REPO / "configs" / config), *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_trains_a_replay_mixed_stage_with_gradient_checkpointing(tiny_checkpoint, built_stages, tmp_path,
                                                                          zero):
    """Each rank gets one record per micro-batch from a stage-3 folder that replays stage 2 (which
    replays stage 1): ranks meet different tasks at the same step, with the shipped checkpointing."""
    out = tmp_path / f"zero{zero}"
    launch(f"cpu_2proc_zero{zero}.yaml", "stage3.yaml", [
        f"model={tiny_checkpoint}", f"data={built_stages / 'stage3'}", f"output_dir={out}", "max_steps=8",
        "global_batch_size=4", "per_device_batch_size=1", "learning_rate=1.0e-2", "warmup_ratio=0.0",
        "freeze_vision=false", "num_workers=0", "max_minutes=30"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["processes"] == 2 and summary["ranks_hold_equal_weights"], summary
    curve = losses(out)
    assert (curve[7] + curve[8]) / 2 < (curve[1] + curve[2]) / 2 - 0.4, curve
    # The saved folder is a plain checkpoint the next stage loads, with the stage's settings.
    assert load_model(out).iadgpt.exemplar_retention == SHIPPED_STAGE3["exemplar_retention"]


@pytest.mark.slow
def test_the_shipped_stage_configs_train_in_a_chain(tiny_checkpoint, built_stages, tmp_path):
    """configs/stage1.yaml -> stage2.yaml -> stage3.yaml under ZeRO-3 on 2 processes, overriding only the
    model, data, output folder and sizes: gradient checkpointing, the frozen stage-3 encoder, the
    learning rates, max_length, workers and the stage-3 IADGPT settings are the shipped ones. bf16 is
    the one shipped setting this CPU does not run: DeepSpeed's CPU accelerator trains in fp32 (the CPU
    accelerate configs carry no mixed_precision, so the DeepSpeed config's bf16 "auto" resolves to off)."""
    from safetensors.torch import load_file

    previous = tiny_checkpoint
    for stage in (1, 2, 3):
        out = tmp_path / f"stage{stage}"
        shipped = yaml.safe_load((REPO / "configs" / f"stage{stage}.yaml").read_text())
        assert shipped["gradient_checkpointing"] is True
        launch("cpu_2proc_zero3.yaml", f"stage{stage}.yaml", [
            f"model={previous}", f"data={built_stages / f'stage{stage}'}", f"output_dir={out}", "max_steps=2",
            f"global_batch_size={2 * shipped['per_device_batch_size']}"])
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["ranks_hold_equal_weights"], summary
        previous = out
    weights = {stage: load_file(tmp_path / f"stage{stage}" / "model.safetensors") for stage in (1, 2, 3)}
    start = load_file(tiny_checkpoint / "model.safetensors")
    encoder = [k for k in start if k.startswith("visual.blocks.")]
    assert encoder
    assert any(not torch.equal(start[k], weights[1][k]) for k in encoder)  # stages 1 and 2 train the encoder
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in encoder)
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in encoder)  # stage 3 freezes it
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[3] if not k.startswith("visual."))
    assert load_model(tmp_path / "stage3").iadgpt.exemplar_retention == SHIPPED_STAGE3["exemplar_retention"]
