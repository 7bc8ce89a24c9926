"""Matryoshka pooling: M3's nested grids, the budget rule, identity at init, learnability."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.matryoshka import Matryoshka
from tokensieve.models.compressors.pool import Pool
from tokensieve.models.losses import answer_cross_entropy, kl_to_teacher

from .conftest import build_visual


@pytest.fixture(scope="module")
def signals(tiny_backbone):
    batch = make_batch(batch_size=2, seed=5)
    visual = tiny_backbone.encode_video(batch)
    with torch.no_grad():
        full = tiny_backbone(batch, visual)
    return batch, visual, full


def test_default_scales_are_m3_grids():
    # M3 (mu-cai/matryoshka-mm): a 24x24 grid pooled to 576, 144, 36, 9, 1 tokens
    grids = Matryoshka(8).grids(24, 24)
    assert [(ph, pw) for _, ph, pw in grids] == [(1, 1), (3, 3), (6, 6), (12, 12), (24, 24)]
    assert [sid for sid, _, _ in grids] == [4, 3, 2, 1, 0]
    assert [(ph, pw) for _, ph, pw in Matryoshka(8).grids(4, 4)] == [(1, 1), (2, 2), (4, 4)]  # duplicates share the first id


def test_at_scale_pools_every_cell_and_untrained_equals_pool():
    visual = build_visual(2, (3, 4, 4), 8, n_valid=[48, 40])
    m = Matryoshka(8, scales=[1.0, 0.25, 0.0])
    assert m.scale_ids(visual) == [2, 1, 0]
    sel, sid = m.at_scale(visual, 1)  # 2x2 per frame
    assert sid == 1 and sel.num_kept.tolist() == [12, 10]  # sample 1: frame 2 keeps rows 0-1 only: 2 usable cells
    for budget in (0.25, 0.1, 12, 1.0):
        ours, ref = m(visual, budget=budget), Pool()(visual, budget=budget)
        assert ours.num_kept.tolist() == [num_keep(int(n), budget) for n in visual.valid.sum(1)]
        if budget in (0.25, 1.0):  # Pool's free grid choice is a trained scale here: an untrained M3 is the pool baseline
            assert torch.equal(ours.index, ref.index) and torch.allclose(ours.tokens, ref.tokens)


def test_budget_rule_coarsest_trained_scale_then_stride_with_padding():
    visual = build_visual(3, (4, 4, 4), 8, n_valid=[64, 50, 9])
    m = Matryoshka(8, scales=[0.25, 0.0])  # no full-resolution scale trained
    for budget in (0.1, 0.25, 0.4, 0.9, 3):
        sel = m(visual, budget=budget)
        assert sel.num_kept.tolist() == [num_keep(int(n), budget) for n in visual.valid.sum(1)]
        for b in range(3):
            idx = sel.index[b][sel.valid[b]] if sel.valid is not None else sel.index[b]
            assert torch.all(idx[1:] > idx[:-1]) and visual.valid[b, idx].all()
    # above the finest trained scale: the unpooled grid, the original tokens unchanged
    torch.nn.init.normal_(m.embed)
    sel = m(visual, budget=1.0)
    assert torch.equal(sel.tokens[0], visual.tokens[0])
    with pytest.raises(ValueError, match="grid"):
        m(_bad_grid(), budget=0.5)
    with pytest.raises(ValueError, match="scales"):
        Matryoshka(8, scales=[2.0])


def _bad_grid():
    v = build_visual(1, (2, 2, 2), 8)
    v.grid = (2, 3, 3)
    return v


def test_gradients_reach_the_learned_part_and_loss_decreases(tiny_backbone, signals):
    batch, visual, full = signals
    torch.manual_seed(0)
    m = Matryoshka(visual.tokens.shape[-1], adapter_dim=16)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    answer = torch.tensor(tiny_backbone.tokenizer.encode("A", add_special_tokens=False)[:1] * batch.size)  # a fixed answer letter

    def loss_at(s):
        logits = tiny_backbone(batch, visual, m.at_scale(visual, s)[0])
        return kl_to_teacher(logits, full) + answer_cross_entropy(logits, answer)

    losses = []
    for step in range(6):
        loss = torch.stack([loss_at(s) for s in m.scale_ids(visual)]).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert m.embed.grad.abs().sum() > 0 and m.adapter[-1].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert min(losses[-2:]) < 0.92 * losses[0], losses
