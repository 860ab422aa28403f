"""Loading real Qwen2.5-VL checkpoints, and writing offline ones of the same architecture.

`load_model` / `load_processor` take a hub name (`Qwen/Qwen2.5-VL-7B-Instruct`) or a local folder,
exactly as users will. `init_model` writes a randomly initialised checkpoint of the real
architecture (the `tiny` and `small` presets) with an offline tokenizer and image processor, so
every test and the built-in demo run the same code without downloads. The `qwen2.5-vl-3b` and
`qwen2.5-vl-7b` presets are the released models' configs, tokenizer and processor at a depth a CPU
can run (`--text-layers` / `--vision-layers` raise it): the proof that the pipeline runs at the
real widths.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .modeling_iadgpt import IADGPTForConditionalGeneration
from .settings import IADGPTSettings, evenly_spaced_layers
from .tokenizer import QWEN2_5_VL_CHAT_TEMPLATE, build_offline_qwen_tokenizer, build_qwen2_5_tokenizer


# The released Qwen2.5-VL processor's pixel limits (preprocessor_config.json): 4 x 28 x 28 and 16384 x 28 x 28.
QWEN2_5_VL_MIN_PIXELS = 3136
QWEN2_5_VL_MAX_PIXELS = 12845056

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of an offline Qwen2.5-VL checkpoint. The 7B model is, for comparison: text 3584 wide,
    28 layers, 28 heads, 4 KV heads; vision 1280 wide, 32 blocks, 16 heads, 112-px windows
    (the `qwen2.5-vl-7b` preset)."""

    text_hidden: int
    """Width of the language model."""
    text_layers: int
    """Decoder layers of the language model."""
    text_heads: int
    """Attention heads (head_dim = text_hidden / text_heads)."""
    text_kv_heads: int
    """Key/value heads (grouped-query attention, as in Qwen2.5)."""
    text_intermediate: int
    """MLP width of the language model."""
    mrope_section: tuple[int, int, int]
    """M-RoPE split of head_dim/2 into temporal, height and width frequencies."""
    vision_hidden: int
    """Width of the vision transformer."""
    vision_depth: int
    """Vision blocks."""
    vision_heads: int
    """Vision attention heads."""
    vision_intermediate: int
    """MLP width of the vision blocks."""
    fullatt_blocks: tuple[int, ...] | None = None
    """0-based vision blocks with full (not windowed) attention, as in Qwen2.5-VL. None: Qwen2.5-VL's
    rule at this depth (`qwen_fullatt_blocks`: every 8th block, the last one included)."""
    patch_size: int = 14
    """Pixels per patch side (Qwen2.5-VL: 14). One visual token covers 2 x 2 patches."""
    window_size: int = 112
    """Side of the vision windows in pixels (Qwen2.5-VL: 112)."""
    vocab_size: int = 1024
    """BPE merges of the offline tokenizer (special tokens are added after); unused with
    `tokenizer="qwen2.5"`."""
    tokenizer: str = "offline"
    """"offline": a small BPE trained on inspection language (`build_offline_qwen_tokenizer`);
    "qwen2.5": Qwen2.5's exact tokenizer, real token ids (`build_qwen2_5_tokenizer`)."""
    embedding_rows: int | None = None
    """Rows of the token embedding and the LM head (the config's `vocab_size`). None: the tokenizer's
    length. The released models pad theirs beyond the tokenizer's 151,665 tokens (7B: 152,064; 3B:
    151,936); the extra rows are never looked up."""
    tie_word_embeddings: bool = False
    """Share the token embedding with the LM head (released: 3B yes, 7B no)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the language model's RMSNorms (released: 1e-6; 1e-5 is transformers' default)."""
    max_position_embeddings: int = 32768
    """Positions the language model is configured for (released: 128,000)."""
    tokens_per_second: int = 4
    """Video frames' temporal position step (released: 2; images do not use it)."""
    pad_token_in_config: bool = True
    """Name `<|endoftext|>` the config's pad_token_id, which makes it the embedding's padding_idx (its row
    starts at zero and gets no gradient). The released configs name no pad token (their padding is
    masked out instead), so the real-width presets leave it out."""
    dtype: str = "float32"
    """dtype the weights are created and saved in ("bfloat16" as released: half the file and the
    memory; `load_model(dtype=...)` converts on loading)."""
    min_pixels: int = 56 * 56
    """Smallest image area the image processor resizes to."""
    max_pixels: int = 224 * 224
    """Largest image area the image processor resizes to (caps visual tokens per image)."""
    iadgpt: dict = field(default_factory=dict)
    """IADGPT settings for this preset (defaults: see IADGPTSettings)."""
    released_text_layers: int | None = None
    """Decoder layers of the released model of these widths (`iadgpt plan` plans that model by name);
    None: a test preset, planned at its own depth."""
    released_vision_depth: int | None = None
    """Vision blocks of the released model (32 for every Qwen2.5-VL)."""

    def released(self) -> "ModelPreset":
        """These widths at the released model's depth (itself for the test presets)."""
        return self.with_depth(self.released_text_layers, self.released_vision_depth)

    @property
    def vision_fullatt_blocks(self) -> tuple[int, ...]:
        if self.fullatt_blocks is None:
            return qwen_fullatt_blocks(self.vision_depth)
        return tuple(self.fullatt_blocks)

    def with_depth(self, text_layers: int | None = None, vision_layers: int | None = None) -> "ModelPreset":
        """The same widths at another depth. Explicit full-attention blocks move with the depth
        (block b of D becomes round((b + 1) * M / D) - 1 of M); None keeps following Qwen's rule."""
        for name, value in (("text layers", text_layers), ("vision layers", vision_layers)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: a model needs at least 1.")
        text_layers = self.text_layers if text_layers is None else text_layers
        vision_layers = self.vision_depth if vision_layers is None else vision_layers
        fullatt = self.fullatt_blocks
        if fullatt is not None and vision_layers != self.vision_depth:
            fullatt = tuple(sorted({max(1, round((b + 1) * vision_layers / self.vision_depth)) - 1 for b in fullatt}))
        return replace(self, text_layers=text_layers, vision_depth=vision_layers, fullatt_blocks=fullatt)


def qwen_fullatt_blocks(depth: int) -> tuple[int, ...]:
    """Qwen2.5-VL's full-attention vision blocks scaled to `depth` (0-based): one in every 8, evenly
    spaced and ending at the last block (32 -> 7, 15, 23, 31 as released; 4 -> 3; 16 -> 7, 15)."""
    return tuple(layer - 1 for layer in evenly_spaced_layers(depth, max(1, round(depth / 8))))


def released_qwen2_5_vl(text_hidden: int, text_heads: int, text_kv_heads: int, text_intermediate: int,
                        embedding_rows: int, tie_word_embeddings: bool, text_layers: int,
                        vision_intermediate: int = 3420) -> ModelPreset:
    """A released Qwen2.5-VL-Instruct's config (its public config.json, preprocessor_config.json and
    tokenizer) at a CPU-sized default depth: 2 text layers, 4 vision blocks (released: `text_layers`
    and 32 vision blocks, recorded for `iadgpt plan`)."""
    return ModelPreset(
        text_hidden=text_hidden, text_layers=2, text_heads=text_heads, text_kv_heads=text_kv_heads,
        text_intermediate=text_intermediate, mrope_section=(16, 24, 24), vision_hidden=1280, vision_depth=4,
        vision_heads=16, vision_intermediate=vision_intermediate, fullatt_blocks=None, patch_size=14, window_size=112,
        tokenizer="qwen2.5", embedding_rows=embedding_rows, tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6, max_position_embeddings=128000, tokens_per_second=2, pad_token_in_config=False,
        dtype="bfloat16",
        min_pixels=QWEN2_5_VL_MIN_PIXELS, max_pixels=QWEN2_5_VL_MAX_PIXELS,
        released_text_layers=text_layers, released_vision_depth=32,
    )


PRESETS: dict[str, ModelPreset] = {
    # Unit tests: ~0.25 M parameters, every mechanism present (fusion over 4 blocks, 2 LLM layers).
    "tiny": ModelPreset(
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
        mrope_section=(2, 3, 3), vision_hidden=32, vision_depth=4, vision_heads=2, vision_intermediate=64,
        fullatt_blocks=(1, 3), patch_size=14, window_size=56,
    ),
    # The quickstart's learner: about a million parameters, whose training step costs a quarter of
    # a 3.5 M model's on one CPU core. 10-px patches give a 128-px
    # image (resized to 120) a 6 x 6 grid of visual tokens (Qwen's 14-px patches: 5 x 5 at 140 px),
    # for pixel maps of small defects; 120-px windows make every vision block attend over a whole
    # quickstart image in one call.
    "small": ModelPreset(
        text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=256,
        mrope_section=(4, 6, 6), vision_hidden=64, vision_depth=4, vision_heads=2, vision_intermediate=128,
        fullatt_blocks=(1, 3), patch_size=10, window_size=120, min_pixels=40 * 40, max_pixels=240 * 240,
    ),
    # The released models' widths (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct), random weights, shallow.
    "qwen2.5-vl-3b": released_qwen2_5_vl(text_hidden=2048, text_heads=16, text_kv_heads=2, text_intermediate=11008,
                                         embedding_rows=151936, tie_word_embeddings=True, text_layers=36),
    "qwen2.5-vl-7b": released_qwen2_5_vl(text_hidden=3584, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                                         embedding_rows=152064, tie_word_embeddings=False, text_layers=28),
    "qwen2.5-vl-32b": released_qwen2_5_vl(text_hidden=5120, text_heads=40, text_kv_heads=8, text_intermediate=27648,
                                          embedding_rows=152064, tie_word_embeddings=False, text_layers=64,
                                          vision_intermediate=3456),
    "qwen2.5-vl-72b": released_qwen2_5_vl(text_hidden=8192, text_heads=64, text_kv_heads=8, text_intermediate=29568,
                                          embedding_rows=152064, tie_word_embeddings=False, text_layers=80,
                                          vision_intermediate=3456),
}


def preset_tokenizer(preset: ModelPreset):
    """The tokenizer a preset's checkpoint carries."""
    if preset.tokenizer == "offline":
        return build_offline_qwen_tokenizer(preset.vocab_size)
    if preset.tokenizer == "qwen2.5":
        return build_qwen2_5_tokenizer()
    raise ValueError(f"ModelPreset.tokenizer={preset.tokenizer!r}: allowed are 'offline' and 'qwen2.5'.")


def preset_config(preset: ModelPreset, tokenizer) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    rows = len(tokenizer) if preset.embedding_rows is None else preset.embedding_rows
    if rows < len(tokenizer):
        raise ValueError(f"ModelPreset.embedding_rows={rows} is below the tokenizer's {len(tokenizer)} tokens: "
                         "every token id needs an embedding row.")
    pad = ids("<|endoftext|>") if preset.pad_token_in_config else None
    text = dict(
        vocab_size=rows, hidden_size=preset.text_hidden, num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads, num_key_value_heads=preset.text_kv_heads,
        intermediate_size=preset.text_intermediate, max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=preset.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(preset.mrope_section)},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=pad,
    )
    vision = dict(
        hidden_size=preset.vision_hidden, depth=preset.vision_depth, num_heads=preset.vision_heads,
        intermediate_size=preset.vision_intermediate, out_hidden_size=preset.text_hidden,
        patch_size=preset.patch_size, window_size=preset.window_size, spatial_merge_size=2,
        temporal_patch_size=2, fullatt_block_indexes=list(preset.vision_fullatt_blocks),
        tokens_per_second=preset.tokens_per_second,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=pad,
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    config.iadgpt = IADGPTSettings.from_dict(preset.iadgpt).to_dict()
    return config


def preset_image_processor(preset: ModelPreset) -> Qwen2VLImageProcessorPil:
    """The image processor a preset's checkpoint carries (the released one's pixel limits for the
    real-width presets: 3,136 .. 12,845,056 pixels)."""
    return Qwen2VLImageProcessorPil(
        patch_size=preset.patch_size, merge_size=2, temporal_patch_size=2,
        min_pixels=preset.min_pixels, max_pixels=preset.max_pixels,
    )


def init_model(out: str | os.PathLike, preset: str | ModelPreset = "tiny", seed: int = 0,
               text_layers: int | None = None, vision_layers: int | None = None) -> Path:
    """Write a randomly initialised IADGPT checkpoint of the real Qwen2.5-VL architecture.

    `preset` is a name from PRESETS or a ModelPreset of your own sizes; `text_layers` /
    `vision_layers` change its depth only (`ModelPreset.with_depth`).
    """
    if isinstance(preset, ModelPreset):
        spec, preset = preset, "custom"
    elif preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise ValueError(f"Unknown preset {preset!r}; allowed: {sorted(PRESETS)}.")
    spec = spec.with_depth(text_layers, vision_layers)
    out = Path(out)
    tokenizer = preset_tokenizer(spec)
    torch.manual_seed(seed)
    # Created in the preset's dtype: a 7B-wide model in bf16 never exists in fp32 (1.7 B parameters at
    # 2 layers / 4 blocks: 3.4 GB instead of 6.7 GB).
    model = IADGPTForConditionalGeneration._from_config(preset_config(spec, tokenizer),
                                                        dtype=getattr(torch, spec.dtype))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                            tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    del model
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=preset_image_processor(spec), tokenizer=tokenizer,
                                             chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "iadgpt_preset.json").write_text(json.dumps({"preset": preset, "seed": seed, **asdict(spec)}, indent=2))
    return out


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video processor, for machines without torchvision.

    `Qwen2_5_VLProcessor` insists on a video processor, which needs torchvision; images, the chat
    template and `mm_token_type_ids` work the same without it.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def save_pretrained(self, save_directory, **kwargs):
        """Save as a stock Qwen2.5-VL processor (image and video sections), loadable by AutoProcessor."""
        result = super().save_pretrained(save_directory, **kwargs)
        config_file = Path(save_directory) / "processor_config.json"
        config = json.loads(config_file.read_text())
        config["processor_class"] = "Qwen2_5_VLProcessor"
        image = config["image_processor"]
        config.setdefault("video_processor", {
            "video_processor_type": "Qwen2VLVideoProcessor",
            **{key: image[key] for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                           "image_std", "do_convert_rgb", "do_normalize", "do_rescale",
                                           "do_resize", "rescale_factor", "resample", "size") if key in image},
        })
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return result


