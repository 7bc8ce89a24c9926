"""FastVID (DySeg + STPrune + density-based merging): models/compressors/fastvid.py."""

from __future__ import annotations

import pytest
import torch

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.fastvid import FastVID, anchor_frames, dyseg
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


def test_dyseg_cuts_at_smallest_similarities_and_below_tau():
    # DySeg in FastVID modeling_qwen2.py: cut after t for the c-1 smallest s_t and s_t < tau.
    e = torch.eye(3)
    g = torch.stack([e[0], e[0], e[1], e[1], e[1] + 0.8 * e[2], e[2]])
    # s = [1, 0, 1, 0.781, 0.625]
    assert dyseg(g, c=2, tau=0.7) == [2, 3, 1]  # smallest: s1; below 0.7: s1, s4
    assert dyseg(g, c=3, tau=0.5) == [2, 3, 1]  # two smallest: s1, s4
    assert dyseg(g, c=1, tau=0.5) == [2, 4]
    assert dyseg(g, c=1, tau=0.0) == [6]
    assert dyseg(g, c=8, tau=0.0) == [1] * 6  # c - 1 clamped to the 5 pairs
    assert dyseg(g[:1]) == [1]


def test_anchor_frames_are_last_and_every_p_before():
    # mask (seg_indices % p == 0) with seg_indices = L-1 ... 0
    assert anchor_frames(4, 4) == [3]
    assert anchor_frames(5, 4) == [0, 4]
    assert anchor_frames(9, 4) == [0, 4, 8]
    assert anchor_frames(4, 2) == [1, 3]
    assert anchor_frames(1, 4) == [0]


def blob_frame():
    """16 tokens: 5 salient (indices 11..15), 11 others in 3 tight blobs (sizes 4, 4, 3)."""
    g = torch.Generator().manual_seed(0)
    e = torch.eye(4)
    x = torch.zeros(16, 4)
    blob = torch.tensor([0] * 4 + [1] * 4 + [2] * 3)
    x[:11] = 2 * e[blob] + 0.01 * torch.randn(11, 4, generator=g)
    x[11:] = torch.randn(5, 4, generator=g)
    sal = torch.zeros(16)
    sal[11:] = 1.0 + torch.arange(5.0)
    return x, sal, blob


def test_single_frame_segment_salient_plus_density_merge():
    # Expected tokens derived from FastVID "ATS" + "DTM for Single-Frame Segment": keep 8 ->
    # int(8 * 0.4) = 3 contextual, 5 salient (tokens 11..15, unchanged); DPC-KNN picks one
    # peak per blob; every non-salient token joins its cosine-nearest peak (its own blob), and
    # a peak with c assigned (itself included) -> w * peak + (1 - w) * mean, w = max(1/(c+1), 0.6).
    x, sal, blob = blob_frame()
    sel = FastVID()(make_visual(x[None], (1, 4, 4), saliency=sal[None]), budget=8)
    idx = sel.index[0].tolist()
    assert idx[-5:] == [11, 12, 13, 14, 15]
    assert torch.equal(sel.tokens[0, -5:], x[11:])
    peaks = idx[:3]
    assert sorted(blob[peaks].tolist()) == [0, 1, 2]
    for j, p in enumerate(peaks):
        members = x[:11][blob == blob[p]]
        w = max(1.0 / (members.shape[0] + 1), 0.6)
        assert torch.allclose(sel.tokens[0, j], w * x[p] + (1 - w) * members.mean(0), atol=1e-6)


