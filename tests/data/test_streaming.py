"""Cluster-scale streaming: ranks and workers, epochs, weighted sources, robustness, video2dataset."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tokensieve.data.reader import (
    ShardSplitError,
    SkipCounter,
    VideoShardDataset,
    collate_videos,
    make_loader,
    parse_sources,
    shard_sizes,
)
from tokensieve.data.shards import CAPTION_PROMPT, default_question
from tokensieve.data.video import QwenResize, write_clip

CLIP = write_clip(np.linspace(0, 200, 6).astype(np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3), fps=6)


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def sample(key: str, data: bytes = CLIP, **record) -> dict:
    return {"__key__": key, "mp4": data, "json": json.dumps({"question": f"q-{key}", **record}).encode()}


def make_shards(folder: Path, name: str, shards: int, per_shard: int, sizes: bool = True) -> list[str]:
    """``shards`` tar files of ``per_shard`` clips each; keys ``{name}{shard}_{i}``; sizes.json beside."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        items = [sample(f"{name}{s}_{i}") for i in range(per_shard)]
        keys += [x["__key__"] for x in items]
        write_tar(folder / f"{name}-{s:06d}.tar", items)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({f"{name}-{s:06d}.tar": per_shard for s in range(shards)}))
    return keys


def read_keys(dataset, batch_size=3, num_workers=0) -> tuple[list[str], SkipCounter]:
    skips = SkipCounter()
    keys = [k for batch in make_loader(dataset, batch_size, num_workers) for k in skips.add(batch).keys]
    return keys, skips


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("four")
    return folder, make_shards(folder, "s", 4, 3)


# -- ranks, workers, epochs --------------------------------------------------------------


def test_two_workers_read_every_sample_exactly_once_per_epoch(four_shards):
    folder, keys = four_shards
    dataset = VideoShardDataset(folder, 2, (16, 16), shuffle_buffer=5, seed=3, training=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen, skips = read_keys(dataset, batch_size=2, num_workers=2)
        assert sorted(seen) == sorted(keys) and len(seen) == len(keys)
        assert skips.total() == 0


@pytest.mark.parametrize("shuffle", [0, 4])
def test_two_ranks_get_disjoint_shards_covering_all(four_shards, monkeypatch, shuffle):
    folder, keys = four_shards
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = VideoShardDataset(folder, 2, (16, 16), shuffle_buffer=shuffle, seed=1, training=True)
        dataset.set_epoch(5)
        per_rank.append(read_keys(dataset, batch_size=2, num_workers=2)[0])
    shards_of = [{k.split("_")[0] for k in seen} for seen in per_rank]
    assert shards_of[0].isdisjoint(shards_of[1]) and len(shards_of[0]) == len(shards_of[1]) == 2
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_fewer_shards_than_workers_is_a_clear_error_for_training(four_shards, monkeypatch):
    folder, keys = four_shards
    with pytest.raises(ShardSplitError, match=r"4 shard\(s\) for 1 rank\(s\) x 5 DataLoader worker\(s\).*resampled=True"):
        make_loader(VideoShardDataset(folder, 2, (16, 16), training=True), 2, num_workers=5)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ShardSplitError, match=r"3 rank\(s\) x 2"):
        make_loader(VideoShardDataset(folder, 2, (16, 16), training=True), 2, num_workers=2)
    make_loader(VideoShardDataset(folder, 2, (16, 16), training=True, resampled=True, epoch_length=6), 2, num_workers=2)


def test_fewer_shards_than_workers_outside_training_still_reads_each_sample_once(tmp_path):
    keys = make_shards(tmp_path, "one", 1, 5)
    seen, _ = read_keys(VideoShardDataset(tmp_path, 2, (16, 16)), batch_size=2, num_workers=2)
    assert sorted(seen) == sorted(keys)


def test_epoch_length_auto_gives_every_rank_the_same_count(four_shards, monkeypatch):
    folder, keys = four_shards
    assert sum(shard_sizes(VideoShardDataset(folder, 2).urls).values()) == 12
    counts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = VideoShardDataset(folder, 2, (16, 16), epoch_length="auto", training=True)
        assert dataset.epoch_length == 12
        counts.append(len(read_keys(dataset, batch_size=4, num_workers=2)[0]))
    assert counts == [6, 6]
    make_shards(folder / "nosizes", "n", 1, 1, sizes=False)
    with pytest.raises(ValueError, match="sizes.json"):
        VideoShardDataset(folder / "nosizes", 2, epoch_length="auto")


