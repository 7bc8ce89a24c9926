"""FlexSelectDistill upgrades: ListMLE, the straight-through KL term, the small-LM scorer."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tokensieve.train.flexselect import FlexSelectDistill


def test_module_path_still_resolves():
    from tokensieve.train import module

    assert module.FlexSelectDistill is FlexSelectDistill


@pytest.mark.parametrize("kwargs", [{"loss": "listmle", "kl_weight": 1.0, "st_budget": 0.5}, {"loss": "spearman", "compressor_kwargs": {"d_model": 32, "scorer": "lm", "lm_layers": 1, "group_frames": 2}}])
def test_training_step_changes_only_the_selector(tiny_backbone_dir, kwargs):
    torch.manual_seed(0)
    module = FlexSelectDistill(backbone=str(tiny_backbone_dir), **{"compressor_kwargs": {"d_model": 32}, **kwargs}, reference_layer=2, lr=1e-2)
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    opt = module.configure_optimizers()
    loss = module.training_step(make_batch(), 0)
    loss.backward()
    if kwargs.get("kl_weight"):  # the KL term alone reaches the scorer through the straight-through weights
        module.compressor.zero_grad()
        batch = make_batch()
        visual, query, teacher = module._signals(batch)
        from tokensieve.models.losses import kl_to_teacher

        sel = module.compressor.select_st(visual, query, budget=0.5)
        kl_to_teacher(module.backbone(batch, visual, sel), teacher.logits).backward()
        assert module.compressor.k_proj.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert any(not torch.equal(v, before[k]) for k, v in module.compressor.state_dict().items())


def test_unknown_loss_is_refused(tiny_backbone_dir):
    with pytest.raises(ValueError, match="listmle"):
        FlexSelectDistill(backbone=str(tiny_backbone_dir), loss="pairwise")
