"""PruneVid stage 1: models/compressors/prunevid.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from tokensieve.models.compressors.prunevid import (
    PruneVid,
    mean_pairwise_cosine,
    refine_segments,
    temporal_segments,
)

from .conftest import build_visual
from .test_properties import cases, check_selection

E = torch.eye(6)


def test_refine_segments_by_hand():
    # Reference `refine_clusters` + `segment_lengths` (Visual-AI/PruneVid modeling_pllava.py).
    # label 0 runs (0-1, len 2) and (3-5, len 3): keeps 3-5; label 1 runs (2) and (6-7): keeps 6-7;
    # the dropped stretch 0-2 has no left neighbour, right run (label 0) -> [0]*6 + [1]*2.
    assert refine_segments([0, 0, 1, 0, 0, 0, 1, 1]) == [(0, 5), (6, 7)]
    # every label's longest run is one frame: all dropped, no neighbour -> label 0, one segment
    assert refine_segments([0, 1, 0, 1]) == [(0, 3)]
    # two runs of the maximal length are both kept (the reference `continue`s on every max run)
    assert refine_segments([0, 0, 1, 1, 0, 0]) == [(0, 1), (2, 3), (4, 5)]
    # dropped single frame between equally long runs joins the left one
    assert refine_segments([0, 0, 1, 2, 2]) == [(0, 2), (3, 4)]
    # the right run is longer -> joins the right one
    assert refine_segments([0, 0, 1, 2, 2, 2]) == [(0, 1), (2, 5)]
    assert refine_segments([3]) == [(0, 0)]
    assert refine_segments([]) == []


def test_temporal_segments_two_scenes():
    # `merge_frames_dynamic`: DPC-KNN over frame means into int(T * 0.25) = 2 clusters, k = 7.
    # Frames 0-3 equal A, 4-7 equal B: equal densities -> ties to the lower index, so frames 0
    # and 4 get delta = |A - B| and are the centres; everything joins its own scene.
    means = torch.stack([E[0]] * 4 + [E[1]] * 4)
    assert temporal_segments(means) == [(0, 3), (4, 7)]
    # fewer than 4 frames: int(3 * 0.25) = 0 clusters is raised to 1 -> one segment
    assert temporal_segments(means[:3]) == [(0, 2)]
    assert temporal_segments(torch.stack([E[0], E[0], E[1], E[1]]), ratio=0.5) == [(0, 1), (2, 3)]


def test_mean_pairwise_cosine_is_the_off_diagonal_mean():
    # reference: (sim.sum(-2) - 1).sum(-2) / (W (W - 1)); position 0: e0, e0, e1 ->
    # ordered pairs (0,1),(1,0) = 1, the other four = 0 -> 2 / 6; position 1: all equal -> 1.
    frames = torch.stack([torch.stack([E[0], E[2]]), torch.stack([E[0], 3 * E[2]]), torch.stack([E[1], E[2]])])
    torch.testing.assert_close(mean_pairwise_cosine(frames), torch.tensor([1 / 3, 1.0]))


def _frames(*rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t for row in rows for t in row])[None]


def test_static_position_is_averaged_over_time_by_hand():
    # 2 frames x 2 positions: position 0 is a / a' (cos 0.98 > 0.8, static), position 1 b / c
    # (cos 0, dynamic). T = 2 -> one segment. Static merging leaves 3 tokens: pools in time
    # order [static {pos 0}], [dyn frame 0 {b}], [dyn frame 1 {c}].
    a, a2, b, c = E[0], E[0] + 0.2 * E[3], E[1], E[2]
    visual = build_visual(1, (2, 1, 2), 6, tokens=_frames([a, b], [a2, c]))
    sel = PruneVid()(visual, budget=3)
    assert sel.index[0].tolist() == [0, 1, 3]  # static token represented by frame 0, position 0
    torch.testing.assert_close(sel.tokens[0], torch.stack([(a + a2) / 2, b, c]))
    # K = 2: split_count(2, [1, 1, 1]) -> [1, 1, 0]: frame 1's dynamic pool is dropped
    sel = PruneVid()(visual, budget=2)
    assert sel.index[0].tolist() == [0, 1]
    torch.testing.assert_close(sel.tokens[0], torch.stack([(a + a2) / 2, b]))
    # budget 1.0 is the identity
    sel = PruneVid()(visual, budget=1.0)
    assert sel.index[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(sel.tokens[0], visual.tokens[0])


def test_budget_above_static_remainder_restores_the_least_similar_position():
    # both positions static (cos 0.98 and 0.86): merging leaves 2 tokens < K = 3, so position
    # 1 (the less similar) goes back to dynamic: [static {0}], [b], [b'].
    a, a2 = E[0], E[0] + 0.2 * E[3]
    b, b2 = E[1], E[1] + 0.6 * E[4]
    visual = build_visual(1, (2, 1, 2), 6, tokens=_frames([a, b], [a2, b2]))
    sel = PruneVid()(visual, budget=3)
    assert sel.index[0].tolist() == [0, 1, 3]
    torch.testing.assert_close(sel.tokens[0], torch.stack([(a + a2) / 2, b, b2]))
    sel = PruneVid()(visual, budget=2)  # both static: one averaged token per position
    assert sel.index[0].tolist() == [0, 1]
    torch.testing.assert_close(sel.tokens[0], torch.stack([(a + a2) / 2, (b + b2) / 2]))


def test_two_scenes_end_to_end_by_hand():
    # 8 frames x 2 positions: frames 0-3 show [a0, a1], frames 4-7 [b0, b1] -> segments
    # (0-3), (4-7); every position static in its segment -> 4 tokens after averaging;
    # K = 4 keeps them all: index = first frame of each segment, weights 1/4 per frame.
    a0, a1, b0, b1 = E[0], E[1], E[2], E[3] + 0.5 * E[4]
    visual = build_visual(1, (8, 1, 2), 6, tokens=_frames(*([[a0, a1]] * 4 + [[b0, b1]] * 4)))
    method = PruneVid()
    sel = method(visual, budget=4)
    assert sel.index[0].tolist() == [0, 1, 8, 9]
    torch.testing.assert_close(sel.tokens[0], torch.stack([a0, a1, b0, b1]))
    w = method.merge_weights(visual, budget=4)[0]
    expected = torch.zeros(4, 16, dtype=torch.float64)
    for row, (seg, pos) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected[row, [(4 * seg + f) * 2 + pos for f in range(4)]] = 0.25
    torch.testing.assert_close(w, expected)


def test_dpc_knn_clusters_a_pool_into_means():
    # one frame of two tight pairs [u, u + d, v, v + d']: K = 2 -> DPC-KNN (k = min(7, 4)) puts
    # one centre in each pair (the denser of the second pair is far from every denser token);
    # outputs are the plain pair means (`compute_cluster_vectors`), represented by 0 and 2.
    u, v = E[0], E[1]
    x = torch.stack([u, u + 0.1 * E[2], v, v + 0.2 * E[3]])[None]
    method = PruneVid()
    sel = method(build_visual(1, (1, 2, 2), 6, tokens=x), budget=0.5)
    assert sel.index[0].tolist() == [0, 2]
    torch.testing.assert_close(sel.tokens[0], torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3]) / 2]))
    w = method.merge_weights(build_visual(1, (1, 2, 2), 6, tokens=x), budget=0.5)[0]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64))


@pytest.mark.parametrize("budget", [0.05, 0.25, 0.77, 1.0, 1, 10, 100])
def test_exact_counts_batch_with_padding_and_partial_frames(budget):
    # sample 1 has 17 valid tokens: two full frames of 6 and a partial frame of 5
    visual = build_visual(2, (4, 2, 3), 8, n_valid=[24, 17], seed=4)
    # check_selection: num_kept == [num_keep(24, b), num_keep(17, b)], ascending / unique / valid indices,
    # convex tokens, merge_weights rows sum to 1 and reproduce the tokens, deterministic
    check_selection(PruneVid(), visual, budget)


def test_static_video_counts_and_weights():
    # every frame identical: all positions static; every budget still keeps exactly K
    visual = build_visual(2, (6, 2, 2), 5, n_valid=[24, 14], tokens=torch.randn(1, 4, 5).repeat(2, 6, 1))
    for budget in (0.1, 0.5, 0.9, 7):
        check_selection(PruneVid(), visual, budget)


def test_gradient_reaches_the_input_tokens():
    visual = build_visual(1, (4, 2, 2), 6, seed=2)
    visual.tokens.requires_grad_(True)
    PruneVid()(visual, budget=0.3).tokens.sum().backward()
    assert visual.tokens.grad is not None and bool((visual.tokens.grad != 0).any())


def test_errors():
    visual = build_visual(1, (2, 2, 2), 4)
    with pytest.raises(ValueError):
        PruneVid()(visual, budget=0.0)
    with pytest.raises(TypeError):
        PruneVid()(visual, budget="0.5")
    holes = build_visual(1, (2, 2, 2), 4)
    holes.valid[0, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        PruneVid()(holes, budget=0.5)
    with pytest.raises(ValueError):
        PruneVid(temporal_segment_ratio=0.0)
    with pytest.raises(ValueError):
        PruneVid(k=0)
    assert PruneVid.name == "prunevid" and not PruneVid.needs_query and not PruneVid.needs_saliency
    assert PruneVid.applies == "pre_llm"


@settings(deadline=None, max_examples=15)
@given(case=cases())
def test_property_invariants(case):
    B, grid, D, n_valid, budget, seed = case
    check_selection(PruneVid(), build_visual(B, grid, D, n_valid=n_valid, seed=seed), budget)
