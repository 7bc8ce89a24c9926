"""``tokensieve export CKPT OUT``: a training checkpoint → a self-contained compressor folder."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tokensieve.models.compressors import REGISTRY


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``OUT/config.json``, ``OUT/model.safetensors`` and ``OUT/recipe.yaml``.

    The checkpoint is read with ``torch.load(weights_only=True)``; the compressor is rebuilt
    from the ``tokensieve`` record that :class:`~tokensieve.train.module.CompressorModule`
    writes into every checkpoint, and its weights are loaded with strict key checking. The
    backbone is not needed. ``recipe.yaml`` holds the module's hyperparameters and the
    backbone reference (path + revision). When the module trained LoRA adapters on the
    student LLM (the record's ``lora`` entry), they are written to ``OUT/lora/``
    (``adapter_config.json`` + ``adapter_model.safetensors``, parameter names relative to the
    backbone's language model); ``tokensieve.train.matryoshka.load_lora_adapter`` attaches them.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        KeyError: the checkpoint was not written by a tokensieve module, or names an unknown method.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    record = ckpt.get("tokensieve")
    if record is None:
        raise KeyError(f"{ckpt_path}: no 'tokensieve' record; was it written by a tokensieve LightningModule?")
    cls = REGISTRY[record["method"]]
    compressor = cls(**record["config"])
    prefix = "compressor."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    compressor.load_state_dict(state, strict=True)
    out = Path(out_dir)
    compressor.save_pretrained(out)
    if record.get("lora"):
        _export_lora(ckpt["state_dict"], record["lora"], out / "lora")
    recipe = {"hyper_parameters": dict(ckpt.get("hyper_parameters", {})), "backbone": record["backbone"], "revision": record["revision"], "source_checkpoint": str(ckpt_path), "global_step": ckpt.get("global_step")}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (out / "README.md").write_text(model_card(compressor, recipe, out))
    return out


def model_card(compressor, recipe: dict, out: Path) -> str:
    """The exported folder's ``README.md``: what the compressor is (its class summary and its
    module's docstring, which gives the source paper and formulas), what it was trained
    against and how to load it (replaces the ``PyTorchModelHubMixin`` placeholder card).

    Args:
        compressor: the exported :class:`~tokensieve.models.compressors.LearnedCompressor`.
        recipe: the dict written to ``recipe.yaml`` (``backbone``, ``revision``, ``global_step``).
        out: the export folder (shown in the load snippet).

    Returns:
        The Markdown text (with a Hugging Face YAML header)."""
    import inspect
    import sys

    summary = (inspect.getdoc(type(compressor)) or "").split("\n\n")[0].replace("\n", " ")
    method = inspect.getdoc(sys.modules[type(compressor).__module__]) or ""
    params = sum(p.numel() for p in compressor.parameters())
    return "\n".join(
        [
            "---",
            "library_name: tokensieve",
            f"tags: [tokensieve, visual-token-compression, {compressor.name}]",
            "---",
            "",
            f"# {compressor.name} ({type(compressor).__name__})",
            "",
            summary,
            "",
            f"- parameters: {params:,}",
            f"- backbone it was trained against (frozen): `{recipe.get('backbone')}` (revision `{recipe.get('revision')}`)",
            f"- optimizer steps: {recipe.get('global_step')}; hyper-parameters and source checkpoint in `recipe.yaml`",
            "",
            "```python",
            "import tokensieve",
            f'compressor = tokensieve.load_compressor("{out.as_posix()}")',
            "vlm = tokensieve.apply(tokensieve.load_backbone(BACKBONE), compressor, budget=0.1)",
            "```",
            "",
            f"## Method (`{type(compressor).__module__}`)",
            "",
            method,
            "",
        ]
    )


def _export_lora(state_dict: dict, record: dict, out: Path) -> None:
    """Write the LoRA weights stored under ``record["prefix"]`` (names with "." written as "__")."""
    import json

    from safetensors.torch import save_file

    prefix = record["prefix"]
    weights = {k[len(prefix) :].replace("__", "."): v.contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"the checkpoint records LoRA adapters but holds no '{prefix}*' weights")
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({**record["config"], "target": record.get("target", "language_model")}, indent=2))
