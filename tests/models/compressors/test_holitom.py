"""HoliTom outer-LLM stage: models/compressors/holitom.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.holitom import HoliTom, static_windows
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


def test_static_windows_dp_partition():
    # HoliTom `select_static_windows`: window [s, e] scores #static(s..e) * (e - s).
    s = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)  # pairs (0,1) (1,2) (2,3)
    assert static_windows(s) == [(0, 1), (2, 3)]  # 3 * 1 + 2 * 1
    s = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert static_windows(s) == [(0, 2), (3, 3)]  # 3 * 2 beats 3 * 1
    s = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # [0,2] -> 1 * 2 = 2 ties [0,1] + [2] -> 2 * 1 = 2: strict '>' keeps the shorter window
    assert static_windows(s) == [(0, 1), (2, 2)]
    assert static_windows(s, max_window=1) == [(0, 0), (1, 1), (2, 2)]
    assert static_windows(torch.zeros(0, 3, dtype=torch.bool)) == [(0, 0)]


def two_static_positions():
    """4 frames x 4 positions: positions 0 and 1 are static between frames 0 and 1 (cos > 0.8,
    position 0 less similar than position 1); everything else is dynamic (random)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, generator=g)
    x[1] = -x[0] + 0.1 * torch.randn(4, 6, generator=g)  # cos ~ -1: dynamic
    x[1, 0] = x[0, 0] + 0.30 * x[0, 0].norm() * F.normalize(torch.randn(6, generator=g), dim=0)
    x[1, 1] = x[0, 1] + 0.05 * x[0, 1].norm() * F.normalize(torch.randn(6, generator=g), dim=0)
    for t in (2, 3):
        x[t] = -x[t - 1] + 0.1 * torch.randn(4, 6, generator=g)
    sim = F.cosine_similarity(x[:-1], x[1:], dim=-1)
    assert (sim[0, :2] > 0.8).all() and (sim[0, 2:] < 0.8).all() and (sim[1:] < 0.8).all()
    assert sim[0, 0] < sim[0, 1]
    sal = torch.rand(16, generator=g)
    return x.reshape(16, 6), sal


def test_static_merge_cluster_and_dynamic_topk_by_hand():
    # Expected selection derived from HoliTom `prepare_inputs_labels_for_multimodal` +
    # `holitom`: windows [(0,1), (2,2), (3,3)] -> 2 static positions averaged over frames 0-1;
    # pools (static 2, dyn f0 2, f1 2, f2 4, f3 4) share K = 8 by largest remainder
    # -> [1, 1, 1, 3, 2]. One static cluster: DPC-KNN with k = min(7, 1) = 1 gives equal
    # scores -> centre = position 0; output 0.6 * avg0 + 0.4 * avg1 at index 0.
    x, sal = two_static_positions()
    sel = HoliTom()(make_visual(x[None], (4, 2, 2), saliency=sal[None]), budget=0.5)
    avg = (x[0:4] + x[4:8]) / 2
    top = lambda cand, k: sorted(cand[sal[cand].topk(k).indices].tolist())  # noqa: E731
    expected = [0] + top(torch.tensor([2, 3]), 1) + top(torch.tensor([6, 7]), 1)
    expected += top(torch.arange(8, 12), 3) + top(torch.arange(12, 16), 2)
    assert sel.index[0].tolist() == sorted(expected)
    assert torch.allclose(sel.tokens[0, 0], 0.6 * avg[0] + 0.4 * avg[1], atol=1e-6)
    others = sel.index[0, 1:]
    assert torch.equal(sel.tokens[0, 1:], x[others])  # dynamic tokens are unchanged


def test_budget_above_static_remainder_restores_weakest_static_first():
    # merging both static positions leaves 14 tokens < K = 15: position 0 (the weaker static
    # position) is restored; position 1 stays merged -> every index but 5 (frame 1, pos 1),
    # with the time average of tokens 1 and 5 at index 1.
    x, sal = two_static_positions()
    sel = HoliTom()(make_visual(x[None], (4, 2, 2), saliency=sal[None]), budget=15)
    assert sel.index[0].tolist() == [i for i in range(16) if i != 5]
    assert torch.allclose(sel.tokens[0, 1], (x[1] + x[5]) / 2, atol=1e-6)
    full = HoliTom()(make_visual(x[None], (4, 2, 2), saliency=sal[None]), budget=1.0)
    assert full.index[0].tolist() == list(range(16)) and torch.equal(full.tokens[0], x)


def test_threshold_default_switches_at_ten_percent():
    assert HoliTom().threshold(10, 100) == 0.65
    assert HoliTom().threshold(11, 100) == 0.80
    assert HoliTom(tau=0.5).threshold(10, 100) == 0.5
    # position with cos ~ 0.7 between frames: static (merged) only under the 10% threshold
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 8, generator=g) * 0.1
    x[1] = x[0] + 0.1 * torch.randn(10, 8, generator=g) * 3  # mostly dynamic
    x[0, :, 0] += 3.0
    x[1, :, 1] += 3.0  # frames 0 / 1 differ a lot everywhere
    u = F.normalize(torch.randn(8, generator=g), dim=0)
    x[0, 0] = F.normalize(torch.randn(8, generator=g), dim=0)
    u = F.normalize(u - (u @ x[0, 0]) * x[0, 0], dim=0)
    x[1, 0] = 0.72 * x[0, 0] + (1 - 0.72**2) ** 0.5 * u  # cos 0.72
    v = make_visual(x.reshape(1, 20, 8), (2, 2, 5), saliency=torch.rand(1, 20, generator=g))
    low = HoliTom()(v, budget=2)  # 10%: tau 0.65 -> position 0 static -> index 10 never kept
    assert torch.equal(low.index, HoliTom(tau=0.65)(v, budget=2).index)
    assert 10 not in low.index[0].tolist()
    high = HoliTom()(v, budget=0.5)
    assert torch.equal(high.index, HoliTom(tau=0.8)(v, budget=0.5).index)
    assert not torch.equal(HoliTom(tau=0.65)(v, budget=0.5).tokens, high.tokens)


@pytest.mark.parametrize("budget", [1, 3, 0.05, 0.1, 0.25, 0.5, 0.8, 0.95, 1.0, 4096])
def test_exact_counts_batch_padding_and_convexity(budget):
    torch.manual_seed(3)
    x = torch.randn(2, 8 * 9, 5)
    x[:, 9:36] = x[:, :9].repeat(1, 3, 1) + 0.05 * torch.randn(2, 27, 5)  # frames 0-3 near-static
    valid = torch.ones(2, 72, dtype=torch.bool)
    valid[1, 50:] = False  # 5 full frames + a partial frame of 5 tokens
    sal = torch.rand(2, 72)
    sel = HoliTom()(make_visual(x, (8, 3, 3), valid, sal), budget=budget)
    for b, n in enumerate((72, 50)):
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


def test_deterministic_and_missing_saliency():
    x, sal = two_static_positions()
    v = make_visual(x[None], (4, 2, 2), saliency=sal[None])
    a, b = HoliTom()(v, budget=0.3), HoliTom()(v, budget=0.3)
    assert torch.equal(a.index, b.index) and torch.equal(a.tokens, b.tokens)
    v.saliency = None
    with pytest.raises(ValueError, match="saliency"):
        HoliTom()(v, budget=0.3)
    with pytest.raises(ValueError):
        HoliTom(beta=2.0)
