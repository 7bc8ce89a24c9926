"""QTSplus gate: threshold solver, budget rule (auto vs explicit), straight-through training
selection, gradients through the backbone, time-aware re-encoder, and (for the learned
selection families together) export → load in a fresh process."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.flexselect import FlexSelect
from tokensieve.models.compressors.matryoshka import Matryoshka
from tokensieve.models.compressors.qtsplus import QTSplus, pack_keep_mask, solve_threshold
from tokensieve.models.losses import kl_to_teacher
from tokensieve.models.types import Query

from .conftest import build_visual

SMALL = {"d_model": 32, "num_heads": 2, "head_dim": 16, "budget_hidden": 16, "reencode_heads": 4}


def _query(B: int, D: int, lengths: list[int], seed: int = 0) -> Query:
    gen = torch.Generator().manual_seed(seed)
    q = max(lengths)
    mask = torch.arange(q).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Query(torch.randn(B, q, D, generator=gen), mask)


@pytest.fixture(scope="module")
def signals(tiny_backbone):
    batch = make_batch(batch_size=3, seed=3)
    visual = tiny_backbone.encode_video(batch)
    query = tiny_backbone.embed_query(batch, visual)
    with torch.no_grad():
        full = tiny_backbone(batch, visual)
    return batch, visual, query, full


def test_threshold_solver_hits_the_target_with_the_implicit_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 40, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    target = torch.tensor([8.0, 3.5], dtype=torch.float64, requires_grad=True)
    t = solve_threshold(z, valid, target, tau=0.5)
    s = torch.sigmoid((z - t.unsqueeze(1)) / 0.5) * valid
    torch.testing.assert_close(s.sum(1), target.detach())
    t.sum().backward()
    slope = (s * (1 - s)).sum(1) / 0.5  # implicit function theorem: dt/dc = -1 / slope, dt/dz_i = s_i(1 - s_i)/τ / slope
    torch.testing.assert_close(target.grad, -1.0 / slope.detach())
    torch.testing.assert_close(z.grad, ((s * (1 - s) / 0.5) / slope.unsqueeze(1)).detach())


def test_pack_keep_mask_sorts_and_pads():
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False], [False] * 5])
    index, valid = pack_keep_mask(keep)
    assert index.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_inference_honours_auto_and_explicit_budgets_with_padding():
    torch.manual_seed(0)
    visual = build_visual(3, (4, 3, 4), 16, n_valid=[48, 37, 20])
    query = _query(3, 16, [5, 3, 1])
    gate = QTSplus(16, n_max=12, **SMALL).eval()
    n = visual.valid.sum(1)
    with torch.no_grad():
        out = gate.select(visual, query)  # auto: the predicted ratio
        expected = [min(math.ceil(float(r) * int(m)), 12, int(m)) for r, m in zip(out.rho, n)]
        assert out.selection.num_kept.tolist() == expected and all(0.05 <= float(r) <= 0.5 for r in out.rho)
        for budget in (0.25, 0.1, 1.0, 7):
            sel = gate(visual, query, budget=budget)
            assert sel.num_kept.tolist() == [num_keep(int(m), budget) for m in n]  # explicit budget ignores n_max
            assert sel.weights is None and sel.tokens.shape == (*sel.index.shape, 16)
            for b in range(3):
                idx = sel.index[b][sel.valid[b]] if sel.valid is not None else sel.index[b]
                assert torch.all(idx[1:] > idx[:-1]) and visual.valid[b, idx].all()
                assert torch.equal(sel.gather_positions(visual)[:, b, : len(idx)], visual.positions[:, b, idx])  # original M-RoPE ids
    with pytest.raises(ValueError, match="query"):
        gate(visual, None)
    with pytest.raises(ValueError, match="auto"):
        gate(visual, query, budget="half")
    with pytest.raises(ValueError, match="time_source"):
        QTSplus(16, time_source="seconds")


def test_training_selection_is_straight_through_at_the_inference_count():
    torch.manual_seed(1)
    visual = build_visual(2, (4, 3, 4), 16, n_valid=[48, 30])
    query = _query(2, 16, [4, 2])
    gate = QTSplus(16, gumbel=False, **SMALL).train()
    out = gate.select(visual, query)
    n = visual.valid.sum(1).float()
    torch.testing.assert_close(out.soft_mask.sum(1), out.rho.detach() * n, atol=1e-3, rtol=0)  # Σσ((z − t)/τ) = ρM
    assert out.n_keep.tolist() == [math.ceil(float(r) * int(m)) for r, m in zip(out.rho, n)]
    w = out.selection.weights[out.selection.valid] if out.selection.valid is not None else out.selection.weights
    assert torch.equal(w, torch.ones_like(w)) and w.requires_grad
    gate.eval()
    with torch.no_grad():  # without Gumbel noise, training and inference keep the same tokens
        assert torch.equal(gate(visual, query).index, out.selection.index)


def test_gradients_reach_scorer_and_budget_head_from_backbone_logits(tiny_backbone, signals):
    batch, visual, query, full = signals
    torch.manual_seed(0)
    gate = QTSplus(visual.tokens.shape[-1], **SMALL).train()
    out = gate.select(visual, query)
    loss = kl_to_teacher(tiny_backbone(batch, visual, out.selection), full)
    loss.backward()
    for name in ("q_proj.weight", "k_proj.weight", "budget_head.0.weight", "re_out.weight"):
        grad = dict(gate.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(p.grad is not None for p in tiny_backbone.parameters())


def test_loss_decreases_on_a_fixed_batch(tiny_backbone, signals):
    batch, visual, query, full = signals
    torch.manual_seed(0)
    gate = QTSplus(visual.tokens.shape[-1], gumbel=False, **SMALL).train()
    opt = torch.optim.AdamW(gate.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = kl_to_teacher(tiny_backbone(batch, visual, gate(visual, query, budget=0.25)), full)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_reencoder_uses_absolute_time():
    torch.manual_seed(0)
    visual = build_visual(1, (4, 2, 2), 16)
    query = _query(1, 16, [3])
    for source in ("frame_index", "position"):
        gate = QTSplus(16, time_source=source, **SMALL).eval()
        torch.nn.init.normal_(gate.re_out.weight)  # trained re-encoder (zero-initialised: identity)
        with torch.no_grad():
            before = gate(visual, query, budget=0.5).tokens
            visual.frame_index = visual.frame_index * 3
            visual.positions = visual.positions * torch.tensor([3, 1, 1]).view(3, 1, 1)
            after = gate(visual, query, budget=0.5).tokens
            visual.frame_index = visual.frame_index // 3
            visual.positions = visual.positions // torch.tensor([3, 1, 1]).view(3, 1, 1)
        assert not torch.allclose(before, after)
    untrained = QTSplus(16, **SMALL).eval()
    with torch.no_grad():
        sel = untrained(visual, query, budget=0.5)
        assert torch.equal(sel.tokens, visual.tokens.gather(1, sel.index.unsqueeze(-1).expand(-1, -1, 16)))


def test_learned_selectors_export_load_in_a_fresh_process(tmp_path):
    """QTSplus, Matryoshka and FlexSelect (lm scorer, frame groups): one subprocess reloads all three."""
    torch.manual_seed(0)
    visual = build_visual(2, (4, 3, 4), 16, n_valid=[48, 33])
    query = _query(2, 16, [4, 2])
    models = {
        "qtsplus": QTSplus(16, **SMALL),
        "matryoshka": Matryoshka(16, scales=[1.0, 0.25, 0.1], adapter_dim=8),
        "flexselect": FlexSelect(16, d_model=32, scorer="lm", lm_layers=1, group_frames=2),
    }
    expected = {}
    for name, model in models.items():
        for p in model.parameters():  # move the zero-initialised parts off zero
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
        model.eval().save_pretrained(tmp_path / name)
        with torch.no_grad():
            sel = model(visual, query if model.needs_query else None, budget=0.25)
        expected[name] = (sel.index, sel.tokens if sel.tokens is not None else model.score(visual, query))
    torch.save({"tokens": visual.tokens, "valid": visual.valid, "positions": visual.positions, "frame_index": visual.frame_index, "q": query.embeds, "qm": query.mask}, tmp_path / "inputs.pt")
    script = f"""
import torch
from tokensieve.models.compressors import REGISTRY, load_compressor
from tokensieve.models.compressors.matryoshka import Matryoshka
from tokensieve.models.compressors.qtsplus import QTSplus
from tokensieve.models.types import Query, VisualTokens
REGISTRY.setdefault("qtsplus", QTSplus)
REGISTRY.setdefault("matryoshka", Matryoshka)
d = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
v = VisualTokens(d["tokens"], d["valid"], d["positions"], d["frame_index"], (4, 3, 4))
q = Query(d["q"], d["qm"])
out = {{}}
for name in ("qtsplus", "matryoshka", "flexselect"):
    m = load_compressor({str(tmp_path)!r} + "/" + name)
    with torch.no_grad():
        sel = m(v, q if m.needs_query else None, budget=0.25)
        out[name] = (sel.index, sel.tokens if sel.tokens is not None else m.score(v, q))
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, (index, values) in expected.items():
        assert torch.equal(got[name][0], index), name
        assert torch.equal(got[name][1], values), name
