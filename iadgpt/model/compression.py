"""Exemplar visual-token compression (IADGPT Eqs. 7-9).

Normal exemplars of one product look alike, so most of their visual tokens repeat what the first
exemplar already shows. The first exemplar is the reference and is kept whole; for every other
exemplar, each token's highest cosine similarity to the reference's tokens measures how redundant
it is, and only the least redundant `retention` fraction is kept. The query image is never
compressed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokens_to_keep(num_tokens: int, retention: float) -> int:
    """How many tokens of a non-reference exemplar survive: floor(retention * n), at least 1."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention={retention} is outside (0, 1]: it is the fraction of exemplar tokens kept.")
    return max(1, int(retention * num_tokens + 1e-9))


def exemplar_token_count(per_image: int, exemplars: int, retention: float | None) -> int:
    """Visual tokens `exemplars` images of `per_image` tokens each put before the language model: the
    first (the reference) keeps all of its tokens, every other `tokens_to_keep`; None or 1.0: no compression."""
    if retention is None or exemplars == 0:
        return exemplars * per_image
    return per_image + (exemplars - 1) * tokens_to_keep(per_image, retention)


@torch.no_grad()
def compress_exemplar_tokens(exemplar_tokens: list[torch.Tensor], retention: float) -> list[torch.Tensor]:
    """Which visual tokens of each exemplar to keep.

    Args:
        exemplar_tokens: per exemplar, its visual tokens `[n_i, d]`; the first is the reference.
        retention: fraction of each non-reference exemplar's tokens kept, in (0, 1].

    Returns:
        Per exemplar, a bool mask `[n_i]` of kept tokens (all True for the reference).
    """
    if not exemplar_tokens:
        raise ValueError(
            "Exemplar compression needs at least one normal exemplar image before the query image; "
            "got none. Pass exemplars, or turn compression off (exemplar_retention=1.0)."
        )
    reference = F.normalize(exemplar_tokens[0].float(), dim=-1)
    keep = [torch.ones(exemplar_tokens[0].shape[0], dtype=torch.bool, device=reference.device)]
    for tokens in exemplar_tokens[1:]:
        n = tokens.shape[0]
        similarity = F.normalize(tokens.float(), dim=-1) @ reference.T  # S_i (Eq. 7)
        redundancy = similarity.max(dim=-1).values  # s_i (Eq. 8)
        kept = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        # Drop the most similar tokens (Eq. 9), i.e. keep the least similar ones.
        kept[redundancy.topk(tokens_to_keep(n, retention), largest=False).indices] = True
        keep.append(kept)
    return keep
