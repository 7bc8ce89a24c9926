"""Shared fixtures for compressor tests.

``make_visual`` (a session-scoped fixture, so hypothesis tests may use it) returns
:func:`build_visual`, a factory for :class:`~tokensieve.models.types.VisualTokens` laid out
the way a backbone lays them out: (t, h, w) row-major, token index ``f*h*w + y*w + x``.
Outside a fixture (e.g. to build a method list at import time) import the function:
``from tests.models.compressors.conftest import build_visual``.
"""

from __future__ import annotations

import pytest
import torch

from tokensieve.models.types import VisualTokens

PAD_VALUE = 1.0e4  # what invalid (padded) slots hold: large, so a method that leaks padding is caught


def build_visual(
    B: int,
    grid: tuple[int, int, int],
    D: int,
    n_valid: int | list[int] | None = None,
    seed: int = 0,
    tokens: torch.Tensor | None = None,
) -> VisualTokens:
    """Build ``VisualTokens`` for a batch of B samples on a ``(t, h, w)`` token grid.

    Args:
        B: batch size.
        grid: ``(t, h, w)``; M = t * h * w.
        D: hidden size (ignored when ``tokens`` is given).
        n_valid: valid tokens per sample: ``None`` (all M), one int for every sample, or a
            list of B ints. Sample b's first ``n_valid[b]`` tokens are valid; the rest are
            padding and hold :data:`PAD_VALUE` in every dimension.
        seed: seed of the standard-normal token values.
        tokens: optional explicit ``float [B, M, D]`` values for the valid slots.

    Returns:
        ``VisualTokens`` with ``tokens [B, M, D]``, ``valid [B, M]``, M-RoPE ``positions
        [3, B, M]`` = (frame, row, column) of each token, ``frame_index [B, M]`` and ``grid``.
    """
    t, h, w = grid
    M = t * h * w
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randn(B, M, D, generator=gen)
    else:
        tokens = tokens.clone().float()
        if tokens.shape[:2] != (B, M):
            raise ValueError(f"tokens must be [{B}, {M}, D], got {tuple(tokens.shape)}")
    if n_valid is None:
        counts = [M] * B
    elif isinstance(n_valid, int):
        counts = [n_valid] * B
    else:
        counts = list(n_valid)
    if len(counts) != B or any(not 0 <= c <= M for c in counts):
        raise ValueError(f"n_valid must give B={B} counts in [0, {M}], got {n_valid!r}")
    valid = torch.arange(M).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    tokens = tokens.masked_fill(~valid.unsqueeze(-1), PAD_VALUE)

    idx = torch.arange(M)
    frame, row, col = idx // (h * w), (idx % (h * w)) // w, idx % w
    positions = torch.stack([frame, row, col]).unsqueeze(1).expand(3, B, M).clone()
    frame_index = frame.unsqueeze(0).expand(B, M).clone()
    return VisualTokens(tokens=tokens, valid=valid, positions=positions, frame_index=frame_index, grid=(t, h, w))


@pytest.fixture(scope="session")
def make_visual():
    """The :func:`build_visual` factory: ``make_visual(B, grid, D, n_valid=None, seed=0, tokens=None)``."""
    return build_visual
