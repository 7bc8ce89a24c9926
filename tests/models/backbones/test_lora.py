"""LoRA on the student LLM: only adapter weights train, the base stays bit-identical,
the teacher ignores the adapter, and a saved adapter reproduces the logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.backbones import load
from tokensieve.models.backbones.lora import add_lora, load_lora, save_lora


@pytest.fixture
def fresh(tiny_dirs):
    # LoRA mutates the model: never use the session-cached loads here
    return load(tiny_dirs["llava_onevision"])


def test_only_lora_trains_and_base_is_untouched(fresh, tmp_path, tiny_dirs):
    batch = make_batch(2, frames=4)
    visual = fresh.encode_video(batch)
    base_logits = fresh(batch, visual)
    teacher = fresh.teacher_signals(batch, visual, layer=1)
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    add_lora(fresh, r=4, alpha=8)
    trainable = fresh.trainable_parameters()
    names = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and ".language_model." in n for n in names)
    assert len(trainable) == len(names) == 4 * 2 * fresh.num_layers  # A and B for q, k, v, o in every layer
    assert torch.equal(fresh(batch, visual), base_logits)  # lora_B starts at zero
    optim = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        optim.zero_grad()
        fresh(batch, visual).logsumexp(-1).sum().backward()
        optim.step()
    after = {k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if ".lora_" not in k}
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    student = fresh(batch, visual)
    assert not torch.allclose(student, base_logits)
    # the teacher is the frozen base, adapters switched off
    again = fresh.teacher_signals(batch, visual, layer=1)
    assert torch.equal(again.attention, teacher.attention) and torch.equal(again.logits, teacher.logits)

    save_lora(fresh, tmp_path / "adapter")
    reloaded = load_lora(load(tiny_dirs["llava_onevision"]), tmp_path / "adapter")
    assert reloaded.trainable_parameters() == []  # loaded for inference unless trainable=True
    torch.testing.assert_close(reloaded(batch, visual), student, atol=0, rtol=0)


def test_lora_errors_are_clear(fresh, tmp_path):
    with pytest.raises(ValueError, match="call add_lora first"):
        save_lora(fresh, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(fresh, tmp_path)
    add_lora(fresh)
    with pytest.raises(ValueError, match="already carries"):
        add_lora(fresh)