def _is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~"))


def check_checkpoint(name_or_path: str | os.PathLike) -> None:
    """Fail early, with what is wrong, on a local folder that is not a Qwen2.5-VL checkpoint."""
    if not _is_local(name_or_path):
        return  # a hub name: from_pretrained resolves and checks it
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Model folder {path} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint: it has no config.json.")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{path} holds a {model_type!r} model; iadgpt needs a Qwen2.5-VL checkpoint "
                         "(model_type 'qwen2_5_vl'), e.g. Qwen/Qwen2.5-VL-7B-Instruct or `iadgpt init-model`.")


def load_processor(name_or_path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None,
                   **kwargs):
    """The checkpoint's processor; without torchvision, the same processor minus its video part.

    `min_pixels` / `max_pixels` replace the image processor's limits (`set_pixel_limits`); None
    keeps the checkpoint's own.
    """
    check_checkpoint(name_or_path)
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a build that does not match torch
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(name_or_path, **kwargs)
    else:
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    return set_pixel_limits(processor, min_pixels, max_pixels)


# -- the pixel budget ----------------------------------------------------------------------------
# Qwen2.5-VL resizes every image to multiples of patch x merge pixels (28) with an area between
# min_pixels and max_pixels (`smart_resize`). Box coordinates in the training records are pixels of
# that resized image, so the builders, the collator, training and evaluation must share one pair of
# limits: the loaded processor's, changed only through `set_pixel_limits` (which the saved
# processor then carries on).
def pixel_limits(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the processor (or image processor) resizes images between."""
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def set_pixel_limits(processor, min_pixels: int | None = None, max_pixels: int | None = None):
    """Set the image processor's pixel limits in place (None keeps that one); returns the processor."""
    from transformers.image_utils import SizeDict

    if min_pixels is None and max_pixels is None:
        return processor
    image_processor = getattr(processor, "image_processor", processor)
    current_min, current_max = pixel_limits(image_processor)
    low = current_min if min_pixels is None else min_pixels
    high = current_max if max_pixels is None else max_pixels
    check_pixel_limits(low, high)
    image_processor.size = SizeDict(shortest_edge=int(low), longest_edge=int(high))
    return processor


def check_pixel_limits(min_pixels: int, max_pixels: int) -> None:
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: a pixel limit is a positive whole number of pixels (an image's area "
                             f"after resizing; the released Qwen2.5-VL processor: {QWEN2_5_VL_MIN_PIXELS} .. "
                             f"{QWEN2_5_VL_MAX_PIXELS}).")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}.")


