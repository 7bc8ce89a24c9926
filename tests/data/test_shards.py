"""tokensieve.data.shards: cutting videos into clips and writing WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokensieve.data.samples import sample_videos
from tokensieve.data.shards import (
    CAPTION_PROMPT,
    QUESTION_TEMPLATES,
    cut_clips,
    default_question,
    find_videos,
    sanitize_key,
    write_shards,
)
from tokensieve.data.video import decode_frames, probe, write_clip


def make_video(path: Path, num_frames: int, fps: int = 10, height: int = 48, width: int = 64) -> Path:
    """A synthetic mp4 whose frame i is solid gray ``2 * i``."""
    levels = (np.arange(num_frames) * 2).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()
    path.write_bytes(write_clip(frames, fps))
    return path


def tar_samples(folder: Path) -> dict[str, dict]:
    """key -> {"json": record, "mp4": bytes} for every shard in ``folder``."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


@pytest.fixture
def videos(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "videos"
    folder.mkdir()
    return [
        make_video(folder / "alpha.mp4", 30),  # 3.0 s -> clips [0,1) [1,2) [2,3)
        make_video(folder / "beta.v2.mp4", 24),  # 2.4 s -> two clips + a 0.4 s tail (dropped)
    ]


def test_default_question_is_stable_and_varied():
    keys = [f"video_{i:04d}" for i in range(64)]
    questions = [default_question(k) for k in keys]
    assert questions == [default_question(k) for k in keys]
    assert set(questions) <= set(QUESTION_TEMPLATES)
    assert len(set(questions)) >= 6
    assert len(QUESTION_TEMPLATES) >= 8


def test_sanitize_key_removes_dots_and_slashes():
    assert sanitize_key("my.video/clip 1_0003-x") == "my_video_clip_1_0003-x"


def test_cut_clips_back_to_back_and_overlapping(videos):
    clips = list(cut_clips(videos[0], clip_seconds=1.0))
    assert [c.index for c in clips] == [0, 1, 2]
    assert [len(c.frames) for c in clips] == [10, 10, 10]
    assert [c.start for c in clips] == pytest.approx([0.0, 1.0, 2.0])
    assert [c.end for c in clips] == pytest.approx([1.0, 2.0, 3.0])
    # frame i of the video has gray level 2*i: clip 1 starts with video frame 10
    assert clips[1].frames[0].mean() == pytest.approx(20, abs=3)

    overlapping = list(cut_clips(videos[0], clip_seconds=1.0, clip_stride=0.5, max_side=32))
    assert [c.start for c in overlapping] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert [len(c.frames) for c in overlapping] == [10, 10, 10, 10, 10, 5]
    assert overlapping[0].frames.shape[1:] == (24, 32, 3)  # 48x64 scaled to longer side 32


def test_write_shards_round_trip(videos, tmp_path):
    bad = tmp_path / "videos" / "broken.mp4"
    bad.write_bytes(b"definitely not an mp4" * 20)
    out = tmp_path / "shards"
    summary = write_shards(
        tmp_path / "videos", out, clip_seconds=1.0, maxcount=2, max_side=30, progress=False
    )
    assert summary["videos"] == 3
    assert summary["samples_written"] == 5
    assert summary["skipped"] == {"unreadable_video": 1, "short_clip": 1}
    assert [e["source"] for e in summary["errors"]] == [str(bad)]

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"clips-000000.tar": 2, "clips-000001.tar": 2, "clips-000002.tar": 1}
    assert summary["splits"]["all"]["shards"] == sizes
    assert json.loads((out / "summary.json").read_text())["samples_written"] == 5

    samples = tar_samples(out)
    assert sorted(samples) == ["alpha_0000", "alpha_0001", "alpha_0002", "beta_v2_0000", "beta_v2_0001"]
    record = samples["alpha_0001"]["json"]
    assert record["source"] == "alpha.mp4"
    assert (record["start"], record["end"], record["fps"]) == pytest.approx((1.0, 2.0, 10.0))
    assert record["question"] in QUESTION_TEMPLATES
    assert record["options"] == [] and record["answer"] == ""
    info = probe(samples["alpha_0001"]["mp4"])
    assert (info.num_frames, info.width, info.height) == (10, 30, 22)  # longer side <= 30, even sides
    assert (record["width"], record["height"]) == (30, 22)


