"""Reference benchmark: determinism, evidence → token mapping, shards, oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokensieve.eval.refbench.evidence import TokenGrid
from tokensieve.eval.refbench.generator import RefBenchConfig, make_sample, write_split
from tokensieve.eval.refbench.oracle import OracleSelect, evidence_of, evidence_recall
from tokensieve.eval.refbench.questions import QUESTION_TYPES
from tokensieve.eval.refbench.scene import COLORS
from tokensieve.models.budget import num_keep
from tokensieve.models.types import VisualTokens


def test_generator_is_deterministic():
    for i in (0, 5, 13):
        f1, r1 = make_sample(0, "test", i)
        f2, r2 = make_sample(0, "test", i)
        assert np.array_equal(f1, f2) and r1 == r2
    f3, r3 = make_sample(1, "test", 0)
    assert not np.array_equal(make_sample(0, "test", 0)[0], f3)
    assert not np.array_equal(make_sample(0, "train", 0)[0], make_sample(0, "test", 0)[0])


def test_question_mix_answers_and_evidence_budget():
    cfg = RefBenchConfig()
    records = [make_sample(0, "val", i, cfg)[1] for i in range(70)]
    assert {r["qtype"] for r in records} == set(QUESTION_TYPES)
    assert {r["answer"] for r in records} == {"A", "B", "C", "D"}
    for r in records:
        assert r["options"][("ABCD").index(r["answer"])] == r["answer_text"]
        assert 1 <= len(r["evidence_tokens"]) <= cfg.max_evidence_tokens <= num_keep(cfg.grid.num_tokens, 0.1)
        assert r["evidence_tokens"] == cfg.grid.evidence_tokens(r["evidence"])
        assert r["token_grid"] == [8, 4, 4] and r["num_tokens"] == 128
        assert all(f"({letter}) {opt}" in r["question"] for letter, opt in zip("ABCD", r["options"]))


def test_evidence_boxes_hold_the_target_colour():
    """The evidence boxes are where the answer is drawn: the target's colour is inside each one."""
    for i in range(21):
        frames, r = make_sample(0, "val", i)
        targets = [o for o in r["objects"] if o["role"] == "target"]
        for item in r["evidence"]:
            x0, y0, x1, y1 = item["box"]
            patch = frames[item["frame"], y0:y1, x0:x1].reshape(-1, 3).astype(int)
            colors = {(o["new_color"] if o["change_at"] is not None and item["frame"] >= o["change_at"] else o["color"]) for o in targets}
            assert any((np.abs(patch - np.array(COLORS[c])).max(1) == 0).sum() >= 20 for c in colors)


def test_direction_target_moves_inside_each_token_and_hops_cells():
    """Aligned direction questions: each temporal group's two frames show the object shifted the
    asked way inside one 28-px cell (one token sees the motion); consecutive groups hop a cell."""
    from tokensieve.eval.refbench.questions import DIRECTIONS
    from tokensieve.eval.refbench.scene import SceneObject

    axes = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    seen = set()
    for i in range(2, 7 * 12, 7):  # the direction samples of the type cycle
        _, r = make_sample(0, "val", i)
        assert r["qtype"] == "direction"
        (o,) = [o for o in r["objects"] if o["role"] == "target"]
        obj = SceneObject(**o)
        ux, uy = axes[r["answer_text"]]
        seen.add(r["answer_text"])
        for t in range(obj.start, obj.end, 2):
            a, b = obj.box(t), obj.box(t + 1)
            assert (b[0] - a[0]) * ux + (b[1] - a[1]) * uy >= 6  # drift the asked way within the group
            assert a[0] // 28 == (b[2] - 1) // 28 and a[1] // 28 == (b[3] - 1) // 28  # one cell in both frames
            if t + 2 < obj.end:
                c = obj.box(t + 2)
                assert ((c[0] - a[0]) * ux + (c[1] - a[1]) * uy) == 28  # next group: next cell
        assert len(r["evidence_tokens"]) == 2
    assert seen == set(DIRECTIONS)