def segment_video(frames=4, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(hw, 6, generator=g)
    x = base.repeat(frames, 1) + 0.05 * torch.randn(frames * hw, 6, generator=g)
    sal = torch.rand(frames * hw, generator=g)
    return x, sal


def per_frame(idx, hw=16, frames=4):
    return [sum(1 for i in idx if f * hw <= i < (f + 1) * hw) for f in range(frames)]


def test_multi_frame_segment_puts_context_on_anchor_frames():
    # One segment (c=1, tau=0: no cut) of 4 frames, keep 16 -> m = 4 per frame,
    # int(4 * 0.4) = 1 contextual + 3 salient per frame; p = 4 -> only the last frame is an
    # anchor and holds the segment's 4 contextual tokens; p = 2 -> frames 1 and 3 hold 2 each.
    x, sal = segment_video()
    v = make_visual(x[None], (4, 4, 4), saliency=sal[None])
    sel = FastVID(c=1, tau=0.0)(v, budget=16)
    idx = sel.index[0].tolist()
    assert per_frame(idx) == [3, 3, 3, 7]
    for f in range(3):  # non-anchor frames keep exactly their top-3 salient tokens, unchanged
        top = sorted((f * 16 + sal[f * 16 : f * 16 + 16].topk(3).indices).tolist())
        assert [i for i in idx if f * 16 <= i < f * 16 + 16] == top
    # anchor-frame context tokens are merges over the whole segment: not raw tokens
    raw = (sel.tokens[0][:, None, :] == x[None, :, :]).all(-1).any(-1)
    assert int((~raw).sum()) == 4
    assert per_frame(FastVID(c=1, tau=0.0, p=2)(v, budget=16).index[0].tolist()) == [3, 5, 3, 5]


def test_anchor_overflow_spills_to_salient_of_other_frames():
    # keep 32 -> m = 8, 3 contextual + 5 salient per frame; the anchor (frame 3) can hold only
    # 16 - 5 = 11 of the segment's 12 contextual tokens: the 1 left over becomes an extra
    # salient token of the first non-anchor frame.
    x, sal = segment_video()
    sel = FastVID(c=1, tau=0.0)(make_visual(x[None], (4, 4, 4), saliency=sal[None]), budget=32)
    assert per_frame(sel.index[0].tolist()) == [6, 5, 5, 16]


@pytest.mark.parametrize("budget", [1, 2, 7, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 9999])
def test_exact_counts_batch_padding_and_convexity(budget):
    torch.manual_seed(3)
    x = torch.randn(2, 10 * 9, 5)
    x[:, 9:45] = x[:, :9].repeat(1, 4, 1) + 0.1 * torch.randn(2, 36, 5)  # some temporal redundancy
    valid = torch.ones(2, 90, dtype=torch.bool)
    valid[1, 58:] = False  # 6 full frames + a partial frame of 4 tokens
    sal = torch.rand(2, 90)
    sel = FastVID()(make_visual(x, (10, 3, 3), valid, sal), budget=budget)
    for b, n in enumerate((90, 58)):
        k = int(sel.num_kept[b])
        assert k == num_keep(n, budget)
        idx = sel.index[b, :k].tolist()
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
        tok = sel.tokens[b, :k]
        lo, hi = x[b, :n].min(0).values, x[b, :n].max(0).values
        assert (tok >= lo - 1e-5).all() and (tok <= hi + 1e-5).all()
    if sel.valid is not None:
        k1 = int(sel.num_kept[1])
        assert (sel.index[1, k1:] == sel.index[1, k1 - 1]).all()


def test_deterministic_identity_and_missing_saliency():
    x, sal = segment_video(frames=4, seed=5)
    v = make_visual(x[None], (4, 4, 4), saliency=sal[None])
    a, b = FastVID()(v, budget=0.3), FastVID()(v, budget=0.3)
    assert torch.equal(a.index, b.index) and torch.equal(a.tokens, b.tokens)
    full = FastVID()(v, budget=1.0)
    assert full.index[0].tolist() == list(range(64)) and torch.equal(full.tokens[0], x)
    v.saliency = None
    with pytest.raises(ValueError, match="saliency"):
        FastVID()(v, budget=0.3)
    with pytest.raises(ValueError):
        FastVID(p=0)


def test_salient_tokens_follow_saliency_not_features():
    # with d = 0 every kept token is salient: exactly the per-frame top-k of saliency
    x, sal = segment_video(frames=2, seed=6)
    sel = FastVID(d=0.0)(make_visual(x[None], (2, 4, 4), saliency=sal[None]), budget=6)
    expected = sorted(sal[:16].topk(3).indices.tolist() + (16 + sal[16:].topk(3).indices).tolist())
    assert sel.index[0].tolist() == expected
    assert torch.equal(sel.tokens[0], x[expected])
