"""Pool parity: hand-derived pooled grids, checked against M3's avg_pool2d where it applies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.compressors.pool import Pool, candidate_grids


def _ramp(B: int, M: int) -> torch.Tensor:
    """D = 1 tokens whose value is their index: a cell's mean is the mean of its indices."""
    return torch.arange(M, dtype=torch.float32).reshape(1, M, 1).expand(B, M, 1).clone()


def test_four_by_four_to_two_by_two(make_visual):
    # Derived by hand from M3: matryoshka_vis_token_process() in mu-cai/matryoshka-mm
    # llava/model/llava_arch.py — avg_pool2d with kernel = stride = int(sqrt(16 / 4)) = 2:
    #   cells {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15} -> means 2.5, 4.5, 10.5, 12.5;
    #   nearest token to each cell centre: (floor(0.5·2), ...) = rows/cols {1, 3} -> 5, 7, 13, 15
    visual = make_visual(1, (1, 4, 4), 1, tokens=_ramp(1, 16))
    sel = Pool()(visual, budget=4)
    assert sel.index[0].tolist() == [5, 7, 13, 15]
    assert sel.tokens[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    m3 = F.avg_pool2d(visual.tokens[0].reshape(1, 4, 4, 1).permute(0, 3, 1, 2), kernel_size=2, stride=2)
    assert m3.flatten().tolist() == sel.tokens[0, :, 0].tolist()


def test_overlapping_adaptive_cells(make_visual):
    # 3x3 -> 2x2 with adaptive_avg_pool2d: cells span rows/cols [0, 2) and [1, 3) (overlap)
    #   {0,1,3,4} -> 2, {1,2,4,5} -> 3, {3,4,6,7} -> 5, {4,5,7,8} -> 6
    #   centre tokens: floor((2i + 1)·3 / 4) = 0, 2 -> indices 0, 2, 6, 8
    visual = make_visual(1, (1, 3, 3), 1, tokens=_ramp(1, 9))
    sel = Pool()(visual, budget=4)
    assert sel.index[0].tolist() == [0, 2, 6, 8]
    assert sel.tokens[0, :, 0].tolist() == [2.0, 3.0, 5.0, 6.0]
    ref = F.adaptive_avg_pool2d(visual.tokens[0].reshape(1, 3, 3, 1).permute(0, 3, 1, 2), (2, 2))
    assert ref.flatten().tolist() == sel.tokens[0, :, 0].tolist()


def test_per_frame_pooling(make_visual):
    # 2 frames of 2x2, K = 2: the 1x1 grid gives 2 cells = K: each frame's mean; centre token
    # (floor(0.5·2), floor(0.5·2)) = (1, 1) -> indices 3 and 7
    visual = make_visual(1, (2, 2, 2), 1, tokens=_ramp(1, 8))
    sel = Pool()(visual, budget=2)
    assert sel.index[0].tolist() == [3, 7]
    assert sel.tokens[0, :, 0].tolist() == [1.5, 5.5]


def test_trim_by_uniform_stride(make_visual):
    # 2 frames of 2x2, K = 3: 1x1 gives 2 < 3 cells, so 2x2 (8 cells, one token each) and keep
    # cells floor((2s + 1)·8 / 6) = 1, 4, 6
    visual = make_visual(1, (2, 2, 2), 1, tokens=_ramp(1, 8))
    sel = Pool()(visual, budget=3)
    assert sel.index[0].tolist() == [1, 4, 6]
    assert sel.tokens[0, :, 0].tolist() == [1.0, 4.0, 6.0]


def test_ratio_budget_picks_the_smallest_grid_with_enough_cells(make_visual):
    # 4 frames of 4x4 = 64 tokens, budget 0.25 -> K = 16 = 4 per frame -> 2x2 per frame, no trim
    visual = make_visual(1, (4, 4, 4), 1, tokens=_ramp(1, 64))
    sel = Pool()(visual, budget=0.25)
    assert sel.index[0].tolist() == [f * 16 + i for f in range(4) for i in (5, 7, 13, 15)]
    assert sel.tokens[0, :4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_padded_centre_token_is_replaced_by_the_nearest_valid_one(make_visual):
    # one 2x2 frame with token 3 padded, K = 1: the 1x1 cell's centre token (1, 1) = 3 is
    # padding; tokens 0, 1, 2 are equally near the centre -> the lowest index, 0
    visual = make_visual(2, (1, 2, 2), 1, n_valid=[4, 3], tokens=_ramp(2, 4))
    sel = Pool()(visual, budget=1)
    assert sel.index.tolist() == [[3], [0]]
    assert sel.tokens[:, 0, 0].tolist() == [1.5, 1.0]  # sample 1: mean of 0, 1, 2 only


def test_candidate_grids_preserve_aspect():
    assert candidate_grids(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert candidate_grids(3, 4) == [(1, 1), (2, 2), (2, 3), (3, 4)]
    assert candidate_grids(1, 4) == [(1, 1), (1, 2), (1, 3), (1, 4)]
