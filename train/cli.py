"""LightningCLI entry point: ``tokensieve fit|validate|test --config recipes/<backbone>/<method>.yaml``."""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI

from tokensieve.train.datamodule import VideoDataModule
from tokensieve.train.module import CompressorModule


def run_cli(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI with ``args`` (e.g. ``["fit", "--config", "recipe.yaml"]``).

    The recipe names the LightningModule by ``model.class_path`` (any subclass of
    :class:`CompressorModule`). The resolved config is saved beside the logs, overwriting
    on a restart so a requeued job does not crash.
    """
    return LightningCLI(
        CompressorModule,
        VideoDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
