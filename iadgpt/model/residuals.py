"""In-context residuals: what each query token has that no normal exemplar token has.

IADGPT leaves the comparison of the query image with its normal exemplars entirely to the language
model's attention. InCTRL / InCTRLv2 (patch-level in-context residuals, InCTRLv2 Eq. 3) show that
the cosine distance of a query patch to its nearest exemplar patch is itself a strong,
class-agnostic anomaly cue. This module hands that cue to the language model: before the visual
tokens are scattered into the prompt, every query token gets

    token + W_r (token - nearest exemplar token) + sum_f d_f * e_f

with three distances d_f: of the token to its nearest exemplar token, and the largest and the mean
distance of its vision patches (the 2 x 2 patches the merger folds into it, as the merger sees them:
fused over the fusion layers) to their nearest exemplar patches. The patch distances see defects
smaller than a token. Nearest neighbours are searched over *all* tokens / patches of the sample's
normal exemplars, before exemplar compression, so what compression drops still informs the query.
`W_r` and `e_f` start at zero, so a model starts out exactly as without the module; a defect then
reaches the language model as tokens with large distances, which attention (exponential in a key
linear in the distances) can single out for the Yes/No answer and for the anomaly words' pixel map.

The patches sit on a fixed grid, so a product at another offset modulo the patch size straddles its
nearest exemplar patches; `shifted_image_pixels` moves the exemplars by half a patch so their
shifted patches can join the bank (setting `residuals.shifted_exemplars`), as PatchCore's overlapping windows do.
For the pixel map, the query itself can be encoded moved by half a patch (setting `residuals.shifted_query`):
`lattice_evidence` then scores each half-patch cell from the four overlapping patches that cover it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.vision_utils import get_vision_window_index

DISTANCE_FEATURES = ("token", "patch_max", "patch_mean")
"""The distances embedded per query token, in the order of `InContextResidual.distance_embedding`."""


def nearest_exemplar_tokens(query_tokens: torch.Tensor, exemplar_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query token its most cosine-similar exemplar token and the cosine distance to it.

    The search is not differentiated; the distances and tokens returned are, so training can shape
    the visual features that the residuals are made of.

    Args:
        query_tokens: `[n, d]` visual tokens of the query image.
        exemplar_tokens: `[m, d]` visual tokens of all normal exemplars of the same sample.

    Returns:
        (`[n, d]` nearest exemplar tokens, `[n]` distances `1 - cos` in [0, 2]).
    """
    if exemplar_tokens.shape[0] == 0:
        raise ValueError("In-context residuals need at least one exemplar token.")
    with torch.no_grad():
        similarity = F.normalize(query_tokens.float(), dim=-1) @ F.normalize(exemplar_tokens.float(), dim=-1).T
        index = similarity.argmax(dim=-1)
    nearest = exemplar_tokens[index]
    return nearest, 1.0 - F.cosine_similarity(query_tokens.float(), nearest.float(), dim=-1)


