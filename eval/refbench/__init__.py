"""Reference benchmark: procedural video QA with ground-truth evidence, a trained teacher, an oracle.

- :mod:`~tokensieve.eval.refbench.generator` — clips + questions + evidence → WebDataset shards;
- :mod:`~tokensieve.eval.refbench.evidence` — pixel boxes → visual-token indices;
- :mod:`~tokensieve.eval.refbench.oracle` — the compressor that keeps the evidence tokens;
- ``teacher/`` — the shipped reference teacher (see :func:`teacher_path`).
"""

from __future__ import annotations

from pathlib import Path

TEACHER_DIR = Path(__file__).resolve().parent / "teacher"


def teacher_path() -> Path:
    """Folder of the shipped reference teacher (a Qwen2.5-VL checkpoint ``load()`` opens).

    Raises:
        FileNotFoundError: the weights are not there (train them with
            ``tokensieve fit --config recipes/tiny/refbench_teacher.yaml``).
    """
    if not (TEACHER_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no reference teacher in {TEACHER_DIR}; train it: tokensieve fit --config recipes/tiny/refbench_teacher.yaml")
    return TEACHER_DIR
