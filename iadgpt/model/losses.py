"""Pixel-level losses supervising the attention anomaly map (IADGPT Eq. 6): focal + Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def pixel_losses(pixel_scores: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
                 alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal, Dice) of a per-token anomaly probability map `[h, w]` against a 0/1 defect mask at the
    image's own size: the map is upsampled bilinearly to the mask, so the loss sees every pixel."""
    prob = F.interpolate(pixel_scores[None, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return focal_loss(prob, mask, gamma, alpha), dice_loss(prob, mask)
