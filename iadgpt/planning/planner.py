"""`iadgpt plan`: GPU memory, tokens and time of a training stage, before it is launched.

What a training process holds, per GPU:
- **model states**: weights, gradients and optimizer states (fp32 master weights and AdamW's two
  moments), sharded as the chosen DeepSpeed ZeRO stage shards them (`model_states`);
- **DeepSpeed buffers**: gradient-reduction buckets, ZeRO-3's prefetch bucket and the parameters it
  keeps whole (`deepspeed_buffers`);
- **activations**: what the forward pass saves for backward, per sample (`activation_bytes`), scaled
  from per-layer coefficients measured on the installed transformers (`activations.coefficients`);
- **backward peak**: what exists only during backward (the logits' gradient, the recomputed layer).

Parameter counts come from the real model class built on the meta device (no memory, no weights):
exact for any checkpoint, with the stage's frozen parts and LoRA adapters applied by the same
functions training uses.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from ..model.compression import exemplar_token_count
from .activations import coefficients, decoder_matmul_weights, merger_matmul_weights, vision_matmul_weights

GIB = 1024 ** 3
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Text tokens of one sample besides the images: chat template, question and answer (measured on
# the builders' records: captions run longest in stage 1, reasoning answers in stage 3).
TEXT_TOKENS = {1: 200, 2: 120, 3: 200}
# Images per sample: a caption's one image; stage 2's odd-one-out group (data_builders/stage2.py
# --group-size); stage 3's exemplars + query come from --shots.
STAGE2_IMAGES = 4
# Word rows of the pixel map in a stage-3 prompt (the anomaly and normal words after the query image).
MAP_ROWS = 4


class PlanError(ValueError):
    """A plan that cannot be made, with the reason."""


# -- the model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The widths and depths of a Qwen2.5-VL checkpoint that memory and FLOPs depend on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    patch_size: int
    merge_size: int
    fusion_layers: int
    map_layers: int
    min_pixels: int
    max_pixels: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@functools.lru_cache(maxsize=8)
def load_model_config(model: str):
    """(Qwen2_5_VLConfig, name, (min_pixels, max_pixels)) of a preset name (at the released depth)
    or a checkpoint folder."""
    from ..model.checkpoint import (PRESETS, QWEN2_5_VL_MAX_PIXELS, QWEN2_5_VL_MIN_PIXELS, load_processor,
                                    pixel_limits, preset_config, preset_tokenizer)

    if model in PRESETS:
        preset = PRESETS[model].released()
        return preset_config(preset, preset_tokenizer(preset)), model, (preset.min_pixels, preset.max_pixels)
    path = Path(model)
    if not path.exists():
        raise PlanError(f"--model {model}: neither a known model ({', '.join(PRESETS)}) nor an existing folder")
    if not (path / "config.json").is_file():
        raise PlanError(f"--model {model}: the folder has no config.json (a Hugging Face checkpoint folder has one)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as err:
        raise PlanError(f"--model {model}: config.json cannot be read: {err}") from err
    if getattr(config, "model_type", None) not in ("qwen2_5_vl",):
        raise PlanError(f"--model {model}: config.json is a {getattr(config, 'model_type', '?')!r} model; "
                        "the planner knows Qwen2.5-VL (model_type 'qwen2_5_vl')")
    pixels = (QWEN2_5_VL_MIN_PIXELS, QWEN2_5_VL_MAX_PIXELS)  # a folder without a processor: the released one's
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        try:
            pixels = pixel_limits(load_processor(path))
        except (OSError, ValueError) as err:
            raise PlanError(f"--model {model}: its processor cannot be read: {err}") from err
    return config, path.name, pixels


@dataclass
class ParameterCounts:
    """Parameters of the model as one stage trains it."""

    total: int
    trainable: int
    sizes: list[int] = field(repr=False, default_factory=list)
    """Every parameter's element count, in `model.parameters()` order (DeepSpeed's flattening order)."""
    trainable_flags: list[bool] = field(repr=False, default_factory=list)
    vision: int = 0
    text_non_embedding: int = 0
    """The language model's layers (for FLOPs)."""
    lm_head: int = 0

    @property
    def trainable_sizes(self) -> list[int]:
        return [n for n, trains in zip(self.sizes, self.trainable_flags) if trains]

    @property
    def frozen_sizes(self) -> list[int]:
        return [n for n, trains in zip(self.sizes, self.trainable_flags) if not trains]


