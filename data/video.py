"""Video decoding, frame sampling, resizing, clip encoding and stream-copy cutting.

Everything here works on one video at a time, given as a path or as the raw bytes of a
container (what a WebDataset shard holds).

Decoding only touches the frames it needs. :func:`decode_frames` first demuxes the stream
(reading packets, decoding nothing) to get the exact presentation time of every frame and
where the keyframes are; it then picks the sampled frames by position, and decodes them
keyframe by keyframe: it seeks to the keyframe at or before the next sampled frame whenever
that skips frames, and otherwise decodes forward. Only sampled frames are converted to RGB
(and resized, by FFmpeg's swscale through PyAV). Damaged files whose packets do not decode
fall back to a sequential decode of whatever frames survive.

Backends: PyAV (the default, always installed) or torchcodec (``backend="torchcodec"``, or
``"auto"`` which picks torchcodec when it is importable). torchcodec resizes with bilinear +
antialias, PyAV with bicubic swscale: the two give slightly different pixels for the same
frame indices.
"""

from __future__ import annotations

import bisect
import importlib.util
import io
import math
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Union

import av
import numpy as np
import torch

VideoSource = Union[bytes, bytearray, memoryview, str, os.PathLike]
"""A video given as the bytes of a container (mp4, webm, ...) or as a file path."""

POLICIES = ("uniform", "jitter", "fps")
"""Frame sampling policies: ``uniform`` T frames (segment centres), ``jitter`` (a random frame
per segment, for training), ``fps`` (``fps`` frames per second, at most T, see
:func:`frames_for_fps`)."""

BACKENDS = ("pyav", "torchcodec", "auto")

SizeSpec = Union[tuple[int, int], Callable[[int, int], tuple[int, int]], None]
"""How frames are resized: ``(H, W)``; a policy ``f(height, width) -> (H, W)`` applied to the
video's native size (:class:`FixedSize`, :class:`QwenResize`); or ``None`` (native size)."""


@dataclass(frozen=True)
class VideoInfo:
    """Container-level facts about a video's first video stream.

    Attributes:
        num_frames: frame count from the container header, or ``round(duration_s * fps)``
            when the header has none (0 when neither is known). An estimate: the number of
            *decodable* frames can differ for damaged files.
        fps: average frame rate, frames per second.
        duration_s: duration in seconds.
        width: frame width in pixels.
        height: frame height in pixels.
    """

    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


# -- resize policies -----------------------------------------------------------------------


@dataclass(frozen=True)
class FixedSize:
    """Every frame becomes ``height × width`` (aspect ratio not kept), e.g. LLaVA-OneVision's 384×384."""

    height: int
    width: int

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"size must be positive, got {self.height}x{self.width}")

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class QwenResize:
    """Qwen2-VL / Qwen2.5-VL dynamic resolution: :func:`smart_resize` of each clip's native size.

    Defaults are transformers' ``Qwen2VLVideoProcessor`` (``size = {"shortest_edge": 128*28*28,
    "longest_edge": 768*28*28}``, factor = patch 14 × merge 2). Clips of different native
    sizes get different sizes, so a batch of them cannot be stacked: use batch size 1,
    bucket clips by size, or let :func:`~tokensieve.data.reader.collate_videos` resize them
    to one size (``mixed_sizes="resize"``).
    """

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    factor: int = 28

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def resize_policy(size: SizeSpec) -> Callable[[int, int], tuple[int, int]] | None:
    """Normalise a :data:`SizeSpec`: ``(H, W)`` → :class:`FixedSize`; callables and ``None`` as given.

    Raises:
        ValueError: a sequence that is not two positive integers.
    """
    if size is None or callable(size):
        return size
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive entries, a resize policy or None, got {size!r}")
    return FixedSize(int(size[0]), int(size[1]))


# -- opening and probing ------------------------------------------------------------------


