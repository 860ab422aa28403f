"""The planner against a measured training step.

`eval/speed.py plan-step` runs the training loop's own set-up for two steps and writes, per process,
what the step held: the bytes of weights, gradients and optimizer states counted from the tensors
(`training_state_census`), the activations saved for backward (`SavedActivations`), and the
micro-batch's shape. `planned_parts` makes the plan of that very step (same checkpoint, stage
config, DeepSpeed settings, process count and sample) and `compare` lines the two up.
"""

from __future__ import annotations

from pathlib import Path

from .planner import (
    MAP_ROWS,
    RunSettings,
    SampleShape,
    activation_bytes,
    count_parameters,
    deepspeed_buffers,
    load_model_config,
    model_shape,
    model_states,
    zero3_partition,
)

STATE_PARTS = ("weights", "gradients", "optimizer")


def sample_of_batch(batch: dict) -> SampleShape:
    """The planner's sample for a measured micro-batch of one sample (`eval/speed.py batch_shape`)."""
    if batch["batch_size"] != 1:
        raise ValueError(f"a measured batch of {batch['batch_size']} samples: compare per-device batches of 1")
    images = batch["images"]
    patches = tuple(t * h * w for t, h, w in (image["grid_thw"] for image in images))
    query = [image["visual_tokens"] for image in images if image["role"] == "query"]
    mapped = batch["pixel_map_requested"] and bool(query)
    return SampleShape(image_patches=patches, llm_tokens=batch["lm_sequence_length"],
                       map_rows=MAP_ROWS if mapped else 1, map_columns=query[-1] if mapped else 1,
                       mask_pixels=batch["mask_pixels"])


def run_settings_of_rank(rank: dict, cfg, hidden: int) -> RunSettings:
    """The RunSettings of a measured process: its DeepSpeed section (sizes already resolved by the
    loop), process count and weight dtype."""
    zero = rank["zero_stage"] or None
    mode = {"float32": "fp32", "bfloat16": "bf16"}[rank["dtype"]] if zero else "fp32"
    return RunSettings.from_deepspeed(
        rank["deepspeed_zero_config"] or {}, hidden, processes=rank["world_size"], zero=zero, mode=mode,
        gradient_checkpointing=rank["gradient_checkpointing"], per_device_batch=1,
        freeze_vision=cfg.freeze_vision, freeze_merger=cfg.freeze_merger)


def planned_parts(checkpoint: str | Path, cfg, rank: dict) -> tuple[dict[str, float], float]:
    """The planner's bytes for the step one process measured: model states, DeepSpeed buffers and the
    activations saved for backward; and the bytes of the states that stay through backward (the
    weights, and ZeRO-3's flat gradient partition in the module's dtype)."""
    config, name, pixels = load_model_config(str(checkpoint))
    shape = model_shape(config, name, pixels)
    params = count_parameters(config, cfg.freeze_vision, cfg.freeze_merger, cfg.lora)
    run = run_settings_of_rank(rank, cfg, shape.hidden)
    sample = sample_of_batch(rank["batch"])
    states = model_states(params, run)
    staying = states["weights"]
    if run.zero == 3:
        staying += run.weight_bytes * zero3_partition(params.trainable_sizes, run.processes)
    parts = {**states, "deepspeed_buffers": deepspeed_buffers(params, run),
             "activations": activation_bytes(shape, sample, run)["saved"]}
    return parts, staying


def measured_parts(rank: dict, staying: float) -> dict[str, float]:
    """The same parts from the census of one process.

    Model states at the optimizer step (`census_before_optimizer_step`: gradients reduced, the AdamW
    states alive), where all three are at their largest. DeepSpeed's buffers at the end of backward
    (`census_backward_end`): everything held then beyond the `staying` states - the reduce buckets,
    ZeRO-2's gradients in partition, ZeRO-3's gathered and persistent weights."""
    step = rank["census_before_optimizer_step"]["parts"]
    parts = {name: float(step[name]) for name in STATE_PARTS}
    parts["activations"] = float(rank["activations"]["bytes"])
    end = rank.get("census_backward_end")
    if end is not None:
        held = end["parts"]
        parts["deepspeed_buffers"] = float(held["weights"] + held["gradients"] + held["buffers"] - staying)
    return parts


def compare(checkpoint: str | Path, cfg, rank: dict) -> dict[str, dict[str, float]]:
    """{part: {planned, measured, rel_error}} for one measured process."""
    planned, staying = planned_parts(checkpoint, cfg, rank)
    measured = measured_parts(rank, staying)
    return {name: {"planned": planned[name], "measured": value,
                   "rel_error": abs(planned[name] - value) / value if value else float(planned[name] != 0)}
            for name, value in measured.items()}
