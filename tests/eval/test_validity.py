"""Validity bars of the reference benchmark, on the shipped teacher and a fixed test subset.

If these fail, the benchmark has lost its power to tell compressors apart: change the design
(clutter, object size, question mix) and retrain the teacher — never the bars.
"""

from __future__ import annotations

import pytest
import torch

from tokensieve.data.types import VideoBatch
from tokensieve.eval.refbench import TEACHER_DIR
from tokensieve.eval.refbench.generator import RefBenchConfig, make_sample
from tokensieve.eval.refbench.oracle import OracleSelect, evidence_of

N_SAMPLES = 224  # the first 224 test-split samples (seed 0): 32 of each of the 7 question types
BATCH = 32


def _batches(n: int = N_SAMPLES) -> list[VideoBatch]:
    """Test-split samples through the same mp4 round trip as the shards."""
    from tokensieve.data.video import decode_frames, write_clip

    cfg = RefBenchConfig()
    out = []
    for start in range(0, n, BATCH):
        frames, records = [], []
        for i in range(start, min(n, start + BATCH)):
            f, r = make_sample(0, "test", i, cfg)
            decoded, _ = decode_frames(write_clip(f, cfg.fps, crf=cfg.crf), cfg.frames, None)
            frames.append(decoded)
            records.append(r)
        out.append(
            VideoBatch(
                frames=torch.stack(frames),
                timestamps=(torch.arange(cfg.frames, dtype=torch.float32) / cfg.fps).expand(len(records), -1).clone(),
                frame_mask=torch.ones(len(records), cfg.frames, dtype=torch.bool),
                questions=[r["question"] for r in records],
                options=[r["options"] for r in records],
                answers=[r["answer"] for r in records],
                meta=records,
            )
        )
    return out


@pytest.fixture(scope="module")
def accuracies():
    from tokensieve.eval.harness import letter_ids
    from tokensieve.models.backbones import load
    from tokensieve.models.compressors import get_compressor

    assert (TEACHER_DIR / "model.safetensors").is_file(), "the reference teacher is not shipped"
    backbone = load(TEACHER_DIR)
    letters = letter_ids(backbone.tokenizer)
    rand, oracle = get_compressor("random"), OracleSelect()
    hits = {"full": 0, "random": 0, "oracle": 0}
    n = 0
    with torch.no_grad():
        for batch in _batches():
            truth = torch.tensor(["ABCD".index(a) for a in batch.answers])
            visual = backbone.encode_video(batch)
            for name, sel in (("full", None), ("random", rand(visual, budget=0.1)), ("oracle", oracle.set_evidence(evidence_of(batch.meta))(visual, budget=0.1))):
                pred = backbone(batch, visual, sel)[:, letters].argmax(-1)
                hits[name] += int((pred == truth).sum())
            n += batch.size
    return {k: v / n for k, v in hits.items()}


TEACHER_TARGET = 0.95  # issue 6: the reference teacher's accuracy with all tokens


def test_teacher_is_accurate_with_all_tokens(accuracies):
    """Issue 6's target for the shipped teacher: >= 95 % with all tokens (96.2 % on all 1024 test clips)."""
    assert accuracies["full"] >= TEACHER_TARGET, accuracies


def test_teacher_is_well_above_chance(accuracies):
    """The bars below are only meaningful on a teacher that reads the video at all."""
    assert accuracies["full"] >= 0.45, accuracies


def test_random_at_10_percent_loses_20_points(accuracies):
    assert accuracies["full"] - accuracies["random"] >= 0.20, accuracies


def test_oracle_at_10_percent_keeps_98_percent_of_full(accuracies):
    assert accuracies["oracle"] >= 0.98 * accuracies["full"], accuracies
