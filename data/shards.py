"""Shard writer: videos (a folder, a glob, or a manifest) → WebDataset tar shards.

Each sample in a shard is tar members sharing one key (keys never contain dots)::

    {key}.mp4   the clip: the source's packets when it can be cut without re-encoding
                (stream copy), else re-encoded as H.264 with :func:`~tokensieve.data.video.write_clip`
    {key}.json  {"question", "options", "answer", "caption", "source", "start", "end", "fps", ...}
    {key}.txt   the caption, when there is one (the video2dataset layout)

Beside the shards, ``sizes.json`` maps each shard file name to its sample count, and the
output folder gets ``summary.json`` (what :func:`write_shards` returns: samples written,
samples skipped by reason, one error line per bad input). No pickle is ever written.

**Cutting without re-encoding.** A stream copy can only start at a keyframe. A clip cut by
copy therefore starts at the keyframe at or before the requested ``start`` (and may end a
few frames after ``end``, where B-frames need them). Its json records ``span`` = the requested
``[start, end)`` in seconds *within the stored clip*, and the reader samples frames only
inside ``span``, so training sees exactly the requested range; the stored bytes carry up to
one GOP of extra video (x264's default keyframe interval is 250 frames, 10 s at 25 fps).
``cut="auto"`` copies only when that lead is at most ``max_lead`` seconds and no resizing is
asked for, and re-encodes otherwise.
"""

from __future__ import annotations

import bisect
import csv
import glob
import json
import logging
import math
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

from tokensieve.data.video import cut_stream_copy, decode_range, open_video, probe, read_frame_table, video_stream, write_clip

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

CAPTION_PROMPT = "Describe this video."
"""The question of a sample that has a caption but no question: the caption becomes its answer."""

CUT_MODES = ("auto", "copy", "reencode")

MANIFEST_FIELDS = ("path", "question", "options", "answer", "caption", "start", "end", "key")
"""Columns a manifest row may have (only ``path`` is required); other columns go into the json."""

QuestionFn = Callable[[str, dict], "str | dict | None"]
"""``questions(key, record) -> str | dict | None`` for :func:`write_shards`: ``record`` is the
clip's json so far (source, start, end, fps, ...). A ``str`` is the question; a ``dict`` is
merged into the json (question, options, answer, caption, or extra fields); ``None`` keeps
what the record has (see :func:`fill_question`)."""


def default_question(key: str) -> str:
    """A generic question for a clip, picked from :data:`QUESTION_TEMPLATES` by ``crc32(key)``.

    Deterministic across runs and machines (unlike ``hash``), and different keys spread over
    the templates.
    """
    return QUESTION_TEMPLATES[zlib.crc32(key.encode("utf-8")) % len(QUESTION_TEMPLATES)]


def fill_question(record: dict, key: str) -> dict:
    """Give a record without a question one, in place: the rule the writer and reader share.

    A record with a caption becomes a captioning sample (question :data:`CAPTION_PROMPT`,
    answer = the caption unless it has an answer); one without gets :func:`default_question`.
    """
    if not record.get("question"):
        caption = record.get("caption") or ""
        if isinstance(caption, str) and caption.strip():
            record["question"] = CAPTION_PROMPT
            if not record.get("answer"):
                record["answer"] = caption.strip()
        else:
            record["question"] = default_question(key)
    return record


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


# -- manifests --------------------------------------------------------------------------


class ManifestError(ValueError):
    """A manifest row that cannot be used (the message says which row and why)."""


def _number(value, name: str, row: int) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"row {row}: {name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ManifestError(f"row {row}: {name} must be a finite number >= 0, got {value!r}")
    return number


def _options(value, row: int) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ManifestError(f"row {row}: options is not a JSON list: {value!r}") from None
        else:
            return [o.strip() for o in text.split("|") if o.strip()]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ManifestError(f"row {row}: options must be a list of strings (or 'a|b|c' in CSV), got {value!r}")
    return value


