"""Pixel-level losses supervising the attention anomaly map (IADGPT Eq. 6): focal + Dice."""

from __future__ import annotations

import torch


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels.

    `prob` is the predicted probability of "anomalous" per pixel, `target` the 0/1 mask.
    FL = -alpha_t (1 - p_t)^gamma log p_t, with p_t = p where the mask is 1 and 1 - p elsewhere.
    """
    prob = prob.float().clamp(eps, 1 - eps)
    target = target.float()
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t)
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss: 1 - (2 sum(p m) + s) / (sum(p) + sum(m) + s)."""
    prob = prob.float().flatten()
    target = target.float().flatten()
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + smooth) / (prob.sum() + target.sum() + smooth)
