"""LightningDataModule over WebDataset video shards (``tokensieve.data.reader``)."""

from __future__ import annotations

import pytorch_lightning as pl

from tokensieve.data.reader import VideoShardDataset, make_loader


class VideoDataModule(pl.LightningDataModule):
    """Train / val loaders of decoded clips.

    Args:
        train_shards, val_shards: shard directory, brace pattern (``clips-{000000..000009}.tar``) or list.
        num_frames: T frames sampled per clip.
        size: ``[H, W]`` in pixels after resizing (multiples of 28 for Qwen2.5-VL).
        batch_size, num_workers: loader settings.
        shuffle_buffer: samples held for shuffling the training stream (0 = off).
        seed: shard/sample shuffle seed (combined with the epoch by the reader).
        train_policy: frame sampling for training ("jitter" or "uniform"); validation is always uniform.
    """

    def __init__(self, train_shards: str, val_shards: str | None = None, num_frames: int = 16, size: tuple[int, int] = (140, 140), batch_size: int = 4, num_workers: int = 0, shuffle_buffer: int = 64, seed: int = 0, train_policy: str = "jitter"):
        super().__init__()
        self.save_hyperparameters()

    def _dataset(self, urls: str, train: bool) -> VideoShardDataset:
        hp = self.hparams
        return VideoShardDataset(
            urls,
            num_frames=hp.num_frames,
            size=tuple(hp.size),
            sample_policy=hp.train_policy if train else "uniform",
            shuffle_buffer=hp.shuffle_buffer if train else 0,
            seed=hp.seed,
        )

    def train_dataloader(self):
        return make_loader(self._dataset(self.hparams.train_shards, train=True), self.hparams.batch_size, self.hparams.num_workers)

    def val_dataloader(self):
        if not self.hparams.val_shards:
            return []
        return make_loader(self._dataset(self.hparams.val_shards, train=False), self.hparams.batch_size, self.hparams.num_workers)
