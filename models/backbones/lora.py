"""Optional LoRA adapters on a backbone's LLM for student training (peft).

Only the decoder stack (``backbone.language_model``) is wrapped — never the vision tower,
projector, embeddings or LM head. peft injects ``lora_A`` / ``lora_B`` next to the target
linears *in place*, so the backbone's own forward / generate use them; the base weights stay
frozen and bit-identical (``lora_B`` starts at zero, so a fresh adapter is the identity).
``teacher_signals`` switches the adapters off: the teacher is always the frozen base.

The backbone stays in eval mode (see ``Backbone.train``), so LoRA dropout is inactive;
``dropout`` is accepted for completeness and recorded in the adapter config.

Source: LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685); peft
``LoraConfig`` / ``get_peft_model`` / ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokensieve.models.backbones.base import Backbone


def _require_language_model(backbone: Backbone):
    lm = getattr(backbone, "language_model", None)
    if lm is None:
        raise TypeError(f"{type(backbone).__name__} exposes no language_model to wrap with LoRA")
    if getattr(backbone, "_lora", None) is not None:
        raise ValueError("this backbone already carries a LoRA adapter")
    return lm


def add_lora(backbone: Backbone, r: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), dropout: float = 0.0) -> Backbone:
    """Wrap the backbone's LLM with fresh LoRA adapters (in place) and return the backbone.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        target_modules: names of the LLM linears to adapt.
        dropout: LoRA dropout (inactive: the backbone stays in eval mode).

    Returns:
        The same backbone; ``backbone.trainable_parameters()`` now lists only the LoRA weights.

    Raises:
        TypeError: the backbone has no ``language_model``.
        ValueError: an adapter is already attached.
    """
    from peft import LoraConfig, get_peft_model

    lm = _require_language_model(backbone)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, bias="none")
    _attach(backbone, get_peft_model(lm, config))
    return backbone


def save_lora(backbone: Backbone, folder: str | Path) -> Path:
    """Write the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to ``folder``.

    Raises:
        ValueError: the backbone carries no adapter.
    """
    peft_model = getattr(backbone, "_lora", None)
    if peft_model is None:
        raise ValueError("no LoRA adapter to save: call add_lora first")
    peft_model.save_pretrained(str(folder))
    return Path(folder)


def load_lora(backbone: Backbone, folder: str | Path, trainable: bool = False) -> Backbone:
    """Attach a saved adapter to the backbone's LLM (in place) and return the backbone.

    Args:
        folder: a folder written by :func:`save_lora` (or any peft LoRA folder for this LLM).
        trainable: keep training the loaded adapter (its weights require grad).

    Raises:
        ValueError: an adapter is already attached.
        FileNotFoundError: ``folder`` has no ``adapter_config.json``.
    """
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a LoRA adapter folder)")
    lm = _require_language_model(backbone)
    _attach(backbone, PeftModel.from_pretrained(lm, str(folder), is_trainable=trainable))
    return backbone


def _attach(backbone: Backbone, peft_model) -> None:
    # held outside the module tree: the LoRA weights are already registered through the
    # wrapped LLM, and a second registration would duplicate every key in state_dict()
    object.__setattr__(backbone, "_lora", peft_model)
    backbone.eval()
