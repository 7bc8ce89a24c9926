"""Frozen VLM adapters. ``load(name_or_path)`` picks the adapter from the config's ``model_type``."""

from __future__ import annotations

from pathlib import Path

from tokensieve.models.backbones.base import Backbone

# model_type (config.json) → "module:Class"; imported lazily so one backbone's deps don't load the others
ADAPTERS = {
    "qwen2_5_vl": "tokensieve.models.backbones.qwen2_5_vl:Qwen25VLBackbone",
}


def load(name_or_path: str | Path, **kwargs) -> Backbone:
    """Load a frozen backbone from a local folder or hub id (``from_pretrained`` underneath).

    Keyword arguments (``dtype``, ``attn_implementation``, ``revision``, ``reference_layer``)
    pass through to the adapter.

    Raises:
        ValueError: the config's ``model_type`` has no adapter (the message lists those supported).
    """
    import importlib

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path), revision=kwargs.get("revision"))
    target = ADAPTERS.get(config.model_type)
    if target is None:
        raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls).from_pretrained(name_or_path, **kwargs)


__all__ = ["ADAPTERS", "Backbone", "load"]
