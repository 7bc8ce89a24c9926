"""Video decoding, frame sampling, resizing and clip encoding with PyAV.

Everything here works on one video at a time, given as a path or as the raw bytes of a
container (what a WebDataset shard holds). Frames are decoded sequentially and only the
sampled ones are converted to RGB (and resized, by FFmpeg's swscale through PyAV); decoding
stops as soon as the last sampled frame is reached.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

import av
import numpy as np
import torch

VideoSource = Union[bytes, bytearray, memoryview, str, os.PathLike]
"""A video given as the bytes of a container (mp4, webm, ...) or as a file path."""

POLICIES = ("uniform", "jitter")


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


def video_stream(container: av.container.InputContainer, label: str) -> av.video.stream.VideoStream:
    """The first video stream of ``container``, set to multi-threaded decoding.

    Raises:
        ValueError: the container has no video stream (the message names ``label``).
    """
    if not container.streams.video:
        raise ValueError(f"{label}: no video stream in container")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
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

    - ``"uniform"``: the centre of each segment, ``floor((i + 0.5) * n / T)``; deterministic.
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
    if policy == "uniform":
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


def _decode_stream(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    indices: list[int] | None,
    size: tuple[int, int] | None,
) -> tuple[dict[int, tuple[np.ndarray, float]], int, bool]:
    """Decode sequentially, converting only the frames at ``indices``.

    Returns ``(frames, decoded, complete)``: ``frames`` maps index → (RGB array, seconds
    from stream start); ``decoded`` counts frames decoded before stopping; ``complete`` is
    True when every wanted index was reached. ``indices=None`` decodes the whole stream just
    to count its frames. A decode error mid-stream ends the stream (the frames before it are
    kept), so truncated files behave like short ones.
    """
    wanted = set(indices or ())
    last = max(indices) if indices else None
    out: dict[int, tuple[np.ndarray, float]] = {}
    decoded = 0
    resize = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    fps = _fps(stream)
    start = stream.start_time or 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted:
                if frame.pts is not None and stream.time_base is not None:
                    t = float((frame.pts - start) * stream.time_base)
                else:
                    t = index / fps if fps else 0.0
                out[index] = (frame.to_ndarray(format="rgb24", interpolation="BICUBIC", **resize), t)
            if last is not None and index >= last:
                break
    except av.FFmpegError:
        pass  # damaged data: keep what decoded so far
    return out, decoded, last is not None and decoded > last


def decode_frames(
    src: VideoSource,
    num_frames: int,
    size: tuple[int, int] | None,
    policy: str = "uniform",
    rng=None,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``num_frames`` sampled frames of a video as RGB.

    Indices come from :func:`sample_indices` over the header's frame count. Frames are
    decoded in order and decoding stops after the last sampled frame. If the stream holds
    fewer decodable frames than the header claims (truncated or damaged files), indices are
    re-drawn over the frames that exist and the video is decoded again; clips shorter than
    ``num_frames`` are sampled with repetition. Resizing uses FFmpeg's bicubic swscale
    (``VideoFrame.to_ndarray(width, height, format="rgb24", interpolation="BICUBIC")``);
    the aspect ratio is not preserved.

    Args:
        src: the container's bytes or a file path.
        num_frames: T, frames to return (>= 1).
        size: ``(H, W)`` output size in pixels, or ``None`` for the native size.
        policy: ``"uniform"`` or ``"jitter"`` (see :func:`sample_indices`).
        rng: random source for ``"jitter"``.
        name: what errors call the video (a shard key, say); defaults to the path.

    Returns:
        ``frames``: ``uint8 [T, H, W, 3]`` RGB; ``timestamps``: ``float32 [T]``, presentation
        time of each returned frame in seconds from the start of the stream, non-decreasing.

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: the video cannot be opened, has no video stream, or has no decodable
            frame (the message names ``name`` or the path); bad ``num_frames``/``size``/``policy``.
    """
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (H, W) with positive entries, got {size!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    label = _label(src, name)
    with open_video(src, label) as container:
        stream = video_stream(container, label)
        claimed = _frame_count(stream, container)
        indices = sample_indices(claimed, num_frames, policy, rng) if claimed > 0 else None
        frames, decoded, complete = _decode_stream(container, stream, indices, size)
    if not complete:  # fewer decodable frames than the header claims (or no count in it)
        if decoded == 0:
            raise ValueError(f"{label}: no decodable video frames")
        indices = sample_indices(decoded, num_frames, policy, rng)
        with open_video(src, label) as container:
            frames, _, complete = _decode_stream(container, video_stream(container, label), indices, size)
        if not complete:
            raise ValueError(f"{label}: video decodes inconsistently ({decoded} frames, then fewer)")
    images = np.stack([frames[i][0] for i in indices])
    times = np.asarray([frames[i][1] for i in indices], dtype=np.float32)
    return torch.from_numpy(images), torch.from_numpy(times)


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
    processors pass their own ``min_pixels``/``max_pixels``.

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
) -> bytes:
    """Encode RGB frames as an in-memory H.264 mp4 (yuv420p, libx264 through PyAV).

    Args:
        frames: ``uint8 [T, H, W, 3]`` RGB, T >= 1; H and W must be even (yuv420p).
        fps: frame rate in frames per second (a float such as 29.97 is turned into the
            nearest fraction with denominator <= 1001, e.g. 30000/1001).
        crf: x264 constant rate factor (lower = better quality, larger file).
        preset: x264 speed preset.

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
        stream.options = {"crf": str(crf), "preset": preset}
        for image in array:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
