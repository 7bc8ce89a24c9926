"""tokensieve: train, distil, evaluate and export visual-token compressors for video LLMs.

The public API is resolved lazily so that ``import tokensieve.data`` does not pull in
Lightning or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "list_compressors": "tokensieve.models.compressors",
    "get_compressor": "tokensieve.models.compressors",
    "load_compressor": "tokensieve.models.compressors",
    "load_backbone": "tokensieve.models.backbones",
    "apply": "tokensieve.eval.fidelity",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, "load" if name == "load_backbone" else name)
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")
