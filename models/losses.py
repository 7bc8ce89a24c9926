"""Rank-distillation losses shared by learned selectors.

Source: FlexSelect (arXiv 2506.00993, repo yunzhuzhang0918/flexselect) trains its selector
with ``1 - Spearman(softrank(pred), rank(teacher))`` using a pairwise-sigmoid soft rank.
"""

from __future__ import annotations

import torch


def soft_rank(scores: torch.Tensor, valid: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Differentiable ascending ranks by pairwise sigmoids: ``r_i = 1 + sum_{j != i} sigmoid((s_i - s_j) / tau)``.

    Args:
        scores: ``float [B, M]``.
        valid: ``bool [B, M]``; invalid tokens neither receive nor contribute rank.
        tau: temperature in score units; smaller is closer to the hard rank.

    Returns:
        ``float [B, M]`` ranks in [1, n_valid] (0 at invalid tokens). Memory is O(B·M²).
    """
    scores = scores.masked_fill(~valid, 0.0)  # -inf padding would give nan pairs
    diff = (scores.unsqueeze(2) - scores.unsqueeze(1)) / tau  # [B, M, M]: s_i - s_j
    pair = torch.sigmoid(diff) * (valid.unsqueeze(1) & valid.unsqueeze(2))
    ranks = 1.0 + pair.sum(dim=2) - 0.5 * valid  # the i == j term contributes sigmoid(0) = 0.5
    return ranks * valid


def hard_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ascending 1-based ranks ``float [B, M]`` among valid tokens (0 at invalid ones)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    ranks = masked.argsort(dim=1).argsort(dim=1).float() + 1.0
    ranks = ranks - (~valid).sum(dim=1, keepdim=True)  # invalid tokens sort first
    return ranks * valid


def masked_pearson(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation per sample over valid tokens: ``float [B]``."""
    w = valid.float()
    n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    xc = (x - (x * w).sum(1, keepdim=True) / n) * w
    yc = (y - (y * w).sum(1, keepdim=True) / n) * w
    return (xc * yc).sum(1) / ((xc.square().sum(1) * yc.square().sum(1)).sqrt() + eps)


def spearman_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``mean_b (1 - Pearson(soft_rank(pred_b), rank(target_b)))`` — a scalar in [0, 2].

    Args:
        pred: selector scores ``float [B, M]`` (gradients flow here).
        target: teacher scores ``float [B, M]`` (no gradient needed).
        valid: ``bool [B, M]``.
    """
    return (1.0 - masked_pearson(soft_rank(pred, valid, tau), hard_rank(target.detach(), valid), valid)).mean()

