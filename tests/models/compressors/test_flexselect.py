"""FlexSelect selector: budget-honouring selection, learnability, exact export → load in a fresh process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.compressors import FlexSelect, load_compressor
from tokensieve.models.losses import spearman_loss


@pytest.fixture
def signals(tiny_backbone):
    batch = make_batch(batch_size=3, frames=8, height=56, width=84, seed=1)
    visual = tiny_backbone.encode_video(batch)
    query = tiny_backbone.embed_query(batch, visual)
    teacher = tiny_backbone.teacher_signals(batch, visual, layer=2, with_logits=False)
    return visual, query, teacher


def test_selection_honours_budget_with_padding(signals):
    visual, query, _ = signals
    visual.valid[1, -7:] = False  # sample 1 has fewer valid tokens
    sel = FlexSelect(hidden_size=visual.tokens.shape[-1], d_model=32)(visual, query, budget=0.25)
    n = visual.valid.sum(1)
    assert sel.num_kept.tolist() == [math.floor(0.25 * int(x) + 0.5) for x in n]
    for b in range(3):
        idx = sel.index[b][sel.valid[b]] if sel.valid is not None else sel.index[b]
        assert torch.all(idx[1:] > idx[:-1]) and visual.valid[b, idx].all()


def test_query_is_required(signals):
    visual, _, _ = signals
    with pytest.raises(ValueError, match="query-aware"):
        FlexSelect(hidden_size=visual.tokens.shape[-1])(visual, None, budget=0.5)


def test_rank_loss_decreases_on_a_fixed_batch(signals):
    visual, query, teacher = signals
    torch.manual_seed(0)
    selector = FlexSelect(hidden_size=visual.tokens.shape[-1], d_model=64)
    opt = torch.optim.AdamW(selector.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = spearman_loss(selector.score(visual, query), teacher.attention, visual.valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_export_load_round_trip_in_fresh_process(signals, tmp_path):
    visual, query, _ = signals
    torch.manual_seed(0)
    selector = FlexSelect(hidden_size=visual.tokens.shape[-1], d_model=48, context_layers=1).eval()
    selector.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["method"] == "flexselect"
    torch.save({"tokens": visual.tokens, "valid": visual.valid, "positions": visual.positions, "frame_index": visual.frame_index, "q": query.embeds, "qm": query.mask, "qp": query.positions}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = selector.score(visual, query)
    script = f"""
import torch, tokensieve
from tokensieve.models.types import VisualTokens, Query
d = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
v = VisualTokens(d["tokens"], d["valid"], d["positions"], d["frame_index"], (4, 2, 3))
q = Query(d["q"], d["qm"], d["qp"])
sel = tokensieve.load_compressor({str(tmp_path / 'export')!r})
with torch.no_grad():
    torch.save(sel.score(v, q), {str(tmp_path / 'scores.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "scores.pt", weights_only=True), expected)


def test_load_is_strict_about_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    FlexSelect(hidden_size=16, d_model=16).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_compressor(tmp_path)


# ---------------------------------------------------------------- upgrades: ListMLE, frame groups, small-LM scorer, straight-through
from tokensieve.models.budget import num_keep
from tokensieve.models.losses import kl_to_teacher, listmle_loss

from .conftest import build_visual


def test_configs_saved_before_the_upgrades_still_load(tmp_path):
    torch.manual_seed(0)
    FlexSelect(hidden_size=16, d_model=16).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("scorer", "lm_layers", "group_frames"):
        cfg.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # what an export written before the upgrades holds
    loaded = load_compressor(tmp_path)
    assert loaded.scorer == "head" and loaded.group_frames == 0
    assert not any(k.startswith("lm.") for k in loaded.state_dict())


def test_frame_group_budget_split_is_exact_and_proportional():
    visual = build_visual(2, (6, 3, 3), 8, n_valid=[54, 40])  # sample 1: groups of 18, 18, 4 valid tokens
    selector = FlexSelect(hidden_size=8, d_model=16, group_frames=2)
    _, counts = selector.group_counts(visual, 0.25)
    # K = 14 of 54: 4.67 each -> 4, 4, 4 + the two largest remainders (ties: earlier group); K = 10 of 40: 4.5, 4.5, 1 -> 5, 4, 1
    assert counts.tolist() == [[5, 5, 4], [5, 4, 1]]
    scores = torch.randn(2, 54)
    for budget in (0.25, 0.1, 7, 1.0):
        _, counts = selector.group_counts(visual, budget)
        assert counts.sum(1).tolist() == [num_keep(54, budget), num_keep(40, budget)]
        sel = selector._select(scores, visual, budget)
        group = visual.frame_index // 2
        for b in range(2):
            idx = sel.index[b][sel.valid[b]] if sel.valid is not None else sel.index[b]
            assert torch.all(idx[1:] > idx[:-1]) and visual.valid[b, idx].all()
            for g in range(3):  # each group keeps its own top-scoring tokens
                members = torch.nonzero((group[b] == g) & visual.valid[b]).squeeze(1)
                top = members[scores[b, members].argsort(descending=True)[: int(counts[b, g])]]
                assert set(idx.tolist()) & set(members.tolist()) == set(top.tolist())


def test_lm_scorer_honours_budget_and_learns_with_listmle(signals):
    visual, query, teacher = signals
    torch.manual_seed(0)
    selector = FlexSelect(hidden_size=visual.tokens.shape[-1], d_model=32, scorer="lm", lm_layers=2)
    assert any(k.startswith("lm.layers.1.") for k in selector.state_dict())
    opt = torch.optim.AdamW(selector.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = listmle_loss(selector.score(visual, query), teacher.attention, visual.valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses[::5]
    visual.valid[1, -7:] = False
    sel = selector(visual, query, budget=0.25)
    assert sel.num_kept.tolist() == [num_keep(int(n), 0.25) for n in visual.valid.sum(1)]
    assert all(visual.valid[b, sel.index[b][sel.valid[b]] if sel.valid is not None else sel.index[b]].all() for b in range(3))
    with pytest.raises(ValueError, match="scorer"):
        FlexSelect(hidden_size=8, scorer="bert")


def test_straight_through_selection_trains_the_scorer_from_backbone_logits(tiny_backbone):
    batch = make_batch(batch_size=2, seed=4)
    visual = tiny_backbone.encode_video(batch)
    query = tiny_backbone.embed_query(batch, visual)
    with torch.no_grad():
        full = tiny_backbone(batch, visual)
    selector = FlexSelect(hidden_size=visual.tokens.shape[-1], d_model=32, group_frames=2)
    sel = selector.select_st(visual, query, budget=0.5)
    assert torch.equal(sel.index, selector(visual, query, budget=0.5).index)
    assert torch.equal(sel.weights, torch.ones_like(sel.weights))
    kl_to_teacher(tiny_backbone(batch, visual, sel), full).backward()
    assert selector.k_proj.weight.grad.abs().sum() > 0 and selector.q_proj.weight.grad.abs().sum() > 0
