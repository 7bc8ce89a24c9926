"""Evidence → visual-token indices for Qwen2-VL-style backbones.

A Qwen2.5-VL video of T frames, H×W pixels becomes ``(T/tp) × (H/(p·m)) × (W/(p·m))`` LLM
tokens: frames are paired by the temporal patch (``tp = 2``), cut into ``p = 14`` pixel
patches, and ``m × m = 2 × 2`` neighbouring patches are merged into one token. The tokens are
laid out row-major over ``(t', y', x')`` (the vision tower's window permutation is undone by
the backbone), so pixel ``(t, y, x)`` lands in token ``t' * h * w + y' * w + x'`` with
``t' = t // tp``, ``y' = y // (p·m)``, ``x' = x // (p·m)``.

An evidence item is ``{"frame": t, "box": [x0, y0, x1, y1]}`` in pixels of the stored clip
(``x1``, ``y1`` exclusive); its tokens are every token cell the box overlaps in that frame's
temporal group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenGrid:
    """How pixels map to visual tokens.

    Attributes:
        frames: T, frames per clip.
        height, width: frame size in pixels (multiples of ``patch * merge``).
        patch: ViT patch size in pixels (14 for Qwen2-VL / Qwen2.5-VL).
        merge: spatial merge factor (2: a token covers ``patch * merge`` pixels per side).
        temporal: temporal patch size (2: a token covers two consecutive frames).
    """

    frames: int = 16
    height: int = 112
    width: int = 112
    patch: int = 14
    merge: int = 2
    temporal: int = 2

    def __post_init__(self):
        cell = self.cell
        if self.height % cell or self.width % cell:
            raise ValueError(f"frame size {self.height}x{self.width} is not a multiple of {cell}")

    @property
    def cell(self) -> int:
        """Pixels per token side."""
        return self.patch * self.merge

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(t, h, w)`` token grid (an odd T is padded by repeating the last frame)."""
        return (-(-self.frames // self.temporal), self.height // self.cell, self.width // self.cell)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.shape
        return t * h * w

    def token(self, frame: int, y: int, x: int) -> int:
        """Index of the token holding pixel ``(y, x)`` of ``frame``."""
        _, h, w = self.shape
        return (frame // self.temporal) * h * w + (y // self.cell) * w + (x // self.cell)

    def box_tokens(self, frame: int, box: Iterable[int]) -> list[int]:
        """Sorted token indices a pixel box ``[x0, y0, x1, y1)`` of ``frame`` overlaps.

        Raises:
            ValueError: an empty box, or one outside the frame.
        """
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height and 0 <= frame < self.frames):
            raise ValueError(f"box {[x0, y0, x1, y1]} at frame {frame} is empty or outside {self.frames}x{self.height}x{self.width}")
        _, h, w = self.shape
        t = frame // self.temporal
        c = self.cell
        return [t * h * w + ty * w + tx for ty in range(y0 // c, (y1 - 1) // c + 1) for tx in range(x0 // c, (x1 - 1) // c + 1)]

    def evidence_tokens(self, evidence: Iterable[dict]) -> list[int]:
        """Sorted, de-duplicated token indices of evidence items ``{"frame", "box"}``."""
        out: set[int] = set()
        for item in evidence:
            out.update(self.box_tokens(int(item["frame"]), item["box"]))
        return sorted(out)
