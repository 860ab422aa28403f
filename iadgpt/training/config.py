"""Settings of one training stage (`configs/stage<N>.yaml`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


def _iadgpt_settings():
    """The schema of TrainConfig.iadgpt, imported when a config uses it (the model package loads torch)."""
    from ..model.settings import IADGPTSettings

    return IADGPTSettings


def _check(problems: list[str], name: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        problems.append(f"{name}={value!r} {requirement}")


@dataclass
class LoraSettings:
    """Optional LoRA (peft) on the language model instead of full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters instead of the full weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters (matched inside the language model only)."""
    merge: bool = True
    """Merge the adapters into the weights when saving, so the output is a plain checkpoint."""

    def __post_init__(self):
        problems: list[str] = []
        _check(problems, "r", self.r, self.r >= 1, "must be >= 1")
        _check(problems, "alpha", self.alpha, self.alpha > 0, "must be > 0")
        _check(problems, "dropout", self.dropout, 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class TrainConfig:
    """One stage of IADGPT training. Defaults are the paper's stage-3 settings on 8 H100s."""

    stage: int = 3
    """1 industrial knowledge, 2 discrepancy awareness, 3 few-shot detection/localization/reasoning."""
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Starting checkpoint: the previous stage's output folder, a local Qwen2.5-VL folder or a hub name."""
    data: str = "data/stage3"
    """Stage folder written by data_builders/ (info.json + JSONL shards)."""
    output_dir: str = "runs/stage3"
    """Where the final checkpoint, metrics.jsonl, TensorBoard logs and resumable checkpoints go. One
    run at a time: a second run on the same folder is refused while the first holds its lock."""
    overwrite: bool = False
    """Let a fresh run (no `--resume`) replace the checkpoints, final model and logs of an earlier
    run in `output_dir`. Off: such a folder is refused, so finished work is never lost by a typo."""
    learning_rate: float = 2e-6
    """Peak learning rate of AdamW (paper: 1e-5, 1e-5, 2e-6 for stages 1-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up, before the cosine decay."""
    global_batch_size: int = 32
    """Samples per optimizer step over all processes (paper: 64, 32, 32); the gradient accumulation
    steps follow from it and the per-device batch size."""
    per_device_batch_size: int = 1
    """Samples per process per forward pass."""
    epochs: float = 1.0
    """Passes over the data (paper: 3, 1, 1)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    max_minutes: float | None = None
    """Stop (and save) after this much wall time."""
    fit_steps_to_minutes: bool = False
    """With max_minutes: treat max_steps (or the epochs' steps) as a first estimate and re-plan it
    from the recent pace at every tenth of the time (`StepBudget`), so the learning-rate schedule
    decays to its end just as the time runs out (the quickstart's stages; a fixed-time run on any
    machine)."""
    freeze_vision: bool = True
    """Freeze the vision encoder (paper: stage 3 only). The merger and fusion weights stay trainable
    unless `freeze_merger` is set."""
    freeze_merger: bool = False
    """With freeze_vision, also freeze the patch merger and the fusion weights."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Compute dtype without DeepSpeed: the forward runs under accelerate's bf16/fp16 autocast while
    the weights stay fp32 (the optimizer's master copy; bf16 autocast also runs on a CPU, slower than
    fp32 there). Under DeepSpeed the launch configuration's mixed_precision decides instead (its
    engine keeps fp32 master weights itself)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant, so the pixel loss keeps its gradients)."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel of both towers. flash_attention_2 runs where the `gpu` extra (flash-attn) and
    a CUDA device are present; elsewhere sdpa is used, with a one-line warning."""
    max_length: int = 8192
    """Records longer than this many tokens are skipped and reported (never cut inside an image)."""
    min_pixels: int | None = None
    """Smallest image area after resizing. None: the model's processor's (released Qwen2.5-VL: 3136).
    Together with max_pixels this is the pixel frame of the records' boxes, so it must be the one
    the stage was built with (checked); the saved model's processor keeps it for evaluation."""
    max_pixels: int | None = None
    """Largest image area after resizing; caps the visual tokens per image (a 28 x 28 square is
    one). None: the model's processor's (released Qwen2.5-VL: 12845056). Must be the stage's."""
    iadgpt: dict[str, Any] = field(default_factory=dict, metadata={"schema": _iadgpt_settings})
    """Overrides of the model's IADGPT settings (`iadgpt.model.settings.IADGPTSettings`, e.g.
    exemplar_retention, pixel_loss_weight), merged into the starting model's; on the command line
    `iadgpt.exemplar_retention=0.5`. Keys and types are checked when the config is read, ranges when
    the model loads with them."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA instead of full fine-tuning."""
    save_every: int = 500
    """Write a resumable checkpoint every this many optimizer steps."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep."""
    log_every: int = 1
    """Log the loss parts every this many optimizer steps."""
    seed: int = 0
    """Seeds the data order, initialisation of new weights and dropout."""
    num_workers: int = 2
    """DataLoader worker processes (images are decoded there)."""
    pixel_loss_on_normals: bool = True
    """Normal query images get an all-zero mask in the pixel loss."""

    def __post_init__(self):
        """Refuse values no run can use, naming each (a negative max_steps trained 0 steps and exited 0)."""
        problems: list[str] = []
        positive = "must be a finite number > 0"
        _check(problems, "stage", self.stage, self.stage in (1, 2, 3), "must be 1, 2 or 3")
        _check(problems, "learning_rate", self.learning_rate,
               math.isfinite(self.learning_rate) and self.learning_rate > 0, positive)
        _check(problems, "weight_decay", self.weight_decay, math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "must be a finite number >= 0")
        _check(problems, "warmup_ratio", self.warmup_ratio, 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)")
        _check(problems, "epochs", self.epochs, math.isfinite(self.epochs) and self.epochs > 0, positive)
        _check(problems, "max_steps", self.max_steps, self.max_steps is None or self.max_steps >= 1,
               "must be >= 1 (or unset: `epochs` decides)")
        _check(problems, "max_minutes", self.max_minutes,
               self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
               positive + " (or unset: no time limit)")
        for name in ("global_batch_size", "per_device_batch_size", "max_length", "save_every", "keep_checkpoints",
                     "log_every"):
            _check(problems, name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
        for name in ("seed", "num_workers"):
            _check(problems, name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        if not problems and self.global_batch_size % self.per_device_batch_size:
            problems.append(f"global_batch_size={self.global_batch_size} is not a multiple of "
                            f"per_device_batch_size={self.per_device_batch_size}")
        if self.fit_steps_to_minutes and self.max_minutes is None:
            problems.append("fit_steps_to_minutes=true needs max_minutes: a time budget to fit the steps to")
        if problems:
            raise ValueError("; ".join(problems))
