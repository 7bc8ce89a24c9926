"""QTSplusDistill on the tiny backbone: what trains, the budget terms, checkpoint → export → load."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.models import compressors
from tokensieve.models.compressors.qtsplus import QTSplus
from tokensieve.train.export import export_checkpoint
from tokensieve.train.qtsplus import QTSplusDistill

SMALL = {"d_model": 32, "num_heads": 2, "head_dim": 16, "budget_hidden": 16, "reencode_heads": 4}


@pytest.fixture
def module(tiny_backbone_dir, monkeypatch):
    monkeypatch.setitem(compressors.REGISTRY, "qtsplus", QTSplus)  # until the lead registers it
    torch.manual_seed(0)
    return QTSplusDistill(backbone=str(tiny_backbone_dir), compressor_kwargs=SMALL, val_budgets=[0.25], lr=1e-2)


def _loader(n_batches: int = 2, answers: bool = False):
    batches = []
    for i in range(n_batches):
        b = make_batch(seed=i)
        if answers:
            b.answers = ["A", "C"]
        batches.append(b)
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def test_training_step_changes_only_the_gate(module):
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.compressor.parameters()}
    module.compressor.train()
    batch = make_batch()
    batch.answers = ["B", ""]  # one labelled sample: CE on it, KL on both
    before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    loss = module.training_step(batch, 0)  # predicted budget: the penalties are on
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    changed = {k for k, v in module.compressor.state_dict().items() if not torch.equal(v, before[k])}
    assert {"q_proj.weight", "k_proj.weight", "budget_head.0.weight", "re_out.weight", "rho_count"} <= changed
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert list(module.state_dict()) and all(k.startswith("compressor.") for k in module.state_dict())


def test_fixed_train_budget_keeps_that_budget(module):
    module.hparams.train_budget = [0.25]
    module.compressor.train()
    batch = make_batch()
    visual, query, _ = module.encode(batch, teacher=False)
    out = module.compressor.select(visual, query, budget=module._budget())
    assert out.n_keep.tolist() == [6, 6]  # num_keep(24, 0.25)


def test_fit_checkpoint_export_round_trip(module, tmp_path):
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader(1, answers=True))
    assert {"val/loss", "val/kl@auto", "val/accuracy@0.25", "val/retention@0.25", "val/top1@auto"} <= set(trainer.callback_metrics)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "export")
    loaded = compressors.load_compressor(out)
    assert isinstance(loaded, QTSplus)
    batch = make_batch(seed=7)
    visual = module.backbone.encode_video(batch)
    query = module.backbone.embed_query(batch, visual)
    module.compressor.eval()
    with torch.no_grad():
        for budget in ("auto", 0.25):
            a, b = loaded(visual, query, budget=budget), module.compressor(visual, query, budget=budget)
            assert torch.equal(a.index, b.index) and torch.equal(a.tokens, b.tokens)


def test_optional_rank_term_reaches_the_scorer(tiny_backbone_dir, monkeypatch):
    monkeypatch.setitem(compressors.REGISTRY, "qtsplus", QTSplus)
    torch.manual_seed(0)
    module = QTSplusDistill(backbone=str(tiny_backbone_dir), compressor_kwargs=SMALL, kl_weight=0.0, ce_weight=0.0, train_budget=0.25, rank_weight=1.0, reference_layer=2)
    module.compressor.train()
    module.training_step(make_batch(), 0).backward()
    assert module.compressor.k_proj.weight.grad.abs().sum() > 0
