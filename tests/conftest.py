"""Shared fixtures: a tiny Qwen2.5-VL saved once per session, and synthetic video batches."""

from __future__ import annotations

import pytest
import torch

from tokensieve.data.types import VideoBatch


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    from tokensieve.models.backbones.tiny import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir):
    from tokensieve.models.backbones import load

    return load(tiny_backbone_dir)


def make_batch(batch_size: int = 2, frames: int = 8, height: int = 56, width: int = 84, seed: int = 0, questions=None) -> VideoBatch:
    """Random-pixel clips with 4 fps timestamps and questions of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    questions = questions or ["What is happening?", "Which object moves the most in this clip, and where does it go?", "Colour?"][:batch_size]
    return VideoBatch(
        frames=torch.randint(0, 256, (batch_size, frames, height, width, 3), dtype=torch.uint8, generator=gen),
        timestamps=(torch.arange(frames, dtype=torch.float32) / 4).expand(batch_size, -1).clone(),
        frame_mask=torch.ones(batch_size, frames, dtype=torch.bool),
        questions=list(questions),
        keys=[f"clip{i}" for i in range(batch_size)],
    )


@pytest.fixture
def video_batch() -> VideoBatch:
    return make_batch()