def test_resampled_streams_are_reproducible(four_shards):
    folder, keys = four_shards

    def run(epoch):
        dataset = VideoShardDataset(folder, 2, (16, 16), resampled=True, epoch_length=10, seed=7, shuffle_buffer=3)
        dataset.set_epoch(epoch)
        return read_keys(dataset, batch_size=5)[0]

    first = run(0)
    assert len(first) == 10 and set(first) <= set(keys)
    assert run(0) == first and run(1) != first


def test_shuffle_buffer_holds_raw_bytes_only_buffered_samples_are_decoded(four_shards):
    folder, _ = four_shards

    class Counting(VideoShardDataset):
        decoded = 0

        def decode_sample(self, sample):
            Counting.decoded += 1
            return super().decode_sample(sample)

    dataset = Counting(folder, 2, (16, 16), shuffle_buffer=8, epoch_length=2)
    seen, _ = read_keys(dataset, batch_size=2)
    assert len(seen) == 2 and Counting.decoded == 2  # 8 raw samples were read into the buffer, 2 decoded


# -- weighted sources ----------------------------------------------------------------------


def test_weighted_sources_mix_in_proportion(tmp_path):
    make_shards(tmp_path / "a", "a", 2, 4)
    make_shards(tmp_path / "b", "b", 2, 4)
    spec = f"{tmp_path}/a/a-{{000000..000001}}.tar@3::{tmp_path}/b@1"
    sources = parse_sources(spec)
    assert [len(s.urls) for s in sources] == [2, 2] and [s.weight for s in sources] == [3.0, 1.0]
    assert parse_sources({str(tmp_path / "a"): 2, str(tmp_path / "b"): 1})[0].weight == 2.0
    assert len(parse_sources(f"{tmp_path}/a::{tmp_path}/b")) == 1  # '::' alone joins into one source
    dataset = VideoShardDataset(spec, 1, (8, 8), resampled=True, epoch_length=200, seed=0, training=True)
    seen, _ = read_keys(dataset, batch_size=50, num_workers=2)
    share_a = sum(k.startswith("a") for k in seen) / len(seen)
    assert len(seen) == 200 and 0.65 < share_a < 0.85
    # without resampling or an epoch length, every sample of every source is read once
    once, _ = read_keys(VideoShardDataset(spec, 1, (8, 8)), batch_size=4)
    assert len(once) == 16 and len(set(once)) == 16
    with pytest.raises(ValueError, match="positive"):
        parse_sources({str(tmp_path / "a"): 0})


# -- robustness ------------------------------------------------------------------------------


