"""Property tests shared by every training-free compressor that runs on visual tokens.

The method lists are built, not written: every class in ``REGISTRY`` that is not a
``LearnedCompressor`` and needs neither a query nor attention signals, plus the classes
imported below (deduplicated by registry name). Methods that read ``VisualTokens.saliency``
(the vision tower's [CLS]-style attention) get a random saliency. A newly registered
baseline is therefore covered without touching this file.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors import REGISTRY, LearnedCompressor
from tokensieve.models.compressors.divprune import DivPrune
from tokensieve.models.compressors.evs import EVS
from tokensieve.models.compressors.pool import Pool
from tokensieve.models.compressors.tome import ToMe

from .conftest import build_visual


def _feature_only(cls) -> bool:
    """Training-free and driven by ``visual.tokens`` alone (no query, saliency or attention)."""
    if issubclass(cls, LearnedCompressor) or any(
        getattr(cls, flag, False) for flag in ("needs_query", "needs_saliency", "needs_attention")
    ):
        return False
    # Methods that read VisualTokens.saliency without declaring a flag say so when it is missing.
    probe = build_visual(1, (2, 2, 2), 4)
    try:
        cls()(probe, budget=0.5)
    except ValueError as err:
        if "saliency" in str(err):
            return False
        raise
    return True


def _saliency_driven(cls) -> bool:
    """Training-free, no query or attention, but reads ``visual.saliency``."""
    if issubclass(cls, LearnedCompressor) or any(getattr(cls, flag, False) for flag in ("needs_query", "needs_attention")):
        return False
    return getattr(cls, "needs_saliency", False) or not _feature_only(cls)


_CLASSES = {cls.name: cls for cls in (DivPrune, EVS, ToMe, Pool)}
_CLASSES.update({name: cls for name, cls in REGISTRY.items()})
METHODS = [cls for _, cls in sorted(_CLASSES.items()) if _feature_only(cls)]
SALIENCY_METHODS = [cls for _, cls in sorted(_CLASSES.items()) if _saliency_driven(cls)]
GRID_METHODS = [cls for cls in METHODS if cls.name in ("evs", "pool")]


def test_method_list_covers_the_new_baselines():
    names = {cls.name for cls in METHODS}
    assert {"divprune", "evs", "tome", "pool", "uniform", "random", "dycoke"} <= names
    assert {"visionzip", "fastvid", "holitom"} <= {cls.name for cls in SALIENCY_METHODS}


def _with_saliency(visual, seed: int):
    visual.saliency = torch.rand(visual.valid.shape, generator=torch.Generator().manual_seed(seed + 1))
    return visual


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    D = draw(st.sampled_from([4, 8]))
    M = grid[0] * grid[1] * grid[2]
    # some samples padded: their last few tokens are invalid (at least one stays valid)
    n_valid = [draw(st.one_of(st.just(M), st.integers(1, M))) for _ in range(B)]
    budget = draw(
        st.one_of(
            st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False),
            st.integers(1, 80),
        )
    )
    seed = draw(st.integers(0, 2**16))
    return B, grid, D, n_valid, budget, seed


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def check_selection(method, visual, budget) -> None:
    """Every invariant a feature-only compressor's Selection must satisfy."""
    sel = method(visual, budget=budget)
    B, M, D = visual.tokens.shape
    counts = [num_keep(int(n), budget) for n in visual.valid.sum(1).tolist()]
    k_max = max(counts)
    assert sel.index.shape == (B, k_max) and sel.index.dtype == torch.long
    assert sel.num_kept.tolist() == counts
    if sel.valid is not None:
        assert sel.valid.shape == (B, k_max)
    if sel.tokens is not None:
        assert sel.tokens.shape == (B, k_max, D)
    weights = method.merge_weights(visual, budget=budget) if hasattr(method, "merge_weights") else None

    for b in range(B):
        k = counts[b]
        if sel.valid is not None:  # valid slots are a prefix
            assert sel.valid[b].tolist() == [True] * k + [False] * (k_max - k)
        idx = sel.index[b]
        assert bool(((idx >= 0) & (idx < M)).all())
        assert bool(visual.valid[b, idx].all()), "kept (or padded-slot) index points at padding"
        kept = idx[:k]
        assert bool((kept[1:] > kept[:-1]).all()), "indices must be strictly ascending (so unique)"
        if k < k_max:
            assert bool((idx[k:] == idx[k - 1]).all()), "padded slots repeat the last kept index"

        if sel.tokens is not None:
            x = visual.tokens[b, visual.valid[b]].double()
            out = sel.tokens[b, :k].double()
            tol = 1e-5 * (1.0 + x.abs().max())
            assert bool((out >= x.min(0).values - tol).all() and (out <= x.max(0).values + tol).all()), (
                "merged tokens must be convex combinations of the sample's valid tokens"
            )
            if k < k_max:
                assert torch.equal(sel.tokens[b, k:], sel.tokens[b, k - 1].expand(k_max - k, D))
        if weights is not None:
            w = weights[b]
            assert w.shape == (k, M)
            assert bool((w >= 0).all())
            assert bool((w[:, ~visual.valid[b]] == 0).all()), "padding must carry no weight"
            torch.testing.assert_close(w.sum(1), torch.ones(k, dtype=w.dtype))
            assert bool((w[torch.arange(k), idx[:k]] > 0).all()), "a representative must be a member of its group"
            torch.testing.assert_close(
                (w @ visual.tokens[b].double().masked_fill(~visual.valid[b, :, None], 0.0)).float(),
                sel.tokens[b, :k].float(),
                rtol=1e-5,
                atol=1e-5,
            )

    again = method(visual, budget=budget)
    assert torch.equal(sel.index, again.index), "not deterministic"
    assert _same(sel.valid, again.valid) and _same(sel.tokens, again.tokens), "not deterministic"


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
@settings(deadline=None, max_examples=50)
@given(case=cases())
def test_selection_invariants(cls, case, make_visual):
    B, grid, D, n_valid, budget, seed = case
    visual = make_visual(B, grid, D, n_valid=n_valid, seed=seed)
    check_selection(cls(), visual, budget)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
