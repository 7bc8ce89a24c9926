"""tokensieve.data.reader: streaming shards into VideoBatch, and surviving bad data."""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tokensieve.data.reader import (
    SkipCounter,
    VideoShardDataset,
    collate_videos,
    expand_urls,
    make_loader,
    skip_record,
)
from tokensieve.data.shards import CAPTION_PROMPT, write_shards
from tokensieve.data.types import VideoBatch
from tokensieve.data.video import write_clip


def clip_bytes(level: int = 100, num_frames: int = 8, size: int = 64) -> bytes:
    return write_clip(np.full((num_frames, size, size, 3), level, np.uint8), fps=8)


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def good(key: str, level: int = 100, **record) -> dict:
    record = {"question": f"q-{key}", "options": ["a", "b"], "answer": "a", "source": f"{key}.mp4", **record}
    return {"__key__": key, "mp4": clip_bytes(level), "json": json.dumps(record).encode()}


def read_all(dataset, batch_size: int = 3, num_workers: int = 0) -> tuple[list[VideoBatch], SkipCounter]:
    skips = SkipCounter()
    batches = [skips.add(batch) for batch in make_loader(dataset, batch_size, num_workers)]
    return batches, skips


def keys_of(batches: list[VideoBatch]) -> list[str]:
    return [key for batch in batches for key in batch.keys]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """Six synthetic clips written by the shard writer into three shards."""
    root = tmp_path_factory.mktemp("reader")
    videos = root / "videos"
    videos.mkdir()
    for name, frames in (("one", 20), ("two", 20), ("three", 20)):
        levels = np.linspace(0, 200, frames).astype(np.uint8)
        clip = np.broadcast_to(levels[:, None, None, None], (frames, 32, 48, 3)).copy()
        (videos / f"{name}.mp4").write_bytes(write_clip(clip, fps=10))
    summary = write_shards(videos, root / "shards", clip_seconds=1.0, maxcount=2, progress=False)
    keys = [f"{name}_{i:04d}" for name in ("one", "three", "two") for i in range(2)]
    assert summary["samples_written"] == len(keys)
    return root / "shards", keys


def test_writer_to_reader_round_trip(shard_dir):
    folder, keys = shard_dir
    dataset = VideoShardDataset(folder, num_frames=4, size=(16, 24))
    batches, skips = read_all(dataset, batch_size=4)
    assert sorted(keys_of(batches)) == sorted(keys)  # every sample exactly once
    assert skips.total() == 0
    batch = batches[0]
    assert batch.frames.shape == (4, 4, 16, 24, 3) and batch.frames.dtype == torch.uint8
    assert batch.timestamps.shape == (4, 4) and batch.timestamps.dtype == torch.float32
    assert batch.frame_mask.all() and batch.frame_mask.shape == (4, 4)
    assert torch.all(batch.timestamps[:, 1:] > batch.timestamps[:, :-1])
    levels = batch.frames.float().mean(dim=(2, 3, 4))  # the synthetic clips brighten over time
    assert torch.all(levels[:, 1:] > levels[:, :-1])
    assert batch.questions[0] and batch.answers[0] == "" and batch.options[0] == []
    assert batch.meta[0]["source"] in {"one.mp4", "two.mp4", "three.mp4"}
    assert "question" not in batch.meta[0]


def test_round_trip_with_two_workers(shard_dir):
    folder, keys = shard_dir
    dataset = VideoShardDataset(str(folder / "clips-{000000..000002}.tar"), num_frames=2, size=(16, 16))
    batches, skips = read_all(dataset, batch_size=2, num_workers=2)
    seen = keys_of(batches)
    assert len(seen) == len(keys) and sorted(seen) == sorted(keys)
    assert skips.total() == 0


def test_shuffling_is_seeded_by_seed_and_epoch(shard_dir):
    folder, keys = shard_dir

    def order(seed, epoch):
        dataset = VideoShardDataset(folder, 2, (16, 16), shuffle_buffer=10, seed=seed)
        dataset.set_epoch(epoch)
        return keys_of(read_all(dataset, batch_size=6)[0])

    first = order(seed=1, epoch=0)
    assert sorted(first) == sorted(keys)
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first


def test_jitter_is_reproducible_per_epoch(shard_dir):
    folder, _ = shard_dir

    def stamps(epoch):
        dataset = VideoShardDataset(folder, 3, (16, 16), sample_policy="jitter", seed=5)
        dataset.set_epoch(epoch)
        return torch.cat([b.timestamps for b in read_all(dataset, batch_size=6)[0]])

    assert torch.equal(stamps(0), stamps(0))
    assert not torch.equal(stamps(0), stamps(1))


