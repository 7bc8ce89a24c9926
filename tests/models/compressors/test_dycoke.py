"""DyCoke stage 1 (temporal token merging): models/compressors/dycoke.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.dycoke import DyCoke, dycoke_anchor
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


def kept(sel, b=0):
    n = int(sel.num_kept[b])
    return sel.index[b, :n].tolist()


def test_anchor_pairs_follow_the_reference_windows():
    # dycole_ttm: pairs (i, i+1) for even i, then (i, i+2) for i % 4 == 0
    assert [dycoke_anchor(f) for f in range(8)] == [None, 0, 0, 2, None, 4, 4, 6]


def test_each_frame_keeps_tokens_least_similar_to_its_own_anchor():
    # Expected selection derived from the pairs in DyCoke `dycole_ttm` (frame a+3 vs a+2):
    # frame 1 differs from frame 0 at position 2; frame 2 differs from frame 0 at position 1;
    # frame 3 = frame 2 except position 3 (cos 0.5). Frame 3 compared with frame 2 keeps
    # position 3 (index 15); compared with frame 0 it would keep position 1 (index 13).
    torch.manual_seed(0)
    d = 8
    f0 = F.normalize(torch.randn(4, d), dim=-1)
    f1 = f0.clone()
    f1[2] = -f0[2]
    f2 = f0.clone()
    f2[1] = -f0[1]
    f3 = f2.clone()
    u = torch.randn(d)
    u = F.normalize(u - (u @ f2[3]) * f2[3], dim=-1)
    f3[3] = 0.5 * f2[3] + (0.75**0.5) * u  # cos(f3[3], f2[3]) = 0.5
    x = torch.cat([f0, f1, f2, f3])[None]
    sel = DyCoke()(make_visual(x, (4, 2, 2)), budget=7)  # 4 anchor tokens + 1 per other frame
    assert kept(sel) == [0, 1, 2, 3, 6, 9, 15]
    assert sel.tokens is None and sel.valid is None


def test_matches_reference_rule_when_budget_equals_int_ratio_counts():
    # 8 frames x 10 tokens, K = 0.7 -> int(0.3 * 10) = 3 per non-anchor frame, anchors in full:
    # the budget 2 * 10 + 6 * 3 = 38 must reproduce the per-frame top-3 rule exactly.
    torch.manual_seed(1)
    x = torch.randn(1, 80, 6)
    sel = DyCoke()(make_visual(x, (8, 2, 5)), budget=38)
    frames = x[0].view(8, 10, 6)
    expected = []
    for f in range(8):
        a = dycoke_anchor(f)
        if a is None:
            expected += list(range(f * 10, f * 10 + 10))
            continue
        sim = F.cosine_similarity(frames[f], frames[a], dim=-1)
        expected += (f * 10 + sim.topk(3, largest=False).indices).tolist()
    assert kept(sel) == sorted(expected)


def test_below_anchor_share_prunes_anchors_by_stated_rule():
    # 8 frames of 4 tokens -> anchors are frames 0 and 4 (8 tokens); K = 2 < 8:
    # first anchor: strided slot floor(0.5 * 4 / 1) = 2; frame 4 keeps the token least
    # similar to frame 0 at the same position (frame 4 = frame 0 except position 3).
    torch.manual_seed(2)
    x = torch.randn(8, 4, 5)
    x[4] = x[0]
    x[4, 3] = -x[0, 3]
    v = make_visual(x.reshape(1, 32, 5), (8, 2, 2))
    assert kept(DyCoke()(v, budget=2)) == [2, 19]
    assert kept(DyCoke()(v, budget=0.25)) == list(range(4)) + list(range(16, 20))  # anchors exactly


@pytest.mark.parametrize("budget", [1, 3, 0.1, 0.25, 0.4, 0.5, 0.9, 1.0, 500])
def test_exact_counts_batch_with_padding_and_partial_frame(budget):
    torch.manual_seed(3)
    x = torch.randn(2, 6 * 9, 4)
    valid = torch.ones(2, 54, dtype=torch.bool)
    valid[1, 40:] = False  # 4 full frames + a partial frame of 4 tokens
    sel = DyCoke()(make_visual(x, (6, 3, 3), valid), budget=budget)
    for b, n in enumerate((54, 40)):
        idx = kept(sel, b)
        assert len(idx) == num_keep(n, budget)
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    if sel.valid is not None:  # padded slots repeat a valid index
        pad = sel.index[1, int(sel.num_kept[1]) :]
        assert (pad == sel.index[1, int(sel.num_kept[1]) - 1]).all()


def test_deterministic_and_keep_all_is_identity():
    torch.manual_seed(4)
    v = make_visual(torch.randn(1, 36, 4), (4, 3, 3))
    a, b = DyCoke()(v, budget=0.3), DyCoke()(v, budget=0.3)
    assert torch.equal(a.index, b.index)
    assert kept(DyCoke()(v, budget=1.0)) == list(range(36))


def test_needs_no_saliency_and_rejects_bad_inputs():
    v = make_visual(torch.randn(1, 8, 2), (2, 2, 2))
    assert v.saliency is None
    DyCoke()(v, budget=0.5)
    with pytest.raises(ValueError):
        DyCoke()(v, budget=1.5)
    with pytest.raises(ValueError, match="window"):
        DyCoke(window=0)
