"""Qwen2.5-VL adapter: exact pruning, original M-RoPE positions, teacher attention, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_batch
from tokensieve.models.compressors import get_compressor
from tokensieve.models.types import Selection


def _hf_unpruned_logits(backbone, batch, visual, b):
    """The stock HF path: input_ids + pixel_values_videos, positions computed by the model itself."""
    layout = backbone._layouts(batch, visual)[b]
    ids = layout.input_ids[None]
    pixels, grid = backbone.preprocessor(batch.frames[b])
    out = backbone.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=pixels,
        video_grid_thw=torch.tensor([grid]),
        mm_token_type_ids=(ids == backbone.video_token_id).int() * 2,
        second_per_grid_ts=visual.cache["second_per_grid_ts"][b : b + 1],
    )
    return out.logits[0, -1]


def test_keep_all_equals_unpruned_hf_forward(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch)
    keep_all = Selection(index=torch.arange(visual.num_tokens).expand(video_batch.size, -1))
    ours = tiny_backbone(video_batch, visual, keep_all)
    assert torch.equal(ours, tiny_backbone(video_batch, visual))
    for b in range(video_batch.size):  # batch rows are left-padded (questions differ in length)
        torch.testing.assert_close(ours[b], _hf_unpruned_logits(tiny_backbone, video_batch, visual, b), atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_mrope_positions(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch)
    sel = get_compressor("random", seed=3)(visual, budget=0.25)
    _, mask, positions, spans = tiny_backbone.lm_inputs(video_batch, visual, sel)
    layouts = tiny_backbone._layouts(video_batch, visual)
    for b, (pad, vs, kept, ts) in enumerate(spans):
        lay = layouts[b]
        full_visual_pos = lay.positions[:, lay.video_start : lay.video_start + lay.num_visual]
        assert torch.equal(positions[:, b, vs : vs + kept], full_visual_pos[:, sel.index[b]])
        # text after the video keeps its original (full-sequence) positions: nothing renumbered
        assert torch.equal(positions[:, b, ts - 1 :], lay.positions[:, lay.text_start - 1 :])
        assert mask[b, :pad].sum() == 0 and mask[b, pad:].all()
    # the temporal axis really is 3-D: tokens of different frames differ in t, equal in h/w pattern
    assert len(set(visual.positions[0, 0].tolist())) == visual.grid[0]


def test_pruning_changes_output_and_keeps_budget(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch)
    sel = get_compressor("uniform")(visual, budget=0.1)
    assert sel.index.shape[1] == round(0.1 * visual.num_tokens)
    assert not torch.allclose(tiny_backbone(video_batch, visual, sel), tiny_backbone(video_batch, visual))


def test_teacher_attention_matches_eager_attention(tiny_backbone_dir):
    from tokensieve.models.backbones import load

    batch = make_batch(batch_size=2)
    sdpa = load(tiny_backbone_dir, attn_implementation="sdpa")
    eager = load(tiny_backbone_dir, attn_implementation="eager")
    visual = sdpa.encode_video(batch)
    layer = 2
    for reduction in ("max", "mean"):
        ours = sdpa.teacher_signals(batch, visual, layer=layer, reduction=reduction)
        embeds, mask, positions, spans = eager.lm_inputs(batch, visual)
        out = eager.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True)
        weights = out.attentions[layer]  # [B, H, L, L], what the eager kernel actually used
        for b, (pad, vs, kept, ts) in enumerate(spans):
            block = weights[b, :, ts:, vs : vs + kept]
            ref = block.amax(dim=(0, 1)) if reduction == "max" else block.mean(dim=(0, 1))
            torch.testing.assert_close(ours.attention[b, :kept], ref, atol=1e-6, rtol=1e-4)


def test_teacher_layer_out_of_range_is_a_clear_error(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch)
    with pytest.raises(ValueError, match="reference layer 99"):
        tiny_backbone.teacher_signals(video_batch, visual, layer=99)


def test_query_is_the_text_after_the_video(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch)
    query = tiny_backbone.embed_query(video_batch, visual)
    lengths = query.mask.sum(1)
    assert lengths[1] > lengths[0]  # second question is longer
    layouts = tiny_backbone._layouts(video_batch, visual)
    emb = tiny_backbone.model.get_input_embeddings()
    for b, lay in enumerate(layouts):
        torch.testing.assert_close(query.embeds[b, : lengths[b]], emb(lay.input_ids[lay.text_start :]))


def test_saliency_is_a_distribution_over_each_frame(tiny_backbone, video_batch):
    visual = tiny_backbone.encode_video(video_batch, saliency=True)
    t, h, w = visual.grid
    per_frame = visual.saliency.view(video_batch.size, t, h * w).sum(-1)
    # mean received attention per patch sums to 1 over a frame's patches; merged tokens average merge² patches
    torch.testing.assert_close(per_frame, torch.full_like(per_frame, 1.0 / 4), atol=1e-5, rtol=1e-5)


def test_patchify_matches_hf_qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil()(images=[image], do_resize=False, return_tensors="pt")
    # an image is a clip of temporal_patch_size identical frames
    ours, grid = QwenVisionPreprocessor()(torch.from_numpy(np.stack([image, image])))
    assert list(hf["image_grid_thw"][0]) == list(grid)
    torch.testing.assert_close(ours, hf["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_patchify_rejects_unaligned_frames():
    from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor

    with pytest.raises(ValueError, match="multiple of 28"):
        QwenVisionPreprocessor()(torch.zeros(2, 50, 56, 3, dtype=torch.uint8))


def test_load_rejects_unsupported_model_type(tmp_path):
    from transformers import GPT2Config

    from tokensieve.models.backbones import load

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load(tmp_path)