def test_corrupt_videos_are_skipped_and_counted(tmp_path):
    whole = clip_bytes()
    shard = write_tar(
        tmp_path / "mixed.tar",
        [
            good("ok_a"),
            {"__key__": "random_bytes", "mp4": np.random.default_rng(0).bytes(4000), "json": b"{}"},
            {"__key__": "truncated", "mp4": whole[: len(whole) // 2], "json": b"{}"},
            good("ok_b"),
        ],
    )
    batches, skips = read_all(VideoShardDataset(shard, 4, (32, 32)), batch_size=4)
    assert keys_of(batches) == ["ok_a", "ok_b"]
    assert skips == Counter({"corrupt_video": 2})
    assert batches[0].questions == ["q-ok_a", "q-ok_b"] and batches[0].options[1] == ["a", "b"]


def test_bad_json_and_missing_mp4_are_skipped_and_counted(tmp_path):
    shard = write_tar(
        tmp_path / "json.tar",
        [
            {"__key__": "unparseable", "mp4": clip_bytes(), "json": b"{not json"},
            {"__key__": "not_object", "mp4": clip_bytes(), "json": b"[1, 2]"},
            {"__key__": "bad_options", "mp4": clip_bytes(), "json": b'{"options": "a,b"}'},
            {"__key__": "no_video", "json": b'{"question": "q"}'},
            good("fine"),
            {"__key__": "caption_only", "mp4": clip_bytes(), "txt": b"a gray square"},
        ],
    )
    batches, skips = read_all(VideoShardDataset(shard, 2, (16, 16)), batch_size=10)
    assert skips == Counter({"bad_json": 3, "missing_field": 1})
    assert batches[0].keys == ["fine", "caption_only"]
    assert batches[0].meta[1] == {"caption": "a gray square"}
    # no question: the caption makes it a captioning sample
    assert batches[0].questions[1] == CAPTION_PROMPT and batches[0].answers[1] == "a gray square"


class _Touch:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("extension", ["pth", "pkl", "pyd"])
def test_pickle_members_are_refused_never_loaded(tmp_path, extension):
    canary = tmp_path / f"unpickled-{extension}"
    payload = pickle.dumps(_Touch(canary))
    sample = {"__key__": "evil", "mp4": clip_bytes(), "json": b"{}", extension: payload}
    shard = write_tar(tmp_path / "pickle.tar", [sample, good("fine")])
    batches, skips = read_all(VideoShardDataset(shard, 2, (16, 16)))
    assert skips == Counter({"pickle_refused": 1})
    assert keys_of(batches) == ["fine"]
    assert not canary.exists()


def test_unreadable_shards_are_counted_and_the_rest_read(tmp_path):
    write_tar(tmp_path / "a-good.tar", [good("x"), good("y")])
    (tmp_path / "b-garbage.tar").write_bytes(np.random.default_rng(1).bytes(3000))
    dataset = VideoShardDataset([tmp_path, tmp_path / "c-missing.tar"], 2, (16, 16))
    batches, skips = read_all(dataset)
    assert keys_of(batches) == ["x", "y"]
    assert skips == Counter({"unreadable_shard": 2})


def test_all_skipped_batch_is_empty_with_the_frame_shape(tmp_path):
    shard = write_tar(tmp_path / "bad.tar", [{"__key__": f"k{i}", "json": b"{}"} for i in range(3)])
    batches, skips = read_all(VideoShardDataset(shard, 4, (8, 12)), batch_size=3)
    assert len(batches) == 1
    assert batches[0].size == 0 and batches[0].frames.shape == (0, 4, 8, 12, 3)
    assert batches[0].timestamps.shape == (0, 4) and batches[0].questions == []
    assert skips == Counter({"missing_field": 3})
    assert collate_videos([]).frames.shape == (0, 0, 0, 0, 3)


def test_collate_refuses_mixed_frame_shapes():
    a = {"__key__": "a", "frames": torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "timestamps": torch.zeros(2)}
    b = {**a, "__key__": "b", "frames": torch.zeros(2, 6, 4, 3, dtype=torch.uint8)}
    for sample in (a, b):
        sample.update(question="", options=[], answer="", meta={})
    with pytest.raises(ValueError, match="'a', 'b'"):
        collate_videos([a, b, skip_record("bad_json", "c")])


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    dataset = VideoShardDataset(write_tar(tmp_path / "x.tar", [good("x")]), 2, (8, 8))
    with caplog.at_level(logging.WARNING, logger="tokensieve.data.reader"):
        for i in range(250):
            assert dataset.decode_sample({"__key__": f"k{i}", "mp4": b"", "pkl": b""}) == skip_record(
                "pickle_refused", f"k{i}"
            )
    assert len(caplog.records) == 3  # skips 1, 101 and 201


def test_epoch_length_repeats_shards(tmp_path):
    shard = write_tar(tmp_path / "small.tar", [good("a"), good("b"), good("c")])
    batches, _ = read_all(VideoShardDataset(shard, 2, (8, 8), epoch_length=7), batch_size=4)
    assert keys_of(batches) == ["a", "b", "c", "a", "b", "c", "a"]
    resampled = VideoShardDataset(shard, 2, (8, 8), resampled=True, epoch_length=5)
    keys = keys_of(read_all(resampled, batch_size=5)[0])
    assert len(keys) == 5 and set(keys) <= {"a", "b", "c"}


def test_expand_urls(tmp_path):
    for name in ("s-000001.tar", "s-000000.tar"):
        write_tar(tmp_path / name, [good("a")])
    assert expand_urls(tmp_path) == [str(tmp_path / "s-000000.tar"), str(tmp_path / "s-000001.tar")]
    assert expand_urls(f"{tmp_path}/s-{{000000..000002}}.tar")[-1] == f"{tmp_path}/s-000002.tar"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.tar shards"):
        VideoShardDataset(tmp_path / "empty", 2, (8, 8))
