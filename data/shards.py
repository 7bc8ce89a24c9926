"""Shard writer: cut videos into short clips and store them as WebDataset tar shards.

Each sample in a shard is three tar members sharing one key::

    {key}.mp4   the clip, re-encoded with :func:`tokensieve.data.video.write_clip` (H.264)
    {key}.json  {"question", "options", "answer", "caption", "source", "start", "end", "fps", ...}

Beside the shards, ``sizes.json`` maps each shard file name to its sample count, and the
output folder gets ``summary.json`` (what :func:`write_shards` returns). No pickle is ever
written (see the design's conventions).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from tokensieve.data.video import open_video, video_stream, write_clip

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")

QUESTION_TEMPLATES = (
    "What is happening in this clip?",
    "Which object moves the most?",
    "What colour dominates the scene?",
    "Describe the background.",
    "How does the camera move during the clip?",
    "What changes between the start and the end of the clip?",
    "Where does this scene take place?",
    "How many distinct objects can you see?",
)
"""Generic questions for clips that come without one (see :func:`default_question`)."""

QuestionFn = Callable[[str, dict], "str | dict | None"]
"""``questions(key, record) -> str | dict | None`` for :func:`write_shards`: ``record`` is the
clip's json so far (source, start, end, fps, ...). A ``str`` is the question; a ``dict`` is
merged into the json (question, options, answer, caption, or extra fields); ``None`` falls
back to :func:`default_question`."""


def default_question(key: str) -> str:
    """A generic question for a clip, picked from :data:`QUESTION_TEMPLATES` by ``crc32(key)``.

    Deterministic across runs and machines (unlike ``hash``), and different keys spread over
    the templates.
    """
    return QUESTION_TEMPLATES[zlib.crc32(key.encode("utf-8")) % len(QUESTION_TEMPLATES)]


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: every character outside ``[A-Za-z0-9_-]`` becomes ``_``.

    WebDataset splits a member name at its first dot into key and extension, so keys must
    not contain dots (or slashes).
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def find_videos(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Resolve the writer's ``inputs`` to a list of video paths.

    Args:
        inputs: a folder (searched recursively for :data:`VIDEO_EXTENSIONS`), a glob pattern
            (``"videos/**/*.mp4"``), one file, or a list of files and folders. Listed files
            are kept even if they do not exist, so the writer reports them as unreadable.

    Returns:
        Paths in a stable order (sorted within each folder or glob).

    Raises:
        FileNotFoundError: a folder or glob that matches no video.
    """
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
            if not found:
                raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {path}")
            return found
        if path.is_file():
            return [path]
        found = sorted(Path(p) for p in glob.glob(os.fspath(inputs), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"no file or folder matches {os.fspath(inputs)!r}")
        return found
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(find_videos(path) if path.is_dir() else [path])
    return paths


@dataclass
class Clip:
    """One clip cut out of a video.

    Attributes:
        index: clip number within its video (clip ``k`` starts at ``k * stride`` seconds).
        frames: ``uint8 [n, H, W, 3]`` RGB at the video's own frame rate.
        start: time of the first frame, seconds from the start of the video.
        end: time of the last frame plus one frame duration, seconds.
        fps: frames per second.
    """

    index: int
    frames: np.ndarray
    start: float
    end: float
    fps: float

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps


def _even_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(H, W)`` scaled so the longer side is <= ``max_side`` (if given), floored to even."""
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    return max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2)


def cut_clips(
    path: str | os.PathLike,
    clip_seconds: float = 2.0,
    clip_stride: float | None = None,
    max_side: int | None = None,
) -> Iterator[Clip]:
    """Decode a video once and yield its clips in order.

    Clip ``k`` holds the frames with ``k * stride <= t < k * stride + clip_seconds`` (``t`` in
    seconds from the start of the stream); ``stride`` defaults to ``clip_seconds``
    (back-to-back clips). Overlapping clips (``stride < clip_seconds``) share frames; with
    ``stride > clip_seconds`` the gaps are dropped. The last clip may be shorter. Frames are
    resized once (bicubic, FFmpeg swscale) so the longer side is <= ``max_side`` pixels, and
    both sides are made even (needed by yuv420p).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a readable video, no frame rate, or no decodable frame.
        av.FFmpegError: a decoding error part-way (clips already yielded stay valid).
    """
    stride = clip_seconds if clip_stride is None else clip_stride
    if clip_seconds <= 0 or stride <= 0:
        raise ValueError(f"clip_seconds and clip_stride must be > 0, got {clip_seconds}, {stride}")
    label = os.fspath(path)
    eps = 1e-6
    with open_video(path, label) as container:
        stream = video_stream(container, label)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{label}: unknown frame rate")
        fps = float(rate)
        height, width = _even_size(stream.codec_context.height, stream.codec_context.width, max_side)
        start_pts = stream.start_time or 0
        pending: dict[int, list[tuple[np.ndarray, float]]] = {}
        next_clip = 0
        decoded = 0

        def make(k: int) -> Clip:
            items = pending.pop(k)
            return Clip(k, np.stack([a for a, _ in items]), items[0][1], items[-1][1] + 1.0 / fps, fps)

        for decoded, frame in enumerate(container.decode(stream), start=1):
            if frame.pts is not None and stream.time_base is not None:
                t = float((frame.pts - start_pts) * stream.time_base)
            else:
                t = (decoded - 1) / fps
            for k in sorted(pending):
                if t >= k * stride + clip_seconds - eps:
                    yield make(k)
            while next_clip * stride <= t + eps:
                if t < next_clip * stride + clip_seconds - eps:
                    pending[next_clip] = []
                next_clip += 1
            if pending:
                rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
                for items in pending.values():
                    items.append((rgb, t))
        if decoded == 0:
            raise ValueError(f"{label}: no decodable video frames")
        for k in sorted(pending):
            yield make(k)


class _SplitWriter:
    """A lazily opened ``wds.ShardWriter`` for one split that records per-shard counts."""

    def __init__(self, folder: Path, prefix: str, maxcount: int, maxsize: float):
        self.folder, self.prefix, self.maxcount, self.maxsize = folder, prefix, maxcount, maxsize
        self.sizes: dict[str, int] = {}
        self.samples = 0
        self._writer: wds.ShardWriter | None = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            pattern = str(self.folder / f"{self.prefix}-%06d.tar")
            self._writer = wds.ShardWriter(
                pattern, maxcount=self.maxcount, maxsize=self.maxsize, post=self._shard_done, verbose=0
            )
        self._writer.write(sample)
        self.samples += 1

    def _shard_done(self, fname: str) -> None:
        self.sizes[Path(fname).name] = self._writer.count

    def close(self) -> dict:
        if self._writer is not None:
            self._writer.close()
            (self.folder / "sizes.json").write_text(json.dumps(self.sizes, indent=2, sort_keys=True) + "\n")
        return {"dir": str(self.folder), "samples": self.samples, "shards": dict(sorted(self.sizes.items()))}


def _prepare_folder(folder: Path, prefix: str, overwrite: bool) -> None:
    old = sorted(folder.glob(f"{prefix}-*.tar"))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds {len(old)} '{prefix}-*.tar' shards; pass overwrite=True")
    for path in old:
        path.unlink()
    if overwrite and (folder / "sizes.json").exists():
        (folder / "sizes.json").unlink()


def _clip_record(clip: Clip, key: str, source: Path, questions: QuestionFn | None) -> dict:
    record = {
        "question": "",
        "options": [],
        "answer": "",
        "caption": "",
        "source": source.name,
        "start": round(clip.start, 6),
        "end": round(clip.end, 6),
        "fps": clip.fps,
        "clip": clip.index,
        "num_frames": int(clip.frames.shape[0]),
        "height": int(clip.frames.shape[1]),
        "width": int(clip.frames.shape[2]),
    }
    given = questions(key, dict(record)) if questions is not None else None
    if isinstance(given, str):
        record["question"] = given
    elif isinstance(given, dict):
        record.update(given)
    elif given is not None:
        raise TypeError(f"questions({key!r}, ...) must return str, dict or None, got {type(given).__name__}")
    if not record["question"]:
        record["question"] = default_question(key)
    return record


def write_shards(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    clip_seconds: float = 2.0,
    clip_stride: float | None = None,
    max_side: int | None = None,
    maxcount: int = 64,
    maxsize: float = 1e9,
    questions: QuestionFn | None = None,
    prefix: str = "clips",
    val_every: int | None = None,
    min_clip_seconds: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Cut videos into clips and write them as WebDataset shards.

    Each clip (see :func:`cut_clips`) is re-encoded as H.264 mp4 and stored under the key
    ``sanitize_key(f"{video_stem}_{clip:04d}")`` with a json record (see the module doc).
    Shards are ``{out_dir}/{prefix}-%06d.tar`` written by ``webdataset.ShardWriter``;
    ``sizes.json`` (shard name → samples) goes beside them, ``summary.json`` into ``out_dir``.

    Args:
        inputs: videos: folder, glob, file, or list (see :func:`find_videos`).
        out_dir: output folder (created).
        clip_seconds: clip length in seconds.
        clip_stride: seconds between clip starts; default ``clip_seconds``.
        max_side: if given, clips are downscaled so their longer side is <= this (pixels).
        maxcount: at most this many samples per shard.
        maxsize: at most about this many bytes per shard.
        questions: ``questions(key, record) -> str | dict | None`` (see :data:`QuestionFn`);
            clips left without a question get :func:`default_question`.
        prefix: shard file name prefix.
        val_every: if given, every ``val_every``-th clip (running clip number ``i`` over all
            inputs, in input order, with ``i % val_every == val_every - 1``) goes to
            ``{out_dir}/val/`` and the rest to ``{out_dir}/train/``, each with its own
            ``sizes.json``.
        min_clip_seconds: a trailing clip shorter than this is dropped (counted as
            ``short_clip``); default ``clip_seconds / 2``.
        overwrite: replace existing ``{prefix}-*.tar`` shards in the output folders instead
            of raising.
        progress: show a tqdm bar over the videos.

    Returns:
        Summary dict: ``out_dir``, ``videos`` (inputs found), ``samples_written``, ``splits`` (split name →
        ``{"dir", "samples", "shards": {name: count}}``; the only split is ``"all"`` without
        ``val_every``), ``skipped`` (reason → count: ``unreadable_video``, ``decode_error``,
        ``short_clip``) and ``errors`` (``{"source", "reason", "detail"}`` per bad video).
        An unreadable video is skipped and reported, never raised.

    Raises:
        FileNotFoundError: ``inputs`` is a folder or glob without videos.
        FileExistsError: an output folder already has shards and ``overwrite`` is False.
        ValueError: ``val_every < 2`` or bad clip lengths.
    """
    if val_every is not None and val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    if clip_seconds <= 0 or (clip_stride is not None and clip_stride <= 0):
        raise ValueError(f"clip_seconds and clip_stride must be > 0, got {clip_seconds}, {clip_stride}")
    min_seconds = clip_seconds / 2 if min_clip_seconds is None else min_clip_seconds
    videos = find_videos(inputs)
    out = Path(out_dir)
    folders = {"train": out / "train", "val": out / "val"} if val_every else {"all": out}
    for folder in folders.values():
        _prepare_folder(folder, prefix, overwrite)
    writers = {name: _SplitWriter(folder, prefix, maxcount, maxsize) for name, folder in folders.items()}
    skipped: Counter = Counter()
    errors: list[dict] = []
    stems: set[str] = set()
    running = 0
    bar = tqdm(videos, desc="shard", unit="video", disable=not progress)
    for path in bar:
        stem = sanitize_key(path.stem)
        base, n = stem, 1
        while stem in stems:  # same file name in two folders: keep keys unique
            n += 1
            stem = f"{base}_{n}"
        stems.add(stem)
        written = 0
        try:
            for clip in cut_clips(path, clip_seconds, clip_stride, max_side):
                if clip.duration_s < min_seconds - 1e-6:
                    skipped["short_clip"] += 1
                    continue
                key = sanitize_key(f"{stem}_{clip.index:04d}")
                record = _clip_record(clip, key, path, questions)
                split = "all" if not val_every else ("val" if running % val_every == val_every - 1 else "train")
                sample = {
                    "__key__": key,
                    "mp4": write_clip(clip.frames, clip.fps),
                    "json": json.dumps(record).encode("utf-8"),
                }
                writers[split].write(sample)
                running += 1
                written += 1
                bar.set_postfix(clips=running)
        except (av.FFmpegError, ValueError, OSError) as exn:
            # open_video turns unopenable files into ValueError/FileNotFoundError; an
            # av.FFmpegError here comes from decoding part-way through the video.
            reason = "decode_error" if written and isinstance(exn, av.FFmpegError) else "unreadable_video"
            skipped[reason] += 1
            errors.append({"source": str(path), "reason": reason, "detail": str(exn)})
            log.warning("%s: %s (%d clips kept): %s", reason, path, written, exn)
    bar.close()
    summary = {
        "out_dir": str(out),
        "videos": len(videos),
        "samples_written": running,
        "splits": {name: writer.close() for name, writer in writers.items()},
        "skipped": dict(sorted(skipped.items())),
        "errors": errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if progress:
        split_counts = ", ".join(f"{name}: {s['samples']}" for name, s in summary["splits"].items())
        tqdm.write(f"wrote {running} clips ({split_counts}) to {out}; skipped {summary['skipped'] or 'none'}")
    return summary
