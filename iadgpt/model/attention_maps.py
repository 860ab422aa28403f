"""Pixel anomaly maps from the LLM's attention (IADGPT Eq. 5), without eager attention.

The map is the attention from anomaly words in the prompt ("defect", "abnormal", ...) to the query
image's visual tokens, averaged over heads, word positions and chosen LLM layers. Eager attention
with `output_attentions=True` would materialise every layer's full `[B, H, L, L]` matrix. Instead,
a pre-hook on each chosen layer's `self_attn` receives the layer's (normalised) hidden states and
rotary embeddings and recomputes attention for just the few word rows, while the model itself keeps
running sdpa / flash-attn. Under causal attention only text *after* the query image can attend to
it, which is the direction that exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, L, ...], index: [B, R] -> [B, R, ...]."""
    expand = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, expand)


def padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries per row, right-padded: ([B, R] indices, [B, R] valid)."""
    counts = mask.sum(-1)
    width = max(int(counts.max().item()) if mask.numel() else 0, 1)
    # Stable sort puts the True positions first, in order.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return order, valid


@dataclass
class AttentionMapRequest:
    """What the layer hooks compute during one forward pass (all in the model's sequence layout)."""

    row_index: torch.Tensor  # [B, R] positions of word tokens (anomaly words then normal words)
    row_valid: torch.Tensor  # [B, R]
    row_is_anomaly: torch.Tensor  # [B, R] True for anomaly-word rows, False for normal-word rows
    col_index: torch.Tensor  # [B, N] positions of the query image's visual tokens
    key_padding: torch.Tensor  # [B, L] True where a key may be attended (the 2-D attention mask)
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    key_offset: int = 0
    """Tokens of the sequence already in the layers' cache (a reference prefix): the layer sees only
    the rest, the keys of those come from the cache, and every index above counts them."""

    def key_allowed(self) -> torch.Tensor:
        """[B, R, L]: causal (key <= row) and not padding."""
        L = self.key_padding.shape[1]
        causal = torch.arange(L, device=self.row_index.device)[None, None, :] <= self.row_index[:, :, None]
        return causal & self.key_padding[:, None, :]


REQUEST_KWARG = "attention_map_request"
"""The keyword argument that carries an `AttentionMapRequest` from the language model's forward down
to every layer's `self_attn` (transformers passes unknown keyword arguments through)."""


class AttentionMapRecorder:
    """Owns pre-hooks on the LLM layers' `self_attn`: on the chosen layers they compute the word rows'
    attention of the request passed as `attention_map_request=` to the language model's forward.

    The request travels as a keyword argument, not as state on this object, because gradient
    checkpointing re-runs each layer in backward with the keyword arguments of its forward: the
    recomputation then runs the same map computation and saves the same tensors, as non-reentrant
    checkpointing requires. Every layer's hook removes the argument before the attention kernel sees it.
    """

    def __init__(self, layers: nn.ModuleList, layer_numbers: list[int]):
        self.layer_numbers = list(layer_numbers)
        for number, layer in enumerate(layers, start=1):
            layer.self_attn.register_forward_pre_hook(self._hook(number if number in self.layer_numbers else None),
                                                      with_kwargs=True)

    @staticmethod
    def _hook(number: int | None):
        def hook(attn: nn.Module, args, kwargs):
            if REQUEST_KWARG not in kwargs:
                return None
            kwargs = dict(kwargs)
            request = kwargs.pop(REQUEST_KWARG)
            if request is not None and number is not None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cos, sin = kwargs["position_embeddings"]
                cached_keys = None
                if request.key_offset:  # the hook runs before the layer adds this step's keys to the cache
                    cached_keys = kwargs["cache"].layers[attn.layer_idx].keys[:, :, :request.key_offset]
                request.maps[number] = word_to_image_attention(attn, hidden, cos, sin, request, cached_keys)
            return args, kwargs

        return hook


def word_to_image_attention(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            request: AttentionMapRequest, cached_keys: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities from the word rows to the query-image tokens, for one layer.

    `cached_keys` `[B, Hkv, key_offset, d]`: the rotated keys of the tokens before `hidden` (a
    reference prefix in the cache); they join the softmax as they would in a whole forward.
    Returns (anomaly, normal) maps `[B, N]`: mean over heads and over that channel's word rows
    (zeros where a sample has no such word).
    """
    bsz, seq_len, _ = hidden.shape
    head_dim = attn.head_dim
    local_rows = request.row_index - request.key_offset  # rows in `hidden`
    rows = _gather_rows(hidden, local_rows)  # [B, R, D]
    num_rows = rows.shape[1]
    # Calling the projections as modules keeps LoRA wrappers and ZeRO-3 parameter gathering working.
    query = attn.q_proj(rows).view(bsz, num_rows, -1, head_dim).transpose(1, 2)  # [B, H, R, d]
    key = attn.k_proj(hidden).view(bsz, seq_len, -1, head_dim).transpose(1, 2)  # [B, Hkv, L, d]
    cos_r, sin_r = _gather_rows(cos, local_rows), _gather_rows(sin, local_rows)
    query = query * cos_r.unsqueeze(1) + _rotate_half(query) * sin_r.unsqueeze(1)
    key = key * cos.unsqueeze(1) + _rotate_half(key) * sin.unsqueeze(1)
    if cached_keys is not None:
        key = torch.cat([cached_keys.to(key.dtype), key], dim=2)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # = repeat_kv
    # In float32 even when the model runs in bf16 (or under bf16 autocast, which would run this
    # product in bf16): the map is a ratio of small probabilities.
    with torch.autocast(query.device.type, enabled=False):
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, L]
    scores = scores.masked_fill(~request.key_allowed()[:, None], torch.finfo(torch.float32).min)
    probs = scores.softmax(-1)
    to_image = torch.gather(probs, 3, request.col_index[:, None, None, :].expand(-1, probs.shape[1], num_rows, -1))
    per_row = to_image.mean(1)  # mean over heads: [B, R, N]
    maps = []
    for channel in (request.row_is_anomaly, ~request.row_is_anomaly):
        weight = (channel & request.row_valid).float()  # [B, R]
        total = weight.sum(-1, keepdim=True).clamp(min=1)
        maps.append((per_row * weight[:, :, None]).sum(1) / total)
    return maps[0], maps[1]
