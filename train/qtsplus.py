"""QTSplusDistill: train the QTSplus query-aware gate through the frozen backbone's own logits.

Source: "Seeing the Forest and the Trees: Query-Aware Tokenizer for Long-Video MLLMs"
(QTSplus), repo Siyou-Li/QTSplus (``src/train/qts_plus_trainer.py``: the LLM's answer CE plus
the tokenizer's ``add_loss`` budget terms).

Loss per step (the compressor in training mode, so its selection carries straight-through
weights and gradients reach the scorer, the budget head and the re-encoder):

    ``kl_weight · KL(full-token teacher ‖ student) + ce_weight · CE(answer token)
    + λt·mean((ρM)²/n_max²) + λm·mean(ρM/n_max) + λs·mean((ρ − ρ̄)²)``

Optional, not in QTSplus (``rank_weight > 0``): a list-wise rank loss between the gate's
log-relevance and the frozen teacher's text→video attention at ``reference_layer`` (the
FlexSelect signal), which gives every token — kept or not — a gradient; the straight-through
path alone only reaches the tokens that were kept.

The budget terms apply when the step uses the predicted budget (``train_budget: null``).
A fixed ``train_budget`` (ratio, count, or a list to draw from per step) trains the gate at
that budget instead; the budget head then gets no gradient. CE needs answers (refbench:
the answer letter); on answer-less shards the KL alone teaches the student.
"""

from __future__ import annotations

import random

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.losses import qtsplus_budget_penalty
from tokensieve.models.losses import rank_loss as _rank_loss
from tokensieve.train.module import CompressorModule


class QTSplusDistill(CompressorModule):
    """Frozen backbone + trainable :class:`~tokensieve.models.compressors.qtsplus.QTSplus`.

    Args:
        kl_weight, ce_weight, temperature: output-distillation weights and KL temperature.
        train_budget: None (predicted ρ, with the budget penalties), a ratio / count, or a
            list of them drawn uniformly per step.
        lambda_t, lambda_m, lambda_s: budget-penalty weights (paper: 0.1 / 0.17 / 0.05).
        val_budgets: budgets evaluated in validation besides ``"auto"`` (logs ``val/kl@b``,
            ``val/top1@b``, ``val/accuracy@b``, ``val/retention@b``); ``val/loss`` is the KL at "auto".
        seed: seed of the per-step budget draw.
        rank_weight: weight of the optional teacher-attention rank loss (0: off, the paper's loss).
        rank_loss: "listmle" or "spearman" for that term.
        reference_layer: teacher attention layer (None: the backbone's default).
        Others: see :class:`CompressorModule`.
    """

    def __init__(
        self,
        backbone: str,
        compressor: str = "qtsplus",
        compressor_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
        temperature: float = 1.0,
        train_budget: float | int | list[float | int] | None = None,
        lambda_t: float = 0.1,
        lambda_m: float = 0.17,
        lambda_s: float = 0.05,
        val_budgets: list[float | int] | None = None,
        seed: int = 0,
        rank_weight: float = 0.0,
        rank_loss: str = "listmle",
        reference_layer: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()
        self._rng = random.Random(seed)

    def _budget(self):
        b = self.hparams.train_budget
        return self._rng.choice(list(b)) if isinstance(b, (list, tuple)) else b

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        hp = self.hparams
        visual, query, teacher = self.encode(batch, teacher=hp.kl_weight > 0 or hp.rank_weight > 0, with_logits=hp.kl_weight > 0, layer=hp.reference_layer)
        budget = self._budget()
        out = self.compressor.select(visual, query, budget=budget)
        logits = self.backbone(batch, visual, out.selection)
        losses = self.student_losses(logits, None if teacher is None else teacher.logits, batch, hp.kl_weight, hp.ce_weight, hp.temperature)
        loss = losses["loss"]
        if hp.rank_weight > 0:
            ranked = _rank_loss(hp.rank_loss, torch.log(out.relevance.clamp_min(1e-12)), teacher.attention, visual.valid)
            self.log("train/rank", ranked, batch_size=batch.size)
            loss = loss + hp.rank_weight * ranked
        if budget is None:
            running = self.compressor.update_running_rho(out.rho)
            penalties = qtsplus_budget_penalty(out.rho, visual.valid.sum(1), running, self.compressor.n_max, hp.lambda_t, hp.lambda_m, hp.lambda_s)
            for name, value in penalties.items():
                self.log(f"train/{name}", value, batch_size=batch.size)
                loss = loss + value
        for name in ("kl", "ce"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=batch.size)
        self.log("train/rho", out.rho.mean(), batch_size=batch.size)
        self.log("train/kept", (out.n_keep.float() / visual.valid.sum(1).float()).mean(), batch_size=batch.size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size)
        return loss

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        visual, query, teacher = self.encode(batch, teacher=True, with_logits=True, layer=self.hparams.reference_layer)
        budgets = ["auto", *(self.hparams.val_budgets or [])]
        kls = self.log_budget_metrics(batch, visual, query, teacher.logits, budgets)
        self.log("val/loss", kls["auto"], prog_bar=True, batch_size=batch.size, sync_dist=True)
        return kls["auto"]
