"""LLaVA-Scissor: models/compressors/llava_scissor.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from tokensieve.models.compressors.llava_scissor import (
    LLaVAScissor,
    connected_components,
)

from .conftest import build_visual
from .test_properties import cases, check_selection

E = torch.eye(5)
e0, e1, e2, e3, e4 = E


def _adjacency(n: int, edges: list[tuple[int, int]]) -> torch.Tensor:
    adj = torch.eye(n, dtype=torch.bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    return adj


def test_connected_components_by_hand():
    # chain 5-3-1-0 (needs propagation + pointer jumping), pair 2-4, 6 alone
    adj = _adjacency(7, [(5, 3), (3, 1), (1, 0), (2, 4)])
    assert connected_components(adj).tolist() == [0, 0, 2, 0, 2, 0, 6]
    # batched, no self loops needed
    batch = torch.stack([adj, torch.zeros(7, 7, dtype=torch.bool)])
    assert connected_components(batch).tolist() == [[0, 0, 2, 0, 2, 0, 6], list(range(7))]
    long_chain = _adjacency(40, [(i, i + 1) for i in range(39)])
    assert connected_components(long_chain).tolist() == [0] * 40
    # dense graph (> 32 edges per node: the dense propagation path): clique of odd nodes < 140,
    # clique of even nodes, node 140 alone
    dense = torch.zeros(141, 141, dtype=torch.bool)
    odd = torch.arange(141) % 2 == 1
    dense[odd.unsqueeze(0) & odd.unsqueeze(1)] = True
    even = ~odd
    even[140] = False
    dense[even.unsqueeze(0) & even.unsqueeze(1)] = True
    assert connected_components(dense).tolist() == [i % 2 for i in range(140)] + [140]


def video(b: torch.Tensor):
    """2 frames x 3 tokens: frame 0 = [a, a + 0.05 e4, b], frame 1 = [a, c, c + 0.05 e3], a = e0, c = e2."""
    x = torch.stack([e0, e0 + 0.05 * e4, b, e0, e2, e2 + 0.05 * e3])[None]
    return build_visual(1, (2, 1, 3), 5, tokens=x)


def test_partition_spatial_then_temporal_by_hand():
    # reference `approximate_components` per frame, then over all fused tokens (tau = 0.9):
    # frame 0 -> {0, 1}, {2}; frame 1 -> {3}, {4, 5}; temporal: mean(0, 1) ~ token 3 -> joined.
    part = LLaVAScissor().partition(video(e1), 0, 0.9)
    assert part.group.tolist() == [0, 0, 1, 2, 3, 3]
    assert part.group_size.tolist() == [2, 1, 1, 2]
    assert part.component.tolist() == [0, 1, 0, 2]
    assert part.num_components == 3


def test_first_probe_hits_k_and_merge_back_by_hand():
    # tau = 0.9 gives exactly K = 3 components. Anchors (mean of step-1 means):
    # A = (mean(x0, x1) + x3) / 2, B = x2, C = mean(x4, x5). Step 3 (`prepare_inputs_labels_for_multimodal`,
    # "Token Merge for all tokens"): x0, x1, x3 -> A; x2 -> B; x4, x5 -> C; output = (anchor + sum) / (count + 1):
    # A: x0 = 1/4 * 1/4 + 1/4 = 5/16, x1 = 5/16, x3 = 1/2 * 1/4 + 1/4 = 3/8; B: x2 = 1; C: x4 = x5 = 1/2.
    visual = video(e1)
    method = LLaVAScissor()
    sel = method(visual, budget=3)
    assert sel.index[0].tolist() == [0, 2, 4]
    expected = torch.tensor(
        [[5 / 16, 5 / 16, 0, 3 / 8, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1 / 2, 1 / 2]], dtype=torch.float64
    )
    torch.testing.assert_close(method.merge_weights(visual, budget=3)[0], expected)
    torch.testing.assert_close(sel.tokens[0], expected.float() @ visual.tokens[0])


def test_bisection_finds_tau_with_exactly_k():
    # b = e1 + 0.1 e2 has cos 0.0995 with c: K = 2 -> bisection from 0.9 over [-1, 0.9]
    # (-0.05 -> 1 component, 0.425, 0.1875 -> 3, 0.06875 -> 2: stop). Components {0,1,3} and
    # {2,4,5}: anchor2 = (x2 + mean(x4, x5)) / 2; x2, x4, x5 join it ->
    # x2 = 1/2 * 1/4 + 1/4 = 3/8, x4 = x5 = 1/4 * 1/4 + 1/4 = 5/16.
    visual = video(e1 + 0.1 * e2)
    method = LLaVAScissor()
    sel = method(visual, budget=2)
    assert sel.index[0].tolist() == [0, 2]
    expected = torch.tensor([[5 / 16, 5 / 16, 0, 3 / 8, 0, 0], [0, 0, 3 / 8, 0, 5 / 16, 5 / 16]], dtype=torch.float64)
    torch.testing.assert_close(method.merge_weights(visual, budget=2)[0], expected)
    torch.testing.assert_close(sel.tokens[0], expected.float() @ visual.tokens[0])


def test_no_tau_gives_k_keeps_largest_components_and_merges_the_rest():
    # a, b, c orthonormal: 1 component for tau < 0, 3 for tau >= 0, never 2. The bracket ends
    # just above 0 with {0,1,3} (3 tokens), {2} (1), {4,5} (2): keep the two largest. x2's
    # cosine with both kept anchors is exactly 0: the tie goes to the first anchor (index 0).
    # Output 0 = (A + x0 + x1 + x2 + x3) / 5: x0 = x1 = (1/4 + 1)/5, x2 = 1/5, x3 = (1/2 + 1)/5.
    visual = video(e1)
    method = LLaVAScissor()
    sel = method(visual, budget=2)
    assert sel.index[0].tolist() == [0, 4]
    expected = torch.tensor([[1 / 4, 1 / 4, 1 / 5, 3 / 10, 0, 0], [0, 0, 0, 0, 1 / 2, 1 / 2]], dtype=torch.float64)
    torch.testing.assert_close(method.merge_weights(visual, budget=2)[0], expected)
    # K = 1: one component everywhere below 0 -> everything in one output
    sel = method(visual, budget=1)
    assert sel.index[0].tolist() == [0]
    w = method.merge_weights(visual, budget=1)[0]
    assert bool((w > 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(1, dtype=torch.float64))


def test_keep_all_is_identity():
    visual = video(e1)
    sel = LLaVAScissor()(visual, budget=1.0)
    assert sel.index[0].tolist() == list(range(6))
    torch.testing.assert_close(sel.tokens[0], visual.tokens[0])


@pytest.mark.parametrize("budget", [0.05, 0.25, 0.77, 1.0, 1, 10, 100])
def test_exact_counts_batch_with_padding_and_partial_frames(budget):
    # sample 1 has 17 valid tokens: two full frames of 6 and a partial frame of 5
    visual = build_visual(2, (4, 2, 3), 8, n_valid=[24, 17], seed=4)
    # check_selection: num_kept == [num_keep(24, b), num_keep(17, b)], ascending / unique / valid indices,
    # convex tokens, merge_weights rows sum to 1 and reproduce the tokens, deterministic
    check_selection(LLaVAScissor(), visual, budget)


def test_duplicated_tokens_counts_and_weights():
    # two distinct vectors repeated: 2 components for every tau < 1; K > 2 needs singletons
    tokens = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))[torch.arange(24) % 2]
    visual = build_visual(2, (4, 2, 3), 5, n_valid=[24, 13], tokens=tokens.expand(2, 24, 5))
    for budget in (1, 3, 0.9):
        check_selection(LLaVAScissor(), visual, budget)


def test_gradient_reaches_the_input_tokens():
    visual = build_visual(1, (4, 2, 2), 6, seed=2)
    visual.tokens.requires_grad_(True)
    LLaVAScissor()(visual, budget=0.3).tokens.sum().backward()
    assert visual.tokens.grad is not None and bool((visual.tokens.grad != 0).any())


def test_errors():
    visual = build_visual(1, (2, 2, 2), 4)
    with pytest.raises(ValueError):
        LLaVAScissor()(visual, budget=1.5)
    with pytest.raises(TypeError):
        LLaVAScissor()(visual, budget=True)
    holes = build_visual(1, (2, 2, 2), 4)
    holes.valid[0, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        LLaVAScissor()(holes, budget=0.5)
    with pytest.raises(ValueError):
        LLaVAScissor(tau=1.5)
    with pytest.raises(ValueError):
        LLaVAScissor(search_steps=-1)
    assert LLaVAScissor.name == "llava_scissor" and not LLaVAScissor.needs_query
    assert not LLaVAScissor.needs_saliency and LLaVAScissor.applies == "pre_llm"


@settings(deadline=None, max_examples=15)
@given(case=cases())
def test_property_invariants(case):
    B, grid, D, n_valid, budget, seed = case
    check_selection(LLaVAScissor(), build_visual(B, grid, D, n_valid=n_valid, seed=seed), budget)
