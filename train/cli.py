"""LightningCLI entry point: ``tokensieve fit|validate|test --config recipes/<backbone>/<method>.yaml``.

On top of Lightning's CLI (see :class:`TokensieveCLI`):

- under SLURM (``SLURMEnvironment.detect()``): the ``SLURMEnvironment(auto_requeue=True,
  requeue_signal=SIGUSR1)`` plugin, :class:`~tokensieve.train.callbacks.SlurmRequeue` (HPC
  checkpoint + ``scontrol requeue`` on SIGUSR1, at a step boundary) and
  :class:`~tokensieve.train.callbacks.JobLog` (plain progress lines). A requeued job resumes
  from the newest ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``: Lightning's
  ``_CheckpointConnector._parse_ckpt_path`` picks it when ``ckpt_path`` is None under SLURM.
- W&B (a ``WandbLogger`` in ``trainer.logger``): offline unless ``WANDB_MODE=online`` or the
  recipe says ``offline: false``; under SLURM the run id comes from the job id, and
  ``WandbLogger`` resumes with ``resume="allow"``, so a requeued job appends to the same run
  (:func:`~tokensieve.train.loggers.configure_wandb`).
- strategies and precision: :mod:`tokensieve.train.strategies` (DeepSpeed names get
  ``exclude_frozen_parameters=True``; ``*-true`` half precisions are refused).
- secrets: the saved ``config.yaml`` and the hyperparameters sent to loggers are redacted
  (:func:`~tokensieve.train.loggers.redact`).
"""

from __future__ import annotations

import functools
import signal

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import ClusterEnvironment, SLURMEnvironment

from tokensieve.train.callbacks import JobLog, SlurmRequeue
from tokensieve.train.datamodule import VideoDataModule
from tokensieve.train.loggers import configure_wandb, redact
from tokensieve.train.module import CompressorModule
from tokensieve.train.strategies import check_precision, resolve_strategy

WANDB_CLASS_PATHS = ("pytorch_lightning.loggers.WandbLogger", "pytorch_lightning.loggers.wandb.WandbLogger")


def _as_list(value) -> list:
    if value is None or value is False:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class RedactingSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` (overwriting on a restart) with secrets redacted, and sends the
    same redacted recipe to a W&B logger as ``config["recipe"]``."""

    def __init__(self, parser, config, *args, **kwargs):
        super().__init__(parser, redact(config.clone() if hasattr(config, "clone") else config), *args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                as_dict = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
                logger.experiment.config.update({"recipe": as_dict}, allow_val_change=True)


class TokensieveCLI(LightningCLI):
    """LightningCLI with SLURM, W&B, strategy and redaction set-up (see the module doc)."""

    def _subconfig(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        trainer = self._subconfig().get("trainer")
        if trainer is None:
            return
        check_precision(trainer.get("precision"))
        for logger in _as_list(trainer.get("logger")):
            if getattr(logger, "class_path", None) in WANDB_CLASS_PATHS:
                args = logger.init_args.as_dict() if hasattr(logger.init_args, "as_dict") else dict(logger.init_args or {})
                # wandb.init arguments (notes, tags, config …) go to W&B as they are: redact them too
                for key, value in redact(configure_wandb(args)).items():
                    if args.get(key) != value:
                        logger.init_args[key] = value

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        strategy = trainer_cfg.get("strategy", "auto")
        resolved = resolve_strategy(strategy)
        if resolved is not strategy:
            kwargs["strategy"] = resolved
        if SLURMEnvironment.detect():
            plugins = _as_list(trainer_cfg.get("plugins"))
            environment = next((p for p in plugins if isinstance(p, ClusterEnvironment)), None)
            if environment is None:
                environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
                plugins.append(environment)
            kwargs["plugins"] = plugins
            callbacks = _as_list(trainer_cfg.get("callbacks"))
            if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
                callbacks.append(SlurmRequeue(environment.requeue_signal or signal.SIGUSR1))
            kwargs["callbacks"] = [*callbacks, JobLog()]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            logger.log_hyperparams = _redacting(logger.log_hyperparams)
        return trainer


def _redacting(log_hyperparams):
    @functools.wraps(log_hyperparams)
    def wrapper(params, *args, **kwargs):
        return log_hyperparams(redact(params), *args, **kwargs)

    return wrapper


def run_cli(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI with ``args`` (e.g. ``["fit", "--config", "recipe.yaml"]``).

    The recipe names the LightningModule by ``model.class_path`` (any subclass of
    :class:`CompressorModule`). The resolved config is saved beside the logs (secrets
    redacted), overwriting on a restart so a requeued job does not crash.

    Raises:
        ValueError: ``trainer.precision`` casts the compressor's parameters (see
            :func:`~tokensieve.train.strategies.check_precision`).
        ImportError: a DeepSpeed strategy without the ``deepspeed`` extra.
    """
    return TokensieveCLI(
        CompressorModule,
        VideoDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_callback=RedactingSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