def _label(src: VideoSource, name: str | None) -> str:
    """How errors refer to ``src``: the given name, else the path, else ``<bytes>``."""
    if name is not None:
        return name
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src)


def open_video(src: VideoSource, label: str) -> av.container.InputContainer:
    """Open ``src`` (bytes or path) with PyAV for reading; use as a context manager.

    Raises:
        FileNotFoundError: a path that does not exist (the message names ``label``).
        ValueError: data FFmpeg cannot open (the message names ``label``).
    """
    file = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    try:
        return av.open(file, mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"video not found: {label}") from None
    except av.FFmpegError as exn:
        raise ValueError(f"{label}: cannot open video ({exn})") from exn


def video_stream(container: av.container.InputContainer, label: str, threads: int | None = None) -> av.video.stream.VideoStream:
    """The first video stream of ``container``, set to multi-threaded decoding.

    Args:
        threads: decoder threads; ``None`` lets FFmpeg choose (one per core), ``1`` decodes
            on the calling thread only (what DataLoader workers want when there is one
            worker per core).

    Raises:
        ValueError: the container has no video stream (the message names ``label``).
    """
    if not container.streams.video:
        raise ValueError(f"{label}: no video stream in container")
    stream = container.streams.video[0]
    if threads is None or threads > 1:
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
    return stream


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration_s(stream: av.video.stream.VideoStream, container: av.container.InputContainer) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _frame_count(stream: av.video.stream.VideoStream, container: av.container.InputContainer) -> int:
    if stream.frames > 0:
        return int(stream.frames)
    return int(round(_duration_s(stream, container) * _fps(stream)))


def probe(src: VideoSource, *, name: str | None = None) -> VideoInfo:
    """Read a video's header (nothing is decoded).

    Args:
        src: the container's bytes or a file path.
        name: what errors call the video (a shard key, say); defaults to the path.

    Returns:
        :class:`VideoInfo` of the first video stream.

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: the container cannot be opened or has no video stream.
    """
    label = _label(src, name)
    with open_video(src, label) as container:
        stream = video_stream(container, label)
        return VideoInfo(
            num_frames=_frame_count(stream, container),
            fps=_fps(stream),
            duration_s=_duration_s(stream, container),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
        )


# -- sampling -------------------------------------------------------------------------------


