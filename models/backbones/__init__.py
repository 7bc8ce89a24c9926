"""Frozen VLM adapters. ``load(name_or_path)`` picks the adapter from the config's ``model_type``.

Supported: ``qwen2_5_vl`` (Qwen2.5-VL), ``qwen2_vl`` (Qwen2-VL), ``llava_onevision``
(LLaVA-OneVision and LLaVA-Video checkpoints in that class).
"""

from __future__ import annotations

from pathlib import Path

from tokensieve.models.backbones.base import Backbone

# model_type (config.json) → "module:Class"; imported lazily so one backbone's deps don't load the others
ADAPTERS = {
    "qwen2_5_vl": "tokensieve.models.backbones.qwen2_5_vl:Qwen25VLBackbone",
    "qwen2_vl": "tokensieve.models.backbones.qwen2_vl:Qwen2VLBackbone",
    "llava_onevision": "tokensieve.models.backbones.llava_onevision:LlavaOnevisionBackbone",
}


def adapter_class(model_type: str, source: str | Path = "config") -> type[Backbone]:
    """The adapter class for a ``model_type``.

    Raises:
        ValueError: no adapter for ``model_type`` (the message names ``source`` and lists those supported).
    """
    import importlib

    target = ADAPTERS.get(model_type)
    if target is None:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def load(name_or_path: str | Path, **kwargs) -> Backbone:
    """Load a frozen backbone from a local folder or hub id (``from_pretrained`` underneath).

    Keyword arguments (``dtype``, ``attn_implementation``, ``revision``, ``reference_layer``)
    pass through to the adapter.

    Raises:
        ValueError: the config's ``model_type`` has no adapter (the message lists those supported).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path), revision=kwargs.get("revision"))
    return adapter_class(config.model_type, name_or_path).from_pretrained(name_or_path, **kwargs)


__all__ = ["ADAPTERS", "Backbone", "adapter_class", "load"]
