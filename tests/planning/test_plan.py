"""`iadgpt plan`: coefficients fitted exactly, parameter counts equal the real model's, model states
equal the memory census of a real training step, and bad requests get clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iadgpt.cli import main
from iadgpt.planning.activations import _decoder_layer_bytes, coefficients, decoder_matmul_weights
from iadgpt.planning.check import STATE_PARTS, compare
from iadgpt.planning.planner import (ParameterCounts, RunSettings, count_parameters, deepspeed_buffers,
                                     load_model_config, model_states, zero2_padded, zero2_partition_gradients,
                                     zero3_partition)


def test_decoder_coefficients_predict_a_layer_they_were_not_fitted_on():
    # 320 wide, 5 heads of 64, 1 KV head, 480 intermediate, 40 tokens: none of the fitted shapes
    for mode in ("fp32", "bf16", "autocast"):
        c = coefficients(mode).decoder
        predicted = 40 * (c["hidden"] * 320 + c["kv"] * 64 + c["intermediate"] * 480 + c["heads"] * 5 + c["tokens"]) \
            + c["weights"] * decoder_matmul_weights(320, 64, 480)
        assert predicted == _decoder_layer_bytes(mode, 320, 5, 1, 480, 40)


def test_parameter_counts_equal_the_checkpoints(tiny_checkpoint):
    from iadgpt.model import load_model
    from iadgpt.training.trainer import freeze_vision_encoder

    config, _, _ = load_model_config(str(tiny_checkpoint))
    model = load_model(tiny_checkpoint)
    freeze_vision_encoder(model, keep_merger=True)
    counts = count_parameters(config, freeze_vision=True, freeze_merger=False)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_states_without_deepspeed_equal_the_census_of_a_real_step(tiny_checkpoint):
    from iadgpt.model import load_model
    from iadgpt.utils.memory_census import training_state_census

    config, _, _ = load_model_config(str(tiny_checkpoint))
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    census = training_state_census(model, optimizer)["parts"]
    planned = model_states(count_parameters(config, False, False),
                           RunSettings(processes=1, zero=None, mode="autocast", gradient_checkpointing=True,
                                       per_device_batch=1, freeze_vision=False))
    assert planned["weights"] == census["weights"]
    assert planned["gradients"] == census["gradients"]
    assert planned["optimizer"] == census["optimizer"]  # the two moments and a 4-byte step per tensor


def test_deepspeed_partitions_are_padded_as_deepspeed_pads_them():
    # Trainable tensors of 5, 3 and 7 elements, a frozen one of 9, on 2 processes.
    params = ParameterCounts(total=24, trainable=15, sizes=[5, 9, 3, 7], trainable_flags=[True, False, True, True])
    assert zero2_padded(15, 2) == 16  # one flat buffer, a multiple of 2 x processes
    assert zero3_partition(params.trainable_sizes, 2) == 3 + 2 + 4  # each tensor on its own, rounded up
    # ZeRO-2 partitions [0, 8) and [8, 16): the 5 and the 3 meet the first, the 7 the second
    assert zero2_partition_gradients(params, 2) == 8
    run = dict(processes=2, mode="bf16", gradient_checkpointing=True, per_device_batch=1, freeze_vision=False,
               reduce_bucket_size=100, prefetch_bucket_size=10, persistence_threshold=4)
    assert model_states(params, RunSettings(zero=2, **run)) == {
        "weights": 2 * (16 + 9), "gradients": (4 + 2) * 8, "optimizer": 12 * 8 + 4}
    assert model_states(params, RunSettings(zero=3, **run)) == {
        "weights": 2 * (9 + 5), "gradients": (2 + 4) * 9, "optimizer": 12 * 9 + 4}
    assert deepspeed_buffers(params, RunSettings(zero=2, **run)) == 2 * (2 * 100 + 8)  # overlap_comm: 2 buckets
    assert deepspeed_buffers(params, RunSettings(zero=3, **run)) == 2 * (100 + 3 + 10 + 9)  # bucket, whole, gathered


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_the_plan_of_a_real_zero_step_equals_what_it_held(zero, tiny_checkpoint, zero2_step_census, zero3_step_census):
    """The shipped stage-3 recipe on 2 CPU processes: every rank's weights, gradients and optimizer
    states equal the plan to the byte, the buffers and activations come close."""
    from iadgpt.config import load_config
    from iadgpt.training.config import TrainConfig

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "configs" / "stage3.yaml")
    census = {2: zero2_step_census, 3: zero3_step_census}[zero]
    for rank in census["ranks"]:
        parts = compare(tiny_checkpoint, cfg, rank)
        for part in STATE_PARTS:
            assert parts[part]["planned"] == parts[part]["measured"], (zero, rank["rank"], part)
        assert parts["activations"]["rel_error"] < 0.1, parts["activations"]
        assert parts["deepspeed_buffers"]["rel_error"] < (0.01 if zero == 2 else 0.2), parts["deepspeed_buffers"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "qwen9"], "neither a known model (tiny, small, qwen2.5-vl-3b"),
    (["--model", "tiny", "--gpus", "0"], "--gpus 0 --nodes 1: a plan needs at least one GPU"),
    (["--model", "tiny", "--zero", "0", "--offload"], "--offload moves DeepSpeed's optimizer states"),
    (["--model", "tiny", "--zero", "3", "--lora"], "--lora with --zero 3: the recipe refuses it"),
    (["--model", "tiny", "--max-pixels", "100"], "--max-pixels 100: min_pixels=3136 is above max_pixels=100"),
    (["--model", "tiny", "--max-pixels", "0"], "--max-pixels 0: max_pixels=0: a pixel limit is a positive"),
])
def test_bad_requests_are_refused_clearly(argv, message):
    base = {"--gpus": "1", "--gpu-memory": "24", "--stage": "3"}
    args = ["plan", *argv]
    for key, value in base.items():
        if key not in argv:
            args += [key, value]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("+", r"\+")):
        main(args)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="the folder has no config.json"):
        main(["plan", "--model", str(tmp_path), "--stage", "1", "--gpus", "1", "--gpu-memory", "24"])


def test_the_7b_plan_does_not_fit_one_24gb_gpu_and_lora_is_suggested(capsys):
    assert main(["plan", "--model", "qwen2.5-vl-7b", "--stage", "3", "--gpus", "1", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "verdict: does NOT fit" in out and "--lora" in out


def test_a_checkpoint_folder_is_planned_with_its_own_processor_and_sizes(tiny_checkpoint, capsys):
    """The tiny checkpoint folder plans as the tiny preset it was made from: same parameters, and the
    pixel limits of the processor saved with it (64 visual tokens for a 1024-px image, not 1369)."""
    common = ["--stage", "3", "--gpus", "1", "--gpu-memory", "24", "--json"]
    plans = []
    for model in (str(tiny_checkpoint), "tiny"):
        assert main(["plan", "--model", model, *common]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0]["tokens_per_sample"] == plans[1]["tokens_per_sample"]
    assert plans[0]["tokens_per_sample"]["visual_per_image"] == 64
    assert plans[0]["parameters"] == plans[1]["parameters"]
