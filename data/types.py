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
            Empty, ``[B, 0, 0, 0, 3]``, when the batch carries cached ``features`` instead.
        timestamps: ``float [B, T]`` — presentation time of each sampled frame, seconds
            from the start of the clip.
        frame_mask: ``bool [B, T]`` — False marks padded frames: with variable-length
            sampling (``sample_policy="fps"``) shorter clips are padded to the batch's T by
            repeating their last frame (timestamps continue at the clip's frame step).
        questions: ``list[str]`` of length B.
        options: ``list[list[str]]`` — multiple-choice options (may be empty lists).
        answers: ``list[str]`` — reference answers ("" when unknown).
        keys: ``list[str]`` — WebDataset sample keys.
        meta: ``list[dict]`` — the rest of each sample's json.
        skipped: reason → count of samples dropped while this batch was assembled
            (corrupt mp4, bad json, ...); the consumer aggregates them so nothing is lost silently.
            Each DataLoader worker counts the skips of its own stream into the batches it
            builds, so summing ``skipped`` over batches sums over all workers.
        features: ``None`` for decoded video; for feature-cache shards (see
            ``tokensieve.data.features``) the cached frozen-backbone outputs, batched, with
            M the longest sample's token count (the cached frame times fill ``timestamps``
            and ``frame_mask``):
            ``tokens [B, M, D]`` (fp16/bf16), ``valid [B, M] bool``, ``positions long
            [3, B, M]`` (M-RoPE) or ``[B, M]``, ``frame_index long [B, M]``, ``grid long
            [B, 3]``, optional ``saliency`` / ``teacher_attention float [B, M]``, and the
            backbone's cache tensors as ``cache.<name>`` (``[B, ...]``) and
            ``cache_shared.<name>``. Each sample's string metadata (backbone, dtype,
            teacher layer ...) is in ``meta[b]["features"]``.
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
    features: dict[str, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.frames.shape[0]

    def to(self, device: torch.device | str) -> VideoBatch:
        self.frames = self.frames.to(device)
        self.timestamps = self.timestamps.to(device)
        self.frame_mask = self.frame_mask.to(device)
        if self.features is not None:
            self.features = {name: t.to(device) for name, t in self.features.items()}
        return self
