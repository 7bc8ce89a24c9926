"""Compressors: training-free baselines and learned selectors, under one interface.

``REGISTRY`` maps a method name to its class. Only finished methods are registered.
"""

from __future__ import annotations

from pathlib import Path

from tokensieve.models.compressors.base import (
    Compressor,
    LearnedCompressor,
    read_method_name,
    select_topk,
    selection_from_indices,
)
from tokensieve.models.compressors.divprune import DivPrune
from tokensieve.models.compressors.dycoke import DyCoke
from tokensieve.models.compressors.evs import EVS
from tokensieve.models.compressors.fastv import FastV
from tokensieve.models.compressors.fastvid import FastVID
from tokensieve.models.compressors.flexselect import FlexSelect
from tokensieve.models.compressors.grpo import GRPOSelector
from tokensieve.models.compressors.holitom import HoliTom
from tokensieve.models.compressors.llava_scissor import LLaVAScissor
from tokensieve.models.compressors.matryoshka import Matryoshka
from tokensieve.models.compressors.pool import Pool
from tokensieve.models.compressors.prunevid import PruneVid
from tokensieve.models.compressors.qtsplus import QTSplus
from tokensieve.models.compressors.random import RandomSelect
from tokensieve.models.compressors.tome import ToMe
from tokensieve.models.compressors.uniform import UniformSelect
from tokensieve.models.compressors.visionzip import VisionZip
from tokensieve.models.compressors.vqtoken import VQToken

REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (UniformSelect, RandomSelect, Pool, DivPrune, EVS, ToMe, DyCoke, VisionZip, FastVID, HoliTom, PruneVid, LLaVAScissor, FastV,
                FlexSelect, QTSplus, Matryoshka, VQToken, GRPOSelector)
}


def list_compressors() -> list[str]:
    """Registered method names, sorted."""
    return sorted(REGISTRY)


def get_compressor(name: str, **kwargs) -> Compressor:
    """Instantiate a registered compressor by name.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown compressor {name!r}; registered: {', '.join(list_compressors())}")
    return REGISTRY[name](**kwargs)


def load_compressor(path_or_id: str | Path, map_location: str = "cpu") -> Compressor:
    """Load an exported compressor folder (``config.json`` + ``model.safetensors``).

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        KeyError: the folder names an unregistered method.
        TypeError: the method is training-free (nothing to load).
    """
    path = Path(path_or_id)
    if path.exists():
        method = read_method_name(path)
    else:  # a hub repo id: fetch only config.json first
        from huggingface_hub import hf_hub_download

        method = read_method_name(Path(hf_hub_download(str(path_or_id), "config.json")).parent)
    cls = REGISTRY.get(method)
    if cls is None:
        raise KeyError(f"{path_or_id}: method {method!r} is not registered; registered: {', '.join(list_compressors())}")
    if not issubclass(cls, LearnedCompressor):
        raise TypeError(f"{path_or_id}: method {method!r} is training-free; use get_compressor({method!r})")
    return cls.load(path_or_id, map_location=map_location)


__all__ = [
    "REGISTRY",
    "Compressor",
    "DivPrune",
    "DyCoke",
    "EVS",
    "FastV",
    "FastVID",
    "FlexSelect",
    "GRPOSelector",
    "HoliTom",
    "LLaVAScissor",
    "LearnedCompressor",
    "Matryoshka",
    "Pool",
    "PruneVid",
    "QTSplus",
    "RandomSelect",
    "ToMe",
    "UniformSelect",
    "VisionZip",
    "VQToken",
    "get_compressor",
    "list_compressors",
    "load_compressor",
    "select_topk",
    "selection_from_indices",
]
