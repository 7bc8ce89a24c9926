"""Frame / count helpers shared by the frame-structured methods (models/compressors/frames.py)."""

from __future__ import annotations


import pytest
import torch

from tokensieve.models.compressors.frames import frame_sizes, require_saliency, split_count, top_indices
from tokensieve.models.types import VisualTokens


def make_visual(tokens: torch.Tensor, grid, valid=None, saliency=None) -> VisualTokens:
    b, m, _ = tokens.shape
    valid = torch.ones(b, m, dtype=torch.bool) if valid is None else valid
    hw = grid[1] * grid[2]
    return VisualTokens(
        tokens=tokens,
        valid=valid,
        positions=torch.arange(m).expand(b, m),
        frame_index=(torch.arange(m) // hw).expand(b, m),
        grid=grid,
        saliency=saliency,
    )


def test_split_count_largest_remainder_and_caps():
    assert split_count(7, [4, 4, 4]) == [3, 2, 2]  # remainders tie -> earlier slot
    assert split_count(10, [3, 1]) == [8, 2]  # 7.5 / 2.5 -> tie on remainder -> first
    assert split_count(5, [1, 1, 1], caps=[1, 5, 5]) == [1, 2, 2]
    assert split_count(9, [16, 16, 5], caps=[16, 16, 5]) == [4, 4, 1]
    assert split_count(0, [3, 4]) == [0, 0]
    assert sum(split_count(37, [196] * 7 + [50], [196] * 7 + [50])) == 37
    with pytest.raises(ValueError):
        split_count(5, [1, 1], caps=[2, 2])


def test_frame_sizes_partial_frame_and_errors():
    tokens = torch.zeros(2, 12, 2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    v = make_visual(tokens, (3, 2, 2), valid)
    assert frame_sizes(v, 0) == [4, 4, 4]
    assert frame_sizes(v, 1) == [4, 4, 2]
    holes = valid.clone()
    holes[0, 3] = False
    with pytest.raises(ValueError, match="prefix"):
        frame_sizes(make_visual(tokens, (3, 2, 2), holes), 0)
    with pytest.raises(ValueError, match="grid"):
        frame_sizes(make_visual(tokens, (2, 2, 2)), 0)


def test_require_saliency_names_the_field():
    v = make_visual(torch.zeros(1, 4, 2), (1, 2, 2))
    with pytest.raises(ValueError, match="saliency"):
        require_saliency(v, "x")
    v.saliency = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="shape"):
        require_saliency(v, "x")


def test_top_indices_ties_to_lower_index():
    assert top_indices(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]
