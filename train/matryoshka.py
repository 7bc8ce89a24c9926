"""MatryoshkaDistill: train one student over every pooling scale at once (M3), optional LoRA.

Source: "Matryoshka Multimodal Models" (M3), arXiv 2405.17430, repo mu-cai/matryoshka-mm:
the LLM is trained with the loss averaged over the nested scales {576, 144, 36, 9, 1}.

Per step: for each trained scale with a distinct grid on the batch (or ``scales_per_step`` of
them drawn at random), pool with :meth:`Matryoshka.at_scale`, run the frozen backbone and take
``kl_weight · KL(full ‖ student) + ce_weight · CE(answer token)``; the loss is the mean over
scales. Trainable: the compressor's scale embeddings and token adapter, and — with ``lora`` —
LoRA adapters on the student LLM (M3's own recipe trains the LLM; the teacher logits come from
the same LLM with the adapters switched off).

LoRA export: the checkpoint records the LoRA config; ``tokensieve export`` writes
``OUT/lora/adapter_config.json`` + ``OUT/lora/adapter_model.safetensors`` beside the
compressor, and :func:`load_lora_adapter` attaches them to a freshly loaded backbone.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
from torch import nn

from tokensieve.data.types import VideoBatch
from tokensieve.train.module import CompressorModule

LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LORA_PREFIX = "lora_weights."


class _LoraHandle:
    """What the backbone's teacher pass looks for in ``backbone._lora``: ``disable_adapter()``."""

    def __init__(self, root: nn.Module):
        self.root = root

    def layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.root.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def disable_adapter(self):
        layers = self.layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def add_lora(backbone, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | None = None) -> dict[str, nn.Parameter]:
    """Inject LoRA adapters (peft) into ``backbone.language_model``; returns the new trainable
    parameters by name relative to the language model. Sets ``backbone._lora`` so teacher
    signals run with the adapters off.

    Raises:
        ValueError: LoRA already attached.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(backbone, "_lora", None) is not None:
        raise ValueError("the backbone already has LoRA adapters")
    lm = backbone.language_model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules or LORA_DEFAULTS["target_modules"]), bias="none")
    inject_adapter_in_model(config, lm)
    object.__setattr__(backbone, "_lora", _LoraHandle(lm))
    params = {}
    for name, p in lm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params[name] = p
    return params


def load_lora_adapter(backbone, folder: str | Path) -> None:
    """Attach an exported LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
    names relative to ``backbone.language_model``) to a loaded backbone, strictly.

    Raises:
        FileNotFoundError: no adapter in ``folder``.
        RuntimeError: the adapter's weights do not match the injected modules.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    params = add_lora(backbone, **{k: cfg[k] for k in LORA_DEFAULTS})
    state = load_file(folder / "adapter_model.safetensors")
    if set(state) != set(params):
        raise RuntimeError(f"{folder}: LoRA keys differ (missing {sorted(set(params) - set(state))[:3]}, unexpected {sorted(set(state) - set(params))[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))
        for p in params.values():
            p.requires_grad_(False)


class MatryoshkaDistill(CompressorModule):
    """Frozen backbone + :class:`~tokensieve.models.compressors.matryoshka.Matryoshka`, trained
    over all scales jointly.

    Args:
        kl_weight, ce_weight, temperature: output-distillation weights and KL temperature.
        scales_per_step: scales drawn per step (None: every distinct scale).
        lora: None (off) or ``{r, alpha, dropout, target_modules}`` for LoRA on the student LLM
            (defaults ``LORA_DEFAULTS``); trained with ``lora_lr`` (default ``lr``).
        val_budgets: budgets evaluated in validation (logs ``val/kl@b``, ``val/top1@b``,
            ``val/accuracy@b``, ``val/retention@b``); ``val/loss`` is the mean KL over them.
        seed: seed of the per-step scale draw.
        Others: see :class:`CompressorModule`.
    """

    def __init__(
        self,
        backbone: str,
        compressor: str = "matryoshka",
        compressor_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
        temperature: float = 1.0,
        scales_per_step: int | None = None,
        lora: dict | None = None,
        lora_lr: float | None = None,
        val_budgets: list[float | int] | None = None,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        super().__init__(backbone, compressor, compressor_kwargs, backbone_kwargs, lr, weight_decay)
        self.save_hyperparameters()
        self._rng = random.Random(seed)
        self.lora_config = None
        if lora is not None:
            self.lora_config = {**LORA_DEFAULTS, **lora}
            params = add_lora(self.backbone, **self.lora_config)
            # the same Parameter objects, registered here so they reach the optimizer and the checkpoint
            self.lora_weights = nn.ParameterDict({name.replace(".", "__"): p for name, p in params.items()})

    def configure_optimizers(self):
        groups = [{"params": list(self.compressor.parameters()), "lr": self.hparams.lr}]
        if self.lora_config is not None:
            groups.append({"params": list(self.lora_weights.values()), "lr": self.hparams.lora_lr or self.hparams.lr})
        return torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def _scales(self, visual) -> list[int]:
        ids = self.compressor.scale_ids(visual)
        k = self.hparams.scales_per_step
        return sorted(self._rng.sample(ids, k)) if k and k < len(ids) else ids

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        hp = self.hparams
        visual, _, teacher = self.encode(batch, teacher=hp.kl_weight > 0, with_logits=True)
        total = 0.0
        scales = self._scales(visual)
        for sid in scales:
            sel, _ = self.compressor.at_scale(visual, sid)
            losses = self.student_losses(self.backbone(batch, visual, sel), None if teacher is None else teacher.logits, batch, hp.kl_weight, hp.ce_weight, hp.temperature)
            self.log(f"train/loss_scale{sid}", losses["loss"], batch_size=batch.size)
            total = total + losses["loss"]
        loss = total / len(scales)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size)
        return loss

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        visual, _, teacher = self.encode(batch, teacher=True, with_logits=True)
        kls = self.log_budget_metrics(batch, visual, None, teacher.logits, self.hparams.val_budgets or [0.1, 0.25])
        loss = torch.stack(list(kls.values())).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.size, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora_config is not None:
            checkpoint["tokensieve"]["lora"] = {"config": dict(self.lora_config), "prefix": LORA_PREFIX, "target": "language_model"}
