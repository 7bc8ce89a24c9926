"""``tokensieve bench-data``: runs end to end and writes what it measured as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokensieve.cli import main
from tokensieve.data.shards import write_shards
from tokensieve.data.video import write_clip


@pytest.fixture
def shards(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        (videos / f"{name}.mp4").write_bytes(write_clip(np.zeros((20, 32, 32, 3), np.uint8), fps=10))
    write_shards(videos, tmp_path / "shards", clip_seconds=1.0, maxcount=1, cut="reencode", progress=False)
    return tmp_path / "shards"


def test_bench_data_reader_only(shards, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench-data", "--shards", str(shards), "--work", str(tmp_path / "work"), "--out", str(out), "--num-frames", "4",
            "--size", "28", "28", "--workers", "0,2", "--repeats", "1", "--passes", "1", "--train-steps", "0"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 4 and result["raw_decode"]["frames_per_s"] > 0
    assert [(r["workers"], r["threads"]) for r in result["reader"] if r["backend"] == "pyav"] == [(0, None), (2, None), (2, 2)]
    assert all(r["skipped"] == 0 and r["ratio_to_raw"] > 0 for r in result["reader"])
    assert {"cpu_count", "loadavg_start", "loadavg_end"} <= set(result["conditions"])
    assert "raw decode" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_data_training_raw_vs_cached(shards, tmp_path):
    out = tmp_path / "bench.json"
    main(["bench-data", "--shards", str(shards), "--work", str(tmp_path / "work"), "--out", str(out), "--num-frames", "4",
          "--size", "56", "56", "--workers", "0", "--repeats", "1", "--passes", "1", "--train-steps", "3"])
    result = json.loads(out.read_text())
    assert result["train_raw"]["steps"] == 3 and result["train_cached"]["steps"] == 3
    assert result["cached_speedup"] > 0