def count_parameters(config, freeze_vision: bool, freeze_merger: bool, lora=None) -> ParameterCounts:
    """Build the IADGPT model on the meta device and count, after the stage's freezing and LoRA."""
    from ..model.modeling_iadgpt import IADGPTForConditionalGeneration
    from ..training.trainer import freeze_vision_encoder

    with torch.device("meta"):
        model = IADGPTForConditionalGeneration(config)
        if freeze_vision:
            freeze_vision_encoder(model, keep_merger=not freeze_merger)
        if lora is not None and lora.enabled:
            from ..training.trainer import add_lora

            with warnings.catch_warnings():  # peft asks the meta model about checkpointing by a deprecated name
                warnings.simplefilter("ignore", FutureWarning)
                model = add_lora(model, SimpleNamespace(lora=lora, freeze_vision=freeze_vision))
    counts = ParameterCounts(total=0, trainable=0)
    for name, param in model.named_parameters():
        counts.total += param.numel()
        counts.trainable += param.numel() if param.requires_grad else 0
        counts.sizes.append(param.numel())
        counts.trainable_flags.append(param.requires_grad)
        if ".visual." in f".{name}" or name.startswith("visual."):
            counts.vision += param.numel()
        elif ".layers." in name:
            counts.text_non_embedding += param.numel()
        elif "lm_head" in name:
            counts.lm_head += param.numel()
    if counts.lm_head == 0:  # tied: the head is the embedding
        counts.lm_head = config.text_config.vocab_size * config.text_config.hidden_size
    return counts


def model_shape(config, name: str, pixels: tuple[int, int]) -> ModelShape:
    from ..model.settings import IADGPTSettings

    text, vision = config.text_config, config.vision_config
    settings = IADGPTSettings.from_dict(getattr(config, "iadgpt", None)).resolved(vision.depth, text.num_hidden_layers)
    return ModelShape(
        name=name, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads, intermediate=text.intermediate_size, vocab=text.vocab_size,
        vision_hidden=vision.hidden_size, vision_depth=vision.depth, vision_heads=vision.num_heads,
        vision_intermediate=vision.intermediate_size, patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size, fusion_layers=len(settings.vision_fusion_layers),
        map_layers=len(settings.attention_map_layers), min_pixels=pixels[0], max_pixels=pixels[1])


# -- one sample ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleShape:
    """What one training sample puts through the model."""

    image_patches: tuple[int, ...]
    """Vision patches of each image (before the 2 x 2 merge into visual tokens)."""
    llm_tokens: int
    """Tokens the language model runs on (text + visual tokens, after exemplar compression)."""
    map_rows: int
    """Word rows of the pixel map (training computes at least one in every sample)."""
    map_columns: int
    """Visual tokens of the query image (the pixel map's columns)."""
    mask_pixels: int = 0
    """Pixels of the defect mask the pixel loss compares the map with (the query image's own size;
    0 for a sample without the pixel loss)."""

    @property
    def patches(self) -> int:
        return sum(self.image_patches)


