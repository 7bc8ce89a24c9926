"""RL-distilled student: a keep-set policy optimised by group-relative policy optimisation (GRPO).

After MARC, "Memory-Augmented RL Token Compression for Efficient Video Understanding"
(C-GRPO; repo Gimlettt/MARC, code not public). The teacher is the same frozen backbone on
the full token sequence; the student is the backbone on the K tokens the policy keeps
(optionally with LoRA adapters, trained by distillation on the sampled keep-sets).

One training step, per batch, at a budget drawn from ``budgets``:

1. teacher pass (full tokens, adapters off): next-token logits ``p_T`` at the answer
   position and the text→video attention ``a`` at ``reference_layer``;
2. rollout: ``G = group_size`` ordered keep-sequences per sample drawn from the current
   (= "old") policy by Gumbel-top-k, their per-pick Plackett–Luce log-probs under the old
   and the reference policy;
3. reward of each keep-set ``S`` (student logits ``p_S``; no gradient):

   ``r(S) = agree_weight · 1[argmax p_S = argmax p_T] − kl_reward_weight · KL(p_T ‖ p_S)
   + retention_weight · Σ_{i∈S} a_i / Σ_i a_i + answer_weight · 1[argmax p_S = answer]``

   — answer match with the teacher and −KL of the answer distribution (agreement with the
   full-token teacher), plus a **retention** term: the share of the teacher's text→video
   attention mass the keep-set retains (our reading of MARC's "retention reward": with a
   fixed K the kept *count* is the same for every group member, so a count term would
   cancel in the group-normalised advantage; the retained attention mass does not, and it
   is a dense signal when the output-level terms tie). ``answer_weight`` (ground-truth
   correctness) is 0 by default: the student is distilled from the teacher, not the labels;
4. group-normalised advantages ``A = (r − mean_G r) / (std_G r + 1e-4)``;
5. ``ppo_epochs`` clipped policy-gradient updates on these rollouts
   (:func:`~tokensieve.models.compressors.grpo.clipped_policy_loss`, per pick) with the
   ``kl_coef`` penalty to the frozen reference policy (the initial scorer).

Defaults and why:

- ``group_size = 8``: GRPO needs several samples per prompt for a usable baseline; each
  member costs one student prefill, and 8 is the low end of what GRPO papers use (8–64),
  chosen for cost — the keep-set reward is smooth (KL), so small groups already rank well.
- ``clip_eps = 0.2``: the PPO / GRPO default; the policy changes slowly per step.
- ``kl_coef = 0.04``: DeepSeekMath's GRPO value; keeps the policy near the (e.g.
  FlexSelect-distilled) initial scorer so it does not collapse onto a degenerate keep-set.
- ``ppo_epochs = 2``: two updates per rollout, so the ratio clip actually acts (with one
  update the ratio is exactly 1).
- reward weights ``agree 1.0, kl 1.0, retention 0.5, answer 0.0``: agreement and KL on the
  same scale (KL in nats is ~0.1–2 at low budgets), retention as shaping at half weight.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from tokensieve.data.types import VideoBatch
from tokensieve.models.compressors.grpo import clipped_policy_loss, group_advantages, plackett_luce_logprob, selections_from_order
from tokensieve.models.types import Selection, TeacherSignals, VisualTokens
from tokensieve.train.module import CompressorModule

LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LORA_PREFIX = "lora_weights."  # the checkpoint convention ``tokensieve export`` writes to OUT/lora/


def kl_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) ‖ softmax(student))`` per sample, nats: ``[B, V]`` × ``[B, V]`` → ``[B]``."""
    log_p = teacher_logits.detach().float().log_softmax(-1)
    log_q = student_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def keep_set_rewards(
    teacher: TeacherSignals,
    student_logits: torch.Tensor,
    selection: Selection,
    visual: VisualTokens,
    answer_ids: torch.Tensor | None = None,
    agree_weight: float = 1.0,
    kl_reward_weight: float = 1.0,
    retention_weight: float = 0.5,
    answer_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward of one keep-set per sample: ``float [B]`` and its terms (see the module docstring).

    Args:
        teacher: full-token ``logits [B, V]`` and ``attention [B, M]``.
        student_logits: ``[B, V]`` with only ``selection`` kept.
        selection: the keep-set (``valid`` marks real entries).
        visual: the visual tokens (validity of the M tokens).
        answer_ids: ``long [B]`` first answer token (−100 = none) for ``answer_weight``.
    """
    s = student_logits.detach().float()
    agree = (s.argmax(-1) == teacher.logits.argmax(-1)).float()
    kl = kl_per_sample(teacher.logits, s)
    attn = teacher.attention.float() * visual.valid
    keep = torch.zeros_like(attn)
    kept_valid = selection.valid if selection.valid is not None else torch.ones_like(selection.index, dtype=torch.bool)
    keep.scatter_(1, selection.index, kept_valid.float())
    retained = (attn * keep).sum(1) / attn.sum(1).clamp_min(1e-12)
    reward = agree_weight * agree - kl_reward_weight * kl + retention_weight * retained
    correct = torch.zeros_like(agree)
    if answer_ids is not None and answer_weight:
        correct = ((s.argmax(-1) == answer_ids) & (answer_ids != -100)).float()
        reward = reward + answer_weight * correct
    return reward, {"agree": agree, "kl": kl, "retained": retained, "correct": correct}


class GRPODistill(CompressorModule):
    """Optimise a :class:`~tokensieve.models.compressors.grpo.GRPOSelector` policy by GRPO against the full-token teacher.

    Args:
        backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay: see
            :class:`~tokensieve.train.module.CompressorModule` (``compressor`` defaults to "grpo").
        budgets: retention budgets, one drawn per step (global torch RNG).
        val_budgets: budgets evaluated in validation (deterministic top-K).
        group_size, clip_eps, kl_coef, ppo_epochs: GRPO settings (module docstring).
        agree_weight, kl_reward_weight, retention_weight, answer_weight: reward weights.
        reference_layer: LLM layer of the teacher attention used by the retention term.
        init_scorer: optional exported FlexSelect folder: its ``config.json`` becomes the
            policy's ``scorer`` settings and its weights warm-start the policy (and therefore
            the reference policy).
        lora: optional ``{"r", "alpha", "dropout", "target_modules"}`` (defaults
            ``LORA_DEFAULTS``) — LoRA on the student LLM (``models.backbones.lora.add_lora``),
            trained with ``distill_weight · KL(p_T ‖ p_S)`` on the sampled keep-sets; the
            teacher pass runs with the adapters off.
        distill_weight: weight of that KL (only with ``lora``).

    ``global_step`` counts optimizer updates: ``ppo_epochs`` per batch (set ``max_steps``
    accordingly). The frozen reference policy is the ``reference`` submodule, saved in
    training checkpoints so a resumed run keeps the same reference; ``tokensieve export``
    writes only the ``compressor.`` weights (and, with LoRA, ``OUT/lora/`` from the
    ``lora_weights.`` entries, as for Matryoshka).

    Logs ``train/{loss,reward,reward_std,agree,kl,retained,clip_frac,kl_ref,ratio}`` (and
    ``train/student_kl`` with LoRA); per validation budget ``b``: ``val/kl@b``, ``val/top1@b``,
    ``val/retained@b``, ``val/retention@b`` and, with answers, ``val/accuracy@b``; ``val/loss``
    is the mean KL over validation budgets.
    """

    def __init__(
        self,
        backbone: str,
        compressor: str = "grpo",
        compressor_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        budgets: list[float | int] | None = None,
        val_budgets: list[float | int] | None = None,
        group_size: int = 8,
        clip_eps: float = 0.2,
        kl_coef: float = 0.04,
        ppo_epochs: int = 2,
        agree_weight: float = 1.0,
        kl_reward_weight: float = 1.0,
        retention_weight: float = 0.5,
        answer_weight: float = 0.0,
        reference_layer: int | None = None,
        init_scorer: str | None = None,
        lora: dict | None = None,
        distill_weight: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group-relative baseline needs several samples), got {group_size}")
        kwargs = dict(compressor_kwargs or {})
        if init_scorer:
            cfg = json.loads((Path(init_scorer) / "config.json").read_text())
            if cfg.get("method") != "flexselect":
                raise ValueError(f"{init_scorer}: init_scorer must be an exported flexselect folder, got method {cfg.get('method')!r}")
            kwargs["scorer"] = {k: v for k, v in cfg.items() if k not in ("method", "hidden_size")}
        super().__init__(backbone, compressor, kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.budgets = list(budgets or [0.02, 0.05, 0.1, 0.25])
        self.val_budgets = list(val_budgets or [0.05])
        if init_scorer:
            from tokensieve.models.compressors.flexselect import FlexSelect

            self.compressor.scorer.load_state_dict(FlexSelect.load(init_scorer).state_dict(), strict=True)
        self.reference = copy.deepcopy(self.compressor).requires_grad_(False)
        self.lora_config = None
        if lora is not None:
            from tokensieve.models.backbones.lora import add_lora

            self.lora_config = {**LORA_DEFAULTS, **lora}
            add_lora(self.backbone, r=self.lora_config["r"], alpha=self.lora_config["alpha"], target_modules=self.lora_config["target_modules"], dropout=self.lora_config["dropout"])
            params = {name: p for name, p in self.backbone.language_model.named_parameters() if p.requires_grad}
            # the same Parameter objects, registered here so they reach the optimizer, the device move and the checkpoint
            self.lora_weights = nn.ParameterDict({name.replace(".", "__"): p for name, p in params.items()})

    def configure_optimizers(self):
        params = [*self.compressor.parameters(), *(self.lora_weights.values() if self.lora_config else [])]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _signals(self, batch: VideoBatch):
        # the backbone's teacher pass switches LoRA adapters off itself
        return self.encode(batch, teacher=True, layer=self.hparams.reference_layer, with_logits=True)

    def reward(self, teacher: TeacherSignals, logits: torch.Tensor, selection: Selection, visual: VisualTokens, answers: torch.Tensor):
        """Reward ``float [B]`` (and its terms) of one keep-set per sample: :func:`keep_set_rewards` with this module's weights."""
        hp = self.hparams
        return keep_set_rewards(teacher, logits, selection, visual, answers, hp.agree_weight, hp.kl_reward_weight, hp.retention_weight, hp.answer_weight)

    def rollout(self, batch: VideoBatch, visual, query, teacher, budget, generator: torch.Generator | None = None, group_size: int | None = None):
        """Sample a group per sample and score it: ``(order, step_valid, old_logp, ref_logp, rewards [B, G], terms, student_kl)``.

        ``group_size`` defaults to the module's G. ``student_kl`` (``[B, G]``, with gradient
        into the LoRA weights) is returned only when LoRA is on; otherwise None.
        """
        hp = self.hparams
        order, step_valid, logits_old = self.compressor.sample(visual, query, budget, group_size or hp.group_size, generator)
        with torch.no_grad():
            old_logp = plackett_luce_logprob(logits_old, visual.valid, order, step_valid)
            ref_logp = self.reference.log_prob(visual, query, order, step_valid)
        answers = self.answer_targets(batch)
        lora_on = self.lora_config is not None and torch.is_grad_enabled()
        rewards, terms, student_kl = [], [], []
        for selection in selections_from_order(order, step_valid):
            with torch.set_grad_enabled(lora_on):
                logits = self.backbone(batch, visual, selection)
            r, t = self.reward(teacher, logits, selection, visual, answers)
            rewards.append(r)
            terms.append(t)
            if lora_on:
                student_kl.append(kl_per_sample(teacher.logits, logits))
        rewards = torch.stack(rewards, dim=1)
        terms = {k: torch.stack([t[k] for t in terms], dim=1) for k in terms[0]}
        return order, step_valid, old_logp, ref_logp, rewards, terms, (torch.stack(student_kl, dim=1) if student_kl else None)

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        hp = self.hparams
        opt = self.optimizers()
        budget = self.budgets[int(torch.randint(len(self.budgets), (1,)))]
        visual, query, teacher = self._signals(batch)
        order, step_valid, old_logp, ref_logp, rewards, terms, student_kl = self.rollout(batch, visual, query, teacher, budget)
        advantages = group_advantages(rewards)
        for epoch in range(hp.ppo_epochs):
            new_logp = self.compressor.log_prob(visual, query, order, step_valid)
            loss, stats = clipped_policy_loss(new_logp, old_logp, ref_logp, advantages, step_valid, hp.clip_eps, hp.kl_coef)
            if student_kl is not None and epoch == 0:  # the LLM forward graph exists once
                loss = loss + hp.distill_weight * student_kl.mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        n = batch.size
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=n)
        self.log_dict({"train/reward_std": rewards.std(dim=1, unbiased=False).mean(), **{f"train/{k}": v.mean() for k, v in terms.items() if k != "correct"}}, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        if student_kl is not None:
            self.log("train/student_kl", student_kl.detach().mean(), batch_size=n)
        return loss.detach()

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        visual, query, teacher = self._signals(batch)
        answers = self.answer_targets(batch)
        has = answers != -100
        n, kls = batch.size, []
        for budget in self.val_budgets:
            selection = self.compressor(visual, query, budget=budget)
            logits = self.backbone(batch, visual, selection)
            _, t = keep_set_rewards(teacher, logits, selection, visual, answers)
            tag = f"val/{{}}@{budget}"
            kept = selection.num_kept.float()
            self.log_dict(
                {
                    tag.format("kl"): t["kl"].mean(),
                    tag.format("top1"): t["agree"].mean(),
                    tag.format("retained"): t["retained"].mean(),
                    tag.format("retention"): (kept / visual.valid.sum(1).float()).mean(),
                },
                batch_size=n,
                sync_dist=True,
            )
            if bool(has.any()):
                self.log(tag.format("accuracy"), (logits.argmax(-1) == answers)[has].float().mean(), batch_size=int(has.sum()), sync_dist=True)
            kls.append(t["kl"].mean())
        loss = torch.stack(kls).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora_config is not None:
            checkpoint["tokensieve"]["lora"] = {"config": dict(self.lora_config), "prefix": LORA_PREFIX, "target": "language_model"}