def test_bad_samples_and_shards_are_counted_across_workers_and_the_rest_is_intact(tmp_path):
    truncated = CLIP[: len(CLIP) // 2]
    write_tar(tmp_path / "d-000000.tar", [sample("a0"), sample("bad_mp4", b"\x00" * 500), sample("a1")])
    write_tar(tmp_path / "d-000001.tar", [sample("b0"), sample("cut", truncated), sample("b1")])
    write_tar(tmp_path / "d-000002.tar", [sample("c0"), {"__key__": "bad_json", "mp4": CLIP, "json": b"{oops"}])
    write_tar(tmp_path / "d-000003.tar", [])  # an empty shard
    (tmp_path / "d-000004.tar").write_bytes(b"\x00garbage" * 100)  # not a tar
    write_tar(tmp_path / "d-000005.tar", [sample("e0"), {"__key__": "no_video", "json": b"{}"}])
    dataset = VideoShardDataset(tmp_path, 2, (16, 16), shuffle_buffer=4, training=True)
    seen, skips = read_keys(dataset, batch_size=2, num_workers=2)
    assert sorted(seen) == ["a0", "a1", "b0", "b1", "c0", "e0"]
    assert skips == Counter({"corrupt_video": 2, "bad_json": 1, "empty_shard": 1, "unreadable_shard": 1, "missing_field": 1})


def test_skip_summary_is_logged_at_the_end_of_a_pass(tmp_path, caplog):
    write_tar(tmp_path / "x.tar", [sample("ok"), sample("bad", b"junk" * 100)])
    with caplog.at_level("WARNING", logger="tokensieve.data.reader"):
        read_keys(VideoShardDataset(tmp_path / "x.tar", 2, (8, 8)))
    assert any("1 samples, skipped {'corrupt_video': 1}" in r.getMessage() for r in caplog.records)


# -- video2dataset ---------------------------------------------------------------------------


def test_video2dataset_output_is_read_as_is(tmp_path):
    """video2dataset writes 00000.tar with {key}.mp4 / .txt / .json and 00000_stats.json."""
    samples = []
    for i, caption in enumerate(["a dog runs on a beach", "", "city traffic at night"]):
        key = f"{i:09d}"
        record = {"url": f"https://example.com/{i}.mp4", "key": key, "status": "success", "error_message": None,
                  "caption": caption, "width": 32, "height": 32, "duration": 1.0}
        samples.append({"__key__": key, "mp4": CLIP, "txt": caption.encode(), "json": json.dumps(record).encode()})
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3, "failed_to_download": 1}))
    dataset = VideoShardDataset(str(tmp_path / "{00000..00000}.tar"), 2, (16, 16), epoch_length="auto")
    assert dataset.epoch_length == 3
    batches = list(make_loader(dataset, batch_size=3))
    batch = batches[0]
    assert batch.keys == ["000000000", "000000001", "000000002"]
    assert batch.questions == [CAPTION_PROMPT, default_question("000000001"), CAPTION_PROMPT]
    assert batch.answers == ["a dog runs on a beach", "", "city traffic at night"]
    assert batch.meta[0]["url"] == "https://example.com/0.mp4" and batch.frames.shape == (3, 2, 16, 16, 3)


# -- variable length and dynamic resolution ------------------------------------------------


def test_fps_policy_pads_shorter_clips_with_a_frame_mask(tmp_path):
    long = write_clip(np.zeros((20, 32, 32, 3), np.uint8), fps=10)  # 2 s
    short = write_clip(np.zeros((6, 32, 32, 3), np.uint8), fps=10)  # 0.6 s
    write_tar(tmp_path / "v.tar", [sample("long", long), sample("short", short)])
    dataset = VideoShardDataset(tmp_path / "v.tar", num_frames=8, size=(16, 16), sample_policy="fps", fps=2, frame_multiple=2)
    batch = list(make_loader(dataset, batch_size=2))[0]
    assert batch.frames.shape == (2, 4, 16, 16, 3)  # 2 s x 2 fps = 4 frames; 0.6 s -> 1.2 -> 2 (multiple of 2)
    assert batch.frame_mask.tolist() == [[True] * 4, [True, True, False, False]]
    ts = batch.timestamps[1]
    assert torch.all(ts[1:] > ts[:-1])  # padded timestamps continue at the clip's step
    assert torch.equal(batch.frames[1, 2], batch.frames[1, 1])  # padding repeats the last frame


def test_qwen_dynamic_resolution_and_mixed_sizes(tmp_path):
    wide = write_clip(np.zeros((4, 64, 128, 3), np.uint8), fps=4)
    square = write_clip(np.zeros((4, 64, 64, 3), np.uint8), fps=4)
    write_tar(tmp_path / "q.tar", [sample("wide", wide), sample("square", square)])
    policy = QwenResize(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    dataset = VideoShardDataset(tmp_path / "q.tar", 2, policy)
    one = [b.frames.shape for b in make_loader(dataset, batch_size=1)]
    assert one == [(1, 2, 56, 140, 3), (1, 2, 56, 56, 3)]  # smart_resize: 128 -> 5 x 28
    with pytest.raises(ValueError, match="cannot batch frames"):
        list(make_loader(dataset, batch_size=2))
    batch = list(make_loader(dataset, batch_size=2, mixed_sizes="resize"))[0]
    assert batch.frames.shape == (2, 2, 56, 140, 3)


def test_collate_of_skips_only_keeps_counts():
    batch = collate_videos([{"__skip__": "bad_json", "__key__": "k"}], frame_shape=(2, 4, 4))
    assert batch.size == 0 and batch.skipped == Counter({"bad_json": 1}) and batch.features is None


def test_tar_members_have_no_dots_in_keys(four_shards):
    folder, _ = four_shards
    with tarfile.open(folder / "s-000000.tar") as tar:
        assert all(name.count(".") == 1 for name in tar.getnames())
