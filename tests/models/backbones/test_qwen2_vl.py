"""Qwen-VL specifics (both variants): temporal M-RoPE spacing, saliency, patchify vs HF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def qwen(request, tiny_dirs):
    from tests.models.backbones.conftest import _load

    return _load(tiny_dirs[request.param], attn_implementation="sdpa")


def test_temporal_ids_follow_the_variant(qwen, video_batch):
    visual = qwen.encode_video(video_batch)
    t, h, w = visual.grid
    temporal = visual.positions[0, 0].view(t, h * w)
    assert (temporal == temporal[:, :1]).all()  # one temporal id per frame group
    steps = temporal[1:, 0] - temporal[:-1, 0]
    if qwen.family == "qwen2_vl":
        assert (steps == 1).all()  # the temporal-patch index
    else:  # tokens_per_second · seconds per temporal patch (4 fps, 2 frames per patch → 0.5 s · 2)
        assert (steps == int(qwen.model.config.vision_config.tokens_per_second * 0.5)).all()


def test_saliency_is_a_distribution_over_each_frame(qwen, video_batch):
    visual = qwen.encode_video(video_batch, saliency=True)
    t, h, w = visual.grid
    per_frame = visual.saliency.view(video_batch.size, t, h * w).sum(-1)
    # mean received attention per patch sums to 1 over a frame's patches; merged tokens average merge² patches
    torch.testing.assert_close(per_frame, torch.full_like(per_frame, 1.0 / 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_saliency_matches_eager_vision_attention(tiny_dirs, video_batch, monkeypatch, family):
    """Reference: the weights HF's eager vision attention computes in the last block (which is
    a full-attention block in both tiny towers), token order restored for Qwen2.5-VL windows."""
    import sys

    from tests.models.backbones.conftest import _load

    eager = _load(tiny_dirs[family], attn_implementation="eager")
    visual = eager.encode_video(video_batch, saliency=True)
    module = sys.modules[type(eager.model.model.visual.blocks[0].attn).__module__]
    recorded, original = [], module.eager_attention_forward

    def spy(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        recorded.append(weights)
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", spy)
    pixels, grids = zip(*(eager.preprocessor(f) for f in video_batch.frames))
    grid_thw = torch.tensor(grids)
    with torch.no_grad():
        eager.model.model.visual(torch.cat(pixels), grid_thw=grid_thw)
    chunks = recorded[-int(grid_thw[:, 0].sum()) :]  # the last block: one [1, H, n, n] call per frame group
    received = torch.cat([w[0].mean(dim=(0, 1)) for w in chunks]).view(-1, 4).mean(-1)
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        tower = eager.model.model.visual
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=tower.window_size, patch_size=14, kwargs={})
        received = received[torch.argsort(window_index)]
    torch.testing.assert_close(visual.saliency, received.view(video_batch.size, -1), atol=1e-6, rtol=1e-5)


def test_patchify_matches_hf_qwen2_vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil()(images=[image], do_resize=False, return_tensors="pt")
    # an image is a clip of temporal_patch_size identical frames
    ours, grid = QwenVisionPreprocessor()(torch.from_numpy(np.stack([image, image])))
    assert list(hf["image_grid_thw"][0]) == list(grid)
    torch.testing.assert_close(ours, hf["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_patchify_matches_hf_video_processor_where_torchvision_exists():
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video = np.random.default_rng(1).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    hf = Qwen2VLVideoProcessor()(videos=[video], do_resize=False, do_sample_frames=False, return_tensors="pt")
    ours, grid = QwenVisionPreprocessor()(torch.from_numpy(video))
    assert list(hf["video_grid_thw"][0]) == list(grid)
    torch.testing.assert_close(ours, hf["pixel_values_videos"].float(), atol=1e-5, rtol=1e-5)


def test_patchify_rejects_unaligned_frames():
    with pytest.raises(ValueError, match="multiple of 28"):
        QwenVisionPreprocessor()(torch.zeros(2, 50, 56, 3, dtype=torch.uint8))