def test_box_to_token_indices():
    grid = TokenGrid(frames=16, height=112, width=112)
    assert grid.shape == (8, 4, 4) and grid.cell == 28
    # frame 5 → temporal group 2; a box inside cell (row 1, col 2)
    assert grid.box_tokens(5, [60, 30, 80, 50]) == [2 * 16 + 1 * 4 + 2]
    # a box straddling rows 0–1 and columns 0–1 of frame 0
    assert grid.box_tokens(0, [20, 20, 40, 40]) == [0, 1, 4, 5]
    # the exclusive end: x1 = 28 stays in column 0
    assert grid.box_tokens(15, [0, 0, 28, 28]) == [7 * 16]
    assert grid.evidence_tokens([{"frame": 0, "box": [0, 0, 10, 10]}, {"frame": 1, "box": [0, 0, 10, 10]}]) == [0]
    with pytest.raises(ValueError):
        grid.box_tokens(0, [100, 0, 120, 10])


def test_evidence_tokens_match_the_backbone_patch_layout():
    """Pixels changed inside a box reach exactly the mapped tokens' merged patch rows."""
    from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor

    pre = QwenVisionPreprocessor()
    grid = TokenGrid(frames=16, height=112, width=112)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(16, 112, 112, 3), dtype=np.uint8)
    for frame, box in [(3, [30, 58, 50, 70]), (10, [0, 90, 112, 112]), (15, [84, 0, 112, 28])]:
        moved = base.copy()
        x0, y0, x1, y1 = box
        moved[frame, y0:y1, x0:x1] = 255 - moved[frame, y0:y1, x0:x1]
        a, thw = pre(torch.from_numpy(base))
        b, _ = pre(torch.from_numpy(moved))
        unit = pre.merge_size**2
        changed = (a != b).any(1).view(-1, unit).any(1).nonzero().squeeze(1).tolist()  # merged-token rows
        assert changed == grid.box_tokens(frame, box)
        assert (thw[0], thw[1] // 2, thw[2] // 2) == grid.shape


def test_mp4_round_trip_keeps_object_colours():
    from tokensieve.data.video import decode_frames, write_clip

    cfg = RefBenchConfig()
    for i in range(7):
        frames, r = make_sample(0, "val", i, cfg)
        decoded, _ = decode_frames(write_clip(frames, cfg.fps, crf=cfg.crf), cfg.frames, None)
        decoded = decoded.numpy().astype(int)
        for o in r["objects"]:
            for t in range(o["start"], o["end"]):
                dt = (t - o["start"]) // o["hop"] * o["hop"]
                x = int(round(o["x"] + o["vx"] * dt)) + o["size"] // 2
                y = int(round(o["y"] + o["vy"] * dt)) + o["size"] // 2
                color = o["new_color"] if o["change_at"] is not None and t >= o["change_at"] else o["color"]
                assert np.abs(decoded[t, y, x] - np.array(COLORS[color])).max() <= 40


def test_write_split_and_read_back(tmp_path):
    from tokensieve.data.reader import VideoShardDataset, make_loader

    summary = write_split(tmp_path, "test", 6, seed=0, maxcount=4, progress=False)
    assert summary["samples"] == 6 and sum(summary["shards"].values()) == 6
    assert json.loads((tmp_path / "test" / "sizes.json").read_text()) == summary["shards"]
    batch = next(iter(make_loader(VideoShardDataset(tmp_path / "test", num_frames=16, size=(112, 112)), 6)))
    assert batch.size == 6 and tuple(batch.frames.shape) == (6, 16, 112, 112, 3)
    _, record = make_sample(0, "test", 0)
    assert batch.meta[0]["evidence_tokens"] == record["evidence_tokens"] and batch.answers[0] == record["answer"]
    assert evidence_of(batch.meta)[0] == record["evidence_tokens"]


def test_write_split_parallel_workers_write_the_same_samples(tmp_path):
    """Same shards, keys and json; the mp4s decode to the same frames within a few levels
    (libx264's bytes depend on what the process encoded before, not only on the frames)."""
    import io
    import tarfile

    import av

    one = write_split(tmp_path / "one", "val", 5, seed=3, maxcount=2, progress=False)
    two = write_split(tmp_path / "two", "val", 5, seed=3, maxcount=2, progress=False, workers=2)
    assert one["shards"] == two["shards"] == {"refbench-000000.tar": 2, "refbench-000001.tar": 2, "refbench-000002.tar": 1}
    assert one["qtypes"] == two["qtypes"] and sum(one["qtypes"].values()) == 5

    def decode(data: bytes) -> np.ndarray:
        with av.open(io.BytesIO(data)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)

    for name in one["shards"]:
        with tarfile.open(tmp_path / "one" / "val" / name) as ta, tarfile.open(tmp_path / "two" / "val" / name) as tb:
            assert ta.getnames() == tb.getnames()
            for m in ta.getnames():
                a, b = ta.extractfile(m).read(), tb.extractfile(m).read()
                if m.endswith(".json"):
                    assert a == b, (name, m)
                else:
                    assert np.abs(decode(a) - decode(b)).max() <= 16, (name, m)


def test_cli_types_sets_the_training_mix_and_rejects_unknown_types(tmp_path, capsys):
    from tokensieve.eval.refbench.generator import main

    assert main(["--out", str(tmp_path), "--train", "6", "--val", "0", "--test", "0", "--types", "count,count,shape"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["types"] == ["count", "count", "shape"]
    assert summary["splits"]["train"]["qtypes"] == {"count": 4, "shape": 2}
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--train", "1", "--val", "0", "--test", "0", "--types", "count,colour"])
    err = capsys.readouterr().err
    assert "--types" in err and "'colour'" in err
    with pytest.raises(ValueError, match="RefBenchConfig.types"):
        RefBenchConfig(types=["color", "size"])


def _visual(b: int = 2, m: int = 128) -> VisualTokens:
    return VisualTokens(tokens=torch.randn(b, m, 8), valid=torch.ones(b, m, dtype=torch.bool), positions=torch.zeros(3, b, m, dtype=torch.long), frame_index=torch.zeros(b, m, dtype=torch.long), grid=(8, 4, 4))


def test_oracle_keeps_evidence_and_fills_the_budget():
    visual = _visual()
    evidence = [[3, 40, 41, 127], list(range(20))]
    oracle = OracleSelect().set_evidence(evidence)
    sel = oracle(visual, budget=0.1)
    kept0 = set(sel.index[0][sel.valid[0]].tolist()) if sel.valid is not None else set(sel.index[0].tolist())
    assert set(evidence[0]) <= kept0 and len(kept0) == num_keep(128, 0.1)
    assert int(sel.num_kept[1]) == 20  # evidence larger than the budget is never cut
    assert evidence_recall(sel, evidence) == [1.0, 1.0]
    assert torch.all(sel.index[:, 1:] >= sel.index[:, :-1])
    with pytest.raises(ValueError):
        OracleSelect()(visual, budget=0.1)


def test_evidence_recall_counts_kept_evidence():
    from tokensieve.models.compressors import get_compressor

    visual = _visual(1)
    sel = get_compressor("uniform")(visual, budget=0.25)  # every 4th token: 1, 5, 9, ...
    kept = set(sel.index[0].tolist())
    ev = [[1, 2, 3, 5]]
    assert evidence_recall(sel, ev) == [sum(i in kept for i in ev[0]) / 4]
    assert evidence_recall(sel, [[]]) == [None]


def test_question_words_cover_every_question_and_option():
    import re

    from tokensieve.eval.refbench.questions import question_words

    words = set(question_words())
    for i in range(35):
        _, r = make_sample(0, "test", i)
        assert {w for w in re.findall(r" ?[A-Za-z]+", r["question"]) if len(w.strip()) > 1} <= words
    assert {" red", " circle", " left", " four", "What"} <= words and " A" not in words
