"""Callbacks for cluster runs: requeue on SIGUSR1 at a step boundary, plain-text progress,
and export of the trained compressor (a W&B artifact when online).

:class:`SlurmRequeue` and :class:`JobLog` are added by ``tokensieve.train.cli`` when the run is
under SLURM; :class:`ExportCompressor` is listed in a recipe's ``trainer.callbacks``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)

PREFIX = "[tokensieve]"
"""Every line :class:`JobLog` and :class:`SlurmRequeue` print starts with this."""

_HPC = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def say(message: str) -> None:
    """Print ``[tokensieve] message`` to stdout and flush (SLURM logs are files, not terminals)."""
    print(f"{PREFIX} {message}", flush=True)


def hpc_checkpoint_path(folder: str | Path) -> Path:
    """``folder/hpc_ckpt_<n+1>.ckpt`` where n is the largest existing number (0 if none).

    The same naming Lightning uses (``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``), so
    a fit under SLURM with ``ckpt_path=None`` resumes from the newest one by itself.
    """
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := _HPC.match(p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id(environ=None) -> str | None:
    """``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None outside SLURM."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


class SlurmRequeue(Callback):
    """On ``signum`` (SIGUSR1): save an HPC checkpoint, ``scontrol requeue`` the job, stop the fit.

    Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) does this *inside* the
    signal handler, wherever the main thread happens to be. Under DDP that can deadlock: one
    rank enters the checkpoint's barrier while another still waits in the step's gradient
    all-reduce, and rank 0 then never requeues. Here the handler only sets a flag; at the end
    of every training batch the ranks agree on it (one boolean all-reduce, "any") and then all
    save ``hpc_ckpt_<n>.ckpt`` together at the same global step, rank 0 runs
    ``scontrol requeue <job>``, and ``trainer.should_stop`` ends the fit. The requeued job
    finds the checkpoint in ``trainer.default_root_dir`` and resumes from it (Lightning's
    ``ckpt_path=None`` rule under SLURM).

    Because this handler is installed in ``setup`` (before Lightning registers its handlers),
    Lightning leaves SIGUSR1 to it and keeps only its SIGTERM handling. A signal that comes
    during validation is acted on after the next training batch.

    Args:
        signum: the signal (SLURM sends it ``--signal=SIGUSR1@<lead>`` before the time limit).
        requeue: run ``scontrol requeue`` (False: only checkpoint and stop; for tests).
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True):
        self.signum = signal.Signals(signum)
        self.requeue = requeue
        self.received = False
        self.requeued = False
        self.checkpoint: Path | None = None
        self._previous = None
        self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # only a flag: the work happens between steps (see the class doc)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("SlurmRequeue: not in the main thread, cannot install a %s handler", self.signum.name)
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.requeued or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = trainer.strategy.broadcast(str(hpc_checkpoint_path(trainer.default_root_dir)), src=0)
        trainer.save_checkpoint(path)
        self.checkpoint, self.requeued = Path(path), True
        # nothing else is written after the snapshot: a ModelCheckpoint saving at this step's
        # epoch end would leave a file the restored callback state does not know about, and
        # the resumed run would then write "last-v1.ckpt" instead of replacing "last.ckpt"
        for cb in trainer.checkpoint_callbacks:
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step
        if trainer.is_global_zero:
            say(f"{self.signum.name}: saved {path} at global_step {trainer.global_step}")
            if self.requeue:
                self._scontrol_requeue()
        trainer.should_stop = True

    @staticmethod
    def _scontrol_requeue() -> None:
        job = slurm_job_id()
        if not job:
            say("not a SLURM job: nothing to requeue")
            return
        # say it first: once `scontrol requeue` succeeds SLURM starts killing this job, so a
        # line printed afterwards may never reach the log
        say(f"requeueing SLURM job {job}")
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            say(f"requeued SLURM job {job}")
        else:
            say(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")


class JobLog(Callback):
    """Plain progress lines for batch logs (rank 0), all starting with ``[tokensieve]``::

        [tokensieve] fit start: job 12 restart 1, global_step 7/30, resumed from runs/x/hpc_ckpt_1.ckpt
        [tokensieve] step 10/30 train/loss=0.8123
        [tokensieve] fit stopped for requeue at global_step 7/30
        [tokensieve] fit finished at global_step 30/30

    Args:
        every_n_steps: print a step line every n optimizer steps (default: ``trainer.log_every_n_steps``).
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps
        self._last = -1

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        job = slurm_job_id()
        where = f"job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}, " if job else ""
        source = f"resumed from {trainer.ckpt_path}" if trainer.ckpt_path else "from scratch"
        say(f"fit start: {where}world size {trainer.world_size}, global_step {trainer.global_step}/{trainer.max_steps}, {source}")

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step != self._last and step % every == 0:
            self._last = step
            loss = trainer.callback_metrics.get("train/loss")
            say(f"step {step}/{trainer.max_steps}" + (f" train/loss={float(loss):.4f}" if loss is not None else ""))

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        requeued = any(isinstance(cb, SlurmRequeue) and cb.requeued for cb in trainer.callbacks)
        state = "stopped for requeue" if requeued else "finished"
        say(f"fit {state} at global_step {trainer.global_step}/{trainer.max_steps}")


class ExportCompressor(Callback):
    """At the end of a fit that was not stopped for a requeue: export the trained compressor
    (``tokensieve export``'s folder) and, when the W&B logger is online, log it as an artifact.

    The checkpoint exported is ``trainer.checkpoint_callback``'s last (else best) path; if no
    checkpoint callback saved one, a ``final.ckpt`` is written to ``dirpath``'s parent first.

    Args:
        dirpath: export folder; default ``<trainer.default_root_dir>/export``.
        log_artifact: ``None`` (default): only when a ``WandbLogger`` is online; ``True``: also
            offline (stored with the offline run for ``wandb sync``); ``False``: never.
        artifact_name: default ``compressor-<run id>``.
    """

    def __init__(self, dirpath: str | None = None, log_artifact: bool | None = None, artifact_name: str | None = None):
        self.dirpath = dirpath
        self.log_artifact = log_artifact
        self.artifact_name = artifact_name
        self.exported: Path | None = None
        self.artifact = None

    def _checkpoint(self, trainer: pl.Trainer, out: Path) -> Path:
        cb = trainer.checkpoint_callback
        for candidate in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        path = out.parent / "final.ckpt"
        trainer.save_checkpoint(path)
        return path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(cb, SlurmRequeue) and cb.requeued for cb in trainer.callbacks):
            return
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "export")
        ckpt = self._checkpoint(trainer, out)  # collective when it saves: every rank calls it
        if not trainer.is_global_zero:
            return
        from tokensieve.train.export import export_checkpoint

        self.exported = export_checkpoint(ckpt, out)
        say(f"exported {ckpt} to {self.exported}")
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            online = not getattr(logger, "_offline", True)
            if self.log_artifact or (self.log_artifact is None and online):
                from tokensieve.train.loggers import log_compressor_artifact

                self.artifact = log_compressor_artifact(logger.experiment, self.exported, self.artifact_name)
                say(f"logged W&B artifact {self.artifact.name}")
            elif self.log_artifact is None:
                say("W&B is offline: compressor not logged as an artifact (log_artifact: true forces it)")
        sys.stdout.flush()
