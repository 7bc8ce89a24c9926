"""Training module: only the selector trains and is checkpointed; export reproduces it exactly."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.models.compressors import load_compressor
from tokensieve.train.export import export_checkpoint
from tokensieve.train.module import FlexSelectDistill


@pytest.fixture
def module(tiny_backbone_dir):
    torch.manual_seed(0)
    return FlexSelectDistill(backbone=str(tiny_backbone_dir), compressor_kwargs={"d_model": 32}, reference_layer=2, lr=1e-2)


def _loader(n_batches: int = 2):
    return DataLoader([make_batch(seed=i) for i in range(n_batches)], batch_size=None, collate_fn=lambda b: b)


def test_training_step_changes_only_the_selector(module):
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    selector_before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.compressor.parameters()}
    loss = module.training_step(make_batch(), 0)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    changed = [k for k, v in module.compressor.state_dict().items() if not torch.equal(v, selector_before[k])]
    assert changed, "no selector parameter moved"
    assert not any(p.requires_grad for p in module.backbone.parameters())


def test_state_dict_holds_only_the_compressor(module):
    keys = list(module.state_dict())
    assert keys and all(k.startswith("compressor.") for k in keys)


def test_empty_batch_is_skipped_and_counted(module):
    batch = make_batch(batch_size=1)
    batch.frames, batch.timestamps, batch.frame_mask = batch.frames[:0], batch.timestamps[:0], batch.frame_mask[:0]
    batch.questions, batch.skipped = [], {"corrupt_video": 1}
    assert module.training_step(batch, 0) is None
    assert module.skipped["corrupt_video"] == 1


def test_fit_checkpoint_export_round_trip(module, tmp_path):
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader(1))
    assert "val/spearman" in trainer.callback_metrics
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith("compressor.") for k in raw["state_dict"])
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "recipe.yaml", "README.md"}
    card = (out / "README.md").read_text()
    assert "# flexselect (FlexSelect)" in card and "arXiv" in card and "More Information Needed" not in card
    loaded = load_compressor(out)
    batch = make_batch(seed=7)
    visual = module.backbone.encode_video(batch)
    query = module.backbone.embed_query(batch, visual)
    module.compressor.eval()
    with torch.no_grad():
        assert torch.equal(loaded.score(visual, query), module.compressor.score(visual, query))