def add_pixel_limit_arguments(parser, what: str = "the model's processor's") -> None:
    """`--min-pixels` / `--max-pixels` of a command that loads a processor (default: `what`)."""
    parser.add_argument("--min-pixels", type=int, metavar="N",
                        help=f"smallest image area after resizing (default: {what})")
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"largest image area after resizing, caps visual tokens per image (default: {what}; "
                             f"the released Qwen2.5-VL processor: {QWEN2_5_VL_MAX_PIXELS})")


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Devices the model runs on: `cpu`, `cuda` (or `cuda:N`) and `mps`."""

DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N or mps (default: cuda when a GPU is visible, else cpu); "
               "bf16 weights on a GPU, fp32 on the CPU")
"""The `--device` help text of every command that loads a model."""


class DeviceError(ValueError):
    """A device that is not a valid choice on this machine (a typo, or a GPU that is not there)."""


def device_and_dtype(device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """The device to run a model on and the dtype of its weights there.

    `device` None means the GPU when there is one (`cuda`), else `cpu`. The weights are bf16 on a
    GPU (`cuda`, `mps`), as Qwen2.5-VL is released and trained, and fp32 on the CPU, where bf16
    matrix products are slow on most processors (`weights_dtype`).
    Raises DeviceError, naming the device, for an unknown device or one this machine does not have.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {str(device)!r}: use one of cpu, cuda, cuda:N, mps") from err
    if resolved.type not in DEVICE_TYPES:
        raise DeviceError(f"device {str(device)!r} is not supported: use one of cpu, cuda, cuda:N, mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r}: no CUDA GPU is visible on this machine (use cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r}: Apple's MPS backend is not available on this machine (use cpu)")
    return resolved, weights_dtype(resolved)


