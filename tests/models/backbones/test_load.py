"""``load()``: model_type → adapter, keyword pass-through, clear errors."""

from __future__ import annotations

import pytest
import torch

from tokensieve.models.backbones import load

CLASSES = {"qwen2_5_vl": "Qwen25VLBackbone", "qwen2_vl": "Qwen2VLBackbone", "llava_onevision": "LlavaOnevisionBackbone"}


def test_load_picks_the_adapter_and_passes_kwargs_through(backbone_dir, family):
    backbone = load(backbone_dir, dtype="bfloat16", attn_implementation="eager", reference_layer=1)
    assert type(backbone).__name__ == CLASSES[family] and backbone.family == family
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    assert backbone.model.config._attn_implementation == "eager"
    assert backbone.reference_layer == 1 and backbone.name_or_path == str(backbone_dir)
    assert not backbone.training and backbone.trainable_parameters() == []
    backbone.train()
    assert not backbone.training  # a frozen backbone never leaves eval mode


def test_load_rejects_unsupported_model_type(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llava_onevision, qwen2_5_vl, qwen2_vl"):
        load(tmp_path)


def test_adapter_refuses_another_model_type(tiny_dirs):
    from tokensieve.models.backbones.qwen2_vl import Qwen2VLBackbone

    with pytest.raises(ValueError, match="model_type 'llava_onevision', but Qwen2VLBackbone loads 'qwen2_vl'"):
        Qwen2VLBackbone.from_pretrained(tiny_dirs["llava_onevision"])


def test_reference_layer_out_of_range_is_a_clear_error(backbone, encoded):
    with pytest.raises(ValueError, match="reference layer 99"):
        load(backbone.name_or_path, reference_layer=99)
    video_batch, visual = encoded
    with pytest.raises(ValueError, match="reference layer 99"):
        backbone.teacher_signals(video_batch, visual, layer=99)
    with pytest.raises(ValueError, match="reduction"):
        backbone.teacher_signals(video_batch, visual, reduction="sum")


def test_generate_rejects_unknown_arguments(backbone, encoded):
    video_batch, visual = encoded
    with pytest.raises(TypeError, match="num_beams"):
        backbone.generate(video_batch, visual, num_beams=2)


def test_sampling_is_reproducible_with_a_generator(tiny_dirs):
    from tests.conftest import make_batch
    from tests.models.backbones.conftest import _load

    backbone = _load(tiny_dirs["llava_onevision"], attn_implementation="sdpa")
    video_batch = make_batch(2, frames=2)
    visual = backbone.encode_video(video_batch)
    runs = [backbone.generate(video_batch, visual, max_new_tokens=3, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[], generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert runs[0].shape == (video_batch.size, 3) and torch.equal(runs[0], runs[1])