@settings(deadline=None, max_examples=20)
@given(case=cases())
def test_duplicate_tokens_still_give_distinct_indices(cls, case, make_visual):
    """Many identical tokens (ties everywhere): counts, order and uniqueness must still hold."""
    B, grid, D, n_valid, budget, seed = case
    visual = make_visual(B, grid, D, n_valid=n_valid, seed=seed)
    M = visual.num_tokens
    base = torch.randn(2, D, generator=torch.Generator().manual_seed(seed))
    tokens = base[torch.arange(M) % 2].expand(B, M, D)
    visual = make_visual(B, grid, D, n_valid=n_valid, tokens=tokens)
    check_selection(cls(), visual, budget)


@pytest.mark.parametrize("cls", SALIENCY_METHODS, ids=lambda c: c.name)
@settings(deadline=None, max_examples=40)
@given(case=cases(), ties=st.booleans())
def test_saliency_methods_selection_invariants(cls, case, ties, make_visual):
    """Same invariants for the saliency-driven methods; ``ties`` makes every token one of two vectors."""
    B, grid, D, n_valid, budget, seed = case
    tokens = None
    if ties:
        M = grid[0] * grid[1] * grid[2]
        tokens = torch.randn(2, D, generator=torch.Generator().manual_seed(seed))[torch.arange(M) % 2].expand(B, M, D)
    visual = _with_saliency(make_visual(B, grid, D, n_valid=n_valid, seed=seed, tokens=tokens), seed)
    check_selection(cls(), visual, budget)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_keep_all_is_identity(cls, make_visual):
    visual = make_visual(2, (2, 3, 2), 8, n_valid=[12, 7], seed=3)
    sel = cls()(visual, budget=1.0)
    assert sel.index[0].tolist() == list(range(12))
    assert sel.index[1, :7].tolist() == list(range(7))
    if sel.tokens is not None:
        torch.testing.assert_close(sel.tokens[0], visual.tokens[0])
        torch.testing.assert_close(sel.tokens[1, :7], visual.tokens[1, :7])


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_sample_without_valid_tokens_keeps_nothing(cls, make_visual):
    visual = make_visual(2, (2, 2, 2), 4, n_valid=[0, 8], seed=1)
    sel = cls()(visual, budget=0.5)
    assert sel.num_kept.tolist() == [0, 4]
    assert sel.index.shape == (2, 4)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "budget,error",
    [(0.0, ValueError), (1.5, ValueError), (0, ValueError), (-2, ValueError), (True, TypeError), ("0.5", TypeError)],
)
def test_invalid_budget_raises(cls, budget, error, make_visual):
    visual = make_visual(1, (1, 2, 2), 4)
    with pytest.raises(error):
        cls()(visual, budget=budget)


@pytest.mark.parametrize("cls", GRID_METHODS, ids=lambda c: c.name)
def test_grid_methods_reject_a_grid_that_does_not_match(cls, make_visual):
    visual = make_visual(1, (2, 2, 2), 4)
    visual.grid = (3, 2, 2)
    with pytest.raises(ValueError, match="grid"):
        cls()(visual, budget=0.5)
