"""MatryoshkaDistill on the tiny backbone: all scales per step, optional LoRA (trained, checkpointed,
exported beside the compressor, reattached to a fresh backbone), checkpoint → export → load."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.models import compressors
from tokensieve.models.backbones import load
from tokensieve.models.compressors.matryoshka import Matryoshka
from tokensieve.train.export import export_checkpoint
from tokensieve.train.matryoshka import MatryoshkaDistill, load_lora_adapter

KW = {"scales": [1.0, 0.25, 0.0], "adapter_dim": 16}


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(compressors.REGISTRY, "matryoshka", Matryoshka)  # until the lead registers it


def _loader(n_batches: int = 2):
    batches = []
    for i in range(n_batches):
        b = make_batch(seed=i)
        b.answers = ["A", "C"]
        batches.append(b)
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


@pytest.mark.parametrize("lora", [None, {"r": 2, "target_modules": ["q_proj", "v_proj"]}])
def test_training_step_changes_only_the_compressor_and_lora(tiny_backbone_dir, lora):
    torch.manual_seed(0)
    module = MatryoshkaDistill(backbone=str(tiny_backbone_dir), compressor_kwargs=KW, lora=lora, lr=1e-2)
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    opt = module.configure_optimizers()
    trainable = {id(p) for p in module.compressor.parameters()} | {id(p) for p in module.backbone.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    batch = make_batch()
    batch.answers = ["B", ""]
    teacher_before = module.backbone.teacher_signals(batch, module.backbone.encode_video(batch)).logits
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    after = module.backbone.state_dict()
    frozen = [k for k in backbone_before if "lora_" not in k]
    assert all(torch.equal(backbone_before[k], after[k]) for k in frozen)  # the base weights are bit-identical
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert {"compressor.embed", "compressor.adapter.3.weight"} <= changed
    assert all(k.startswith(("compressor.", "lora_weights.")) for k in module.state_dict())
    if lora is None:
        assert not any(p.requires_grad for p in module.backbone.parameters())
    else:
        assert any(k.startswith("lora_weights.") and "lora_B" in k for k in changed)  # B starts at zero, moves first
        # the teacher is the base model: LoRA is switched off for it
        teacher_after = module.backbone.teacher_signals(batch, module.backbone.encode_video(batch)).logits
        assert torch.equal(teacher_before, teacher_after)


@pytest.mark.parametrize("lora", [None, {"r": 2, "target_modules": ["q_proj", "v_proj"]}])
def test_fit_checkpoint_export_load_round_trip(tiny_backbone_dir, tmp_path, lora):
    torch.manual_seed(0)
    module = MatryoshkaDistill(backbone=str(tiny_backbone_dir), compressor_kwargs=KW, lora=lora, val_budgets=[0.25], lr=1e-2)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader(1))
    assert {"val/loss", "val/kl@0.25", "val/accuracy@0.25", "val/retention@0.25"} <= set(trainer.callback_metrics)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert (out / "lora" / "adapter_model.safetensors").is_file() == (lora is not None)
    loaded = compressors.load_compressor(out)
    backbone = load(tiny_backbone_dir)
    if lora is not None:
        load_lora_adapter(backbone, out / "lora")
    batch = make_batch(seed=7)
    visual = module.backbone.encode_video(batch)
    module.compressor.eval()
    with torch.no_grad():
        for budget in (0.25, 0.1):
            a, b = loaded(visual, budget=budget), module.compressor(visual, budget=budget)
            assert torch.equal(a.index, b.index) and torch.equal(a.tokens, b.tokens)
            assert torch.equal(backbone(batch, visual, a), module.backbone(batch, visual, b))
