"""Streaming reader: WebDataset shards → decoded, collated :class:`VideoBatch`.

Reads three layouts with no option to choose between them (the members say which):

- tokensieve shards: ``{key}.mp4`` + ``{key}.json`` (+ ``{key}.txt``), from ``tokensieve shard``;
- **video2dataset** output as it is: ``{key}.mp4`` + ``{key}.txt`` (caption) + ``{key}.json``
  (``url``, ``key``, ``status``, ``caption``, ...). Samples without a question get one by
  :func:`~tokensieve.data.shards.fill_question` (the caption becomes a captioning sample's
  answer; otherwise a generic question). Other video extensions (webm, mkv, ...) work too;
- feature-cache shards: ``{key}.safetensors`` + ``{key}.json`` (see
  :mod:`tokensieve.data.features`), batched into ``VideoBatch.features``.

The pipeline, per DataLoader worker::

    shard list ─ (seed, epoch) shuffle, identical on every rank ─ split_by_node ─ split_by_worker
      └ tar reading (raw bytes) ─ [several sources: seeded weighted mix] ─ shuffle buffer
          └ decode (only now: PyAV / torchcodec / safetensors) ─ [epoch length cut]

so the shuffle buffer holds raw bytes and only samples that leave it are decoded.

Samples are decoded by our own map function: webdataset's automatic decoders (``.decode()``)
are never used, because they unpickle ``.pth``/``.pyd``/``.pkl`` members; a sample carrying a
pickle member is refused outright.

A bad sample never stops the stream. It becomes a skip record
``{"__skip__": reason, "__key__": key}`` that :func:`collate_videos` counts into
``VideoBatch.skipped``; reasons are listed in :data:`SKIP_REASONS`. Warnings about skips are
rate-limited to one per reason per 100 skips (per process), and each worker logs a summary of
its skips at the end of its pass.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.utils import pytorch_worker_info

from tokensieve.data.features import FEATURE_EXTENSION, collate_features, decode_features
from tokensieve.data.shards import fill_question
from tokensieve.data.types import VideoBatch
from tokensieve.data.video import BACKENDS, POLICIES, SizeSpec, decode_frames, resize_policy

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_video", "bad_json", "missing_field", "pickle_refused", "unreadable_shard", "empty_shard", "bad_features",
)
"""Why a sample can be skipped: undecodable video; json unparseable, not an object, or with
wrongly typed fields; no video (or features) member; a pickle member present; a shard (or
part of one) that could not be read, or a shard without a sample (the record's key is then
the shard URL); a feature sample whose safetensors cannot be read."""

PICKLE_EXTENSIONS = frozenset({"pt", "pth", "pkl", "pickle", "pyd"})
"""Member extensions that mean pickled Python objects; samples carrying them are refused."""

VIDEO_MEMBERS = ("mp4", "webm", "mkv", "mov", "m4v", "avi")
"""Member extensions read as video, the first present wins."""

WARN_EVERY = 100


class _SkipWarner:
    """Logs the 1st, 101st, 201st, ... skip of each reason (one warning per 100 skips)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, reason: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n % WARN_EVERY == 1:
            suffix = f": {detail}" if detail else ""
            log.warning("skipped sample %s (%s, %d so far in this process)%s", key, reason, n, suffix)


# -- shard lists, sources, sizes ------------------------------------------------------


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs as a flat list.

    Strings go through webdataset's expansion (brace patterns such as
    ``"shards/clips-{000000..000009}.tar"``, ``::``-separated lists); an entry that is a
    directory becomes all ``*.tar`` files in it, sorted.

    Raises:
        ValueError: nothing to read (an empty list, or a directory without ``*.tar``).
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in _wds_expand_urls(os.fspath(item)):
            if os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise ValueError(f"no *.tar shards in directory {url}")
                out.extend(found)
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


