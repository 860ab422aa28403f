"""In-context residuals: what each query token has that no normal exemplar token has.

IADGPT leaves the comparison of the query image with its normal exemplars entirely to the language
model's attention. InCTRL / InCTRLv2 (patch-level in-context residuals, Eq. 3 of InCTRLv2) show that
the distance of a query patch to its nearest exemplar patch is itself a strong, class-agnostic
anomaly cue. This module hands that cue to the language model: before the visual tokens are
scattered into the prompt, every query token gets

    token + W_r (token - nearest exemplar token) + d * e_d,     d = 1 - max cos(token, exemplar tokens)

where the nearest token is searched over *all* visual tokens of the sample's normal exemplars
(before exemplar compression, so what compression drops still informs the query). `W_r` and `e_d`
start at zero, so a model starts out exactly as without the module; a defect then shows up as a
token with a large `d`, which attention (exponential in a key that is linear in `d`) can single out
for both the Yes/No answer and the anomaly words' pixel map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class InContextResidual(nn.Module):
    """Adds a learned embedding of each query token's residual to its nearest exemplar token.

    Plain parameters (no nn.Linear) so that transformers' weight initialisation leaves them to
    `IADGPTForConditionalGeneration.initialize_weights`, which sets them to zero.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.residual_weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.distance_embedding = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, query_tokens: torch.Tensor, exemplar_tokens: torch.Tensor) -> torch.Tensor:
        """`query_tokens` `[n, d]` with their residual embeddings added; `exemplar_tokens` `[m, d]`."""
        nearest, distance = nearest_exemplar_tokens(query_tokens, exemplar_tokens)
        residual = (query_tokens - nearest).to(self.residual_weight.dtype)
        added = residual @ self.residual_weight.T + distance[:, None].to(self.distance_embedding.dtype) * self.distance_embedding
        return query_tokens + added.to(query_tokens.dtype)
