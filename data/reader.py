"""Streaming reader: WebDataset shards of mp4 + json → decoded, collated :class:`VideoBatch`.

Samples are read with ``webdataset.WebDataset`` and decoded by our own map function:
webdataset's automatic decoders (``.decode()``) are never used, because they unpickle
``.pth``/``.pyd``/``.pkl`` members. Only the ``mp4``, ``json`` and ``txt`` members are read;
a sample carrying a pickle member is refused outright.

A bad sample never stops the stream. It becomes a skip record
``{"__skip__": reason, "__key__": key}`` that :func:`collate_videos` counts into
``VideoBatch.skipped``; reasons are listed in :data:`SKIP_REASONS`. Warnings about skips are
rate-limited to one per reason per 100 skips (per process).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice

import av
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.utils import pytorch_worker_info

from tokensieve.data.types import VideoBatch
from tokensieve.data.video import POLICIES, decode_frames

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_video", "bad_json", "missing_field", "pickle_refused", "unreadable_shard")
"""Why a sample can be skipped: undecodable mp4; json unparseable, not an object, or with
wrongly typed fields; no mp4 member; a pickle member present; a shard (or part of one) that
could not be read (the record's key is then the shard URL)."""

PICKLE_EXTENSIONS = frozenset({"pt", "pth", "pkl", "pickle", "pyd"})
"""Member extensions that mean pickled Python objects; samples carrying them are refused."""

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


def _seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (unlike ``hash``, same in every process)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def skip_record(reason: str, key: str) -> dict:
    """The record that stands in for a dropped sample: ``{"__skip__": reason, "__key__": key}``."""
    return {"__skip__": reason, "__key__": key}


class VideoShardDataset(IterableDataset):
    """Stream decoded clips from WebDataset shards (``IterableDataset``).

    Yields dicts ``{"__key__", "frames": uint8 [T, H, W, 3], "timestamps": float32 [T]
    (seconds), "question": str, "options": list[str], "answer": str, "meta": dict}`` or skip
    records (see :func:`skip_record`); batch them with :func:`collate_videos` /
    :func:`make_loader`.

    Shards are split across DDP ranks (``wds.split_by_node``) and DataLoader workers
    (``wds.split_by_worker``), so each sample is read once per epoch when there are at
    least as many shards as ranks × workers (fewer shards leave some workers idle).

    Randomness is reproducible from ``seed`` and the epoch set with :meth:`set_epoch`: the
    shard order, the shuffle buffer (per rank and worker) and the jitter of frame sampling
    (per sample key) all derive from them. ``resampled=True`` draws shards with replacement
    (webdataset's ``ResampledShards``, which seeds itself from time and pid — not
    reproducible) and never ends unless ``epoch_length`` is set.

    Args:
        urls: brace pattern string, list of URLs/paths, or a directory (all ``*.tar`` in it).
        num_frames: T, frames sampled per clip.
        size: ``(H, W)`` in pixels every frame is resized to; ``None`` keeps the native size
            (then clips of different sizes cannot be batched together).
        sample_policy: ``"uniform"`` or ``"jitter"`` (see :func:`~tokensieve.data.video.sample_indices`).
        shuffle_buffer: samples held in the shuffle buffer; 0 turns shuffling (of shards and
            samples) off.
        seed: base seed.
        resampled: sample shards with replacement, endlessly.
        epoch_length: if given, each epoch yields this many records (samples and skip
            records) per rank, shared across workers, repeating the shards as needed; exact
            when every worker has a shard (a worker without one yields nothing, with a warning).

    Raises:
        ValueError: bad ``num_frames``, ``size``, ``sample_policy``, ``shuffle_buffer`` or
            ``epoch_length``, or no shards (see :func:`expand_urls`).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        num_frames: int,
        size: tuple[int, int] | None,
        sample_policy: str = "uniform",
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
    ):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be (H, W) with positive entries or None, got {size!r}")
        if sample_policy not in POLICIES:
            raise ValueError(f"sample_policy must be one of {POLICIES}, got {sample_policy!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.urls = expand_urls(urls)
        self.num_frames = num_frames
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.sample_policy = sample_policy
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.epoch = 0
        self._warn = _SkipWarner()
        self._pending: list[dict] = []

    @property
    def frame_shape(self) -> tuple[int, int, int] | None:
        """``(T, H, W)`` of every sample's frames, or None when ``size`` is None."""
        return None if self.size is None else (self.num_frames, *self.size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds shuffling and jitter; call before each epoch's iteration.

        DataLoader workers receive a fresh copy of the dataset each epoch
        (``persistent_workers=False``), so the value set here reaches them.
        """
        self.epoch = epoch

    # -- pipeline ---------------------------------------------------------------------

    def _on_shard_error(self, exn: Exception) -> bool:
        """webdataset ``handler``: record an unreadable shard as a skip record, keep going."""
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
        for arg in getattr(exn, "args", ()):
            if isinstance(arg, str) and arg in known:
                return arg
            if isinstance(arg, str) and " @ " in arg:  # tar member errors: "message @ <file object>"
                return arg.rsplit(" @ ", 1)[-1]
        return "<unknown shard>"

    def _pipeline(self) -> wds.WebDataset:
        shuffle = self.shuffle_buffer > 0
        dataset = wds.WebDataset(
            self.urls,
            handler=self._on_shard_error,
            resampled=self.resampled,
            shardshuffle=len(self.urls) if shuffle and not self.resampled else False,
            detshuffle=True,
            seed=_seed("shards", self.seed, self.epoch),
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        if shuffle:
            rank, _, worker, _ = pytorch_worker_info()
            dataset = dataset.shuffle(self.shuffle_buffer, seed=_seed("samples", self.seed, self.epoch, rank, worker))
        return dataset.map(self.decode_sample)

    def decode_sample(self, sample: dict) -> dict:
        """Turn one raw webdataset sample (member extension → bytes) into a decoded sample.

        Returns the decoded dict (see the class doc) or a skip record; never raises for bad
        data. Frames are decoded with :func:`~tokensieve.data.video.decode_frames`; jitter is
        seeded from ``(seed, epoch, key)``.
        """
        key = str(sample.get("__key__", "<no key>"))
        members = [name for name in sample if not name.startswith("__")]
        if any(name.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS for name in members):
            return self._skip("pickle_refused", key, f"members {sorted(members)}")
        if "mp4" not in sample:
            return self._skip("missing_field", key, f"no mp4 member (has {sorted(members)})")
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, ValueError) as exn:
                return self._skip("bad_json", key, str(exn))
            if not isinstance(meta, dict):
                return self._skip("bad_json", key, f"json is a {type(meta).__name__}, not an object")
        question, options, answer = meta.pop("question", ""), meta.pop("options", []), meta.pop("answer", "")
        if not (isinstance(question, str) and isinstance(answer, str)):
            return self._skip("bad_json", key, "question and answer must be strings")
        if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
            return self._skip("bad_json", key, "options must be a list of strings")
        if "txt" in sample and not meta.get("caption"):
            meta["caption"] = bytes(sample["txt"]).decode("utf-8", errors="replace")
        rng = random.Random(_seed("frames", self.seed, self.epoch, key)) if self.sample_policy == "jitter" else None
        try:
            frames, timestamps = decode_frames(
                sample["mp4"], self.num_frames, self.size, self.sample_policy, rng, name=key
            )
        except (av.FFmpegError, ValueError, OSError, EOFError) as exn:
            return self._skip("corrupt_video", key, str(exn))
        return {
            "__key__": key,
            "frames": frames,
            "timestamps": timestamps,
            "question": question,
            "options": options,
            "answer": answer,
            "meta": meta,
        }

    def _skip(self, reason: str, key: str, detail: str) -> dict:
        self._warn(reason, key, detail)
        return skip_record(reason, key)

    # -- iteration --------------------------------------------------------------------

    def _one_pass(self) -> Iterator[dict]:
        self._pending = []
        for sample in self._pipeline():
            yield from self._drain()
            yield sample
        yield from self._drain()

    def _drain(self) -> Iterator[dict]:
        while self._pending:
            yield self._pending.pop(0)

    def _repeated(self) -> Iterator[dict]:
        """Passes over the shards back to back; stops if a whole pass yields nothing."""
        while True:
            produced = False
            for sample in self._one_pass():
                produced = True
                yield sample
            if not produced:
                return

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, workers = pytorch_worker_info()
        if not self.resampled and len(self.urls) < world_size * workers and rank == 0 and worker == 0:
            log.warning(
                "%d shards for %d ranks x %d workers: some workers get no shard%s",
                len(self.urls), world_size, workers, "" if self.epoch_length is None else " and epochs run short",
            )
        if self.epoch_length is None:
            return self._one_pass()
        share = self.epoch_length // workers + (1 if worker < self.epoch_length % workers else 0)
        return islice(self._repeated(), share)


def collate_videos(samples: list[dict], frame_shape: tuple[int, int, int] | None = None) -> VideoBatch:
    """Stack decoded samples into a :class:`VideoBatch`; count skip records into ``skipped``.

    Args:
        samples: dicts from :class:`VideoShardDataset` (decoded samples and skip records).
        frame_shape: ``(T, H, W)`` used for an empty batch (every sample skipped) so its
            ``frames`` is ``[0, T, H, W, 3]``; ``(0, 0, 0)`` when unknown.

    Returns:
        ``VideoBatch`` with ``frames uint8 [B, T, H, W, 3]``, ``timestamps float32 [B, T]``
        (seconds), ``frame_mask bool [B, T]`` (all True: short clips are sampled with
        repetition, not padded), questions / options / answers / keys / meta of length B,
        and ``skipped`` (reason → count). B may be 0.

    Raises:
        ValueError: samples whose frames differ in shape (e.g. ``size=None`` with clips of
            different sizes); the message names the keys.
    """
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
    shapes = {tuple(s["frames"].shape) for s in good}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch frames of shapes {sorted(shapes)} (keys {[s['__key__'] for s in good]})")
    frames = torch.stack([s["frames"] for s in good])
    return VideoBatch(
        frames=frames,
        timestamps=torch.stack([s["timestamps"] for s in good]).float(),
        frame_mask=torch.ones(frames.shape[:2], dtype=torch.bool),
        questions=[s["question"] for s in good],
        options=[list(s["options"]) for s in good],
        answers=[s["answer"] for s in good],
        keys=[s["__key__"] for s in good],
        meta=[s["meta"] for s in good],
        skipped=skipped,
    )


def make_loader(dataset: VideoShardDataset, batch_size: int, num_workers: int = 0, **kwargs) -> DataLoader:
    """A ``DataLoader`` yielding :class:`VideoBatch` (``collate_fn=collate_videos``).

    ``persistent_workers=False`` so each epoch's workers get the dataset's current epoch
    (see :meth:`VideoShardDataset.set_epoch`). Batches are formed inside each worker, so
    the last batch of each worker may be short. Extra ``kwargs`` go to ``DataLoader``
    (``pin_memory``, ``prefetch_factor``, ...).
    """
    collate = partial(collate_videos, frame_shape=getattr(dataset, "frame_shape", None))
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
