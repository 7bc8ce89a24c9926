"""Cached frozen-backbone outputs (``VideoBatch.features``) → ``VisualTokens`` / ``TeacherSignals``.

The inverse of what ``tokensieve.train.cache_features`` stores (format:
:mod:`tokensieve.data.features`). A batch read from feature-cache shards then goes through
the backbone's text side (``embed_query``, ``forward``, ``teacher_signals``) exactly like a
freshly encoded one: the cached ``cache.*`` entries are the backbone's own
``VisualTokens.cache``, so the LLM sequence (M-RoPE positions, chat template) is rebuilt
identically.
"""

from __future__ import annotations

import json

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.types import TeacherSignals, VisualTokens


def has_features(batch: VideoBatch) -> bool:
    """Whether ``batch`` came from feature-cache shards."""
    return getattr(batch, "features", None) is not None


def _info(batch: VideoBatch) -> list[dict]:
    return [dict((m or {}).get("features") or {}) for m in batch.meta] or [{}]


def visual_from_features(batch: VideoBatch, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> VisualTokens:
    """Rebuild the ``VisualTokens`` that ``encode_video`` returned when the cache was written.

    Args:
        batch: a batch with ``features`` (see :class:`~tokensieve.data.types.VideoBatch`).
        dtype: dtype for ``tokens`` (the backbone's; the cache holds fp16/bf16).
        device: where the tensors go (default: where they are).

    Returns:
        VisualTokens with ``tokens [B, M, D]``, ``valid [B, M]`` (False at padding when
        samples have different M), ``positions``, ``frame_index``, ``grid`` (the first
        sample's), ``saliency`` when cached, and ``cache`` = the backbone's cache entries.

    Raises:
        ValueError: the batch has no features.
    """
    if not has_features(batch):
        raise ValueError("batch carries no cached features (VideoBatch.features is None)")
    f = batch.features

    def move(t: torch.Tensor) -> torch.Tensor:
        return t if device is None else t.to(device)

    tokens = f["tokens"] if dtype is None else f["tokens"].to(dtype)
    cache: dict = {}
    cache_json = _info(batch)[0].get("cache_json")
    if cache_json:
        cache.update(json.loads(cache_json))
    for name, value in f.items():
        if name.startswith("cache."):
            cache[name[len("cache.") :]] = value
        elif name.startswith("cache_shared."):
            cache[name[len("cache_shared.") :]] = value
    return VisualTokens(
        tokens=move(tokens),
        valid=move(f["valid"]),
        positions=move(f["positions"]),
        frame_index=move(f["frame_index"]),
        grid=tuple(int(x) for x in f["grid"][0].tolist()),
        saliency=move(f["saliency"]) if "saliency" in f else None,
        cache=cache,
    )


def cached_teacher(batch: VideoBatch) -> tuple[int, str] | None:
    """``(layer, reduction)`` of the cached teacher attention, or None when the batch has none
    (or its samples were cached with different settings)."""
    if not has_features(batch) or "teacher_attention" not in batch.features:
        return None
    settings = {(i.get("teacher_layer"), i.get("teacher_reduction")) for i in _info(batch)}
    if len(settings) != 1:
        return None
    layer, reduction = settings.pop()
    if layer is None or reduction is None:
        return None
    return int(layer), str(reduction)


def teacher_from_features(
    batch: VideoBatch, layer: int | None, reduction: str = "max", with_logits: bool = True, with_hidden: bool = False, **other
) -> TeacherSignals | None:
    """The cached teacher signals when they answer the request, else ``None`` (compute fresh).

    They answer it when the batch has ``teacher_attention`` cached at ``layer`` with
    ``reduction`` and neither logits nor hidden states are asked for (only the attention is
    cached), nor any other teacher option. ``layer`` must be resolved (an int), not ``None``.
    """
    cached = cached_teacher(batch)
    if cached is None or with_logits or with_hidden or other or layer is None or cached != (int(layer), reduction):
        return None
    return TeacherSignals(attention=batch.features["teacher_attention"].float())
