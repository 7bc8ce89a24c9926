"""LLaVA-OneVision specifics: preprocessing, placeholder expansion, the newline token, saliency."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.backbones.llava_processing import SiglipVideoPreprocessor


@pytest.fixture
def llava(tiny_dirs):
    from tests.models.backbones.conftest import _load

    return _load(tiny_dirs["llava_onevision"], attn_implementation="sdpa")


@pytest.mark.parametrize("size", [(96, 128), (40, 50), (70, 70)])
def test_preprocessing_matches_hf_pil_image_processor(size):
    """Within one uint8 step (2/255 after 0.5/0.5 normalisation) on < 2 % of values."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    hf = LlavaOnevisionImageProcessorPil()(images=[image], size={"height": 70, "width": 70}, image_mean=[0.5] * 3, image_std=[0.5] * 3, return_tensors="pt")
    ref = hf["pixel_values"][0][0].float()  # the base (un-tiled) view: a plain resize to 70×70
    ours = SiglipVideoPreprocessor(70)(torch.from_numpy(image)[None])[0]
    diff = (ours - ref).abs()
    assert diff.max() <= 2 / 255 + 1e-6
    assert (diff > 1e-6).float().mean() < 0.02


def test_preprocessing_matches_hf_video_processor_where_torchvision_exists():
    pytest.importorskip("torchvision")
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    video = np.random.default_rng(1).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)
    proc = LlavaOnevisionVideoProcessor(size={"height": 70, "width": 70}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = proc(videos=[video], return_tensors="pt")["pixel_values_videos"][0].float()
    ours = SiglipVideoPreprocessor(70)(torch.from_numpy(video))
    assert (ours - ref).abs().max() <= 2 / 255 + 1e-6


def test_preprocessor_rejects_bad_frames_and_mismatched_config(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        SiglipVideoPreprocessor(70)(torch.zeros(2, 70, 70, 3))
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"height": 384, "width": 384}}')
    with pytest.raises(ValueError, match="preprocessor_config.json.*'size'"):
        SiglipVideoPreprocessor.from_pretrained(tmp_path, 70)


def test_placeholder_expansion_equals_the_hf_processor(llava, video_batch):
    """HF's processor writes frames·ceil(side/2)²+1 <video> ids in place of <video>."""
    from transformers import LlavaOnevisionProcessor

    visual = llava.encode_video(video_batch)
    frames = video_batch.frames.shape[1]
    side = llava.patch_grid
    fake = types.SimpleNamespace(num_image_tokens=side * side, video_token="<video>")
    expansion = LlavaOnevisionProcessor.replace_video_token(fake, {"pixel_values_videos": [np.zeros((frames, 3, 70, 70))]}, 0)
    assert expansion == "<video>" * llava.num_video_tokens(frames) == "<video>" * (visual.num_tokens + 1)
    for b, question in enumerate(video_batch.questions):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = llava.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == f"<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
        ref = llava.tokenizer(prompt.replace("<video>", expansion))["input_ids"]
        assert llava._layouts(video_batch, visual)[b].input_ids.tolist() == ref


def test_newline_is_an_always_kept_template_token(llava, video_batch):
    from tokensieve.models.compressors import get_compressor

    visual = llava.encode_video(video_batch)
    t, h, w = visual.grid
    assert (t, h, w) == (video_batch.frames.shape[1], 3, 3) and visual.num_tokens == t * h * w
    newline = llava.model.model.image_newline
    sel = get_compressor("uniform")(visual, budget=0.1)
    embeds, _, positions, spans = llava.lm_inputs(video_batch, visual, sel)
    for b, (pad, vs, kept, ts) in enumerate(spans):
        lay = llava._layouts(video_batch, visual)[b]
        assert torch.equal(embeds[b, ts - 1], newline)  # right after the kept tokens
        assert positions[b, ts - 1] == lay.template_index == vs - pad + visual.num_tokens  # its full-sequence id
        assert torch.equal(positions[b, vs : vs + kept], visual.positions[b, sel.index[b]])
    # the model's own video features end with that newline
    with torch.no_grad():
        feats = llava.model.model.get_video_features(torch.stack([llava.preprocessor(f) for f in video_batch.frames])).pooler_output
    torch.testing.assert_close(feats[:, -1], newline.expand(video_batch.size, -1))
    torch.testing.assert_close(feats[:, :-1], visual.tokens)


def test_saliency_is_the_pooled_received_attention(tiny_dirs):
    from tests.models.backbones.conftest import _load

    eager = _load(tiny_dirs["llava_onevision"], attn_implementation="eager")
    batch = make_batch(1, frames=2)
    visual = eager.encode_video(batch, saliency=True)
    pixels = torch.stack([eager.preprocessor(f) for f in batch.frames])[0]
    with torch.no_grad():
        attn = eager.model.model.vision_tower(pixels, output_attentions=True).attentions[-1]  # [T, H, N, N]
    side = eager.patch_grid
    received = attn.mean(dim=(1, 2)).view(-1, 1, side, side)
    ref = torch.nn.functional.interpolate(received, size=(3, 3), mode="bilinear").reshape(1, -1)
    torch.testing.assert_close(visual.saliency, ref, atol=1e-6, rtol=1e-5)
