"""FlexSelectDistill: train a FlexSelect selector on the frozen VLM's text→video attention ranking.

Source: "FlexSelect: Flexible Token Selection for Efficient Long Video Understanding",
arXiv 2506.00993; reference repo yunzhuzhang0918/flexselect — loss
``1 − Spearman(softrank(pred), rank(teacher))`` against the attention at reference layer L.

Upgrades over the reference (all chosen by recipe; defaults = the original behaviour):
    * ``loss: spearman | listmle`` — list-wise rank losses
      (:func:`tokensieve.models.losses.rank_loss`); ``listmle_top_k`` scores only the
      teacher's first k positions.
    * ``kl_weight > 0`` / ``ce_weight > 0`` — adds ``KL(full ‖ pruned)`` of the backbone's
      next-token logits and the answer-token CE (where the shards carry answers) with the
      selector's straight-through selection at ``st_budget``
      (:meth:`~tokensieve.models.compressors.flexselect.FlexSelect.select_st`), so the
      scorer also learns from the task, not only from the teacher's attention.
    * Scorer kind (``head`` / ``lm``) and frame-group budgeting are compressor options
      (``compressor_kwargs: {scorer: lm, group_frames: 32}``).
    * Teacher signals come through :meth:`CompressorModule.encode`, so batches carrying
      feature-cache shards skip the backbone's vision tower and teacher pass there.
"""

from __future__ import annotations

import torch
from torchmetrics.functional import spearman_corrcoef

from tokensieve.data.types import VideoBatch
from tokensieve.models.losses import rank_loss
from tokensieve.train.module import CompressorModule


class FlexSelectDistill(CompressorModule):
    """Train a FlexSelect-style selector to reproduce the teacher's text→video attention ranking.

    Args:
        reference_layer: LLM layer of the teacher signal (default: the backbone's middle layer).
        reduction: "max" (reference default) or "mean" over heads and text tokens.
        tau: soft-rank temperature of the Spearman loss.
        loss: "spearman" (reference) or "listmle".
        listmle_top_k: ListMLE scores only the teacher's first k positions (None: all).
        kl_weight: weight of the straight-through KL to the full-token logits (0: off).
        ce_weight: weight of the straight-through answer-token CE (0: off; needs answers).
        st_budget: budget of the straight-through selection (ratio or count).
        st_tau: gate temperature of the straight-through weights.
        val_budgets: budgets at which validation also runs the pruned backbone (logs
            ``val/kl@b``, ``val/top1@b``, ``val/accuracy@b``, ``val/retention@b``; None: off).
        Others: see :class:`CompressorModule`.

    Logs ``train/loss`` (+ ``train/rank``, ``train/kl``, ``train/ce`` with the task terms), ``val/loss``
    and ``val/spearman`` (mean per-sample Spearman rank correlation between selector scores
    and teacher scores, torchmetrics).

    Raises:
        ValueError: unknown ``loss``.
    """

    def __init__(
        self,
        backbone: str,
        compressor: str = "flexselect",
        compressor_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        reference_layer: int | None = None,
        reduction: str = "max",
        tau: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loss: str = "spearman",
        listmle_top_k: int | None = None,
        kl_weight: float = 0.0,
        ce_weight: float = 0.0,
        st_budget: float | int = 0.25,
        st_tau: float = 0.5,
        val_budgets: list[float | int] | None = None,
    ):
        if loss not in ("spearman", "listmle"):
            raise ValueError(f"loss must be 'spearman' or 'listmle', got {loss!r}")
        super().__init__(backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()

    def _signals(self, batch: VideoBatch):
        hp = self.hparams
        return self.encode(batch, layer=hp.reference_layer, reduction=hp.reduction, with_logits=hp.kl_weight > 0)

    @property
    def _task_terms(self) -> bool:
        return self.hparams.kl_weight > 0 or self.hparams.ce_weight > 0

    def _rank(self, scores: torch.Tensor, teacher, valid: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return rank_loss(hp.loss, scores, teacher.attention, valid, tau=hp.tau, top_k=hp.listmle_top_k)

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        visual, query, teacher = self._signals(batch)
        scores = self.compressor.score(visual, query)
        loss = self._rank(scores, teacher, visual.valid)
        if self._task_terms:
            hp = self.hparams
            self.log("train/rank", loss, batch_size=batch.size)
            sel = self.compressor.select_st(visual, query, budget=hp.st_budget, tau=hp.st_tau)
            task = self.student_losses(self.backbone(batch, visual, sel), teacher.logits, batch, hp.kl_weight, hp.ce_weight)
            for name in ("kl", "ce"):
                if name in task:
                    self.log(f"train/{name}", task[name], batch_size=batch.size)
            loss = loss + task["loss"]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size)
        return loss

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        hp = self.hparams
        visual, query, teacher = self.encode(batch, layer=hp.reference_layer, reduction=hp.reduction, with_logits=bool(hp.kl_weight > 0 or hp.val_budgets))
        scores = self.compressor.score(visual, query)
        loss = self._rank(scores, teacher, visual.valid)
        if hp.val_budgets:
            self.log_budget_metrics(batch, visual, query, teacher.logits, hp.val_budgets)
        rho = torch.stack([spearman_corrcoef(scores[b][visual.valid[b]].float(), teacher.attention[b][visual.valid[b]].float()) for b in range(batch.size)])
        self.log("val/loss", loss, batch_size=batch.size, sync_dist=True)
        self.log("val/spearman", rho.mean(), prog_bar=True, batch_size=batch.size, sync_dist=True)
        return loss
