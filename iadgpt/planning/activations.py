"""Bytes a training forward pass saves for backward, per token, for every kind of layer of the model.

The coefficients are not typed in from reading the code: `coefficients()` runs one layer of each
kind (decoder layer, vision block, patch merger, output head, pixel-map rows, pixel loss) of the *installed*
transformers at a few small widths on the CPU, counts what autograd saves with saved-tensor hooks,
and solves for bytes per token as a linear function of the widths (exact: every saved tensor is a
width times the tokens). The planner scales those to any model. Attention is counted as the fused
kernels save it (sdpa / FlashAttention-2: the outputs and a log-sum-exp, never the T x T matrix),
which is what the CPU's sdpa kernel saves too.

Precision modes:
- "fp32": weights and activations fp32 (DeepSpeed on a CPU, or mixed_precision "no").
- "bf16": weights and activations bf16 (DeepSpeed's bf16 engine).
- "autocast": fp32 weights under bf16 autocast (training without DeepSpeed): the residual stream of
  the language model stays fp32, matmuls run in bf16, and each layer also holds a bf16 copy of its
  weights for backward (the "weights" coefficient: 2 bytes per weight of its matmuls).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.memory_census import SavedActivations

MODES = ("fp32", "bf16", "autocast")


def _precision(mode: str):
    weights = torch.bfloat16 if mode == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    return weights, autocast


def _rope_config(hidden: int, heads: int, kv_heads: int, intermediate: int):
    from transformers import Qwen2_5_VLConfig

    half = hidden // heads // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2_5_VLConfig(text_config=dict(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
        num_hidden_layers=1, vocab_size=64, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": section}))
    config.text_config._attn_implementation = "sdpa"
    return config.text_config


def _decoder_layer_bytes(mode: str, hidden: int, heads: int, kv_heads: int, intermediate: int, tokens: int,
                         map_rows: int = 0, map_columns: int = 0) -> int:
    """Saved bytes of one decoder layer, or with `map_rows` of the attention-map hook alone (word rows
    attending to `map_columns` query-image tokens)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    from ..model.attention_maps import AttentionMapRequest, word_to_image_attention

    config = _rope_config(hidden, heads, kv_heads, intermediate)
    weights, autocast = _precision(mode)
    layer = qwen.Qwen2_5_VLDecoderLayer(config, 0).to(weights)
    residual = torch.float32 if mode != "bf16" else torch.bfloat16
    hidden_states = torch.randn(1, tokens, hidden, dtype=residual, requires_grad=True)
    positions = torch.arange(tokens)[None, None].expand(3, 1, tokens)
    cos, sin = qwen.Qwen2_5_VLRotaryEmbedding(config)(hidden_states, positions)
    # The output stays referenced until the count: only what a live graph holds is counted.
    with SavedActivations(layer, exclude=[cos, sin, hidden_states]) as saved:
        with autocast:
            if map_rows:
                rows = torch.arange(map_rows)[None] + tokens - map_rows
                request = AttentionMapRequest(
                    row_index=rows, row_valid=torch.ones_like(rows, dtype=torch.bool),
                    row_is_anomaly=torch.ones_like(rows, dtype=torch.bool),
                    col_index=torch.arange(map_columns)[None], key_padding=torch.ones(1, tokens, dtype=torch.bool))
                output = word_to_image_attention(layer.self_attn, hidden_states, cos, sin, request)
            else:
                output = layer(hidden_states, attention_mask=None, position_embeddings=(cos, sin))
    del output
    return saved.nbytes


