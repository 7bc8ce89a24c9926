"""VQTokenDistill on the tiny backbone: what trains, the losses, checkpoint → export → load."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.models import compressors
from tokensieve.models.compressors.vqtoken import VQToken
from tokensieve.train.export import export_checkpoint
from tokensieve.train.vqtoken import VQTokenDistill

KW = {"codebook_size": 32, "code_dim": 16, "d_model": 32, "num_heads": 2}


@pytest.fixture
def module(tiny_backbone_dir, monkeypatch):
    monkeypatch.setitem(compressors.REGISTRY, "vqtoken", VQToken)  # until the lead registers it
    torch.manual_seed(0)
    return VQTokenDistill(backbone=str(tiny_backbone_dir), compressor_kwargs=KW, budgets=[0.1, 0.25], val_budgets=[0.1], lr=1e-2)


def _loader(n_batches: int = 2, answers: bool = False):
    batches = []
    for i in range(n_batches):
        b = make_batch(seed=i)
        if answers:
            b.answers = ["A", "C"]
        batches.append(b)
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def test_training_step_changes_only_the_tokenizer(module):
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.compressor.parameters()}
    module.compressor.train()
    batch = make_batch()
    batch.answers = ["B", ""]  # one labelled sample: the CE term is used; the other trains by KL only
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    loss.backward()
    opt.step()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    changed = {k for k, v in module.compressor.state_dict().items() if not torch.equal(v, before[k])}
    # W_out starts at zero, so the step reaches the attention's output projection first
    assert any(k.startswith("out.") for k in changed), "the hash-map attention did not train"
    assert any(k.startswith("encoder.") for k in changed), "the VQ encoder did not train"
    assert not any(p.requires_grad for p in module.backbone.parameters())


def test_fit_checkpoint_export_round_trip(module, tmp_path):
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader(1, answers=True))
    metrics = trainer.callback_metrics
    assert {"val/loss", "val/kl@0.1", "val/top1@0.1", "val/accuracy@0.1", "val/tokdense@0.1", "val/kept_tokens@0.1", "val/retention@0.1"} <= set(metrics)
    assert metrics["val/codes_per_video@0.1"] > 1
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith("compressor.") for k in raw["state_dict"])
    assert raw["tokensieve"]["method"] == "vqtoken"
    out = export_checkpoint(ckpt, tmp_path / "export")
    loaded = compressors.load_compressor(out)
    assert isinstance(loaded, VQToken)
    batch = make_batch(seed=7)
    visual = module.backbone.encode_video(batch)
    module.compressor.eval()
    with torch.no_grad():
        a, ca = module.compressor.compress(visual, 0.1)
        b, cb = loaded.compress(visual, 0.1)
    assert torch.equal(ca.codes, cb.codes) and torch.equal(a.index, b.index)
    torch.testing.assert_close(a.tokens, b.tokens)
