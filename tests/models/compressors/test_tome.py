"""ToMe parity: hand-derived merges and a transcription of one reference matching round."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.models.compressors.tome import ToMe, tome_groups

# Four 2-D tokens; A = {x0, x2} (even), B = {x1, x3} (odd).
# Derived by hand from ToMe: bipartite_soft_matching() + merge_wavg() in
# facebookresearch/ToMe tome/merge.py:
#   cos(x0, x1) = 0, cos(x0, x3) = -1            -> x0's edge: x1, score 0
#   cos(x2, x1) = 0.995, cos(x2, x3) = -0.0995   -> x2's edge: x1, score 0.995
#   K = 3: r = 1, the top edge x2 -> x1 merges: (x1 + x2) / 2 = [0.05, 1] (sizes 1 + 1)
#   K = 2: r = 2, both edges merge into x1: (x0 + x1 + x2) / 3
X4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])


def test_one_merge_pair(make_visual):
    visual = make_visual(1, (1, 2, 2), 2, tokens=X4.unsqueeze(0))
    sel = ToMe()(visual, budget=3)
    assert sel.index[0].tolist() == [0, 1, 3]  # the merged pair {1, 2} is represented by 1
    torch.testing.assert_close(sel.tokens[0], torch.tensor([[1.0, 0.0], [0.05, 1.0], [-1.0, 0.0]]))


def test_two_sources_into_one_destination(make_visual):
    visual = make_visual(1, (1, 2, 2), 2, tokens=X4.unsqueeze(0))
    sel = ToMe()(visual, budget=2)
    assert sel.index[0].tolist() == [0, 3]
    torch.testing.assert_close(sel.tokens[0], torch.tensor([[1.1 / 3, 2.0 / 3], [-1.0, 0.0]]))


# Five tokens, three rounds; checks that sizes carry over (size-weighted mean).
#   round 1 (m = 5, K = 1): r = min(4, 2) = 2; A = {x0, x2, x4}, B = {x1, x3}
#     best edges: x4 -> x1 (0.9988), x0 -> x1 (0.9950), x2 -> x3 (0.9578)
#     merge x4 and x0 into x1: G = {0, 1, 4}, size 3, mean [1, 0.05]
#   round 2 (m = 3, order G, x2, x3): r = 1; A = {G, x3}, B = {x2}
#     x3 -> x2 (0.958) beats G -> x2 (0.050): H = {2, 3}, size 2, mean [0.15, 1]
#   round 3 (m = 2): G (size 3) and H (size 2) merge:
#     (3·[1, 0.05] + 2·[0.15, 1]) / 5 = [0.66, 0.43]  (an unweighted mean would give [0.575, 0.525])
X5 = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.3, 1.0], [1.0, 0.05]])


def test_rounds_and_size_weighting(make_visual):
    visual = make_visual(1, (1, 1, 5), 2, tokens=X5.unsqueeze(0))
    two = ToMe()(visual, budget=2)
    assert two.index[0].tolist() == [0, 2]
    torch.testing.assert_close(two.tokens[0], torch.tensor([[1.0, 0.05], [0.15, 1.0]]))
    one = ToMe()(visual, budget=1)
    assert one.index[0].tolist() == [0]
    torch.testing.assert_close(one.tokens[0], torch.tensor([[0.66, 0.43]]))


def test_merge_weights_describe_the_groups(make_visual):
    visual = make_visual(1, (1, 1, 5), 2, tokens=X5.unsqueeze(0))
    (w,) = ToMe().merge_weights(visual, budget=2)
    expected = torch.tensor([[1 / 3, 1 / 3, 0, 0, 1 / 3], [0, 0, 0.5, 0.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected)


def _reference_round(x: torch.Tensor, r: int) -> torch.Tensor:
    """One bipartite_soft_matching + merge_wavg round (no class token, unit sizes),
    transcribed; returns the merged tokens in the reference's [unmerged A, B] order."""
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    node_max, node_idx = (a @ b.T).max(dim=-1)
    edge = node_max.argsort(descending=True)
    unm, src = edge[r:], edge[:r]
    dst = node_idx[src]
    xa, xb = x[::2], x[1::2]
    sums = xb.index_add(0, dst, xa[src])
    size = torch.ones(xb.shape[0], dtype=x.dtype).index_add(0, dst, torch.ones(r, dtype=x.dtype))
    return torch.cat([xa[unm], sums / size[:, None]])


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    for d in reversed(range(x.shape[1])):
        x = x[torch.sort(x[:, d], stable=True).indices]
    return x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [7, 12])
def test_single_round_matches_reference(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    r = n // 2
    group, _ = tome_groups(x, n - r)  # K >= n - n // 2: exactly one round
    ours = torch.zeros(n - r, 6, dtype=torch.float64).index_add(0, group, x)
    ours = ours / torch.bincount(group, minlength=n - r).to(x.dtype)[:, None]
    torch.testing.assert_close(_rows_sorted(ours), _rows_sorted(_reference_round(x, r)))


def test_padding_is_never_merged(make_visual):
    tokens = torch.cat([X5, torch.zeros(1, 2)]).unsqueeze(0).expand(2, -1, -1)
    visual = make_visual(2, (1, 2, 3), 2, n_valid=[5, 5], tokens=tokens)
    sel = ToMe()(visual, budget=2)
    assert sel.index.tolist() == [[0, 2], [0, 2]]
    torch.testing.assert_close(sel.tokens[1], torch.tensor([[1.0, 0.05], [0.15, 1.0]]))
    assert F.cosine_similarity(sel.tokens[0], sel.tokens[1]).min() > 0.999