def _vision_block_bytes(mode: str, hidden: int, heads: int, intermediate: int, patches: int) -> int:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=hidden, num_heads=heads,
                                                 intermediate_size=intermediate, depth=1)).vision_config
    config._attn_implementation = "sdpa"
    weights, autocast = _precision(mode)
    block = qwen.Qwen2_5_VLVisionBlock(config).to(weights)
    # Under autocast the vision stream is bf16 from the patch embedding (a conv autocast runs in bf16).
    stream = torch.float32 if mode == "fp32" else torch.bfloat16
    x = torch.randn(patches, hidden, dtype=stream, requires_grad=True)
    angles = torch.randn(patches, hidden // heads)
    cos, sin = angles.cos(), angles.sin()
    windows = torch.tensor([0, patches // 2, patches], dtype=torch.int32)
    with SavedActivations(block, exclude=[x, cos, sin]) as saved, autocast:
        output = block(x, cu_seqlens=windows, position_embeddings=(cos, sin))
    del output
    return saved.nbytes


def _merger_bytes(mode: str, vision_hidden: int, text_hidden: int, tokens: int) -> int:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    weights, autocast = _precision(mode)
    merger = qwen.Qwen2_5_VLPatchMerger(dim=text_hidden, context_dim=vision_hidden).to(weights)
    stream = torch.float32 if mode == "fp32" else torch.bfloat16
    x = torch.randn(tokens * 4, vision_hidden, dtype=stream, requires_grad=True)
    with SavedActivations(merger, exclude=[x]) as saved, autocast:
        output = merger(x)
    del output
    return saved.nbytes


def _head_bytes(mode: str, hidden: int, vocab: int, tokens: int) -> int:
    """Final norm, LM head and the causal-LM loss (transformers' own), with every position labelled."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    weights, autocast = _precision(mode)
    norm = qwen.Qwen2_5_VLRMSNorm(hidden).to(weights)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(weights)
    stream = torch.bfloat16 if mode == "bf16" else torch.float32
    x = torch.randn(1, tokens, hidden, dtype=stream, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    with SavedActivations(parameters=[*norm.parameters(), *head.parameters()], exclude=[x]) as saved, autocast:
        loss = ForCausalLMLoss(head(norm(x)), labels, vocab_size=vocab)
    del loss
    return saved.nbytes


def _pixel_loss_bytes(map_side: int, mask_side: int) -> int:
    """The pixel map's probability and its focal + Dice loss against a mask at image size (fp32 in
    every mode: the maps are cast to fp32 before the loss)."""
    from ..model.losses import pixel_losses
    from ..model.modeling_iadgpt import pixel_anomaly_probability

    anomaly = torch.rand(map_side, map_side, requires_grad=True)
    normal = torch.rand(map_side, map_side, requires_grad=True)
    mask = (torch.rand(mask_side, mask_side) > 0.5).float()
    # The mask counts: the loss saves it, and it lives as long as the graph does.
    with SavedActivations(parameters=[], exclude=[anomaly, normal]) as saved:
        focal, dice = pixel_losses(pixel_anomaly_probability(anomaly, normal), mask)
    del focal, dice
    return saved.nbytes


def _solve(rows: list[list[float]], values: list[int], names: list[str]) -> dict[str, float]:
    """Exact linear fit (least squares, then checked): bytes = sum(coefficient * feature)."""
    a, b = np.array(rows, dtype=float), np.array(values, dtype=float)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    worst = np.max(np.abs(a @ solution - b) / np.maximum(b, 1))
    if worst > 1e-6:
        raise RuntimeError(f"saved bytes are not linear in {names} (off by {worst:.1e}): the installed "
                           "transformers saves something the planner does not model")
    return dict(zip(names, (float(round(v, 6)) for v in solution)))


@dataclass(frozen=True)
class LayerCoefficients:
    """Saved bytes per token of each kind of layer, as `{width name: bytes per token per unit width}`."""

    decoder: dict[str, float]
    """Decoder layer (features: hidden, kv = KV heads x head_dim, intermediate, heads, all per token;
    weights = `decoder_matmul_weights`), unpadded batch (no mask: sdpa/FlashAttention take the KV
    heads as they are). A padded batch (per-device batch > 1) also saves the KV heads repeated to all
    heads and a [T, T] mask: the planner adds those (`padded_batch_extra`), as the GPU's
    memory-efficient kernel saves them; the CPU's sdpa falls back to its math kernel there."""
    map_rows: dict[str, float]
    """The attention-map hook of one map layer (R word rows, N query-image columns): per token of the
    sequence ("tokens", "hidden", "kv", "rows", "rows_x_heads": x T), per row and column
    ("rows_x_columns[_x_heads]", "columns": x N), per row ("..._once"), and the q/k weights it reuses."""
    vision_block: dict[str, float]
    """Vision block, per patch."""
    merger: dict[str, float]
    """Patch merger, per visual token (4 patches)."""
    head: dict[str, float]
    """Final norm + LM head + loss, per token."""
    pixel_loss: dict[str, float]
    """The pixel map's probability and focal + Dice loss: per mask pixel ("mask"), per map token
    ("map") and once."""


@functools.lru_cache(maxsize=None)
def coefficients(mode: str) -> LayerCoefficients:
    """Measure and fit every layer kind once per precision mode (about a second on a CPU)."""
    if mode not in MODES:
        raise ValueError(f"precision mode {mode!r}: allowed are {MODES}")
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the probe configs' special-token ids lie outside their 64-word vocabulary
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _fit_all(mode)
    finally:
        hf_logging.set_verbosity(verbosity)


def _fit_all(mode: str) -> LayerCoefficients:
    torch.manual_seed(0)
    # (hidden, heads, kv_heads, intermediate): head_dim 16 and 32, so hidden and heads separate.
    shapes = [(64, 4, 2, 96), (128, 8, 2, 96), (128, 8, 4, 160), (128, 4, 2, 96), (256, 8, 2, 224), (96, 6, 3, 96)]
    decoder, rows_ = [], []
    for hidden, heads, kv, inter in shapes:
        kv_width = kv * hidden // heads
        features = [hidden, kv_width, inter, heads, 1]
        weights = decoder_matmul_weights(hidden, kv_width, inter)
        for tokens in (24, 48):
            decoder.append(([tokens * f for f in features] + [weights], _decoder_layer_bytes(
                mode, hidden, heads, kv, inter, tokens, 0)))
            for map_rows in (1, 3):
                for columns in (tokens // 2, tokens // 4):
                    rows_.append(([tokens, tokens * hidden, tokens * kv_width, map_rows * tokens * heads,
                                   map_rows * tokens, map_rows * columns * heads, map_rows * columns, columns,
                                   map_rows * hidden, map_rows * heads, map_rows * hidden // heads, map_rows, 1,
                                   hidden * (hidden + kv_width)],
                                  _decoder_layer_bytes(mode, hidden, heads, kv, inter, tokens, map_rows, columns)))
    names = ["hidden", "kv", "intermediate", "heads", "tokens", "weights"]
    fit = lambda data, n: _solve([r for r, _ in data], [v for _, v in data], n)  # noqa: E731
    vision, merger, head = [], [], []
    for hidden, heads, inter in [(64, 4, 96), (128, 4, 96), (128, 8, 160), (96, 2, 224)]:
        for patches in (32, 64):
            vision.append(([patches, patches * hidden, patches * inter, patches * heads,
                            vision_matmul_weights(hidden, inter)],
                           _vision_block_bytes(mode, hidden, heads, inter, patches)))
    for vision_hidden, text_hidden in [(32, 64), (64, 64), (32, 128)]:
        for tokens in (8, 16):
            merger.append(([tokens, tokens * vision_hidden, tokens * text_hidden,
                            merger_matmul_weights(vision_hidden, text_hidden)],
                           _merger_bytes(mode, vision_hidden, text_hidden, tokens)))
    for hidden, vocab in [(64, 100), (128, 100), (64, 300)]:
        for tokens in (8, 16):
            head.append(([tokens, tokens * hidden, tokens * vocab, hidden * vocab, 1],
                         _head_bytes(mode, hidden, vocab, tokens)))
    pixel = [([mask * mask, side * side, 1], _pixel_loss_bytes(side, mask)) for side in (4, 8) for mask in (16, 40)]
    return LayerCoefficients(
        decoder=fit(decoder, names),
        map_rows=fit(rows_, ["tokens", "hidden", "kv", "rows_x_heads", "rows", "rows_x_columns_x_heads",
                             "rows_x_columns", "columns", "rows_x_hidden_once", "rows_x_heads_once", "rows_x_head_dim_once", "rows_once",
                             "once", "weights"]),
        vision_block=fit(vision, ["tokens", "hidden", "intermediate", "heads", "weights"]),
        merger=fit(merger, ["tokens", "vision_hidden", "text_hidden", "weights"]),
        head=fit(head, ["tokens", "hidden", "vocab", "weights", "once"]),
        pixel_loss=fit(pixel, ["mask", "map", "once"]))


# Weights of the matmuls of each layer kind: under autocast each layer holds a bf16 copy of them for
# backward (the "weights" coefficient: 2 bytes under autocast, 0 otherwise).
def decoder_matmul_weights(hidden: int, kv_width: int, intermediate: int) -> int:
    return 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate


def vision_matmul_weights(hidden: int, intermediate: int) -> int:
    return 4 * hidden * hidden + 3 * hidden * intermediate


def merger_matmul_weights(vision_hidden: int, text_hidden: int) -> int:
    return 16 * vision_hidden * vision_hidden + 4 * vision_hidden * text_hidden
