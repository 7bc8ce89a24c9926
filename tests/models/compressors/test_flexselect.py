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
