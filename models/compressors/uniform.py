"""``uniform``: keep evenly strided visual tokens — the simplest training-free baseline.

Tokens are laid out in the backbone's (t, h, w) row-major order, so an even stride over the
flattened valid tokens is a joint temporal + spatial stride. No paper; the baseline every
token-reduction paper reports.
"""

from __future__ import annotations

import torch

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.types import Query, Selection, VisualTokens


class UniformSelect(Compressor):
    """Keep K evenly spaced valid tokens: the i-th kept token is valid token ``floor((i + 0.5) * n / K)``.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]``. Output: ``Selection.index [B, K]``.
    """

    name = "uniform"

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        picks = []
        for valid in visual.valid:
            positions = valid.nonzero().squeeze(1)
            n = positions.numel()
            k = num_keep(n, budget)
            slots = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / max(k, 1)).floor().long()
            picks.append(positions[slots.to(positions.device)])
        return selection_from_indices(picks, visual.tokens.device)