@dataclass(frozen=True)
class Source:
    """One stream of shards in a mix: its URLs and its sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


_WEIGHT = re.compile(r"^(?P<spec>.+)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_sources(spec) -> list[Source]:
    """Shard sources with weights, from any of these forms:

    - ``"a/clips-{000000..000009}.tar"``, a directory, or a list of them: one source;
    - ``"a/{000..009}.tar::b/"``: ``::`` joins URLs into **one** source (webdataset's meaning);
    - ``"a/{000..009}.tar@0.7::b/@0.3"``: as soon as one ``::`` part carries ``@weight``, each
      part is its own source (weight 1 when not given), mixed in proportion to the weights;
    - ``{"a/": 0.7, "b/": 0.3}`` (YAML mapping) or ``[{"urls": "a/", "weight": 0.7}, ...]``.

    Raises:
        ValueError: a non-positive weight, or a source without shards.
    """
    if isinstance(spec, dict):
        parts = [(urls, float(weight)) for urls, weight in spec.items()]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(x, dict) for x in spec):
        parts = [(x["urls"], float(x.get("weight", 1.0))) for x in spec]
    elif isinstance(spec, str) and "@" in spec:
        pieces = spec.split("::")
        matches = [_WEIGHT.match(p) for p in pieces]
        if any(matches):
            parts = [(m["spec"], float(m["weight"])) if m else (p, 1.0) for p, m in zip(pieces, matches)]
        else:
            parts = [(spec, 1.0)]
    else:
        parts = [(spec, 1.0)]
    sources = []
    for urls, weight in parts:
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"source weights must be positive, got {weight} for {urls!r}")
        sources.append(Source(tuple(expand_urls(urls)), weight))
    return sources


def _folder_sizes(folder: str) -> dict[str, int]:
    """Shard name → samples from ``sizes.json`` / ``sizes-*.json`` and video2dataset ``*_stats.json`` in ``folder``."""
    sizes: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_stats.json"))):  # video2dataset: 00000_stats.json
        try:
            stats = json.loads(open(path, encoding="utf-8").read())
            sizes[os.path.basename(path)[: -len("_stats.json")] + ".tar"] = int(stats["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for path in sorted(glob.glob(os.path.join(folder, "sizes*.json"))):
        try:
            table = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError):
            continue
        if isinstance(table, dict):
            sizes.update({str(k): int(v) for k, v in table.items() if isinstance(v, int)})
    return sizes


def shard_sizes(urls: Iterable[str]) -> dict[str, int]:
    """Sample count of each shard, read from the ``sizes.json`` beside it (or video2dataset's
    ``{shard}_stats.json`` ``successes``).

    Raises:
        ValueError: some shard has no recorded size (the message lists a few).
    """
    out, missing, folders = {}, [], {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in folders:
            folders[folder] = _folder_sizes(folder or ".")
        size = folders[folder].get(name)
        if size is None:
            missing.append(url)
        else:
            out[url] = size
    if missing:
        raise ValueError(
            f"no sample count for {len(missing)} shard(s) (e.g. {missing[:3]}): write sizes.json beside them "
            "(tokensieve shard does) or give epoch_length as a number"
        )
    return out


def _seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (unlike ``hash``, same in every process)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def skip_record(reason: str, key: str) -> dict:
    """The record that stands in for a dropped sample: ``{"__skip__": reason, "__key__": key}``."""
    return {"__skip__": reason, "__key__": key}


def _buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream with a buffer of ``size`` items (filled before the first yield)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Draw the next sample from stream ``i`` with probability ∝ ``weights[i]``; a stream that
    ends is dropped and the others go on (so finite sources are each read to the end)."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights=weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


class ShardSplitError(ValueError):
    """Fewer shards than ranks × workers for a training stream (see :class:`VideoShardDataset`)."""


# -- the dataset ----------------------------------------------------------------------


class VideoShardDataset(IterableDataset):
    """Stream decoded clips (or cached features) from WebDataset shards (``IterableDataset``).

    Yields dicts ``{"__key__", "frames": uint8 [T, H, W, 3], "timestamps": float32 [T]
    (seconds), "question": str, "options": list[str], "answer": str, "meta": dict}`` (plus
    ``"features"`` for feature-cache samples, whose ``frames`` are empty) or skip records (see
    :func:`skip_record`); batch them with :func:`collate_videos` / :func:`make_loader`.

    **Splitting.** Each source's shard list is shuffled by ``(seed, epoch)`` — the same order
    on every rank and worker — then split across DDP ranks (``wds.split_by_node``) and
    DataLoader workers (``wds.split_by_worker``), so each sample is read once per epoch.
    Ranks come from ``RANK``/``WORLD_SIZE`` or ``torch.distributed``. With fewer shards than
    ranks × workers some workers would get nothing: a ``training`` stream raises
    :class:`ShardSplitError` (an uneven split makes DDP ranks run different step counts and
    hang); otherwise every worker reads every shard and keeps every n-th sample (exact, at
    the cost of reading shards several times). ``resampled=True`` needs no split: each worker
    draws shards with replacement, reproducibly from ``(seed, epoch, rank, worker)``.

    **Epochs.** ``set_epoch`` reseeds the shard order, the mix, the shuffle buffer and frame
    jitter. ``epoch_length`` (a total over all ranks, or ``"auto"`` = the shards' sample
    counts from ``sizes.json``) makes every rank yield exactly ``epoch_length // world_size``
    records (samples and skip records), repeating its shards as needed — equal step counts
    on every rank. Without it, one pass over the shards is an epoch (``resampled`` streams
    then never end).

    Args:
        urls: shards: brace pattern, directory, list, or weighted sources (see
            :func:`parse_sources`: ``"a/@0.7::b/@0.3"``, ``{"a/": 0.7, "b/": 0.3}``).
        num_frames: T, frames sampled per clip (the most, for ``sample_policy="fps"``).
        size: ``(H, W)`` every frame is resized to, a resize policy
            (:class:`~tokensieve.data.video.FixedSize`, :class:`~tokensieve.data.video.QwenResize`)
            or ``None`` for the native size.
        sample_policy: ``"uniform"``, ``"jitter"`` or ``"fps"``.
        shuffle_buffer: raw samples held in the shuffle buffer; 0 turns shuffling (of shards
            and samples) off.
        seed: base seed.
        resampled: draw shards with replacement, endlessly (training on many nodes).
        epoch_length: records per epoch over all ranks: an int, ``"auto"`` (from sizes.json)
            or ``None`` (one pass).
        fps: frames per second for ``sample_policy="fps"``.
        frame_multiple: ``"fps"`` counts are floored to a multiple of this (2 for Qwen2.5-VL).
        backend: video decoder, ``"pyav"``, ``"torchcodec"`` or ``"auto"``.
        decode_threads: PyAV decoder threads per clip (``None``: FFmpeg's choice in the main
            process; the cores divided among the workers inside DataLoader workers).
        training: a training stream: too few shards for the workers is an error.

    Raises:
        ValueError: bad arguments, no shards, or ``epoch_length="auto"`` without sizes.
    """

    def __init__(
        self,
        urls,
        num_frames: int = 16,
        size: SizeSpec = None,
        sample_policy: str = "uniform",
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | str | None = None,
        *,
        fps: float | None = None,
        frame_multiple: int = 1,
        backend: str = "pyav",
        decode_threads: int | None = None,
        training: bool = False,
    ):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.resize = resize_policy(size)
        if sample_policy not in POLICIES:
            raise ValueError(f"sample_policy must be one of {POLICIES}, got {sample_policy!r}")
        if sample_policy == "fps" and not (fps and fps > 0):
            raise ValueError("sample_policy='fps' needs fps > 0")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.sources = parse_sources(urls)
        self.urls = [u for s in self.sources for u in s.urls]
        if epoch_length == "auto":
            epoch_length = sum(shard_sizes(self.urls).values())
        if epoch_length is not None and (isinstance(epoch_length, str) or epoch_length < 1):
            raise ValueError(f"epoch_length must be >= 1, 'auto' or None, got {epoch_length!r}")
        self.num_frames = num_frames
        self.size = (self.resize.height, self.resize.width) if hasattr(self.resize, "height") else None
        self.sample_policy = sample_policy
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.fps = fps
        self.frame_multiple = frame_multiple
        self.backend = backend
        self.decode_threads = decode_threads
        self.training = training
        self.epoch = 0
        self.world: tuple[int, int] | None = None
        self._warn = _SkipWarner()
        self._pending: list[dict] = []
        self._shard_errors = 0
        self._report_shard_errors = True

    @property
    def frame_shape(self) -> tuple[int, int, int] | None:
        """``(T, H, W)`` of every sample's frames, or None when sizes or counts vary."""
        if self.size is None or self.sample_policy == "fps":
            return None
        return (self.num_frames, *self.size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds shuffling and jitter; call before each epoch's iteration.

        DataLoader workers receive a fresh copy of the dataset each epoch
        (``persistent_workers=False``), so the value set here reaches them.
        """
        self.epoch = epoch

    def bind_world(self, rank: int | None = None, world_size: int | None = None) -> None:
        """Fix the DDP rank and world size used for splitting (default: read them now).

        :func:`make_loader` calls this in the main process, where ``torch.distributed`` is
        initialised, so workers started by any method (fork or spawn) agree.
        """
        if rank is None or world_size is None:
            rank, world_size, _, _ = pytorch_worker_info()
        self.world = (int(rank), int(world_size))

    def _worker_info(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = pytorch_worker_info()
        if self.world is not None:
            rank, world = self.world
        return rank, world, worker, workers

    def check_split(self, num_workers: int, world_size: int | None = None) -> str:
        """How shards are split for ``num_workers`` workers (0 counts as 1) on ``world_size`` ranks.

        Returns ``"resampled"``, ``"shards"`` (every worker has a shard of every source) or
        ``"samples"`` (too few shards: every worker reads all and keeps every n-th sample).

        Raises:
            ShardSplitError: too few shards in a ``training`` stream.
        """
        if self.resampled:
            return "resampled"
        if world_size is None:
            world_size = self.world[1] if self.world is not None else pytorch_worker_info()[1]
        slots = world_size * max(num_workers, 1)
        fewest = min(len(s.urls) for s in self.sources)
        if fewest >= slots:
            return "shards"
        if self.training:
            raise ShardSplitError(
                f"{fewest} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} DataLoader worker(s): every "
                f"worker needs at least one shard of every source, or ranks read different amounts and DDP hangs. "
                f"Write more, smaller shards (tokensieve shard --maxcount), use fewer workers, or set resampled=True."
            )
        return "samples"

    # -- pipeline ---------------------------------------------------------------------

    def _on_shard_error(self, exn: Exception) -> bool:
        """webdataset ``handler``: record an unreadable shard as a skip record, keep going."""
        self._shard_errors += 1
        if self._report_shard_errors:
            url = self._url_of(exn)
            self._warn("unreadable_shard", url, f"{type(exn).__name__}: {exn}")
            self._pending.append(skip_record("unreadable_shard", url))
        return True

    def _url_of(self, exn: BaseException) -> str:
        """The shard an exception from webdataset's tar reading is about, as far as known."""
        filename = getattr(exn, "filename", None)
        if filename:
            return os.fspath(filename)
        known = set(self.urls)
        for arg in reversed(getattr(exn, "args", ())):
            if isinstance(arg, str) and arg in known:
                return arg
        for arg in getattr(exn, "args", ()):
            if isinstance(arg, str) and " @ " in arg:  # tar member errors: "message @ <file object>"
                return arg.rsplit(" @ ", 1)[-1]
        return "<unknown shard>"

    def _source_pass(self, index: int, source: Source, split: str, pass_no: int) -> Iterator[dict]:
        """Raw samples (and unreadable-shard skip records) of one pass over this worker's shards of ``source``."""
        rank, world, worker, workers = self._worker_info()
        if split == "resampled":
            rng = random.Random(_seed("resample", self.seed, self.epoch, pass_no, index, rank, worker))
            urls: Iterable[str] = (rng.choice(source.urls) for _ in iter(int, 1))
        else:
            order = list(source.urls)
            if self.shuffle_buffer > 0:  # the same permutation on every rank and worker
                random.Random(_seed("shards", self.seed, self.epoch, pass_no, index)).shuffle(order)
            if split == "shards":  # = wds.split_by_node, then wds.split_by_worker
                order = order[rank::world][worker::workers]
            urls = order
        slot, slots = rank + world * worker, world * workers
        position = 0
        for url in urls:
            errors = self._shard_errors
            read = 0
            for sample in wds.tarfile_to_samples(handler=self._on_shard_error)([dict(url=url)]):
                read += 1
                if split == "samples":
                    position += 1
                    if (position - 1) % slots != slot:
                        continue
                yield from self._drain()
                yield sample
            if read == 0 and self._shard_errors == errors and self._report_shard_errors:
                self._warn("empty_shard", url, "no samples in it")
                self._pending.append(skip_record("empty_shard", url))
            yield from self._drain()

    def _source_stream(self, index: int, source: Source, split: str, endless: bool) -> Iterator[dict]:
        if not endless or split == "resampled":
            yield from self._source_pass(index, source, split, 0)
            return
        pass_no = 0
        while True:  # passes back to back; a pass that yields nothing ends the stream
            produced = False
            for sample in self._source_pass(index, source, split, pass_no):
                produced = True
                yield sample
            if not produced:
                return
            pass_no += 1

    def _records(self, split: str) -> Iterator[dict]:
        rank, world, worker, workers = self._worker_info()
        endless = self.resampled or self.epoch_length is not None
        streams = [self._source_stream(i, s, split, endless) for i, s in enumerate(self.sources)]
        if len(streams) == 1:
            raw = streams[0]
        else:
            raw = _mix(streams, [s.weight for s in self.sources], random.Random(_seed("mix", self.seed, self.epoch, rank, worker)))
        if self.shuffle_buffer > 0:  # on raw bytes: nothing is decoded before it leaves the buffer
            raw = _buffer_shuffle(raw, self.shuffle_buffer, random.Random(_seed("samples", self.seed, self.epoch, rank, worker)))
        for sample in raw:
            yield self.decode_sample(sample)

    def _drain(self) -> Iterator[dict]:
        while self._pending:
            yield self._pending.pop(0)

    def decode_sample(self, sample: dict) -> dict:
        """Turn one raw webdataset sample (member extension → bytes) into a decoded sample.

        Returns the decoded dict (see the class doc) or a skip record; never raises for bad
        data. Frames are decoded with :func:`~tokensieve.data.video.decode_frames` (within the
        json's ``span`` when a stream-copied clip has one); jitter is seeded from
        ``(seed, epoch, key)``.
        """
        if "__skip__" in sample:
            return sample
        key = str(sample.get("__key__", "<no key>"))
        members = [name for name in sample if not name.startswith("__")]
        if any(name.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS for name in members):
            return self._skip("pickle_refused", key, f"members {sorted(members)}")
        video = next((ext for ext in VIDEO_MEMBERS if ext in sample), None)
        if video is None and FEATURE_EXTENSION not in sample:
            return self._skip("missing_field", key, f"no video or features member (has {sorted(members)})")
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, ValueError) as exn:
                return self._skip("bad_json", key, str(exn))
            if not isinstance(meta, dict):
                return self._skip("bad_json", key, f"json is a {type(meta).__name__}, not an object")
        if "txt" in sample and not meta.get("caption"):
            meta["caption"] = bytes(sample["txt"]).decode("utf-8", errors="replace").strip()
        for name in ("question", "answer", "caption"):
            if meta.get(name) is None:
                meta[name] = ""
            if not isinstance(meta[name], str):
                return self._skip("bad_json", key, f"{name} must be a string")
        options = meta.pop("options", None) or []
        if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
            return self._skip("bad_json", key, "options must be a list of strings")
        fill_question(meta, key)
        question, answer = meta.pop("question"), meta.pop("answer")
        if video is None:
            try:
                tensors, info = decode_features(sample[FEATURE_EXTENSION])
            except ValueError as exn:
                return self._skip("bad_features", key, str(exn))
            meta["features"] = info
            frames = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
            out = {"__key__": key, "frames": frames, "timestamps": tensors["timestamps"].float(), "features": tensors}
        else:
            span = meta.get("span")
            if span is not None and not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, (int, float)) for x in span)):
                return self._skip("bad_json", key, "span must be [start, end] seconds")
            rng = random.Random(_seed("frames", self.seed, self.epoch, key)) if self.sample_policy == "jitter" else None
            try:
                frames, timestamps = decode_frames(
                    sample[video],
                    self.num_frames,
                    self.resize,
                    self.sample_policy,
                    rng,
                    name=key,
                    fps=self.fps,
                    frame_multiple=self.frame_multiple,
                    span=tuple(span) if span else None,
                    backend=self.backend,
                    threads=self._threads(),
                )
            except (av.FFmpegError, ValueError, OSError, EOFError, RuntimeError) as exn:
                return self._skip("corrupt_video", key, str(exn))
            out = {"__key__": key, "frames": frames, "timestamps": timestamps}
        out.update(question=question, options=options, answer=answer, meta=meta)
        return out

    def _threads(self) -> int | None:
        """Decoder threads: as set, else (inside DataLoader workers) the cores shared out among
        the workers — FFmpeg's own choice (one thread per core in every worker) oversubscribes."""
        if self.decode_threads is not None:
            return self.decode_threads
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers < 2:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // info.num_workers)

    def _skip(self, reason: str, key: str, detail: str) -> dict:
        self._warn(reason, key, detail)
        return skip_record(reason, key)

    # -- iteration --------------------------------------------------------------------

    def _share(self) -> int | None:
        """Records this worker yields per epoch (``None``: until the shards run out)."""
        if self.epoch_length is None:
            return None
        rank, world, worker, workers = self._worker_info()
        per_rank = self.epoch_length // world
        return per_rank // workers + (1 if worker < per_rank % workers else 0)

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = self._worker_info()
        split = self.check_split(workers, world)
        if split == "samples" and rank == 0 and worker == 0:
            log.info("%d shards for %d ranks x %d workers: every worker reads all shards and keeps every %d-th sample",
                     min(len(s.urls) for s in self.sources), world, workers, world * workers)
        self._pending = []
        self._report_shard_errors = split != "samples" or rank + world * worker == 0
        records = self._records(split)
        share = self._share()
        if share is not None:
            records = islice(records, share)
        return self._counted(records, rank, worker)

    def _counted(self, records: Iterator[dict], rank: int, worker: int) -> Iterator[dict]:
        good, skipped = 0, Counter()
        for record in records:
            if "__skip__" in record:
                skipped[record["__skip__"]] += 1
            else:
                good += 1
            yield record
        if skipped:
            log.warning("epoch %d, rank %d worker %d: %d samples, skipped %s", self.epoch, rank, worker, good, dict(skipped))
        else:
            log.info("epoch %d, rank %d worker %d: %d samples, none skipped", self.epoch, rank, worker, good)