def weights_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (`cuda`, `mps`), fp32 on the CPU: the rule of `device_and_dtype`."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def attention_implementation(requested: str, device: str | torch.device | None = None) -> str:
    """`requested`, except `flash_attention_2` where it cannot run: then `sdpa`, with one warning.

    flash-attention 2 needs the `flash_attn` package (the `gpu` extra) and a CUDA device (`device`;
    None: this machine's GPU, for training, where accelerate places the model later). Checkpoints
    and configs can then ask for it and still run on a machine without it.
    """
    if requested != "flash_attention_2":
        return requested
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    installed = importlib.util.find_spec("flash_attn") is not None
    if on_cuda and installed:
        return requested
    missing = "the flash_attn package is not installed (pip install 'iadgpt[gpu]')" if not installed else \
        f"it needs a CUDA device, not {device or 'this CPU-only machine'}"
    logger.warning("attn_implementation flash_attention_2 is not available: %s; using sdpa instead.", missing)
    return "sdpa"


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto", attn_implementation: str = "sdpa",
               iadgpt: dict | None = None, processor=None, device: str | torch.device | None = None,
               **kwargs) -> IADGPTForConditionalGeneration:
    """Load any Qwen2.5-VL checkpoint as IADGPT, with its words configured from its tokenizer.

    `device` loads the weights straight onto that device (None: the CPU, placement left to the
    caller, e.g. accelerate in training); `device_and_dtype` gives the device and dtype to run on.
    flash_attention_2 falls back to sdpa where flash-attn cannot run (`attention_implementation`).
    `iadgpt` overrides settings (e.g. `{"exemplar_retention": 0.4}`); a plain Qwen2.5-VL
    checkpoint gets the defaults, and the fusion weights start as set by `fusion_init_last_weight`.
    """
    check_checkpoint(name_or_path)
    if device is not None:
        device, _ = device_and_dtype(device)
        kwargs.setdefault("device_map", device)
    config = Qwen2_5_VLConfig.from_pretrained(name_or_path)
    if iadgpt:
        config.iadgpt = IADGPTSettings.from_dict(getattr(config, "iadgpt", None), iadgpt).to_dict()
    model = IADGPTForConditionalGeneration.from_pretrained(
        name_or_path, config=config, dtype=dtype,
        attn_implementation=attention_implementation(attn_implementation, device), **kwargs)
    processor = processor or load_processor(name_or_path)
    model.configure_words(processor.tokenizer)
    return model
