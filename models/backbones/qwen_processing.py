"""Qwen2-VL / Qwen2.5-VL video preprocessing without torchvision.

Equivalent to the HF processor's rescale → normalise → patchify for frames that are already
resized to a multiple of ``patch_size * merge_size`` (the data layer resizes; see
``tokensieve.data.video.smart_resize``). Source: ``Qwen2VLImageProcessorPil.patchify`` and
``Qwen2VLVideoProcessor`` in transformers; tested against the former in the test suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenVisionPreprocessor:
    """Frames → flattened patches + ``grid_thw``, Qwen2-VL layout.

    Patch order: (t, h/merge, w/merge, merge_h, merge_w) — consecutive rows are the
    ``merge²`` patches that the vision merger folds into one LLM token; each row holds
    ``(C, temporal_patch, patch, patch)`` flattened.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> QwenVisionPreprocessor:
        """Read ``preprocessor_config.json`` (or ``video_preprocessor_config.json``) when present; defaults otherwise."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = Path(folder) / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                return cls(
                    patch_size=cfg.get("patch_size", 14),
                    temporal_patch_size=cfg.get("temporal_patch_size", 2),
                    merge_size=cfg.get("merge_size", 2),
                    image_mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                    image_std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
                )
        return cls()

    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patchify one clip.

        Args:
            frames: ``uint8 [T, H, W, 3]`` on any device (the patches come back on it), H and W
                multiples of ``patch_size * merge_size``.

        Returns:
            ``(pixel_values float32 [grid_t * grid_h * grid_w, 3 * temporal_patch * patch²], (grid_t, grid_h, grid_w))``
            where the grid is in patches (before merging). An odd T repeats the last frame.

        Raises:
            ValueError: wrong dtype/shape, or H/W not a multiple of ``patch_size * merge_size``.
        """
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        t, h, w, _ = frames.shape
        factor = self.patch_size * self.merge_size
        if h % factor or w % factor:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {factor}; resize with smart_resize first")
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.image_mean, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=frames.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if t % self.temporal_patch_size:
            pad = self.temporal_patch_size - t % self.temporal_patch_size
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, m, m, C, tp, p, p
        return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)
