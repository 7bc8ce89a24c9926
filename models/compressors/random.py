"""``random``: keep a seeded random subset of the valid visual tokens — the lower bound.

Deterministic: the same input and ``seed`` give the same selection on every call.
"""

from __future__ import annotations

import torch

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.types import Query, Selection, VisualTokens


class RandomSelect(Compressor):
    """Keep K valid tokens drawn uniformly without replacement (``torch.randperm``, seeded per call).

    Args:
        seed: generator seed; sample b uses ``seed + b`` so samples differ within a batch.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        picks = []
        for b, valid in enumerate(visual.valid):
            positions = valid.nonzero().squeeze(1)
            k = num_keep(positions.numel(), budget)
            gen = torch.Generator().manual_seed(self.seed + b)
            perm = torch.randperm(positions.numel(), generator=gen)[:k]
            picks.append(positions[perm.to(positions.device)])
        return selection_from_indices(picks, visual.tokens.device)