def parse_manifest_row(raw: dict, row: int, base: Path) -> dict:
    """Validate one manifest row into ``{"path": Path, "question", "options", "answer",
    "caption", "start", "end", "key", "extra": {...}}``.

    Relative paths are taken from ``base`` (the manifest's folder). ``options`` is a list,
    a JSON list, or ``"a|b|c"``; ``start``/``end`` are seconds (empty = whole video).

    Raises:
        ManifestError: no path, bad numbers, ``start >= end``, or wrongly typed text fields.
    """
    if not isinstance(raw, dict):
        raise ManifestError(f"row {row}: not an object")
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ManifestError(f"row {row}: no 'path'")
    path = Path(path.strip())
    if not path.is_absolute():
        path = base / path
    start, end = _number(raw.get("start"), "start", row), _number(raw.get("end"), "end", row)
    if start is not None and end is not None and end <= start:
        raise ManifestError(f"row {row}: end ({end}) must be after start ({start})")
    out = {"path": path, "start": start or 0.0, "end": end, "options": _options(raw.get("options"), row)}
    for name in ("question", "answer", "caption", "key"):
        value = raw.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ManifestError(f"row {row}: {name} must be a string, got {type(value).__name__}")
        out[name] = value.strip() if name == "key" else value
    out["extra"] = {k: v for k, v in raw.items() if k not in MANIFEST_FIELDS and k is not None and v not in (None, "")}
    return out


