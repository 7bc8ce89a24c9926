"""GRPODistill on the tiny backbone: only the policy (and LoRA) trains, reward rises, export round trip."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.models import compressors
from tokensieve.models.compressors.grpo import GRPOSelector
from tokensieve.train.export import export_checkpoint
from tokensieve.train.grpo import GRPODistill

POLICY = {"scorer": {"d_model": 32, "num_heads": 2, "head_dim": 16, "context_layers": 0}}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(compressors.REGISTRY, "grpo", GRPOSelector)  # until the lead registers it


def _module(backbone_dir, **kw) -> GRPODistill:
    torch.manual_seed(0)
    args = {"budgets": [0.25], "val_budgets": [0.25], "group_size": 4, "reference_layer": 2, "lr": 5e-2, **kw}
    return GRPODistill(backbone=str(backbone_dir), compressor_kwargs=POLICY, **args)


def _loader(batches):
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _fit(module, batches, tmp_path, val=None):
    # one epoch over ``batches``; note global_step counts optimizer updates (ppo_epochs per batch)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, _loader(batches), _loader(val) if val else None)
    return trainer


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}, {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_the_policy_changes_then_export_round_trip(tiny_backbone_dir, tmp_path):
    module = _module(tiny_backbone_dir)
    backbone_before, before = _snapshot(module)
    assert {k.split(".")[0] for k in before} == {"compressor", "reference"}
    trainer = _fit(module, [make_batch(seed=i) for i in range(2)], tmp_path, val=[make_batch(seed=5)])
    assert {"val/loss", "val/kl@0.25", "val/top1@0.25", "val/retained@0.25", "val/retention@0.25"} <= set(trainer.callback_metrics)
    after = module.state_dict()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("reference.")), "the reference policy moved"
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("compressor.")), "the policy did not move"
    assert not any(p.requires_grad for p in module.backbone.parameters())
    # checkpoint → export → load: the exported policy is the trained one, deterministic top-K
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "export")
    loaded = compressors.load_compressor(out)
    batch = make_batch(seed=7)
    visual = module.backbone.encode_video(batch)
    query = module.backbone.embed_query(batch, visual)
    module.compressor.eval()
    with torch.no_grad():
        assert torch.equal(loaded(visual, query, 0.1).index, module.compressor(visual, query, 0.1).index)
        torch.testing.assert_close(loaded.logits(visual, query), module.compressor.logits(visual, query))


def test_with_lora_only_the_policy_and_the_adapters_change(tiny_backbone_dir, tmp_path):
    module = _module(tiny_backbone_dir, lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    backbone_before, before = _snapshot(module)
    lora_keys = {k for k in backbone_before if "lora_" in k}
    assert lora_keys and any(k.startswith("lora_weights.") for k in before)
    opt_params = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.compressor.parameters()} | {id(p) for p in module.lora_weights.values()}
    trainer = _fit(module, [make_batch(seed=0)], tmp_path)
    backbone_after = module.backbone.state_dict()
    assert all(torch.equal(backbone_after[k], v) for k, v in backbone_before.items() if k not in lora_keys), "a frozen backbone weight moved"
    assert any(not torch.equal(backbone_after[k], backbone_before[k]) for k in lora_keys), "LoRA did not train"
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("reference."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("compressor."))
    # export writes the adapters beside the policy; they attach to a fresh backbone
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "export")
    assert {p.name for p in (out / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    from tokensieve.models.backbones import load
    from tokensieve.train.matryoshka import load_lora_adapter

    fresh = load(tiny_backbone_dir)
    load_lora_adapter(fresh, out / "lora")
    trained = dict(module.backbone.language_model.named_parameters())
    for name, p in fresh.language_model.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name])


class _TargetReward(GRPODistill):
    """The module's rollout, advantages and clipped update, with a reward whose optimum is known.

    On the random tiny backbone every keep-set gives nearly the same output (KL ~1e-3,
    uniform attention), so the real reward is flat; here the reward is the share of kept
    tokens in a fixed target set (every third token)."""

    def reward(self, teacher, logits, selection, visual, answers):
        hit = (selection.index % 3 == 0).float()
        valid = selection.valid.float() if selection.valid is not None else torch.ones_like(hit)
        r = (hit * valid).sum(1) / valid.sum(1)
        return r, {"agree": r, "kl": r, "retained": r, "correct": r}


def test_expected_reward_rises_on_a_fixed_batch(tiny_backbone_dir, tmp_path):
    torch.manual_seed(0)
    module = _TargetReward(backbone=str(tiny_backbone_dir), compressor_kwargs=POLICY, budgets=[0.25], group_size=4, reference_layer=2, lr=1e-2)
    batch = make_batch(seed=3)
    visual = module.backbone.encode_video(batch)
    query = module.backbone.embed_query(batch, visual)

    def expected_reward() -> float:  # Monte Carlo over 512 keep-sets, common random numbers before/after
        with torch.no_grad():
            order, step_valid, _ = module.compressor.sample(visual, query, 0.25, 512, torch.Generator().manual_seed(0))
        hit = (order % 3 == 0).float() * step_valid[:, None, :]
        return (hit.sum(-1) / step_valid.sum(-1, keepdim=True)).mean().item()

    before = expected_reward()
    _fit(module, [batch] * 4, tmp_path)
    after = expected_reward()
    assert after > before + 0.08, (before, after)


def test_init_scorer_warm_starts_policy_and_reference(tiny_backbone_dir, tmp_path):
    from tokensieve.models.compressors.flexselect import FlexSelect

    torch.manual_seed(1)
    flex = FlexSelect(hidden_size=128, d_model=16, num_heads=2, head_dim=8, context_layers=0)
    flex.save_pretrained(tmp_path / "flex")
    module = _module(tiny_backbone_dir, init_scorer=str(tmp_path / "flex"))
    assert module.compressor._hub_mixin_config["scorer"]["d_model"] == 16  # the export's shape, recorded for export
    for key, value in flex.state_dict().items():
        assert torch.equal(module.compressor.scorer.state_dict()[key], value)
        assert torch.equal(module.reference.scorer.state_dict()[key], value)
