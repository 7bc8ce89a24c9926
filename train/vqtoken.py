"""Train the VQToken tokenizer (arXiv 2503.16980, repo Hai-chao-Zhang/VQToken) against the full-token teacher.

Loss per step, at a retention budget drawn from ``budgets``:

``L = kl_weight · KL(p_teacher ‖ p_student) + ce_weight · CE(answer) + commitment_weight · commit + recon_weight · recon``

- ``KL`` — next-token distributions at the answer position, full tokens (teacher: the same
  frozen backbone) vs the K code tokens (student), temperature ``temperature``;
- ``CE`` — cross-entropy of the answer's first token, on samples that have an answer (on
  the quickstart shards answers are empty and only KL trains);
- ``commit`` / ``recon`` — the VQ losses of :class:`~tokensieve.models.compressors.vqtoken.VQToken`
  (the codebook itself moves by EMA, not by gradient).

What differs from the reference: it fine-tunes the LLM with SFT cross-entropy only (no VQ
losses, no teacher); here the backbone stays frozen, only the tokenizer trains, and the
full-token model is the teacher.
"""

from __future__ import annotations

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.compressors.vqtoken import tokdense
from tokensieve.train.module import CompressorModule


class VQTokenDistill(CompressorModule):
    """Train a :class:`~tokensieve.models.compressors.vqtoken.VQToken` tokenizer on a frozen backbone.

    Args:
        backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay: see
            :class:`~tokensieve.train.module.CompressorModule` (``compressor`` defaults to "vqtoken").
        budgets: retention budgets (ratios or token counts); one is drawn per training step
            (global torch RNG, seeded by ``seed_everything``) so one tokenizer serves them all.
        val_budgets: budgets evaluated in validation.
        kl_weight, ce_weight, commitment_weight, recon_weight: loss weights (module docstring).
        temperature: KL temperature.

    Logs ``train/{loss,kl,ce,commit,recon,codes_per_video,kept_tokens}``; per validation
    budget ``b``: ``val/kl@b`` (vs full tokens), ``val/top1@b`` (argmax agreement),
    ``val/retention@b``, ``val/kept_tokens@b``, ``val/codes_per_video@b`` and, on samples with
    an answer, ``val/accuracy@b`` (first answer token) and ``val/tokdense@b`` = accuracy /
    kept tokens; ``val/loss`` is the mean KL over validation budgets.
    """

    def __init__(
        self,
        backbone: str,
        compressor: str = "vqtoken",
        compressor_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        budgets: list[float | int] | None = None,
        val_budgets: list[float | int] | None = None,
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
        commitment_weight: float = 0.25,
        recon_weight: float = 1.0,
        temperature: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()
        self.budgets = list(budgets or [0.02, 0.05, 0.1, 0.25])
        self.val_budgets = list(val_budgets or [0.05])

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        hp = self.hparams
        budget = self.budgets[int(torch.randint(len(self.budgets), (1,)))]
        visual, _, teacher = self.encode(batch, teacher=hp.kl_weight > 0, with_logits=True)
        selection, coding = self.compressor.compress(visual, budget)
        logits = self.backbone(batch, visual, selection)
        losses = self.student_losses(logits, None if teacher is None else teacher.logits, batch, hp.kl_weight, hp.ce_weight, hp.temperature)
        loss = losses["loss"] + hp.commitment_weight * coding.commitment + hp.recon_weight * coding.reconstruction
        n = batch.size
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        self.log_dict({"train/commit": coding.commitment, "train/recon": coding.reconstruction, "train/codes_per_video": coding.num_codes.float().mean(), "train/kept_tokens": selection.num_kept.float().mean()}, batch_size=n)
        return loss

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        from tokensieve.models.losses import kl_to_teacher

        visual, _, teacher = self.encode(batch, teacher=True, with_logits=True)
        targets = self.answer_targets(batch)
        has = targets != -100
        n, kls = batch.size, []
        for budget in self.val_budgets:
            selection, coding = self.compressor.compress(visual, budget)
            logits = self.backbone(batch, visual, selection)
            kept = selection.num_kept.float()
            kl = kl_to_teacher(logits, teacher.logits)
            tag = f"val/{{}}@{budget}"
            self.log_dict(
                {
                    tag.format("kl"): kl,
                    tag.format("top1"): (logits.argmax(-1) == teacher.logits.argmax(-1)).float().mean(),
                    tag.format("retention"): (kept / visual.valid.sum(1).float()).mean(),
                    tag.format("kept_tokens"): kept.mean(),
                    tag.format("codes_per_video"): coding.num_codes.float().mean(),
                },
                batch_size=n,
                sync_dist=True,
            )
            if bool(has.any()):
                acc = (logits.argmax(-1) == targets)[has].float().mean()
                self.log(tag.format("accuracy"), acc, batch_size=int(has.sum()), sync_dist=True)
                self.log(tag.format("tokdense"), tokdense(float(acc), float(kept[has].mean())), batch_size=int(has.sum()), sync_dist=True)
            kls.append(kl)
        loss = torch.stack(kls).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss
