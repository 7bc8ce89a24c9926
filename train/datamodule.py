"""LightningDataModule over WebDataset shards (``tokensieve.data.reader``): video or cached features."""

from __future__ import annotations

import pytorch_lightning as pl

from tokensieve.data.reader import VideoShardDataset, make_loader
from tokensieve.data.video import FixedSize, QwenResize

RESIZE_MODES = ("fixed", "qwen", "native")


class VideoDataModule(pl.LightningDataModule):
    """Train / val loaders of decoded clips — or of cached features: point ``train_shards`` /
    ``val_shards`` at the output of ``tokensieve cache-features`` and the same recipe trains
    without the vision tower (frame options are then unused).

    Args:
        train_shards, val_shards: shard directory, brace pattern (``clips-{000000..000009}.tar``),
            list, or weighted sources (``"a/@0.7::b/@0.3"`` or a mapping ``{a/: 0.7, b/: 0.3}``;
            see :func:`tokensieve.data.reader.parse_sources`). video2dataset output works as is.
        num_frames: T frames sampled per clip (the most, with ``train_policy: fps``).
        size: ``[H, W]`` in pixels after resizing (``resize: fixed``; multiples of 28 for Qwen2.5-VL).
        batch_size, num_workers: loader settings.
        shuffle_buffer: raw samples held for shuffling the training stream (0 = off).
        seed: shard/sample shuffle seed (combined with the epoch by the reader).
        train_policy: frame sampling for training ("jitter", "uniform" or "fps"); validation
            uses "uniform" (or "fps" when training does).
        fps, frame_multiple: for the "fps" policy (frames per second; counts floored to a
            multiple — 2 for Qwen2.5-VL).
        resize: "fixed" (``size``; LLaVA-OneVision uses 384×384), "qwen" (Qwen2.5-VL dynamic
            resolution between ``min_pixels`` and ``max_pixels``; clips of different sizes
            in a batch follow ``mixed_sizes``) or "native".
        min_pixels, max_pixels: bounds for ``resize: qwen`` (transformers' video defaults).
        mixed_sizes: "error" or "resize" (to the batch's first clip) for clips of different H×W.
        resampled: draw training shards with replacement (no shard-count constraint; pair it
            with ``epoch_length``).
        epoch_length: training records per epoch over all ranks: a number, "auto" (from
            ``sizes.json``) or null (one pass). Set it for multi-GPU runs: every rank then
            runs the same number of steps.
        backend: video decoder, "pyav", "torchcodec" or "auto".
        decode_threads: decoder threads per clip (null: FFmpeg's choice; 1 when workers ≥ cores).
    """

    def __init__(
        self,
        train_shards: str | list | dict,
        val_shards: str | list | dict | None = None,
        num_frames: int = 16,
        size: tuple[int, int] = (140, 140),
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        train_policy: str = "jitter",
        fps: float | None = None,
        frame_multiple: int = 1,
        resize: str = "fixed",
        min_pixels: int = 128 * 28 * 28,
        max_pixels: int = 768 * 28 * 28,
        mixed_sizes: str = "error",
        resampled: bool = False,
        epoch_length: int | str | None = None,
        backend: str = "pyav",
        decode_threads: int | None = None,
    ):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.save_hyperparameters()

    def _size(self):
        hp = self.hparams
        if hp.resize == "qwen":
            return QwenResize(hp.min_pixels, hp.max_pixels)
        if hp.resize == "native":
            return None
        return FixedSize(int(hp.size[0]), int(hp.size[1]))

    def _dataset(self, urls, train: bool) -> VideoShardDataset:
        hp = self.hparams
        policy = hp.train_policy if train else ("fps" if hp.train_policy == "fps" else "uniform")
        return VideoShardDataset(
            urls,
            num_frames=hp.num_frames,
            size=self._size(),
            sample_policy=policy,
            shuffle_buffer=hp.shuffle_buffer if train else 0,
            seed=hp.seed,
            resampled=hp.resampled if train else False,
            epoch_length=hp.epoch_length if train else None,
            fps=hp.fps,
            frame_multiple=hp.frame_multiple,
            backend=hp.backend,
            decode_threads=hp.decode_threads,
            training=train,
        )

    def _loader(self, urls, train: bool):
        hp = self.hparams
        return make_loader(self._dataset(urls, train), hp.batch_size, hp.num_workers, mixed_sizes=hp.mixed_sizes)

    def train_dataloader(self):
        return self._loader(self.hparams.train_shards, train=True)

    def val_dataloader(self):
        if not self.hparams.val_shards:
            return []
        return self._loader(self.hparams.val_shards, train=False)
