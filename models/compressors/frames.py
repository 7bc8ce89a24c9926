"""Helpers shared by the frame-structured training-free methods (DyCoke, VisionZip, FastVID, HoliTom).

Tokens are (t, h, w) row-major: ``index = t*h*w + y*w + x`` with ``visual.grid = (t, h, w)``.
"""

from __future__ import annotations

import torch

from tokensieve.models.budget import Budget
from tokensieve.models.compressors.base import Compressor, pack_merged
from tokensieve.models.types import Query, Selection, VisualTokens


class SaliencyMerge(Compressor):
    """Base of the saliency-guided merging methods (VisionZip, FastVID, HoliTom): one sample at a time.

    Subclasses implement ``_compress(visual, saliency [M], b, budget) -> (index long [K_b],
    tokens [K_b, D])`` for sample ``b``; :meth:`forward` packs the samples into a merged
    :class:`Selection`.

    Raises:
        ValueError: ``visual.saliency`` is missing or mis-shaped.
    """

    needs_saliency = True

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        saliency = require_saliency(visual, self.name)
        indices, tokens = [], []
        for b in range(visual.batch_size):
            idx, tok = self._compress(visual, saliency[b], b, budget)
            indices.append(idx)
            tokens.append(tok)
        return pack_merged(indices, tokens, visual.tokens)

    def _compress(self, visual: VisualTokens, saliency: torch.Tensor, b: int, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

def frame_sizes(visual: VisualTokens, b: int) -> list[int]:
    """Token counts of sample ``b``'s frame groups, in order.

    Tokens are (t, h, w) row-major (``index = t*h*w + y*w + x``); a sample's ``n`` valid tokens
    are a prefix of its row. ``n`` need not be a whole number of frames: the last frame group
    is then partial (its first ``n mod h*w`` positions).

    Raises:
        ValueError: padding not at the end of the sample, or more valid tokens than the grid holds.
    """
    t, h, w = visual.grid
    hw = h * w
    valid = visual.valid[b]
    n = int(valid.sum())
    if n and not bool(valid[:n].all()):
        raise ValueError(f"sample {b}: valid tokens must be a prefix (padding at the end of the sample)")
    if hw <= 0 or n > t * hw:
        raise ValueError(f"sample {b}: {n} valid tokens do not fit grid (t, h, w) = {visual.grid}")
    sizes = [hw] * (n // hw)
    if n % hw:
        sizes.append(n % hw)
    return sizes


def split_count(total: int, weights: list[int], caps: list[int] | None = None) -> list[int]:
    """Split the integer ``total`` over slots in proportion to integer ``weights``.

    Largest-remainder rule in exact integer arithmetic: slot ``i`` gets
    ``floor(total * w_i / W)``, and the leftover units go one each to the largest remainders
    (ties to the earlier slot). With ``caps`` (water-filling): a slot whose proportional share
    exceeds its cap is fixed at the cap and the rest is re-split over the other slots, until
    every share fits. Slots of zero weight get nothing unless every open slot has zero weight
    (then the split is even).

    Raises:
        ValueError: ``total`` exceeds the sum of the caps.
    """
    m = len(weights)
    caps = list(caps) if caps is not None else [total] * m
    if total > sum(caps):
        raise ValueError(f"cannot split {total} over capacities {caps}")
    counts = [0] * m
    remaining = total
    open_slots = [i for i in range(m) if caps[i] > 0]
    while remaining > 0 and open_slots:
        ws = {i: weights[i] for i in open_slots}
        if sum(ws.values()) <= 0:
            ws = {i: 1 for i in open_slots}
        wsum = sum(ws.values())
        over = [i for i in open_slots if remaining * ws[i] > caps[i] * wsum]
        if over:
            for i in over:
                counts[i] = caps[i]
                remaining -= caps[i]
            open_slots = [i for i in open_slots if i not in over]
            continue
        share = {i: remaining * ws[i] // wsum for i in open_slots}
        rem = {i: remaining * ws[i] % wsum for i in open_slots}
        left = remaining - sum(share.values())
        for i in sorted(open_slots, key=lambda j: (-rem[j], j))[:left]:
            share[i] += 1
        for i in open_slots:
            counts[i] = share[i]
        remaining = 0
    return counts


def require_saliency(visual: VisualTokens, method: str) -> torch.Tensor:
    """``visual.saliency [B, M]`` or a clear error naming the missing field."""
    if visual.saliency is None:
        raise ValueError(
            f"compressor {method!r} needs vision-tower attention: VisualTokens.saliency is None "
            "(encode with a backbone that fills `saliency` [B, M])"
        )
    if tuple(visual.saliency.shape) != tuple(visual.valid.shape):
        raise ValueError(
            f"compressor {method!r}: VisualTokens.saliency has shape {tuple(visual.saliency.shape)}, "
            f"expected {tuple(visual.valid.shape)}"
        )
    return visual.saliency


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``scores`` (ties to the lower position), in score order."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]
