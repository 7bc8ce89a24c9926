"""``VideoBatch``: what the data layer hands to a backbone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class VideoBatch:
    """A collated batch of decoded clips and their questions.

    Attributes:
        frames: ``uint8 [B, T, H, W, 3]`` RGB frames (all samples resized to one H×W).
        timestamps: ``float [B, T]`` — presentation time of each sampled frame, seconds
            from the start of the clip.
        frame_mask: ``bool [B, T]`` — False marks padded frames (clips shorter than T).
        questions: ``list[str]`` of length B.
        options: ``list[list[str]]`` — multiple-choice options (may be empty lists).
        answers: ``list[str]`` — reference answers ("" when unknown).
        keys: ``list[str]`` — WebDataset sample keys.
        meta: ``list[dict]`` — the rest of each sample's json.
        skipped: reason → count of samples dropped while this batch was assembled
            (corrupt mp4, bad json, ...); the consumer aggregates them so nothing is lost silently.
    """

    frames: torch.Tensor
    timestamps: torch.Tensor
    frame_mask: torch.Tensor
    questions: list[str]
    options: list[list[str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return self.frames.shape[0]

    def to(self, device: torch.device | str) -> VideoBatch:
        self.frames = self.frames.to(device)
        self.timestamps = self.timestamps.to(device)
        self.frame_mask = self.frame_mask.to(device)
        return self
