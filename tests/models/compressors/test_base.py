"""Packing helpers of the compressor base (models/compressors/base.py)."""

import torch

from tokensieve.models.compressors.base import pack_merged, select_topk, selection_from_indices


def test_pack_merged_sorts_and_pads():
    idx = [torch.tensor([5, 1, 3]), torch.tensor([2])]
    tok = [torch.tensor([[5.0], [1.0], [3.0]]), torch.tensor([[2.0]])]
    sel = pack_merged(idx, tok, torch.zeros(2, 6, 1))
    assert sel.index.tolist() == [[1, 3, 5], [2, 2, 2]]
    assert sel.tokens[:, :, 0].tolist() == [[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]
    assert sel.valid.tolist() == [[True, True, True], [True, False, False]]
    same = pack_merged(idx[:1], tok[:1], torch.zeros(1, 6, 1))
    assert same.valid is None


def test_select_topk_ties_break_to_lower_index_and_pad_with_valid_mask():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    sel = select_topk(scores, valid, 0.5)
    assert sel.index.tolist() == [[1, 2], [0, 0]]
    assert sel.valid.tolist() == [[True, True], [True, False]]


def test_selection_from_indices_sorts():
    sel = selection_from_indices([torch.tensor([4, 0, 2])])
    assert sel.index.tolist() == [[0, 2, 4]] and sel.valid is None


def test_random_draws_differ_across_clips_at_the_same_batch_slot():
    from tokensieve.models.compressors import RandomSelect
    from tokensieve.models.types import VisualTokens

    def visual(seed):
        tokens = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(seed))
        return VisualTokens(tokens, torch.ones(1, 40, dtype=torch.bool), torch.arange(40)[None], torch.zeros(1, 40, dtype=torch.long), (1, 5, 8))

    rnd = RandomSelect(seed=0)
    assert rnd(visual(1), budget=0.25).index.tolist() != rnd(visual(2), budget=0.25).index.tolist()
    assert rnd(visual(1), budget=0.25).index.tolist() == rnd(visual(1), budget=0.25).index.tolist()
    assert RandomSelect(seed=1)(visual(1), budget=0.25).index.tolist() != rnd(visual(1), budget=0.25).index.tolist()