def _randrange(rng, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi)`` from a ``random.Random`` or a numpy generator."""
    if isinstance(rng, random.Random):
        return rng.randrange(lo, hi)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(lo, hi))
    if isinstance(rng, np.random.RandomState):
        return int(rng.randint(lo, hi))
    raise TypeError(f"rng must be random.Random or a numpy Generator/RandomState, got {type(rng).__name__}")


def sample_indices(num_frames: int, num_samples: int, policy: str = "uniform", rng=None) -> list[int]:
    """Pick ``num_samples`` frame indices out of ``num_frames`` (TSN-style segment sampling).

    The clip is cut into ``T = num_samples`` equal segments; segment ``i`` covers frames
    ``[floor(i*n/T), floor((i+1)*n/T))`` (at least one frame).

    - ``"uniform"`` (and ``"fps"``, whose count is chosen by :func:`frames_for_fps`): the
      centre of each segment, ``floor((i + 0.5) * n / T)``; deterministic.
    - ``"jitter"``: a uniformly random frame inside each segment, drawn from ``rng``
      (``random.Random`` or ``numpy.random.Generator``/``RandomState``; a fresh unseeded
      ``random.Random`` when ``None``).

    When ``n < T`` indices repeat (short clips are sampled with repetition). The result is
    non-decreasing and every index lies in ``[0, n)``.

    Raises:
        ValueError: ``num_frames < 1``, ``num_samples < 1`` or an unknown policy.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    n, t = num_frames, num_samples
    if policy in ("uniform", "fps"):
        return [int((i + 0.5) * n / t) for i in range(t)]
    if policy == "jitter":
        rng = random.Random() if rng is None else rng
        indices = []
        for i in range(t):
            lo = (i * n) // t
            hi = max(lo + 1, ((i + 1) * n) // t)
            indices.append(_randrange(rng, lo, hi))
        return indices
    raise ValueError(f"unknown sampling policy {policy!r}; expected one of {POLICIES}")


def frames_for_fps(duration_s: float, fps: float, max_frames: int, available: int, multiple: int = 1) -> int:
    """How many frames the ``"fps"`` policy samples from a clip.

    ``duration_s * fps`` frames (at least ``multiple``, at least 1), capped at ``max_frames``
    and at the ``available`` frames, then floored to a multiple of ``multiple`` (Qwen2.5-VL
    wants an even count: its temporal patch is 2 frames). This is transformers'
    ``Qwen2VLVideoProcessor.sample_frames`` rule without its ``min_frames`` floor.

    Raises:
        ValueError: non-positive ``fps``, ``max_frames`` or ``multiple``.
    """
    if fps <= 0 or max_frames < 1 or multiple < 1:
        raise ValueError(f"fps, max_frames and multiple must be positive, got {fps}, {max_frames}, {multiple}")
    cap = max(min(max_frames, available), 1)
    count = min(max(duration_s * fps, 1.0), cap)
    floored = int(math.floor(count / multiple)) * multiple
    return max(floored, min(multiple, cap), 1)


# -- frame tables and planned decoding --------------------------------------------------


@dataclass
class FrameTable:
    """Every frame of a stream in presentation order, from demuxing (nothing decoded).

    Attributes:
        pts: presentation timestamps in ``time_base`` units, ascending, unique.
        keyframe: whether each frame is a keyframe (decoding can start there).
        time_base: seconds per pts unit.
        start: the stream's start pts (time 0 of :attr:`times`).
    """

    pts: list[int]
    keyframe: list[bool]
    time_base: Fraction
    start: int

    def __len__(self) -> int:
        return len(self.pts)

    def time(self, position: int) -> float:
        """Seconds from the stream start of frame ``position``."""
        return float((self.pts[position] - self.start) * self.time_base)

    def __post_init__(self) -> None:
        self._keys = [i for i, k in enumerate(self.keyframe) if k]

    def times(self) -> list[float]:
        """Seconds from the stream start of every frame."""
        return [float((p - self.start) * self.time_base) for p in self.pts]

    def keyframe_before(self, position: int) -> int:
        """Position of the last keyframe at or before ``position`` (0 if none)."""
        i = bisect.bisect_right(self._keys, position) - 1
        return self._keys[i] if i >= 0 else 0


def _demux_entries(container, stream, end_pts: int | None) -> dict[int, bool] | None:
    entries: dict[int, bool] = {}
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None:
                return None
            if end_pts is not None and packet.dts is not None and packet.dts >= end_pts:
                break  # every frame shown before end_pts has been read (dts <= pts)
            entries[packet.pts] = entries.get(packet.pts, False) or bool(packet.is_keyframe)
    except av.FFmpegError:
        pass
    return entries


def frame_table(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    window: tuple[float, float] | None = None,
) -> FrameTable | None:
    """Demux ``stream`` (no decoding) into a :class:`FrameTable`.

    Args:
        window: ``(start, end)`` seconds: only demux from the keyframe at or before ``start``
            (a seek through the container's index) up to ``end`` — what cutting one range
            out of a long file needs, instead of reading the whole file. Falls back to the
            whole stream when the seek does not land on a keyframe at or before ``start``.

    Returns ``None`` when packets carry no timestamps (then only sequential decoding works).
    A demuxing error part-way keeps the packets read so far. The container is left somewhere
    in the stream: seek before decoding.
    """
    if stream.time_base is None:
        return None
    tb = Fraction(stream.time_base)
    origin = stream.start_time or 0
    entries = None
    if window is not None and window[0] > 0:
        start_pts = origin + int(math.floor(window[0] / tb))
        end_pts = None if not math.isfinite(window[1]) else origin + int(math.ceil(window[1] / tb))
        try:
            container.seek(start_pts, stream=stream, backward=True, any_frame=False)
            entries = _demux_entries(container, stream, end_pts)
        except av.FFmpegError:
            entries = None
        if entries:
            first = min(entries)
            if first > start_pts or not entries[first]:
                entries = None  # landed after the start, or not on a keyframe: read it all
        if not entries:
            container.seek(origin, stream=stream, backward=True, any_frame=False)
            entries = None
    if entries is None:
        entries = _demux_entries(container, stream, None)
    if not entries:
        return None
    pts = sorted(entries)
    start = stream.start_time if stream.start_time is not None else pts[0]
    return FrameTable(pts, [entries[p] for p in pts], tb, start)


def read_frame_table(src: VideoSource, *, name: str | None = None) -> FrameTable | None:
    """The :class:`FrameTable` of ``src``'s first video stream (``None`` without packet timestamps).

    Raises:
        FileNotFoundError, ValueError: the video cannot be opened or has no video stream.
    """
    label = _label(src, name)
    with open_video(src, label) as container:
        return frame_table(container, video_stream(container, label, threads=1))


def _rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    resize = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    return frame.to_ndarray(format="rgb24", interpolation="BICUBIC", **resize)


# Seeking flushes the decoder (and its frame threads); skipping fewer frames than this is
# cheaper done by decoding through them.
MIN_SEEK_SKIP = 4


def _decode_planned(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    table: FrameTable,
    positions: list[int],
    size: tuple[int, int] | None,
) -> dict[int, np.ndarray] | None:
    """Decode the frames at ``positions`` (sorted, unique) of ``table``, seeking keyframe to keyframe.

    Returns position → RGB array, or ``None`` when some frame could not be reached (damaged
    data): the caller then falls back to sequential decoding.
    """
    index_of = {p: i for i, p in enumerate(table.pts)}
    wanted = set(positions)
    out: dict[int, np.ndarray] = {}
    decoded_to = -1  # position of the last frame decoded by the current decode iterator
    frames = None
    try:
        for target in positions:
            if target in out:
                continue
            key = table.keyframe_before(target)
            if frames is None or (target > decoded_to and key - decoded_to > MIN_SEEK_SKIP):
                container.seek(table.pts[key], stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                decoded_to = key - 1
            while target not in out:
                frame = next(frames, None)
                if frame is None:
                    return None
                position = index_of.get(frame.pts) if frame.pts is not None else None
                if position is None:
                    continue
                decoded_to = position
                if position in wanted and position not in out:
                    out[position] = _rgb(frame, size)
                if position > target and target not in out:
                    return None  # the target frame never came out of the decoder
    except av.FFmpegError:
        return None
    return out


def _decode_sequential(
    src: VideoSource, label: str, times_only: bool, positions: set[int], size: tuple[int, int] | None, threads: int | None
) -> tuple[list[float], dict[int, np.ndarray]]:
    """Decode from the start; returns (time of every decodable frame, position → RGB for ``positions``).

    Frames are numbered by decode output order. A decode error ends the stream (the frames
    before it are kept), so truncated files behave like short ones.
    """
    times: list[float] = []
    out: dict[int, np.ndarray] = {}
    last = max(positions) if positions else None
    with open_video(src, label) as container:
        stream = video_stream(container, label, threads)
        fps = _fps(stream)
        start = stream.start_time or 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if frame.pts is not None and stream.time_base is not None:
                    times.append(float((frame.pts - start) * stream.time_base))
                else:
                    times.append(index / fps if fps else 0.0)
                if not times_only and index in positions:
                    out[index] = _rgb(frame, size)
                if last is not None and index >= last:
                    break
        except av.FFmpegError:
            pass
    return times, out


def _in_span(times: list[float], span: tuple[float, float] | None) -> list[int]:
    """Positions of the frames whose time lies in ``[span[0], span[1])`` (all when ``span`` is None)."""
    if span is None:
        return list(range(len(times)))
    lo, hi = span
    eps = 1e-6
    return [i for i, t in enumerate(times) if lo - eps <= t < hi - eps]


def _choose(
    candidates: list[int], times: list[float], num_frames: int, policy: str, rng, fps: float | None, multiple: int
) -> list[int]:
    """Sampled positions (with repetition for short clips) among ``candidates``."""
    n = len(candidates)
    if policy == "fps":
        if fps is None:
            raise ValueError("sample_policy 'fps' needs fps=...")
        duration = times[candidates[-1]] - times[candidates[0]]
        duration += duration / max(n - 1, 1) if n > 1 else 0.0  # last frame's own duration
        count = frames_for_fps(duration, fps, num_frames, n, multiple)
    else:
        count = num_frames
    return [candidates[i] for i in sample_indices(n, count, policy, rng)]


def decode_frames(
    src: VideoSource,
    num_frames: int,
    size: SizeSpec,
    policy: str = "uniform",
    rng=None,
    *,
    name: str | None = None,
    fps: float | None = None,
    frame_multiple: int = 1,
    span: tuple[float, float] | None = None,
    backend: str = "pyav",
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode sampled frames of a video as RGB, touching only the frames needed.

    Frame positions come from :func:`sample_indices` over the frames that really exist (a
    demux pass counts them; the header's count is not trusted). Decoding seeks to the
    keyframe at or before each sampled frame when that skips frames and decodes forward from
    there (see the module doc). If packets do not decode as their index promised (truncated
    or damaged files), the video is decoded sequentially instead: indices are re-drawn over
    the frames that decode. Clips shorter than T are sampled with repetition.

    Args:
        src: the container's bytes or a file path.
        num_frames: T, frames to return (>= 1); with ``policy="fps"`` the most frames returned.
        size: ``(H, W)``, a resize policy (:class:`FixedSize`, :class:`QwenResize`, any
            ``f(height, width) -> (H, W)``) or ``None`` for the native size. PyAV resizes
            with FFmpeg's bicubic swscale; the aspect ratio is not preserved.
        policy: ``"uniform"``, ``"jitter"`` or ``"fps"`` (see :data:`POLICIES`).
        rng: random source for ``"jitter"``.
        name: what errors call the video (a shard key, say); defaults to the path.
        fps: frames per second for ``policy="fps"``.
        frame_multiple: with ``policy="fps"``, the count is floored to a multiple of this.
        span: ``(start, end)`` seconds from the stream start: only frames with
            ``start <= t < end`` are sampled (a stream-copied clip that begins at an earlier
            keyframe; see :func:`cut_stream_copy`); timestamps are then relative to ``start``.
        backend: ``"pyav"``, ``"torchcodec"`` or ``"auto"`` (torchcodec when importable).
            torchcodec failures (damaged data, spans) fall back to PyAV.
        threads: PyAV decoder threads (``None``: FFmpeg's choice; 1 inside DataLoader workers
            on small machines).

    Returns:
        ``frames``: ``uint8 [T', H, W, 3]`` RGB (``T' = T`` except for ``policy="fps"``);
        ``timestamps``: ``float32 [T']``, presentation time of each frame in seconds from the
        start of the stream (or of ``span``), non-decreasing.

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: the video cannot be opened, has no video stream, or has no decodable
            frame (in ``span``) (the message names ``name`` or the path); bad arguments.
    """
    policy_fn = resize_policy(size)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if policy not in POLICIES:
        raise ValueError(f"unknown sampling policy {policy!r}; expected one of {POLICIES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    label = _label(src, name)
    if backend == "auto":
        backend = "torchcodec" if torchcodec_available() else "pyav"
    if backend == "torchcodec" and span is None:
        result = _decode_torchcodec(src, label, num_frames, policy_fn, policy, rng, fps, frame_multiple, threads)
        if result is not None:
            return result
    rng_state = rng.getstate() if isinstance(rng, random.Random) else None
    with open_video(src, label) as container:
        stream = video_stream(container, label, threads)
        out_size = policy_fn(stream.codec_context.height, stream.codec_context.width) if policy_fn else None
        table = frame_table(container, stream, span)
        frames = None
        if table is not None:
            times = table.times()
            candidates = _in_span(times, span)
            if candidates:
                positions = _choose(candidates, times, num_frames, policy, rng, fps, frame_multiple)
                frames = _decode_planned(container, stream, table, sorted(set(positions)), out_size)
    if frames is None:  # no usable index, or packets that did not decode: go sequential
        if rng_state is not None:
            rng.setstate(rng_state)  # same draw as the planned path would have made
        times, _ = _decode_sequential(src, label, True, set(), None, threads)
        candidates = _in_span(times, span)
        if not candidates:
            where = "" if span is None else f" in span {span}"
            raise ValueError(f"{label}: no decodable video frames{where}")
        positions = _choose(candidates, times, num_frames, policy, rng, fps, frame_multiple)
        _, frames = _decode_sequential(src, label, False, set(positions), out_size, threads)
        if not set(positions) <= set(frames):
            raise ValueError(f"{label}: video decodes inconsistently ({len(times)} frames, then fewer)")
    offset = span[0] if span is not None else 0.0
    images = np.stack([frames[p] for p in positions])
    stamps = np.asarray([times[p] - offset for p in positions], dtype=np.float32)
    return torch.from_numpy(images), torch.from_numpy(stamps)


def decode_range(
    src: VideoSource,
    start: float = 0.0,
    end: float | None = None,
    size: SizeSpec = None,
    *,
    name: str | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode every frame with ``start <= t < end`` (seconds from the stream start).

    Seeks to the keyframe at or before ``start`` and decodes forward (sequentially from the
    start for files without a usable packet index or with damaged packets).

    Returns:
        ``(frames uint8 [n, H, W, 3], times float64 [n] seconds from the stream start, fps)``.

    Raises:
        FileNotFoundError, ValueError: unreadable video, or no decodable frame in the range.
    """
    label = _label(src, name)
    policy_fn = resize_policy(size)
    span = (start, math.inf if end is None else end)
    with open_video(src, label) as container:
        stream = video_stream(container, label, threads)
        fps = _fps(stream)
        out_size = policy_fn(stream.codec_context.height, stream.codec_context.width) if policy_fn else None
        table = frame_table(container, stream, span)
        frames = None
        if table is not None:
            times = table.times()
            positions = _in_span(times, span)
            if positions:
                frames = _decode_planned(container, stream, table, positions, out_size)
    if frames is None:
        times, _ = _decode_sequential(src, label, True, set(), None, threads)
        positions = _in_span(times, span)
        if positions:
            _, frames = _decode_sequential(src, label, False, set(positions), out_size, threads)
            positions = [p for p in positions if p in frames]
    if not frames or not positions:
        raise ValueError(f"{label}: no decodable video frames in [{start}, {end})")
    return np.stack([frames[p] for p in positions]), np.asarray([times[p] for p in positions]), fps


# -- torchcodec ---------------------------------------------------------------------------


def torchcodec_available() -> bool:
    """Whether ``torchcodec`` can be imported (it needs FFmpeg's shared libraries)."""
    if importlib.util.find_spec("torchcodec") is None:
        return False
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # missing libavcodec, CUDA-only wheel, ...
        return False
    return True


def _decode_torchcodec(src, label, num_frames, policy_fn, policy, rng, fps, multiple, threads):
    """torchcodec path of :func:`decode_frames`; ``None`` when torchcodec cannot decode ``src``."""
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    options = {"seek_mode": "exact", "dimension_order": "NHWC", "num_ffmpeg_threads": 0 if threads is None else threads}
    try:
        if isinstance(policy_fn, FixedSize):  # size known up front: one decoder
            decoder = VideoDecoder(data, transforms=[Resize(size=[policy_fn.height, policy_fn.width])], **options)
            meta = decoder.metadata
        else:
            decoder = VideoDecoder(data, **options)
            meta = decoder.metadata
            out_size = policy_fn(meta.height, meta.width) if policy_fn else None
            if out_size is not None and tuple(out_size) != (meta.height, meta.width):
                decoder = VideoDecoder(data, transforms=[Resize(size=list(out_size))], **options)
        n = int(meta.num_frames or 0)
        if n < 1:
            return None
        step = 1.0 / float(meta.average_fps) if meta.average_fps else 0.0
        times = [i * step for i in range(n)]
        positions = _choose(list(range(n)), times, num_frames, policy, rng, fps, multiple)
        batch = decoder.get_frames_at(positions)
    except Exception:  # damaged data and any torchcodec error: let PyAV handle it
        return None
    begin = float(meta.begin_stream_seconds or 0.0)
    return batch.data.contiguous(), (batch.pts_seconds.double() - begin).float()


# -- encoding and cutting ------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """The Qwen2-VL / Qwen2.5-VL resize policy: the ``(H, W)`` a frame is resized to.

    A copy of ``smart_resize`` in transformers' Qwen2-VL image processor
    (``transformers.models.qwen2_vl.image_processing_qwen2_vl``), with the same defaults,
    so the data layer can size frames without importing transformers:

    1. both sides are rounded to the nearest multiple of ``factor`` (Python ``round``);
    2. if the area exceeds ``max_pixels`` the image is scaled down, sides floored to
       multiples of ``factor`` (never below ``factor``);
    3. if the area is below ``min_pixels`` it is scaled up, sides ceiled to multiples.

    ``factor`` is patch size × spatial merge size (14 × 2 = 28 for Qwen2.5-VL). Video
    processors pass their own ``min_pixels``/``max_pixels`` (see :class:`QwenResize`).

    Args:
        height, width: input size in pixels.
        factor: both output sides are multiples of this.
        min_pixels, max_pixels: bounds on the output area in pixels.

    Returns:
        ``(height, width)`` in pixels.

    Raises:
        ValueError: the aspect ratio ``max(h, w) / min(h, w)`` exceeds 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def write_clip(
    frames: np.ndarray | torch.Tensor,
    fps: float | Fraction,
    *,
    crf: int = 23,
    preset: str = "veryfast",
    threads: int | None = None,
) -> bytes:
    """Encode RGB frames as an in-memory H.264 mp4 (yuv420p, libx264 through PyAV).

    Args:
        frames: ``uint8 [T, H, W, 3]`` RGB, T >= 1; H and W must be even (yuv420p).
        fps: frame rate in frames per second (a float such as 29.97 is turned into the
            nearest fraction with denominator <= 1001, e.g. 30000/1001).
        crf: x264 constant rate factor (lower = better quality, larger file).
        preset: x264 speed preset.
        threads: x264 encoder threads (None: x264's choice, from the core count). x264's output
            depends on its thread count, so pass a number (e.g. 1) for byte-identical files on
            every machine.

    Returns:
        The bytes of the mp4 file.

    Raises:
        ValueError: wrong dtype/shape, odd width or height, or ``fps <= 0``.
    """
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {array.dtype} {tuple(array.shape)}")
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, **({"threads": str(threads)} if threads else {})}
        for image in array:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


COPY_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4"})
"""Codecs an mp4 container can carry as they are (stream copy into ``{key}.mp4``)."""


@dataclass(frozen=True)
class CopiedClip:
    """What :func:`cut_stream_copy` returns.

    Attributes:
        data: the mp4 bytes (the source's packets, not re-encoded).
        stored_start: source time (s) of the clip's first frame — the keyframe at or before
            the requested start.
        span: ``(start, end)`` seconds *within the clip* of the requested range: the reader
            samples only frames in it (the clip may begin earlier, at the keyframe, and end a
            few frames later, where B-frames needed them).
        num_frames: frames in the requested range.
        width, height: frame size in pixels.
        fps: average frame rate.
    """

    data: bytes
    stored_start: float
    span: tuple[float, float]
    num_frames: int
    width: int
    height: int
    fps: float


def cut_stream_copy(
    src: VideoSource,
    start: float = 0.0,
    end: float | None = None,
    *,
    max_lead: float | None = None,
    name: str | None = None,
    table: FrameTable | None = None,
) -> CopiedClip | None:
    """Cut ``[start, end)`` seconds out of a video *without re-encoding* (PyAV remux to mp4).

    Packets are copied from the keyframe at or before ``start``: a stream copy can only begin
    at a keyframe, so the clip usually starts a little before ``start`` (up to one GOP — x264's
    default keyframe interval is 250 frames, 10 s at 25 fps). Packets are copied in decode
    order while their decode time is before ``end``, so every frame shown before ``end``
    decodes. :attr:`CopiedClip.span` says which part of the clip was asked for; the reader
    samples inside it.

    Args:
        src: the source video (bytes or path).
        start, end: range in seconds from the stream start; ``end=None`` is the end of the video.
        max_lead: give up (return ``None``) when the keyframe lies more than this many
            seconds before ``start`` — the clip would carry too much unwanted video; re-encode
            instead.
        name: what errors call the video.
        table: the source's :class:`FrameTable` when already known (see
            :func:`read_frame_table`): cutting many clips out of one video then demuxes
            only each clip's packets instead of the whole file per clip.

    Returns:
        A :class:`CopiedClip`, or ``None`` when stream copy is not possible here: codec not
        storable in mp4 (see :data:`COPY_CODECS`), packets without timestamps, no frame in
        the range, ``max_lead`` exceeded, or a muxing error.

    Raises:
        FileNotFoundError, ValueError: the source cannot be opened or has no video stream.
    """
    label = _label(src, name)
    with open_video(src, label) as container:
        stream = video_stream(container, label, threads=1)
        if stream.codec_context.name not in COPY_CODECS:
            return None
        if table is None:
            table = frame_table(container, stream, (start, math.inf if end is None else end))
        if table is None:
            return None
        times = table.times()
        inside = _in_span(times, (start, math.inf if end is None else end))
        if not inside:
            return None
        key = table.keyframe_before(inside[0])
        if not table.keyframe[key]:
            return None  # no keyframe before the range: the first frames would not decode
        lead = start - times[key]
        if max_lead is not None and lead > max_lead + 1e-6:
            return None
        key_pts = table.pts[key]
        end_pts = None if end is None else table.start + int(math.ceil(end / table.time_base))
        buffer = io.BytesIO()
        try:
            container.seek(key_pts, stream=stream, backward=True, any_frame=False)
            with av.open(buffer, mode="w", format="mp4") as output:
                out_stream = output.add_stream_from_template(stream)
                for packet in container.demux(stream):
                    if packet.size == 0 or packet.pts is None or packet.dts is None:
                        continue
                    if end_pts is not None and packet.dts >= end_pts:
                        break
                    if packet.pts < key_pts:
                        continue  # leading frames of an open GOP: they reference the previous GOP
                    packet.pts -= key_pts
                    packet.dts -= key_pts
                    packet.stream = out_stream
                    output.mux(packet)
        except (av.FFmpegError, ValueError):
            return None
        first = times[key]
        if end is None:
            step = times[inside[-1]] - times[inside[-2]] if len(inside) > 1 else 1.0 / max(_fps(stream), 1e-6)
            span_end = times[inside[-1]] + step - first
        else:
            span_end = end - first
        return CopiedClip(
            data=buffer.getvalue(),
            stored_start=first,
            span=(round(max(start - first, 0.0), 6), round(span_end, 6)),
            num_frames=len(inside),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=_fps(stream),
        )
