"""Strategy and precision choices for compressor training, checked before the Trainer exists.

- DDP: ``trainer.strategy: ddp``. Lightning picks the process-group backend from the device:
  ``gloo`` on CPU, ``nccl`` on CUDA (:func:`default_backend`). The frozen backbone is not a
  submodule of the LightningModule, so DDP wraps, all-reduces and checkpoints only the
  compressor.
- DeepSpeed ZeRO-2/3 (optional extra: ``pip install 'tokensieve[deepspeed]'``):
  ``trainer.strategy: deepspeed_stage_2`` / ``deepspeed_stage_3`` (or ``_offload``), or a
  ``pytorch_lightning.strategies.DeepSpeedStrategy`` with ``init_args``. Strategy names are
  turned into a ``DeepSpeedStrategy(stage=..., exclude_frozen_parameters=True)`` so that frozen
  weights (LoRA bases, if a module ever holds any) are never written to checkpoints.
- Precision: ``bf16-mixed`` / ``16-mixed`` keep the compressor's parameters (and optimizer
  state) in fp32 and autocast the compute. ``bf16-true`` / ``16-true`` would cast the
  parameters themselves; they are refused (:func:`check_precision`).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

DEEPSPEED_EXTRA = "pip install 'tokensieve[deepspeed]'"
_DEEPSPEED_NAME = re.compile(r"^deepspeed(?:_stage_(?P<stage>[123])(?P<offload>_offload)?)?$")
TRUE_PRECISIONS = ("bf16-true", "16-true")
CONSOLIDATED_KEYS = ("state_dict", "tokensieve", "hyper_parameters", "global_step", "epoch", "pytorch-lightning_version")


def default_backend(device: torch.device | str) -> str:
    """The torch.distributed backend Lightning's DDP uses on ``device``: ``nccl`` for CUDA, else ``gloo``."""
    from lightning_fabric.utilities.distributed import _get_default_process_group_backend_for_device

    return _get_default_process_group_backend_for_device(torch.device(device))


def deepspeed_available() -> bool:
    """Whether the ``deepspeed`` package can be imported (it is an optional extra)."""
    return importlib.util.find_spec("deepspeed") is not None


def _is_deepspeed(strategy) -> bool:
    if isinstance(strategy, str):
        return strategy.startswith("deepspeed")
    name = type(strategy).__name__ if not isinstance(strategy, dict) else str(strategy.get("class_path", ""))
    return "DeepSpeed" in name


def resolve_strategy(strategy):
    """The strategy to give the Trainer for a recipe's ``trainer.strategy`` value.

    DeepSpeed names become ``DeepSpeedStrategy(stage=N, offload_optimizer=..., exclude_frozen_parameters=True)``;
    everything else (``"ddp"``, ``"auto"``, a strategy object) is returned unchanged.

    Raises:
        ImportError: a DeepSpeed strategy without the ``deepspeed`` package (the message says
            ``trainer.strategy`` and how to install the extra).
        ValueError: an unknown ``deepspeed*`` name (names ``trainer.strategy``).
    """
    if not _is_deepspeed(strategy):
        return strategy
    if not deepspeed_available():
        raise ImportError(f"trainer.strategy {strategy!r} needs DeepSpeed, which is not installed: {DEEPSPEED_EXTRA}")
    if not isinstance(strategy, str):
        if hasattr(strategy, "exclude_frozen_parameters"):
            strategy.exclude_frozen_parameters = True
        return strategy
    m = _DEEPSPEED_NAME.match(strategy)
    if m is None:
        raise ValueError(f"trainer.strategy {strategy!r}: expected deepspeed, deepspeed_stage_1/2/3 or deepspeed_stage_2/3_offload")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    offload = bool(m.group("offload"))
    return DeepSpeedStrategy(stage=int(m.group("stage") or 2), offload_optimizer=offload, offload_parameters=offload and m.group("stage") == "3", exclude_frozen_parameters=True)


def check_precision(precision) -> None:
    """Refuse precisions that cast the compressor's parameters.

    Raises:
        ValueError: ``trainer.precision`` is ``bf16-true`` or ``16-true`` (the message names
            the field and suggests ``bf16-mixed``).
    """
    if precision is not None and str(precision) in TRUE_PRECISIONS:
        raise ValueError(
            f"trainer.precision {precision!r} casts the compressor's parameters; use 'bf16-mixed' "
            "(fp32 parameters and optimizer state, bf16 autocast) or '32-true'"
        )


def consolidate_deepspeed_checkpoint(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """A DeepSpeed checkpoint folder → one Lightning checkpoint file that ``tokensieve export`` reads.

    Uses Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` (fp32 weights gathered from
    the ZeRO shards), then keeps only :data:`CONSOLIDATED_KEYS` (``state_dict``, the
    ``tokensieve`` record, hyperparameters, ``global_step`` …) so the file loads with
    ``torch.load(weights_only=True)``. DeepSpeed reads its own shard files with pickle: run
    this only on checkpoints you wrote.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a folder.
        ImportError: DeepSpeed is not installed (the message says how to install the extra).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: not a DeepSpeed checkpoint folder")
    if not deepspeed_available():
        raise ImportError(f"consolidating a DeepSpeed checkpoint needs DeepSpeed: {DEEPSPEED_EXTRA}")
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    state = convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint_dir), str(out_file))
    # keep what export needs, so the file loads with torch.load(weights_only=True)
    torch.save({k: state[k] for k in CONSOLIDATED_KEYS if k in state}, out_file)
    return Path(out_file)
