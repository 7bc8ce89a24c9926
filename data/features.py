"""Feature-cache shards: the format of cached visual tokens (the job that writes them is
``tokensieve.train.cache_features``; the reader streams them like video shards).

A feature-cache sample is two tar members with the key of the raw sample it came from::

    {key}.safetensors   the tensors below (safetensors bytes — never pickle)
    {key}.json          the raw sample's json (question, options, answer, ...)

Tensors of one sample (M visual tokens, T sampled frames, D the LLM's hidden size):

=========================  =====================  ==========================================
name                       shape / dtype          what
=========================  =====================  ==========================================
``tokens``                 ``[M, D]`` fp16/bf16   visual tokens after the projector / merger
``positions``              ``[3, M]`` or ``[M]``  the backbone's position ids (M-RoPE or 1-D)
``frame_index``            ``[M]`` long           frame group of each token
``grid``                   ``[3]`` long           ``(t, h, w)`` token grid
``timestamps``             ``[T]`` float32        seconds of the sampled frames
``saliency``               ``[M]`` float32        optional: vision-tower attention received
``teacher_attention``      ``[M]`` float32        optional: text→video attention at a layer
``cache.<name>``           per sample             the backbone's ``VisualTokens.cache`` tensors
                                                  whose first dim was the batch (e.g.
                                                  ``cache.grid_thw [3]``,
                                                  ``cache.second_per_grid_ts []``)
``cache_shared.<name>``    any                    other cache tensors, stored whole
=========================  =====================  ==========================================

The safetensors header metadata (strings) says ``format`` (:data:`FEATURE_FORMAT`),
``backbone``, ``revision``, ``dtype``, ``teacher_layer`` and ``teacher_reduction`` (when
``teacher_attention`` is present), ``cache_json`` (the non-tensor cache entries, JSON), and
how frames were sampled (``num_frames``, ``size``, ``sample_policy``).
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FEATURE_FORMAT = "tokensieve.features/1"
FEATURE_EXTENSION = "safetensors"
TOKEN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

REQUIRED = ("tokens", "positions", "frame_index", "grid", "timestamps")


def encode_features(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """One sample's tensors + string metadata as safetensors bytes (tensors made contiguous, on CPU)."""
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"format": FEATURE_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    return save_safetensors(clean, metadata=meta)


def feature_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header is JSON: no pickle, no tensor read).

    Raises:
        ValueError: not safetensors bytes.
    """
    if len(data) < 8:
        raise ValueError("too short for safetensors")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if length > len(data) - 8:
        raise ValueError("safetensors header longer than the data")
    header = json.loads(bytes(data[8 : 8 + length]))
    return dict(header.get("__metadata__") or {})


def decode_features(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Safetensors bytes → ``(tensors, metadata)``.

    Raises:
        ValueError: unreadable bytes, a foreign format, or a required tensor missing
            (:data:`REQUIRED`).
    """
    try:
        metadata = feature_metadata(data)
        tensors = load_safetensors(bytes(data))
    except Exception as exn:  # safetensors raises its own SafetensorError
        raise ValueError(f"unreadable safetensors ({exn})") from exn
    if metadata.get("format") != FEATURE_FORMAT:
        raise ValueError(f"not a tokensieve feature sample (format {metadata.get('format')!r})")
    missing = [name for name in REQUIRED if name not in tensors]
    if missing:
        raise ValueError(f"feature sample lacks {missing}")
    return tensors, metadata


def _pad_stack(items: list[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    """Stack tensors after zero-padding dimension ``dim`` to ``length``."""
    out = []
    for t in items:
        pad = length - t.shape[dim]
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
        out.append(t)
    return torch.stack(out)


def collate_features(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample feature dicts → batched tensors, padding the token axis to the longest M.

    Returns a dict with ``tokens [B, M, D]``, ``valid [B, M] bool``, ``positions [3, B, M]``
    (M-RoPE) or ``[B, M]``, ``frame_index [B, M]``, ``grid [B, 3]``, ``timestamps [B, T]``
    and ``frame_mask [B, T]`` (padded with the last time, False there), optional
    ``saliency`` / ``teacher_attention [B, M]`` (0 at padding; present only when every
    sample has them), ``cache.<name>`` stacked to ``[B, ...]``, and ``cache_shared.<name>``
    from the first sample.

    Raises:
        ValueError: samples with different hidden sizes, position layouts or cache entries.
    """
    if not samples:
        return {}
    lengths = [s["tokens"].shape[0] for s in samples]
    m = max(lengths)
    dims = {tuple(s["tokens"].shape[1:]) for s in samples}
    if len(dims) > 1:
        raise ValueError(f"cannot batch feature samples with token shapes {sorted(dims)}")
    out: dict[str, torch.Tensor] = {
        "tokens": _pad_stack([s["tokens"] for s in samples], m, 0),
        "valid": torch.stack([torch.arange(m) < n for n in lengths]),
        "frame_index": _pad_stack([s["frame_index"].long() for s in samples], m, 0),
        "grid": torch.stack([s["grid"].long() for s in samples]),
    }
    positions = [s["positions"].long() for s in samples]
    if len({p.dim() for p in positions}) > 1:
        raise ValueError("cannot batch feature samples with different position layouts")
    out["positions"] = _pad_stack(positions, m, positions[0].dim() - 1)
    if out["positions"].dim() == 3:  # [B, 3, M] -> [3, B, M]
        out["positions"] = out["positions"].transpose(0, 1).contiguous()
    t = max(s["timestamps"].shape[0] for s in samples)
    stamps, masks = [], []
    for s in samples:
        ts = s["timestamps"].float()
        n = ts.shape[0]
        if n < t:
            last = ts[-1:] if n else torch.zeros(1)
            ts = torch.cat([ts, last.expand(t - n)])
        stamps.append(ts)
        masks.append(torch.arange(t) < n)
    out["timestamps"], out["frame_mask"] = torch.stack(stamps), torch.stack(masks)
    for name in ("saliency", "teacher_attention"):
        if all(name in s for s in samples):
            out[name] = _pad_stack([s[name].float() for s in samples], m, 0)
    names = {k for k in samples[0] if k.startswith("cache.")}
    for s in samples[1:]:
        if {k for k in s if k.startswith("cache.")} != names:
            raise ValueError("cannot batch feature samples with different backbone cache entries")
    for name in sorted(names):
        out[name] = torch.stack([s[name] for s in samples])
    for name in (k for k in samples[0] if k.startswith("cache_shared.")):
        out[name] = samples[0][name]
    return out