def patches_per_token(patch_states: torch.Tensor, grid_thw: torch.Tensor, vision_config) -> list[torch.Tensor]:
    """Per image, `[tokens, merge_unit, C]`: the vision patches each merged visual token is made of,
    in the tokens' order.

    `patch_states` is the vision tower's `last_hidden_state`: every image's patches, in the
    window-attention order the blocks work in (groups of `merge_unit` patches per token).
    """
    merge = vision_config.spatial_merge_size
    unit = merge * merge
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=vision_config.window_size,
                                              patch_size=vision_config.patch_size)
    if patch_states.shape[0] != window_index.numel() * unit:
        raise ValueError(f"The vision tower's patch states hold {patch_states.shape[0]} patches, but the images' grids "
                         f"(image_grid_thw) have {window_index.numel() * unit}: pass the encoder output of these images.")
    grouped = patch_states.reshape(-1, unit, patch_states.shape[-1])[torch.argsort(window_index.to(patch_states.device))]
    return list(torch.split(grouped, (grid_thw.prod(-1) // unit).tolist()))


def nearest_patch_distances(query_patches: torch.Tensor, exemplar_patches: torch.Tensor) -> torch.Tensor:
    """`[n, unit]` cosine distance of each patch of each query token to its nearest exemplar patch.

    `query_patches`: `[n, unit, C]`; `exemplar_patches`: `[m, unit, C]` (all exemplars' patches).
    """
    flat_query = query_patches.reshape(-1, query_patches.shape[-1])
    _, distance = nearest_exemplar_tokens(flat_query, exemplar_patches.reshape(-1, exemplar_patches.shape[-1]))
    return distance.view(query_patches.shape[0], query_patches.shape[1])


def residual_features(query_tokens: torch.Tensor, exemplar_tokens: torch.Tensor, query_patches: torch.Tensor,
                      exemplar_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `InContextResidual` embeds for one query image.

    Args:
        query_tokens: `[n, d]` the query's visual tokens; exemplar_tokens: `[m, d]` every token of the
            sample's normal exemplars.
        query_patches / exemplar_patches: `[n, unit, C]` / `[m, unit, C]` their vision patches
            (`patches_per_token`).

    Returns:
        (`[n, d]` residuals to the nearest exemplar tokens, `[n, 3]` distances (DISTANCE_FEATURES),
        `[n, unit]` distance of each of the token's patches to its nearest exemplar patch).
    """
    nearest, token_distance = nearest_exemplar_tokens(query_tokens, exemplar_tokens)
    patch_distance = nearest_patch_distances(query_patches, exemplar_patches)
    distances = torch.stack([token_distance, patch_distance.amax(-1), patch_distance.mean(-1)], dim=-1)
    return query_tokens - nearest, distances, patch_distance


HALF_PATCH_SHIFTS = ((0, 1), (1, 0), (1, 1))
"""Half-patch shifts (rows, columns) of the copies of an image encoded moved: of the exemplars whose
patches join the bank (setting `residuals.shifted_exemplars`), and of a query whose map is drawn on the
half-patch lattice (`residuals.shifted_query`)."""


def shifted_image_pixels(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision_config,
                         shifts: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of images moved by half a vision patch, as the vision tower's input.

    Why: a vision patch and the exemplar patch that shows the same part of the product only line up
    when the product sits at the same offset modulo the patch size; otherwise every patch straddles
    two of its nearest exemplar patches and looks a little anomalous. PatchCore-style matchers
    avoid this with overlapping windows; here the exemplars are also encoded moved by half a patch
    (edge pixels repeated), so the bank holds patches on a half-patch lattice.

    Args:
        pixel_values: `[patches, C * T * P * P]` the images' flattened patches as Qwen2.5-VL's image
            processor lays them out (per image: grid t, rows / m, columns / m, m, m, then C, T, P, P).
        grid_thw: `[images, 3]`; shifts: per copy (rows, columns) in half patches.

    Returns:
        (`pixel_values` of every image's shifted copies, image by image and shift by shift, and
        their `grid_thw`).
    """
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    temporal = vision_config.temporal_patch_size
    half = patch // 2
    copies, grids = [], []
    for pixels, (t, h, w) in zip(pixels_per_image(pixel_values, grid_thw), grid_thw.tolist()):
        image = (pixels.view(t, h // merge, w // merge, merge, merge, -1, temporal, patch, patch)
                 .permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, -1, h * patch, w * patch))
        padded = F.pad(image, (half, half, half, half), mode="replicate")
        for rows, cols in shifts:
            top, left = half - rows * half, half - cols * half
            moved = padded[:, :, top:top + h * patch, left:left + w * patch]
            copies.append(moved.reshape(t, temporal, -1, h // merge, merge, patch, w // merge, merge, patch)
                          .permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1))
            grids.append((t, h, w))
    return torch.cat(copies), torch.tensor(grids, dtype=grid_thw.dtype, device=grid_thw.device)


def lattice_evidence(evidence_by_shift: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """`[2H, 2W]` map on the half-patch lattice from `[H, W]` per-patch evidence of the query's own
    grid, key (0, 0), and of its copies moved by (rows, columns) half patches (`shifted_image_pixels`).

    Each cell, half a patch on a side, gets the mean evidence of the patch of every grid that covers
    it: overlapping windows, as PatchCore scores a pixel from every patch around it. Patch i of a
    grid moved down by r half patches covers cells 2i - r and 2i + 1 - r, so cell n lies in its patch
    (n + r) // 2; a moved grid does not reach the last cell (its last half patch is edge padding),
    which takes the grid's last patch.
    """
    height, width = evidence_by_shift[(0, 0)].shape
    device = evidence_by_shift[(0, 0)].device
    rows, cols = torch.arange(2 * height, device=device), torch.arange(2 * width, device=device)
    total = 0.0
    for (down, right), grid in evidence_by_shift.items():
        covering_rows = ((rows + down) // 2).clamp(max=height - 1)
        covering_cols = ((cols + right) // 2).clamp(max=width - 1)
        total = total + grid[covering_rows][:, covering_cols]
    return total / len(evidence_by_shift)


def patch_grid(per_token: torch.Tensor, height: int, width: int, merge: int) -> torch.Tensor:
    """`[height * merge, width * merge]` image layout of `[tokens, merge * merge]` per-patch values
    (each merged token's patches row by row, tokens row by row)."""
    return per_token.view(height, width, merge, merge).transpose(1, 2).reshape(height * merge, width * merge)


def pixels_per_image(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """The rows of `pixel_values` that belong to each image."""
    return list(torch.split(pixel_values, grid_thw.prod(-1).tolist()))


class InContextResidual(nn.Module):
    """The learned embedding `W_r residual + distances @ E` added to query tokens.

    Called once per forward on all query tokens of the batch, so that every rank runs it the same
    number of times (ZeRO-3 gathers a module's weights collectively at each call). Plain parameters
    (no nn.Linear) so that transformers' weight initialisation leaves them to
    `IADGPTForConditionalGeneration.initialize_weights`, which sets them to zero.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.residual_weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.distance_embedding = nn.Parameter(torch.zeros(len(DISTANCE_FEATURES), hidden_size))

    def forward(self, residuals: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """`[n, d]` embeddings to add, from `[n, d]` residuals and `[n, 3]` distances (`residual_features`)."""
        added = residuals.to(self.residual_weight.dtype) @ self.residual_weight.T
        return added + distances.to(self.distance_embedding.dtype) @ self.distance_embedding


class ResidualEvidence(nn.Module):
    """Learned anomaly evidence from the residual distances, added to the model's own scores in
    logit space (setting `residuals.scores`):

        image: r = max_t(d_t) . w_max + mean_t(d_t) . w_mean + b   (over the query's tokens t)
        patch: r_p = (d_p, d_t[token], d_t[patch_mean]) . v + c      (p one of token t's patches)

    with d_t the three DISTANCE_FEATURES of token t and d_p the patch's own distance to its nearest
    exemplar patch: the map gets the vision patches' resolution (spatial_merge_size finer than the
    token grid), which small defects need. The language model already sees the distances
    (InContextResidual) but must learn to route them to one answer token and to the anomaly words'
    attention; this direct path is what InCTRL does with its residual score, and it trains in a few
    hundred steps. Every weight is stored divided by GAIN: Adam moves a weight by about the learning
    rate per step whatever its gradient, and cosine distances differ by tenths where logits must
    move by units, so the stored weights move at the pace of a logit. Zero-initialised (see
    `IADGPTForConditionalGeneration.initialize_weights`): the scores start as without evidence.
    Called once per forward for the whole batch, like InContextResidual (ZeRO-3).
    """

    GAIN = 100.0

    def __init__(self):
        super().__init__()
        features = len(DISTANCE_FEATURES)
        self.image_weight = nn.Parameter(torch.zeros(2 * features))
        self.image_bias = nn.Parameter(torch.zeros(1))
        self.patch_weight = nn.Parameter(torch.zeros(features))
        self.patch_bias = nn.Parameter(torch.zeros(1))

    def forward(self, distances: list[torch.Tensor], patch_distances: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per query image `[n_i, 3]` distances and `[n_i, unit]` patch distances (`residual_features`)
        -> (per image `[n_i, unit]` patch evidence, `[images]` image evidence)."""
        flat, patches = torch.cat(distances), torch.cat(patch_distances)
        features = torch.stack([patches, flat[:, None, 0].expand_as(patches), flat[:, None, 2].expand_as(patches)], -1)
        per_patch = self.GAIN * (features.to(self.patch_weight.dtype) @ self.patch_weight + self.patch_bias)
        pooled = torch.stack([torch.cat([d.amax(0), d.mean(0)]) for d in distances]).to(self.image_weight.dtype)
        images = self.GAIN * (pooled @ self.image_weight + self.image_bias)
        return list(per_patch.split([d.shape[0] for d in distances])), images
