"""Tiny backbones of every supported architecture, built once per session.

``family`` parametrises a test over the three adapters; ``backbone`` is the sdpa load and
``eager_backbone`` the eager one (for attention-weight references).
"""

from __future__ import annotations

import pytest

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


_DIRS: dict = {}


def tiny_dirs_for(tmp_path_factory, tiny_backbone_dir) -> dict:
    """family → saved tiny backbone folder, built once per session (shared with tests/eval)."""
    from tokensieve.models.backbones.tiny import make_tiny

    if not _DIRS:
        _DIRS["qwen2_5_vl"] = tiny_backbone_dir
        for family in FAMILIES[1:]:
            _DIRS[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    return _DIRS


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_backbone_dir):
    return tiny_dirs_for(tmp_path_factory, tiny_backbone_dir)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def backbone_dir(tiny_dirs, family):
    return tiny_dirs[family]


_CACHE: dict = {}


def _load(path, **kwargs):
    """Load once per (folder, kwargs) per session; callers must not mutate the result."""
    from tokensieve.models.backbones import load

    key = (str(path), tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = load(path, **kwargs)
    return _CACHE[key]


@pytest.fixture
def backbone(backbone_dir):
    return _load(backbone_dir, attn_implementation="sdpa")


@pytest.fixture
def eager_backbone(backbone_dir):
    return _load(backbone_dir, attn_implementation="eager")


_ENCODED: dict = {}


@pytest.fixture
def encoded(backbone):
    """``(batch, visual)`` for the default two-clip batch, encoded once per backbone (read-only)."""
    from tests.conftest import make_batch

    if id(backbone) not in _ENCODED:
        batch = make_batch()
        _ENCODED[id(backbone)] = (batch, backbone.encode_video(batch))
    return _ENCODED[id(backbone)]