def read_manifest(path: str | os.PathLike) -> Iterator[tuple[int, dict | ManifestError]]:
    """Rows of a CSV (header line) or JSONL manifest, as ``(row_number, raw_row or error)``.

    The format follows the extension: ``.jsonl``/``.json`` (one object per line, blank lines
    ignored) or anything else as CSV. A JSONL line that does not parse is yielded as a
    :class:`ManifestError` so the writer can count it and go on.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except ValueError as exn:
                    yield number, ManifestError(f"row {number}: bad JSON ({exn})")
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            for number, raw in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield number, raw


# -- clips --------------------------------------------------------------------------------


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


@dataclass
class EncodedClip:
    """A clip ready for a shard: mp4 bytes plus the json fields describing them."""

    data: bytes
    fields: dict


def _needs_resize(width: int, height: int, max_side: int | None) -> bool:
    return bool(max_side) and max(width, height) > max_side


def _reencoded(clip: Clip, start: float | None = None, end: float | None = None) -> EncodedClip:
    fields = {
        "start": round(clip.start if start is None else start, 6),
        "end": round(clip.end if end is None else end, 6),
        "fps": clip.fps,
        "num_frames": int(clip.frames.shape[0]),
        "height": int(clip.frames.shape[1]),
        "width": int(clip.frames.shape[2]),
        "cut": "reencode",
    }
    return EncodedClip(write_clip(clip.frames, clip.fps), fields)


def _copied(path: Path, start: float, end: float | None, max_lead: float | None, table=None) -> EncodedClip | None:
    copied = cut_stream_copy(path, start, end, max_lead=max_lead, table=table)
    if copied is None:
        return None
    fields = {
        "start": round(copied.stored_start + copied.span[0], 6),
        "end": round(copied.stored_start + copied.span[1], 6),
        "fps": copied.fps,
        "num_frames": copied.num_frames,
        "height": copied.height,
        "width": copied.width,
        "cut": "copy",
        "stored_start": round(copied.stored_start, 6),
        "span": list(copied.span),
    }
    return EncodedClip(copied.data, fields)


def _reencode_range(path: Path, start: float, end: float | None, max_side: int | None) -> EncodedClip:
    info = probe(path)
    size = _even_size(info.height, info.width, max_side)
    frames, times, fps = decode_range(path, start, end, size)
    fps = fps or 25.0
    clip = Clip(0, frames, float(times[0]), float(times[-1]) + 1.0 / fps, fps)
    return _reencoded(clip)


def _clip_ranges(duration: float, clip_seconds: float, stride: float) -> list[tuple[int, float, float]]:
    count = max(1, int(math.floor((duration - 1e-6) / stride)) + 1) if duration > 0 else 0
    return [(k, k * stride, min(k * stride + clip_seconds, duration)) for k in range(count) if k * stride < duration - 1e-6]


def _leads_ok(table, ranges: list[tuple[int, float, float]], max_lead: float) -> bool:
    """Whether every range starts at most ``max_lead`` seconds after its keyframe."""
    times = table.times()
    for _, start, _ in ranges:
        first = bisect.bisect_left(times, start - 1e-6)
        if first >= len(times):
            continue
        key = table.keyframe_before(first)
        if not table.keyframe[key] or start - times[key] > max_lead + 1e-6:
            return False
    return True


def video_clips(
    path: Path, clip_seconds: float, clip_stride: float | None, max_side: int | None, cut: str, max_lead: float
) -> Iterator[tuple[int, EncodedClip | None, float]]:
    """The clips of one video as ``(clip_index, encoded or None, duration_s)``.

    ``cut="reencode"`` decodes once and re-encodes every clip (:func:`cut_clips`);
    ``"copy"`` stream-copies every clip range (``None`` for a range that cannot be copied);
    ``"auto"`` copies when the video needs no resizing and *every* clip's keyframe lead is at
    most ``max_lead`` seconds, and otherwise re-encodes the whole video.
    """
    stride = clip_seconds if clip_stride is None else clip_stride
    if cut in ("copy", "auto"):
        info = probe(path)
        ranges = _clip_ranges(info.duration_s, clip_seconds, stride)
        table = read_frame_table(path)
        if cut == "copy" or (table is not None and not _needs_resize(info.width, info.height, max_side) and _leads_ok(table, ranges, max_lead)):
            for k, start, end in ranges:
                yield k, _copied(path, start, end, None, table), end - start
            return
    for clip in cut_clips(path, clip_seconds, clip_stride, max_side):
        yield clip.index, _reencoded(clip), clip.duration_s


def manifest_clip(row: dict, max_side: int | None, cut: str, max_lead: float) -> EncodedClip | None:
    """The clip of one manifest row (``None`` when ``cut="copy"`` and it cannot be copied)."""
    path = row["path"]
    if cut in ("copy", "auto"):
        info = probe(path)
        if cut == "copy" or not _needs_resize(info.width, info.height, max_side):
            copied = _copied(path, row["start"], row["end"], None if cut == "copy" else max_lead)
            if copied is not None or cut == "copy":
                return copied
    return _reencode_range(path, row["start"], row["end"], max_side)


# -- writing ------------------------------------------------------------------------------


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


def _record(key: str, source: Path, fields: dict, base: dict, questions: QuestionFn | None) -> dict:
    record = {"question": "", "options": [], "answer": "", "caption": "", "source": source.name, **fields, **base}
    given = questions(key, dict(record)) if questions is not None else None
    if isinstance(given, str):
        record["question"] = given
    elif isinstance(given, dict):
        record.update(given)
    elif given is not None:
        raise TypeError(f"questions({key!r}, ...) must return str, dict or None, got {type(given).__name__}")
    return fill_question(record, key)


def _sample(key: str, clip: EncodedClip, record: dict) -> dict:
    sample = {"__key__": key, "mp4": clip.data, "json": json.dumps(record).encode("utf-8")}
    caption = record.get("caption")
    if isinstance(caption, str) and caption:
        sample["txt"] = caption.encode("utf-8")
    return sample


def write_shards(
    inputs: str | os.PathLike | Iterable[str | os.PathLike] | None,
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
    *,
    manifest: str | os.PathLike | None = None,
    cut: str = "auto",
    max_lead: float = 0.5,
) -> dict:
    """Write videos as WebDataset shards: clips of a folder / glob / list, or manifest rows.

    **Videos** (``inputs``): each video is cut into clips of ``clip_seconds`` every
    ``clip_stride`` seconds, stored under ``sanitize_key(f"{video_stem}_{clip:04d}")``.
    **Manifest** (``manifest=``, a CSV with a header or a JSONL file): each row is one sample —
    ``path`` (relative to the manifest's folder) and any of ``question``, ``options``,
    ``answer``, ``caption``, ``start``, ``end`` (seconds; default the whole video) and ``key``
    (default ``{video_stem}_{row:06d}``); other columns are copied into the json.

    Clips are stream-copied or re-encoded as ``cut`` says (see the module doc); each json
    records ``cut`` ("copy" or "reencode") and, for copies, ``span`` and ``stored_start``.
    Shards are ``{out_dir}/{prefix}-%06d.tar`` (``webdataset.ShardWriter``); ``sizes.json``
    (shard name → samples) goes beside them, ``summary.json`` into ``out_dir``. A caption
    is also stored as ``{key}.txt``; a sample without a question gets one by
    :func:`fill_question`.

    Args:
        inputs: videos: folder, glob, file, or list (see :func:`find_videos`); may be
            ``None``/empty when ``manifest`` is given.
        out_dir: output folder (created).
        clip_seconds: clip length in seconds (videos only).
        clip_stride: seconds between clip starts; default ``clip_seconds``.
        max_side: if given, clips are downscaled so their longer side is <= this (pixels);
            a video that needs it is re-encoded.
        maxcount: at most this many samples per shard.
        maxsize: at most about this many bytes per shard.
        questions: ``questions(key, record) -> str | dict | None`` (see :data:`QuestionFn`).
        prefix: shard file name prefix.
        val_every: if given, every ``val_every``-th sample (running number ``i`` over all
            inputs, in input order, with ``i % val_every == val_every - 1``) goes to
            ``{out_dir}/val/`` and the rest to ``{out_dir}/train/``, each with its own
            ``sizes.json``.
        min_clip_seconds: a trailing clip shorter than this is dropped (counted as
            ``short_clip``); default ``clip_seconds / 2`` (videos only).
        overwrite: replace existing ``{prefix}-*.tar`` shards in the output folders instead
            of raising.
        progress: show a tqdm bar.
        manifest: a CSV or JSONL manifest (see above).
        cut: ``"auto"`` (copy when it needs no resize and the keyframe lead is at most
            ``max_lead``, else re-encode), ``"copy"`` (stream copy or skip) or ``"reencode"``.
        max_lead: seconds of video before the requested start that ``"auto"`` accepts in a copy.

    Returns:
        Summary dict: ``out_dir``, ``videos`` (inputs found), ``rows`` (manifest rows),
        ``samples_written``, ``splits`` (split name → ``{"dir", "samples", "shards": {name:
        count}}``; the only split is ``"all"`` without ``val_every``), ``cuts`` (``copy`` /
        ``reencode`` → count), ``skipped`` (reason → count: ``unreadable_video``,
        ``decode_error``, ``short_clip``, ``bad_row``, ``copy_failed``, ``duplicate_key``)
        and ``errors`` (``{"source", "reason", "detail"}`` per skipped input). Bad inputs are
        skipped and reported, never raised.

    Raises:
        FileNotFoundError: ``inputs`` is a folder or glob without videos, or no manifest file.
        FileExistsError: an output folder already has shards and ``overwrite`` is False.
        ValueError: ``val_every < 2``, bad clip lengths or ``cut``, or nothing to read.
    """
    if val_every is not None and val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    if clip_seconds <= 0 or (clip_stride is not None and clip_stride <= 0):
        raise ValueError(f"clip_seconds and clip_stride must be > 0, got {clip_seconds}, {clip_stride}")
    if cut not in CUT_MODES:
        raise ValueError(f"cut must be one of {CUT_MODES}, got {cut!r}")
    has_inputs = inputs is not None and (isinstance(inputs, (str, os.PathLike)) or len(list(inputs)) > 0)
    if not has_inputs and manifest is None:
        raise ValueError("write_shards: give videos (inputs) or a manifest")
    if manifest is not None and not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    min_seconds = clip_seconds / 2 if min_clip_seconds is None else min_clip_seconds
    videos = find_videos(inputs) if has_inputs else []
    out = Path(out_dir)
    folders = {"train": out / "train", "val": out / "val"} if val_every else {"all": out}
    for folder in folders.values():
        _prepare_folder(folder, prefix, overwrite)
    writers = {name: _SplitWriter(folder, prefix, maxcount, maxsize) for name, folder in folders.items()}
    skipped: Counter = Counter()
    cuts: Counter = Counter()
    errors: list[dict] = []
    keys: set[str] = set()
    running = 0

    def skip(reason: str, source, detail, kept: int | None = None) -> None:
        skipped[reason] += 1
        errors.append({"source": str(source), "reason": reason, "detail": str(detail)})
        log.warning("%s: %s%s: %s", reason, source, "" if kept is None else f" ({kept} clips kept)", detail)

    def emit(key: str, clip: EncodedClip, record: dict) -> None:
        nonlocal running
        split = "all" if not val_every else ("val" if running % val_every == val_every - 1 else "train")
        writers[split].write(_sample(key, clip, record))
        keys.add(key)
        cuts[clip.fields.get("cut", "reencode")] += 1
        running += 1

    bar = tqdm(total=len(videos), desc="shard", unit="video", disable=not progress)
    stems: set[str] = set()
    for path in videos:
        stem = sanitize_key(path.stem)
        base, n = stem, 1
        while stem in stems:  # same file name in two folders: keep keys unique
            n += 1
            stem = f"{base}_{n}"
        stems.add(stem)
        written = 0
        try:
            for index, clip, duration in video_clips(path, clip_seconds, clip_stride, max_side, cut, max_lead):
                if duration < min_seconds - 1e-6:
                    skipped["short_clip"] += 1
                    continue
                key = sanitize_key(f"{stem}_{index:04d}")
                if clip is None:
                    skip("copy_failed", f"{path}#{index}", "stream copy is not possible for this range")
                    continue
                emit(key, clip, _record(key, path, {**clip.fields, "clip": index}, {}, questions))
                written += 1
                bar.set_postfix(clips=running)
        except (av.FFmpegError, ValueError, OSError) as exn:
            # open_video turns unopenable files into ValueError/FileNotFoundError; an
            # av.FFmpegError here comes from decoding part-way through the video.
            reason = "decode_error" if written and isinstance(exn, av.FFmpegError) else "unreadable_video"
            skip(reason, path, exn, written)
        bar.update(1)
    bar.close()

    rows = 0
    if manifest is not None:
        base_dir = Path(manifest).resolve().parent
        for number, raw in tqdm(read_manifest(manifest), desc="manifest", unit="row", disable=not progress):
            rows += 1
            try:
                if isinstance(raw, ManifestError):
                    raise raw
                row = parse_manifest_row(raw, number, base_dir)
            except ManifestError as exn:
                skip("bad_row", f"{manifest}:{number}", exn)
                continue
            key = sanitize_key(row["key"]) if row["key"] else sanitize_key(f"{row['path'].stem}_{number:06d}")
            if key in keys:
                skip("duplicate_key", f"{manifest}:{number}", f"key {key!r} already written")
                continue
            try:
                clip = manifest_clip(row, max_side, cut, max_lead)
            except (av.FFmpegError, ValueError, OSError) as exn:
                skip("unreadable_video", row["path"], exn)
                continue
            if clip is None:
                skip("copy_failed", row["path"], f"stream copy of [{row['start']}, {row['end']}) is not possible")
                continue
            fields = {k: row[k] for k in ("question", "options", "answer", "caption")}
            record = _record(key, row["path"], {**clip.fields, "row": number}, {**row["extra"], **fields}, questions)
            emit(key, clip, record)

    summary = {
        "out_dir": str(out),
        "videos": len(videos),
        "rows": rows,
        "samples_written": running,
        "splits": {name: writer.close() for name, writer in writers.items()},
        "cuts": dict(sorted(cuts.items())),
        "skipped": dict(sorted(skipped.items())),
        "errors": errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if progress:
        split_counts = ", ".join(f"{name}: {s['samples']}" for name, s in summary["splits"].items())
        tqdm.write(f"wrote {running} samples ({split_counts}) to {out}; skipped {summary['skipped'] or 'none'}")
    return summary