# -- collation -------------------------------------------------------------------------


def _pad_frames(frames: torch.Tensor, stamps: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a clip to ``t`` frames by repeating its last frame; timestamps continue at its step."""
    n = frames.shape[0]
    if n >= t:
        return frames, stamps
    step = float(stamps[-1] - stamps[0]) / (n - 1) if n > 1 else 0.0
    extra = stamps[-1] + step * torch.arange(1, t - n + 1, dtype=stamps.dtype)
    return torch.cat([frames, frames[-1:].expand(t - n, -1, -1, -1)]), torch.cat([stamps, extra])


def _resize_clip(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` → ``[T, *size, 3]`` (bicubic, antialiased)."""
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def collate_videos(
    samples: list[dict], frame_shape: tuple[int, int, int] | None = None, mixed_sizes: str = "error"
) -> VideoBatch:
    """Stack decoded samples into a :class:`VideoBatch`; count skip records into ``skipped``.

    Clips with fewer frames than the longest in the batch (``sample_policy="fps"``) are
    padded by repeating their last frame, with ``frame_mask`` False there. Feature-cache
    samples are batched with :func:`~tokensieve.data.features.collate_features` into
    ``features`` (``frames`` is then ``[B, 0, 0, 0, 3]``).

    Args:
        samples: dicts from :class:`VideoShardDataset` (decoded samples and skip records).
        frame_shape: ``(T, H, W)`` used for an empty batch (every sample skipped) so its
            ``frames`` is ``[0, T, H, W, 3]``; ``(0, 0, 0)`` when unknown.
        mixed_sizes: what to do with clips of different H×W (dynamic resolution such as
            :class:`~tokensieve.data.video.QwenResize`): ``"error"``, or ``"resize"`` every clip
            to the first clip's size (bicubic, antialiased). Batch size 1 avoids the question.

    Returns:
        ``VideoBatch`` with ``frames uint8 [B, T, H, W, 3]``, ``timestamps float32 [B, T]``
        (seconds), ``frame_mask bool [B, T]``, questions / options / answers / keys / meta of
        length B, ``skipped`` (reason → count) and ``features`` (or None). B may be 0.

    Raises:
        ValueError: clips of different sizes with ``mixed_sizes="error"`` (the message names
            the keys), or raw video and cached features in one batch.
    """
    if mixed_sizes not in ("error", "resize"):
        raise ValueError(f"mixed_sizes must be 'error' or 'resize', got {mixed_sizes!r}")
    skipped = Counter(s["__skip__"] for s in samples if "__skip__" in s)
    good = [s for s in samples if "__skip__" not in s]
    if not good:
        t, h, w = frame_shape or (0, 0, 0)
        return VideoBatch(
            frames=torch.empty((0, t, h, w, 3), dtype=torch.uint8),
            timestamps=torch.empty((0, t), dtype=torch.float32),
            frame_mask=torch.empty((0, t), dtype=torch.bool),
            questions=[],
            skipped=skipped,
        )
    cached = ["features" in s for s in good]
    features = None
    if any(cached):
        if not all(cached):
            raise ValueError(f"cannot batch raw video with cached features (keys {[s['__key__'] for s in good]})")
        features = collate_features([s["features"] for s in good])
        timestamps, frame_mask = features.pop("timestamps"), features.pop("frame_mask")
        frames = torch.empty((len(good), 0, 0, 0, 3), dtype=torch.uint8)
    else:
        sizes = {tuple(s["frames"].shape[1:3]) for s in good}
        clips = [s["frames"] for s in good]
        if len(sizes) > 1:
            if mixed_sizes == "error":
                shapes = sorted({tuple(s["frames"].shape) for s in good})
                raise ValueError(f"cannot batch frames of shapes {shapes} (keys {[s['__key__'] for s in good]})")
            target = tuple(clips[0].shape[1:3])
            clips = [c if tuple(c.shape[1:3]) == target else _resize_clip(c, target) for c in clips]
        t = max(c.shape[0] for c in clips)
        padded = [_pad_frames(c, s["timestamps"].float(), t) for c, s in zip(clips, good)]
        # numpy copies on the calling thread; torch.stack of uint8 would use the intra-op
        # thread pool, which costs 10x more than the copy on a busy machine
        frames = torch.from_numpy(np.stack([f.numpy() for f, _ in padded]))
        timestamps = torch.stack([ts for _, ts in padded])
        frame_mask = torch.stack([torch.arange(t) < c.shape[0] for c in clips])
    return VideoBatch(
        frames=frames,
        timestamps=timestamps.float(),
        frame_mask=frame_mask,
        questions=[s["question"] for s in good],
        options=[list(s["options"]) for s in good],
        answers=[s["answer"] for s in good],
        keys=[s["__key__"] for s in good],
        meta=[s["meta"] for s in good],
        skipped=skipped,
        features=features,
    )


def make_loader(dataset: VideoShardDataset, batch_size: int, num_workers: int = 0, *, mixed_sizes: str = "error", **kwargs) -> DataLoader:
    """A ``DataLoader`` yielding :class:`VideoBatch` (``collate_fn=collate_videos``).

    Binds the dataset to this process's DDP rank and world size and checks the shard split
    now (so a training stream with too few shards fails here, in the main process, with
    :class:`ShardSplitError`). ``persistent_workers=False`` so each epoch's workers get the
    dataset's current epoch (see :meth:`VideoShardDataset.set_epoch`). Batches are formed
    inside each worker, so the last batch of each worker may be short. Extra ``kwargs`` go to
    ``DataLoader`` (``pin_memory``, ``prefetch_factor``, ...).
    """
    if isinstance(dataset, VideoShardDataset):
        dataset.bind_world()
        dataset.check_split(num_workers)
        if dataset.training and dataset.world[1] > 1 and dataset.epoch_length is None and not dataset.resampled:
            log.warning(
                "training on %d ranks without epoch_length: ranks whose shards hold fewer samples run fewer steps, "
                "and DDP waits for them; set epoch_length (e.g. 'auto') so every rank runs the same count",
                dataset.world[1],
            )
    collate = partial(collate_videos, frame_shape=getattr(dataset, "frame_shape", None), mixed_sizes=mixed_sizes)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        **kwargs,
    )


class SkipCounter(Counter):
    """Running total of skipped samples across batches (a ``Counter`` reason → count).

    Example::

        skips = SkipCounter()
        for batch in loader:
            skips.add(batch)
        print(skips.total(), dict(skips))
    """

    def add(self, batch: VideoBatch) -> VideoBatch:
        """Add ``batch.skipped`` to the totals and return the batch unchanged."""
        self.update(batch.skipped)
        return batch