def image_patches(shape: ModelShape, height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    """Vision patches of an image after the processor's resize (Qwen's smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = shape.patch_size * shape.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // shape.patch_size) * (w // shape.patch_size)


def stage_sample(shape: ModelShape, stage: int, shots: int, image_size: int, min_pixels: int, max_pixels: int,
                 retention: float, text_tokens: int | None = None) -> tuple[SampleShape, dict]:
    """The largest sample of a stage (stage 3: `shots` exemplars + the query) and its token counts
    (`retention` 1.0: exemplars uncompressed)."""
    patches = image_patches(shape, image_size, image_size, min_pixels, max_pixels)
    per_image = patches // shape.merge_size ** 2
    images = {1: 1, 2: STAGE2_IMAGES, 3: shots + 1}[stage]
    text = TEXT_TOKENS[stage] if text_tokens is None else text_tokens
    exemplars = images - 1 if stage == 3 else 0
    compressed_exemplars = exemplar_token_count(per_image, exemplars, retention)
    llm_tokens = text + (images - exemplars) * per_image + compressed_exemplars
    tokens = {"text": text, "visual_per_image": per_image, "images": images,
              "exemplars_uncompressed": exemplars * per_image, "exemplars_compressed": compressed_exemplars,
              "total": llm_tokens, "total_uncompressed": text + images * per_image}
    sample = SampleShape(image_patches=(patches,) * images, llm_tokens=llm_tokens,
                         map_rows=MAP_ROWS if stage == 3 else 1, map_columns=per_image if stage == 3 else 1,
                         mask_pixels=image_size * image_size if stage == 3 else 0)
    return sample, tokens


# -- memory ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """How the stage runs: parallelism, precision and the switches that move memory."""

    processes: int
    """GPUs over all nodes (DeepSpeed shards over all of them)."""
    zero: int | None
    """DeepSpeed ZeRO stage (1, 2, 3) or None without DeepSpeed (DDP / one process)."""
    mode: str
    """"bf16" (DeepSpeed's bf16 engine), "fp32" (fp32 throughout: DeepSpeed on a CPU, or
    mixed_precision=no), "autocast" (no DeepSpeed: fp32 weights, bf16 autocast)."""
    gradient_checkpointing: bool
    per_device_batch: int
    freeze_vision: bool
    freeze_merger: bool = False
    offload: bool = False
    """ZeRO-Offload: optimizer states (and ZeRO-3's weights) in CPU memory."""
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of the module's weights (and of DeepSpeed's gradient buffers)."""
        return 2 if self.mode == "bf16" else 4

    @classmethod
    def from_deepspeed(cls, zero_config: dict, hidden: int, **settings) -> "RunSettings":
        """Settings with the bucket sizes of a DeepSpeed `zero_optimization` section, its "auto"
        entries resolved as the training loop resolves them (`deepspeed_auto_sizes`), absent ones
        at DeepSpeed's defaults."""
        from ..training.trainer import deepspeed_auto_sizes

        auto = deepspeed_auto_sizes(hidden)

        def size(key: str) -> int:
            value = zero_config.get(key, getattr(cls, _FIELD_OF[key]))
            return auto[key] if value == "auto" else int(value)

        return cls(**settings, reduce_bucket_size=size("reduce_bucket_size"),
                   overlap_comm=bool(zero_config.get("overlap_comm", True)),
                   contiguous_gradients=bool(zero_config.get("contiguous_gradients", True)),
                   prefetch_bucket_size=size("stage3_prefetch_bucket_size"),
                   persistence_threshold=size("stage3_param_persistence_threshold"))


_FIELD_OF = {"reduce_bucket_size": "reduce_bucket_size", "stage3_prefetch_bucket_size": "prefetch_bucket_size",
             "stage3_param_persistence_threshold": "persistence_threshold"}


def zero2_padded(trainable: int, processes: int) -> int:
    """Elements of ZeRO-1/2's flat buffer of the trainable parameters: padded so that every
    process's partition holds the same even number (`nccl_start_alignment_factor` 2 x processes)."""
    align = 2 * processes
    return -(-trainable // align) * align


def zero3_partition(sizes: list[int], processes: int) -> int:
    """Elements one process holds of `sizes` under ZeRO-3, which partitions every parameter on its
    own, padded to a multiple of the process count."""
    return sum(-(-n // processes) for n in sizes)


def zero2_partition_gradients(params: ParameterCounts, processes: int) -> int:
    """Elements of ZeRO-2's `grads_in_partition` on the fullest process: the whole of every trainable
    parameter that overlaps its partition of the flat buffer (a parameter across a boundary counts
    on both sides). It holds the reduced gradients from the first full bucket until the step."""
    padded = zero2_padded(params.trainable, processes)
    part = padded // processes
    fullest, start = 0, 0
    ends = []
    for n in params.trainable_sizes:
        ends.append((start, start + n))
        start += n
    for rank in range(processes):
        low, high = rank * part, (rank + 1) * part
        fullest = max(fullest, sum(e - s for s, e in ends if s < high and e > low))
    return fullest


def model_states(params: ParameterCounts, run: RunSettings) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer states one process holds at the optimizer step.

    Checked to the byte on this CPU (fp32) against the tensors of a real step
    (`eval/speed.py plan`; docs/experiments/2026-12-05-training-step-census.md):
    - without DeepSpeed the fp32 weights are the optimizer's master copy: 4 bytes per parameter,
      4 per trainable gradient, AdamW's two moments (8) and one 4-byte `step` per trainable tensor;
    - ZeRO-1/2 flatten the trainable parameters into one buffer padded to `zero2_padded` elements;
      each process keeps all weights, and of its partition the fp32 gradient, a separate fp32 master
      copy (even of fp32 weights) and the two moments;
    - ZeRO-3 partitions every parameter (`zero3_partition`): the weights, the flat gradient
      partition in the module's dtype, the fp32 master's gradient made for the step, the master
      and the moments.
    With bf16 weights (b = 2) the sizes follow DeepSpeed's source, not a measurement: the step
    converts the 16-bit gradient partition to fp32, so both count.
    """
    n, b = run.processes, run.weight_bytes
    trainable, frozen = params.trainable, params.total - params.trainable
    if run.zero is None:
        return {"weights": 4.0 * params.total, "gradients": 4.0 * trainable,
                "optimizer": 8.0 * trainable + 4.0 * len(params.trainable_sizes)}
    if run.zero == 3:
        part = zero3_partition(params.trainable_sizes, n)
        weights = b * (part + zero3_partition(params.frozen_sizes, n))
        gradients = b * part + 4 * part
    else:
        padded = zero2_padded(trainable, n)
        part = padded // n
        weights = b * (padded + frozen)
        gradients = 4 * part + (b * part if b != 4 else 0) + (b * padded if run.zero == 1 else 0)
    optimizer = 12 * part + 4
    if run.offload:  # the fp32 master, its gradient and the moments live in CPU memory
        optimizer = 0
        gradients = b * part if run.zero >= 2 else b * padded
        if run.zero == 3:
            weights = 0
    return {"weights": float(weights), "gradients": float(gradients), "optimizer": float(optimizer)}


def deepspeed_buffers(params: ParameterCounts, run: RunSettings) -> float:
    """Bytes DeepSpeed holds on top of the model states while backward runs, per process.

    ZeRO-1/2 with contiguous gradients: one reduce bucket of `reduce_bucket_size` elements, two
    with overlap_comm, and ZeRO-2's `grads_in_partition` (`zero2_partition_gradients`). ZeRO-3: one
    reduce bucket (overlap_comm does not double it), the parameters it keeps whole (at most
    `persistence_threshold` elements each), and the gathered weights in flight: the prefetch bucket
    plus the largest parameter. Buckets are in the module's dtype.
    """
    if run.zero is None:
        return 0.0
    b = run.weight_bytes
    if run.zero == 3:
        whole = sum(n for n in params.sizes if n <= run.persistence_threshold)
        gathered = run.prefetch_bucket_size + max(params.sizes, default=0)
        return float(b * (run.reduce_bucket_size + whole + gathered))
    if not run.contiguous_gradients:
        return 0.0
    buckets = run.reduce_bucket_size * (2 if run.overlap_comm else 1)
    in_partition = zero2_partition_gradients(params, run.processes) if run.zero == 2 else 0
    return float(b * (buckets + in_partition))


def activation_bytes(shape: ModelShape, sample: SampleShape, run: RunSettings) -> dict[str, float]:
    """Bytes saved for backward by one sample's forward, by part, and the backward-only peak."""
    mode = run.mode
    coef = coefficients(mode)
    t = sample.llm_tokens
    text_stream = 2 if mode == "bf16" else 4  # the language model's residual stream (fp32 under autocast)
    vision_stream = 4 if mode == "fp32" else 2
    compute = 4 if mode == "fp32" else 2

    def per(c: dict[str, float], **features) -> float:
        return sum(c[name] * value for name, value in features.items())

    layer = per(coef.decoder, hidden=t * shape.hidden, kv=t * shape.kv_width, intermediate=t * shape.intermediate,
                heads=t * shape.heads, tokens=t,
                weights=decoder_matmul_weights(shape.hidden, shape.kv_width, shape.intermediate))
    if run.per_device_batch > 1:  # padding: sdpa repeats the KV heads (and the mask is added once below)
        layer += 2 * (shape.hidden - shape.kv_width) * compute * t
    rows, columns = sample.map_rows, sample.map_columns
    map_layer = per(coef.map_rows, tokens=t, hidden=t * shape.hidden, kv=t * shape.kv_width,
                    rows_x_heads=rows * t * shape.heads, rows=rows * t, rows_x_columns_x_heads=rows * columns * shape.heads,
                    rows_x_columns=rows * columns, columns=columns, rows_x_hidden_once=rows * shape.hidden,
                    rows_x_heads_once=rows * shape.heads, rows_x_head_dim_once=rows * shape.head_dim, rows_once=rows,
                    once=1, weights=0)  # its q/k weight copies are the layer's own
    parts: dict[str, float] = {}
    if run.gradient_checkpointing:
        # each checkpointed layer keeps its input; the layer itself is recomputed in backward
        parts["language_model"] = shape.layers * text_stream * shape.hidden * t
    else:
        parts["language_model"] = shape.layers * layer
        parts["pixel_map_rows"] = shape.map_layers * map_layer
    # shared by the layers: rotary cos/sin, M-RoPE positions, the image-scatter mask (bool, T x h)
    parts["language_model"] += 2 * t * shape.head_dim * text_stream + 3 * t * 8 + t * shape.hidden
    if run.per_device_batch > 1:
        parts["language_model"] += t * t

    p = sample.patches
    vision = 0.0
    if not run.freeze_vision:
        block = per(coef.vision_block, tokens=p, hidden=p * shape.vision_hidden, intermediate=p * shape.vision_intermediate,
                    heads=p * shape.vision_heads,
                    weights=vision_matmul_weights(shape.vision_hidden, shape.vision_intermediate))
        vision += shape.vision_depth * (vision_stream * shape.vision_hidden * p if run.gradient_checkpointing else block)
        vision += p * 3 * 2 * shape.patch_size ** 2 * (4 if mode == "fp32" else 2)  # the patch embedding's input
        fused_saved = 1 if run.gradient_checkpointing else (0 if mode == "fp32" else shape.fusion_layers)
    else:
        fused_saved = shape.fusion_layers
    if not run.freeze_merger:
        vision += fused_saved * vision_stream * shape.vision_hidden * p  # the fusion's weighted block outputs
        merged = p // shape.merge_size ** 2
        vision += per(coef.merger, tokens=merged, vision_hidden=merged * shape.vision_hidden,
                      text_hidden=merged * shape.hidden,
                      weights=merger_matmul_weights(shape.vision_hidden, shape.hidden))
    parts["vision"] = vision
    parts["head_and_loss"] = per(coef.head, tokens=t, hidden=t * shape.hidden, vocab=t * shape.vocab,
                                 weights=shape.hidden * shape.vocab, once=1)
    if sample.mask_pixels:
        parts["pixel_loss"] = per(coef.pixel_loss, mask=sample.mask_pixels, map=sample.map_columns, once=1)
    saved = sum(parts.values())
    # Alive until backward without being saved: the logits the model returns (module dtype).
    held = t * shape.vocab * compute
    # Only during backward: the fp32 gradient of the logits, and with checkpointing one recomputed layer.
    peak = max(t * shape.vocab * 4, (layer + map_layer) if run.gradient_checkpointing else 0.0)
    return {**parts, "saved": saved, "logits_held": float(held), "backward_peak": float(peak)}


# -- compute ----------------------------------------------------------------------------------------
def flops_per_sample(shape: ModelShape, params: ParameterCounts, sample: SampleShape, run: RunSettings) -> dict:
    """Training FLOPs of one sample: 2 per weight per token forward, twice that backward (6 in all);
    a frozen vision tower runs forward only; checkpointed layers run their forward twice. Attention adds
    2 x 2 x T^2/2 x h per language-model layer forward (causal); vision blocks attend within 256-patch windows."""
    t, p = sample.llm_tokens, sample.patches
    recompute = 1 if run.gradient_checkpointing else 0
    text = 2 * (params.text_non_embedding + params.lm_head) * t + shape.layers * 2 * t * t * shape.hidden
    window = 256  # patches in a 112-px window (8 x 8 merged tokens): most vision blocks attend within one
    vision_forward = 2 * params.vision * p + shape.vision_depth * 4 * p * window * shape.vision_hidden
    vision_passes = 1 if run.freeze_vision else 3 + recompute
    total = text * (3 + recompute) + vision_forward * vision_passes
    return {"flops": float(total), "formula": "6 x weights x tokens (+2 per checkpointed forward) + attention; "
            "frozen vision tower: forward only"}


# -- the plan -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    stage: int
    run: RunSettings
    params: ParameterCounts
    tokens: dict
    memory: dict
    """Bytes per GPU: weights, gradients, optimizer, deepspeed_buffers, activations (per-device batch),
    logits_held, backward_peak, total."""
    gpu_bytes: float
    flops: dict
    timing: dict
    fits: bool
    suggestions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "stage": self.stage, "run": asdict(self.run),
                "parameters": {"total": self.params.total, "trainable": self.params.trainable},
                "tokens_per_sample": self.tokens,
                "memory_gib": {k: (v / GIB if isinstance(v, float) else {p: b / GIB for p, b in v.items()})
                               for k, v in self.memory.items()},
                "gpu_gib": self.gpu_bytes / GIB, "fits": self.fits, "compute": {**self.flops, **self.timing},
                "nearest_settings_that_fit": self.suggestions}


def memory_plan(shape: ModelShape, params: ParameterCounts, sample: SampleShape, run: RunSettings) -> dict:
    states = model_states(params, run)
    activations = activation_bytes(shape, sample, run)
    b = run.per_device_batch
    memory = {**states, "deepspeed_buffers": deepspeed_buffers(params, run),
              "activations": activations["saved"] * b, "logits_held": activations["logits_held"] * b,
              "backward_peak": activations["backward_peak"] * b}
    memory["total"] = sum(memory.values())
    memory["activation_parts_per_sample"] = {k: v for k, v in activations.items()
                                             if k not in ("saved", "logits_held", "backward_peak")}
    other = activation_bytes(shape, sample, replace(run, gradient_checkpointing=not run.gradient_checkpointing))
    memory["activations_per_sample"] = {
        "with_checkpointing" if run.gradient_checkpointing else "without_checkpointing": activations["saved"],
        "without_checkpointing" if run.gradient_checkpointing else "with_checkpointing": other["saved"]}
    return memory
