"""VisionZip (dominant by saliency + merged contextual tokens): models/compressors/visionzip.py."""

from __future__ import annotations

import pytest
import torch

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.visionzip import VisionZip
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


def hand_frame():
    """One 16-token frame: tokens 5..15 are the most salient; 0..4 are the rest."""
    e = torch.eye(4)
    x = torch.zeros(16, 4)
    x[5:] = torch.rand(11, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    x[0] = e[0]
    x[1] = e[0] + 0.1 * e[2]  # closest target: token 0
    x[2] = e[1]
    x[3] = e[1] + 0.1 * e[2]  # closest target: token 2
    x[4] = 0.9 * e[0] + 0.1 * e[1]  # closest target: token 0
    sal = torch.zeros(16)
    sal[5:] = torch.arange(11, dtype=torch.float) + 1.0
    return x, sal


def test_dominant_and_strided_contextual_targets_by_hand():
    # Expected tokens derived from the VisionZip reference `forward` ("Contextual Visual
    # Tokens"): keep 13 -> round(13 * 10 / 64) = 2 contextual, 11 dominant (tokens 5..15);
    # rest = [0, 1, 2, 3, 4], step = 5 // 2 = 2 -> targets rest[0] = 0 and rest[2] = 2;
    # 1 and 4 join 0, 3 joins 2 (cosine argmax).
    x, sal = hand_frame()
    v = make_visual(x[None], (1, 4, 4), saliency=sal[None])
    sel = VisionZip()(v, budget=13)
    assert sel.index[0].tolist() == [0, 2] + list(range(5, 16))
    assert torch.allclose(sel.tokens[0, 0], 0.5 * x[0] + 0.5 * (x[1] + x[4]) / 2)
    assert torch.allclose(sel.tokens[0, 1], 0.5 * x[2] + 0.5 * x[3])
    assert torch.equal(sel.tokens[0, 2:], x[5:])  # dominant tokens are unchanged
    ref = VisionZip(merge="sum")(v, budget=13)  # the reference's target + mean(assigned)
    assert torch.allclose(ref.tokens[0, 0], x[0] + (x[1] + x[4]) / 2)
    assert torch.allclose(ref.tokens[0, 1], x[2] + x[3])


def test_one_contextual_token_takes_the_first_rest_token():
    x, sal = hand_frame()
    sel = VisionZip()(make_visual(x[None], (1, 4, 4), saliency=sal[None]), budget=8)  # 7 + 1
    assert sel.index[0].tolist() == [0] + list(range(9, 16))
    assert torch.allclose(sel.tokens[0, 0], 0.5 * x[0] + 0.5 * x[1:9].mean(0))


def test_54_10_split_per_frame():
    # two frames of 100 tokens keeping 128 -> 64 each -> 54 dominant + 10 contextual per frame
    torch.manual_seed(1)
    x = torch.randn(1, 200, 8)
    sal = torch.rand(1, 200)
    sel = VisionZip()(make_visual(x, (2, 10, 10), saliency=sal), budget=128)
    idx = sel.index[0]
    assert idx.numel() == 128
    for f in range(2):
        top54 = set((f * 100 + sal[0, f * 100 : f * 100 + 100].topk(54).indices).tolist())
        in_frame = [i for i in idx.tolist() if f * 100 <= i < f * 100 + 100]
        assert len(in_frame) == 64
        assert len(top54 & set(in_frame)) == 54
    assert VisionZip().contextual_count(64) == 10 and VisionZip().contextual_count(128) == 20


@pytest.mark.parametrize("budget", [1, 2, 5, 0.1, 0.25, 0.5, 0.9, 1.0, 10_000])
def test_exact_counts_batch_padding_and_convexity(budget):
    torch.manual_seed(2)
    x = torch.randn(2, 5 * 16, 6)
    valid = torch.ones(2, 80, dtype=torch.bool)
    valid[1, 70:] = False  # 4 full frames + a partial frame of 6 tokens
    sal = torch.rand(2, 80)
    sel = VisionZip()(make_visual(x, (5, 4, 4), valid, sal), budget=budget)
    for b, n in enumerate((80, 70)):
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
        assert (sel.tokens[1, k1:] == sel.tokens[1, k1 - 1]).all()


def test_deterministic_identity_and_errors():
    torch.manual_seed(3)
    x = torch.randn(1, 32, 4)
    v = make_visual(x, (2, 4, 4), saliency=torch.rand(1, 32))
    a, b = VisionZip()(v, budget=0.4), VisionZip()(v, budget=0.4)
    assert torch.equal(a.index, b.index) and torch.equal(a.tokens, b.tokens)
    full = VisionZip()(v, budget=1.0)
    assert full.index[0].tolist() == list(range(32)) and torch.equal(full.tokens, x)
    v.saliency = None
    with pytest.raises(ValueError, match="saliency"):
        VisionZip()(v, budget=0.4)
    with pytest.raises(ValueError, match="merge"):
        VisionZip(merge="max")
