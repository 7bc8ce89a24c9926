"""LLaVA-OneVision video preprocessing without torchvision.

Each frame is resized to the vision tower's square ``image_size`` (bicubic, antialiased,
on the uint8 frames, as PIL and torchvision resize uint8 images), rescaled by 1/255 and
normalised — what ``LlavaOnevisionVideoProcessor`` does to video frames (no anyres tiling
for videos). ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses PIL's
bicubic kernel (a = -0.5), support scaling and per-pass uint8 rounding, so the result
equals PIL's resize up to ±1 uint8 step; the test suite compares with ``LlavaOnevisionImageProcessorPil``.

Mean / std come from the checkpoint's ``video_preprocessor_config.json`` /
``preprocessor_config.json`` (SigLIP checkpoints ship 0.5 / 0.5; that is also the default).
Source: transformers ``models/llava_onevision/{processing,video_processing,
image_processing_pil}_llava_onevision.py`` (5.23); SigLIP (arXiv 2303.15343).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SiglipVideoPreprocessor:
    """Frames → ``pixel_values_videos`` for a SigLIP tower.

    Attributes:
        image_size: side of the square input the tower expects (``vision_config.image_size``).
        image_mean, image_std: per-channel normalisation.
    """

    image_size: int = 384
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_size: int) -> SiglipVideoPreprocessor:
        """Read mean/std (and check the size) from the first preprocessor config found.

        Args:
            folder: checkpoint folder.
            image_size: the vision config's ``image_size`` — authoritative, because the model's
                pooling assumes it.

        Raises:
            ValueError: the file's ``size`` disagrees with ``image_size`` (names file and field).
        """
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = Path(folder) / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                size = cfg.get("size") or {}
                side = size.get("height", size.get("shortest_edge", image_size))
                if side != image_size or size.get("width", side) != image_size:
                    raise ValueError(f"{path}: field 'size' = {size} disagrees with vision_config.image_size = {image_size}")
                return cls(image_size, tuple(cfg.get("image_mean", SIGLIP_MEAN)), tuple(cfg.get("image_std", SIGLIP_STD)))
        return cls(image_size)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """Preprocess one clip.

        Args:
            frames: ``uint8 [T, H, W, 3]`` RGB, any H, W.

        Returns:
            ``float32 [T, 3, image_size, image_size]``.

        Raises:
            ValueError: wrong dtype or shape.
        """
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).contiguous()
        s = self.image_size
        if x.shape[-2:] != (s, s):
            # uint8 in, uint8 out: the kernel rounds between its two passes exactly like PIL
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        x = x.float()
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std
