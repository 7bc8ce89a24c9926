"""LightningModules: a frozen backbone plus a trainable compressor.

The backbone is held *outside* the module tree (not a registered submodule), so it never
reaches the optimizer, the DDP wrapper or the checkpoint; it is referenced by path +
revision in the hyperparameters and reloaded on resume. Only ``self.compressor`` is saved.
"""

from __future__ import annotations

from collections import Counter

import pytorch_lightning as pl
import torch
from torchmetrics.functional import spearman_corrcoef

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones import Backbone, load
from tokensieve.models.compressors import LearnedCompressor, get_compressor
from tokensieve.models.losses import spearman_loss


class CompressorModule(pl.LightningModule):
    """Base module: loads the frozen backbone and builds the compressor.

    Args:
        backbone: local folder or hub id of the frozen VLM (``tokensieve.models.backbones.load``).
        compressor: registry name of a learned compressor.
        compressor_kwargs: its constructor arguments (``hidden_size`` is filled from the backbone).
        backbone_kwargs: ``dtype``, ``attn_implementation``, ``revision`` … for the backbone.
        lr, weight_decay: AdamW settings for the compressor's parameters.
    """

    def __init__(self, backbone: str, compressor: str, compressor_kwargs: dict | None = None, backbone_kwargs: dict | None = None, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        frozen = load(backbone, **(backbone_kwargs or {}))
        object.__setattr__(self, "_backbone", frozen)  # not a submodule: never trained, never saved
        kwargs = {"hidden_size": frozen.model.config.text_config.hidden_size, **(compressor_kwargs or {})}
        self.compressor = get_compressor(compressor, **kwargs)
        if not isinstance(self.compressor, LearnedCompressor):
            raise TypeError(f"compressor {compressor!r} is training-free: nothing to train")
        self.skipped: Counter = Counter()

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    # the backbone follows the module to its device at the start of every loop
    def _place_backbone(self) -> None:
        if self.backbone.device != self.device:
            self.backbone.to(self.device)

    def on_fit_start(self) -> None:
        self._place_backbone()

    def on_train_epoch_start(self) -> None:
        # Lightning sets the epoch on samplers only; our iterable dataset reseeds its shard
        # order, shuffle buffer and frame jitter from (seed, epoch) — before workers start
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_validation_start(self) -> None:
        self._place_backbone()

    def on_test_start(self) -> None:
        self._place_backbone()

    def transfer_batch_to_device(self, batch: VideoBatch, device: torch.device, dataloader_idx: int) -> VideoBatch:
        return batch.to(device)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.compressor.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _count_skipped(self, batch: VideoBatch) -> bool:
        """Add the batch's skipped-sample counts; True when nothing is left to train on."""
        self.skipped.update(batch.skipped)
        return batch.size == 0

    def on_train_epoch_end(self) -> None:
        for reason, count in sorted(self.skipped.items()):
            self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", sync_dist=True)

    def encode(self, batch: VideoBatch, teacher: bool = True, saliency: bool = False, **teacher_kwargs):
        """Frozen-backbone signals for a batch: ``(visual, query, teacher_signals | None)``.

        The one place where a training step touches the backbone's vision side, so that a
        batch carrying cached features can bypass the vision tower here.
        """
        visual = self.backbone.encode_video(batch, saliency=saliency)
        query = self.backbone.embed_query(batch, visual)
        signals = self.backbone.teacher_signals(batch, visual, **teacher_kwargs) if teacher else None
        return visual, query, signals

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what ``tokensieve export`` needs to rebuild the compressor without the backbone."""
        checkpoint["tokensieve"] = {
            "method": self.compressor.name,
            "config": dict(self.compressor._hub_mixin_config or {}),
            "backbone": self.hparams.backbone,
            "revision": (self.hparams.backbone_kwargs or {}).get("revision"),
        }


class FlexSelectDistill(CompressorModule):
    """Train a FlexSelect-style selector to reproduce the teacher's text→video attention ranking.

    Source: FlexSelect (arXiv 2506.00993, repo yunzhuzhang0918/flexselect): loss
    ``1 - Spearman(softrank(pred), rank(teacher))`` against the attention at reference layer L.

    Args:
        reference_layer: LLM layer of the teacher signal (default: the backbone's middle layer).
        reduction: "max" (reference default) or "mean" over heads and text tokens.
        tau: soft-rank temperature.
        Others: see :class:`CompressorModule`.

    Logs ``train/loss``, ``val/loss`` and ``val/spearman`` (mean per-sample Spearman rank
    correlation between selector scores and teacher scores, torchmetrics).
    """

    def __init__(self, backbone: str, compressor: str = "flexselect", compressor_kwargs: dict | None = None, backbone_kwargs: dict | None = None, reference_layer: int | None = None, reduction: str = "max", tau: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()

    def _signals(self, batch: VideoBatch):
        return self.encode(batch, layer=self.hparams.reference_layer, reduction=self.hparams.reduction, with_logits=False)

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        visual, query, teacher = self._signals(batch)
        scores = self.compressor.score(visual, query)
        loss = spearman_loss(scores, teacher.attention, visual.valid, self.hparams.tau)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size)
        return loss

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        visual, query, teacher = self._signals(batch)
        scores = self.compressor.score(visual, query)
        loss = spearman_loss(scores, teacher.attention, visual.valid, self.hparams.tau)
        rho = torch.stack([spearman_corrcoef(scores[b][visual.valid[b]].float(), teacher.attention[b][visual.valid[b]].float()) for b in range(batch.size)])
        self.log("val/loss", loss, batch_size=batch.size, sync_dist=True)
        self.log("val/spearman", rho.mean(), prog_bar=True, batch_size=batch.size, sync_dist=True)
        return loss