def test_write_shards_val_split_and_questions(videos, tmp_path):
    def questions(key, record):
        if key.startswith("alpha"):
            return {"question": f"When does {key} start?", "options": ["early", "late"], "answer": "early"}
        return None

    summary = write_shards(videos, tmp_path / "out", clip_seconds=1.0, val_every=2, questions=questions, progress=False)
    train, val = tar_samples(tmp_path / "out" / "train"), tar_samples(tmp_path / "out" / "val")
    # running clip numbers 0..4 in input order; odd ones go to val
    assert sorted(train) == ["alpha_0000", "alpha_0002", "beta_v2_0001"]
    assert sorted(val) == ["alpha_0001", "beta_v2_0000"]
    for split, samples in (("train", train), ("val", val)):
        sizes = json.loads((tmp_path / "out" / split / "sizes.json").read_text())
        assert sum(sizes.values()) == len(samples) == summary["splits"][split]["samples"]
    assert train["alpha_0002"]["json"]["question"] == "When does alpha_0002 start?"
    assert train["alpha_0002"]["json"]["options"] == ["early", "late"]
    assert val["beta_v2_0000"]["json"]["question"] == default_question("beta_v2_0000")


def test_write_shards_refuses_to_mix_with_old_shards(videos, tmp_path):
    write_shards(videos[:1], tmp_path / "out", clip_seconds=1.0, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(videos[:1], tmp_path / "out", clip_seconds=1.0, progress=False)
    summary = write_shards(videos[1:], tmp_path / "out", clip_seconds=1.0, overwrite=True, progress=False)
    assert sorted(tar_samples(tmp_path / "out")) == ["beta_v2_0000", "beta_v2_0001"]
    assert summary["samples_written"] == 2


def test_find_videos_inputs(videos, tmp_path):
    assert find_videos(tmp_path / "videos") == sorted(videos)
    assert find_videos(str(tmp_path / "videos" / "a*.mp4")) == [videos[0]]
    with pytest.raises(FileNotFoundError):
        find_videos(str(tmp_path / "videos" / "*.webm"))


def test_write_shards_on_the_sample_videos(tmp_path):
    summary = write_shards(sample_videos(), tmp_path, max_side=160, val_every=4, progress=False)
    # bigbuckbunny 5.28 s -> 2 clips + 1.28 s tail; bikes 10 s -> 5 clips: 8 clips, every 4th to val
    assert summary["samples_written"] == 8
    assert summary["splits"]["train"]["samples"] == 6 and summary["splits"]["val"]["samples"] == 2
    val, train = tar_samples(tmp_path / "val"), tar_samples(tmp_path / "train")
    assert sorted(val) == ["bikes_0000", "bikes_0004"]
    record = val["bikes_0004"]["json"]
    assert (record["source"], record["start"], record["end"]) == ("bikes.mp4", 8.0, 10.0)
    assert (record["width"], record["height"], record["num_frames"]) == (160, 68, 50)
    tail = train["bigbuckbunny_0002"]["json"]
    assert (tail["width"], tail["height"], tail["num_frames"]) == (160, 90, 32)


# -- manifests and stream copy -----------------------------------------------------------------


def gop_video(path: Path, num_frames: int = 40, fps: int = 10, gop: int = 5) -> Path:
    """A textured mp4 with a keyframe every ``gop`` frames (frame i shifted by i pixels)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    frames = np.concatenate([np.roll(base, i, axis=2) for i in range(num_frames)])
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    path.write_bytes(buffer.getvalue())
    return path


def test_manifest_csv_copy_reencode_captions_and_skip_reasons(tmp_path):
    gop_video(tmp_path / "v.mp4")  # 4 s, keyframes every 0.5 s
    (tmp_path / "manifest.csv").write_text(
        "path,question,options,answer,caption,start,end,topic\n"
        "v.mp4,What moves?,left|right,left,,1.2,2.6,motion\n"  # keyframe at 1.0: lead 0.2 s -> copy
        'v.mp4,,"[""a"", ""b""]",,a textured square,,,\n'  # whole video, caption only
        "missing.mp4,q,,,,,,\n"
        "v.mp4,q,,,,3,2,\n"
    )
    summary = write_shards(None, tmp_path / "out", manifest=tmp_path / "manifest.csv", progress=False)
    assert summary["rows"] == 4 and summary["samples_written"] == 2
    assert summary["skipped"] == {"bad_row": 1, "unreadable_video": 1}
    assert summary["cuts"] == {"copy": 2}
    samples = tar_samples(tmp_path / "out")
    assert sorted(samples) == ["v_000002", "v_000003"]  # {stem}_{csv line}, no dots
    first, second = samples["v_000002"], samples["v_000003"]
    record = first["json"]
    assert (record["question"], record["options"], record["answer"], record["topic"]) == ("What moves?", ["left", "right"], "left", "motion")
    assert record["cut"] == "copy" and record["stored_start"] == pytest.approx(1.0)
    assert record["span"] == pytest.approx([0.2, 1.6]) and (record["start"], record["end"]) == pytest.approx((1.2, 2.6))
    assert "txt" not in first
    assert second["txt"] == b"a textured square"
    assert second["json"]["question"] == CAPTION_PROMPT and second["json"]["answer"] == "a textured square"
    assert second["json"]["options"] == ["a", "b"]
    # the reader samples only inside the span: 14 frames from 1.2 s to 2.5 s
    frames, stamps = decode_frames(first["mp4"], 14, None, span=tuple(record["span"]))
    torch.testing.assert_close(stamps, torch.arange(14, dtype=torch.float32) / 10)
    whole, _ = decode_frames(tmp_path / "v.mp4", 40, None)  # every frame of the source
    assert torch.equal(frames, whole[12:26])


def test_manifest_jsonl_reencodes_when_resizing_or_the_lead_is_long(tmp_path):
    gop_video(tmp_path / "v.mp4", gop=40)  # one keyframe at 0
    rows = [
        {"path": str(tmp_path / "v.mp4"), "start": 2.0, "end": 3.0, "key": "late.clip", "question": "q"},
        {"path": "v.mp4", "end": 1.0, "key": "early"},
        "not json",
        {"path": "v.mp4", "key": "early"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    summary = write_shards([], tmp_path / "out", manifest=tmp_path / "m.jsonl", progress=False)
    assert summary["skipped"] == {"bad_row": 1, "duplicate_key": 1}
    samples = tar_samples(tmp_path / "out")
    assert sorted(samples) == ["early", "late_clip"]
    late = samples["late_clip"]["json"]
    assert late["cut"] == "reencode" and "span" not in late and late["num_frames"] == 10  # lead 2 s > max_lead
    assert samples["early"]["json"]["cut"] == "copy"
    resized = write_shards(None, tmp_path / "small", manifest=tmp_path / "m.jsonl", max_side=32, progress=False)
    assert resized["cuts"] == {"reencode": 2}
    assert probe(tar_samples(tmp_path / "small")["early"]["mp4"]).width == 32
    copied = write_shards(None, tmp_path / "copy", manifest=tmp_path / "m.jsonl", cut="copy", progress=False)
    assert copied["cuts"] == {"copy": 2}  # forced copy keeps the 2 s lead, span marks the range
    assert tar_samples(tmp_path / "copy")["late_clip"]["json"]["span"] == pytest.approx([2.0, 3.0])


def test_folder_input_copies_clips_when_keyframes_allow(tmp_path):
    (tmp_path / "videos").mkdir()
    gop_video(tmp_path / "videos" / "g.mp4")
    summary = write_shards(tmp_path / "videos", tmp_path / "out", clip_seconds=1.0, progress=False)
    assert summary["cuts"] == {"copy": 4} and summary["samples_written"] == 4
    record = tar_samples(tmp_path / "out")["g_0002"]["json"]
    assert (record["start"], record["end"], *record["span"]) == pytest.approx((2.0, 3.0, 0.0, 1.0))
    reencoded = write_shards(tmp_path / "videos", tmp_path / "re", clip_seconds=1.0, cut="reencode", progress=False)
    assert reencoded["cuts"] == {"reencode": 4}


def test_shard_cli_with_a_manifest(tmp_path):
    from tokensieve.cli import main

    gop_video(tmp_path / "v.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "v.mp4", "start": 1.0, "end": 2.0, "caption": "moving texture"}) + "\n")
    assert main(["shard", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples_written"] == 1 and summary["cuts"] == {"copy": 1}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"clips-000000.tar": 1}
