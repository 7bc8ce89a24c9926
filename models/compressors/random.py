"""``random``: keep a seeded random subset of the valid visual tokens — the lower bound.

Deterministic: the same input and ``seed`` give the same selection on every call. Each
sample's generator is seeded from ``seed`` and a digest of the sample's own tokens, so
different clips get independent draws wherever they sit in a batch.
"""

from __future__ import annotations

import hashlib

import torch

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.types import Query, Selection, VisualTokens


class RandomSelect(Compressor):
    """Keep K valid tokens drawn uniformly without replacement (``torch.randperm``, seeded per call).

    Args:
        seed: generator seed, combined with a digest of each sample's tokens (a strided
            subsample of ``visual.tokens[b]``, so hashing stays cheap at 7B sizes).
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
            gen = torch.Generator().manual_seed(self._sample_seed(visual.tokens[b, positions]))
            perm = torch.randperm(positions.numel(), generator=gen)[:k]
            picks.append(positions[perm.to(positions.device)])
        return selection_from_indices(picks, visual.tokens.device)

    def _sample_seed(self, tokens: torch.Tensor) -> int:
        """``seed`` mixed with a digest of ``tokens [n, D]`` (every ~64th token, first 16 channels)."""
        step = max(1, tokens.shape[0] // 64)
        sample = tokens[::step, :16].detach().float().cpu().numpy().tobytes()
        digest = hashlib.blake2b(sample, digest_size=8, key=str(self.seed).encode()).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
