"""LightningModules: a frozen backbone plus a trainable compressor.

The backbone is held *outside* the module tree (not a registered submodule), so it never
reaches the optimizer, the DDP wrapper or the checkpoint; it is referenced by path +
revision in the hyperparameters and reloaded on resume. Only ``self.compressor`` is saved.
"""

from __future__ import annotations

from collections import Counter

import pytorch_lightning as pl
import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones import Backbone, load
from tokensieve.models.compressors import LearnedCompressor, get_compressor


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

        The one place where a training step touches the backbone's vision side. A batch from
        feature-cache shards (``batch.features``, written by ``tokensieve cache-features``)
        bypasses the vision tower: its cached visual tokens are used as they are, and its
        cached teacher attention too when it was cached at the requested layer and reduction
        and no logits are asked for; otherwise the teacher runs on the cached tokens.
        """
        if getattr(batch, "features", None) is None:
            visual = self.backbone.encode_video(batch, saliency=saliency)
            query = self.backbone.embed_query(batch, visual)
            signals = self.backbone.teacher_signals(batch, visual, **teacher_kwargs) if teacher else None
            return visual, query, signals
        from tokensieve.train.features import teacher_from_features, visual_from_features

        visual = visual_from_features(batch, dtype=next(self.backbone.parameters()).dtype, device=self.device)
        if saliency and visual.saliency is None:
            raise ValueError("the feature cache has no vision saliency: rebuild it with `tokensieve cache-features --saliency`")
        query = self.backbone.embed_query(batch, visual)
        signals = None
        if teacher:
            kwargs = dict(teacher_kwargs)
            if kwargs.get("layer") is None:
                kwargs["layer"] = getattr(self.backbone, "reference_layer", None)
            signals = teacher_from_features(batch, **{"reduction": "max", "with_logits": True, **kwargs})
            if signals is None:
                signals = self.backbone.teacher_signals(batch, visual, **teacher_kwargs)
            else:
                signals.attention = signals.attention.to(self.device)
        return visual, query, signals

    def answer_targets(self, batch: VideoBatch) -> torch.Tensor:
        """``long [B]``: the first token id of each reference answer as the backbone's tokenizer
        writes it (``-100`` where the answer is empty) — the target of the next-token logits
        that ``backbone.forward`` returns. Multiple-choice answers are single letters, so the
        first token is the whole answer."""
        tokenizer = self.backbone.tokenizer
        out = []
        for answer in list(batch.answers) + [""] * (batch.size - len(batch.answers)):
            ids = tokenizer.encode(answer, add_special_tokens=False) if answer else []
            out.append(ids[0] if ids else -100)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def student_losses(self, logits: torch.Tensor, teacher_logits: torch.Tensor | None, batch: VideoBatch, kl_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Output-distillation losses of a compressed student's next-token ``logits [B, V]``:
        ``kl`` = KL(full-token teacher ‖ student) (when ``teacher_logits`` is given and
        ``kl_weight > 0``), ``ce`` = cross-entropy on the answer's first token (only samples
        with an answer), and ``loss`` = their weighted sum."""
        from tokensieve.models.losses import answer_cross_entropy, kl_to_teacher

        out = {"loss": logits.sum() * 0.0}
        if kl_weight > 0 and teacher_logits is not None:
            out["kl"] = kl_to_teacher(logits, teacher_logits, temperature)
            out["loss"] = out["loss"] + kl_weight * out["kl"]
        targets = self.answer_targets(batch)
        if ce_weight > 0 and bool((targets != -100).any()):
            out["ce"] = answer_cross_entropy(logits, targets)
            out["loss"] = out["loss"] + ce_weight * out["ce"]
        return out

    @torch.no_grad()
    def log_budget_metrics(self, batch: VideoBatch, visual, query, teacher_logits: torch.Tensor | None, budgets, prefix: str = "val") -> dict:
        """Run the compressor (eval mode) at each budget and log ``{prefix}/kl@b`` (vs full
        tokens), ``{prefix}/top1@b`` (argmax agreement with full tokens),
        ``{prefix}/accuracy@b`` (answer-token accuracy, when answers exist) and
        ``{prefix}/retention@b`` (kept / valid tokens). Returns the KL per budget."""
        from tokensieve.models.losses import kl_to_teacher

        was_training = self.compressor.training
        self.compressor.eval()
        targets = self.answer_targets(batch)
        has_answer = targets != -100
        kls = {}
        try:
            for budget in budgets:
                sel = self.compressor(visual, query if self.compressor.needs_query else None, budget=budget)
                logits = self.backbone(batch, visual, sel)
                tag = f"{prefix}/{{}}@{budget}"
                self.log(tag.format("retention"), (sel.num_kept.float() / visual.valid.sum(1).float()).mean(), batch_size=batch.size, sync_dist=True)
                if teacher_logits is not None:
                    kls[budget] = kl_to_teacher(logits, teacher_logits)
                    self.log(tag.format("kl"), kls[budget], batch_size=batch.size, sync_dist=True)
                    self.log(tag.format("top1"), (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean(), batch_size=batch.size, sync_dist=True)
                if bool(has_answer.any()):
                    acc = (logits.argmax(-1) == targets)[has_answer].float().mean()
                    self.log(tag.format("accuracy"), acc, batch_size=int(has_answer.sum()), sync_dist=True)
        finally:
            self.compressor.train(was_training)
        return kls

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record what ``tokensieve export`` needs to rebuild the compressor without the backbone."""
        checkpoint["tokensieve"] = {
            "method": self.compressor.name,
            "config": dict(self.compressor._hub_mixin_config or {}),
            "backbone": self.hparams.backbone,
            "revision": (self.hparams.backbone_kwargs or {}).get("revision"),
        }


def __getattr__(name: str):
    # FlexSelectDistill lives in tokensieve.train.flexselect; kept importable from here (recipes name it so)
    if name == "FlexSelectDistill":
        from tokensieve.train.flexselect import FlexSelectDistill

        return FlexSelectDistill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
