"""DivPrune parity: hand-derived greedy orders and a transcription of the reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.models.compressors.divprune import DivPrune, divprune_order


def _angles(degrees, scales=None):
    """2-D tokens at the given angles (cosine distance depends on the angle only)."""
    scales = scales or [1.0] * len(degrees)
    return torch.tensor(
        [[s * math.cos(math.radians(d)), s * math.sin(math.radians(d))] for d, s in zip(degrees, scales)]
    )


# Six tokens at 0, 10, 100, 115, 200, 290 degrees (norms vary: cosine ignores them).
# Derived by hand from DivPrune: DivPrune() in vbdi/divprune llava_arch.py
# (= divprune() in ModelTC/llmc token_reduction/divprune.py):
#   nearest-neighbour angles: t0 10, t1 10, t2 15, t3 15, t4 85 (to t3), t5 70 (to t0)
#   -> first pick t4 (the reference's topk(D, 2, largest=False)[1] then argmax);
#   angle to t4: t0 160, t1 170, t2 100, t3 85, t5 90              -> t1
#   min angle to {t4, t1}: t0 10, t2 90, t3 85, t5 80              -> t2
#   min angle to {t4, t1, t2}: t0 10, t3 15, t5 80                 -> t5
#   min angle to {t4, t1, t2, t5}: t0 10, t3 15                    -> t3, then t0
DEGREES = [0, 10, 100, 115, 200, 290]
SCALES = [1.0, 2.0, 3.0, 0.5, 1.0, 0.7]
ORDER = [4, 1, 2, 5, 3, 0]


def test_hand_derived_pick_order():
    x = _angles(DEGREES, SCALES)
    assert divprune_order(x, 6).tolist() == ORDER


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_hand_derived_selection(k, make_visual):
    visual = make_visual(1, (1, 2, 3), 2, tokens=_angles(DEGREES, SCALES).unsqueeze(0))
    sel = DivPrune()(visual, budget=k)
    assert sel.index[0].tolist() == sorted(ORDER[:k])  # kept in original order


def test_padded_batch_matches_single_samples(make_visual):
    """Sample 1 is sample 0 with three padded slots appended: only its valid tokens count."""
    x = _angles(DEGREES, SCALES)
    tokens = torch.zeros(2, 9, 2)
    tokens[0, :6] = x
    tokens[0, 6:] = _angles([45, 135, 225])
    tokens[1, :6] = x
    visual = make_visual(2, (1, 3, 3), 2, n_valid=[9, 6], tokens=tokens)
    sel = DivPrune()(visual, budget=3)
    assert sel.index[1].tolist() == sorted(ORDER[:3])
    assert sel.valid is None


def _reference_order(x: torch.Tensor, k: int) -> list[int]:
    """The reference loop, transcribed: full distance matrix, second-smallest per column for
    the first pick, then min over the selected rows; argmax each time."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[picks].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return picks


@pytest.mark.parametrize("seed", range(8))
def test_matches_reference_loop_on_random_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    assert divprune_order(x, 25).tolist() == _reference_order(x, 25)
