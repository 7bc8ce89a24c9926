"""Training CLI set-up: W&B ids and redaction, strategies, SIGUSR1 requeue callback, SLURM wiring."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from tests.conftest import make_batch
from tokensieve.train import strategies
from tokensieve.train.callbacks import ExportCompressor, JobLog, SlurmRequeue, hpc_checkpoint_path
from tokensieve.train.loggers import REDACTED, configure_wandb, is_secret_key, redact, slurm_run_id
from tokensieve.train.module import FlexSelectDistill

FAKE_KEY = "fake-wandb-key-5d41402abc4b2a76b9719d911017c592"
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- W&B ids, modes, redaction
def test_slurm_run_id_from_job_or_array_task():
    assert slurm_run_id({}) is None
    assert slurm_run_id({"SLURM_JOB_ID": "17", "SLURM_CLUSTER_NAME": "c1"}) == "slurm-c1-17"
    assert slurm_run_id({"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "17", "SLURM_ARRAY_TASK_ID": "3"}) == "slurm-17_3"


@pytest.mark.parametrize(
    ("init", "env", "offline"),
    [({}, {}, True), ({"offline": False}, {}, False), ({"offline": True}, {"WANDB_MODE": "online"}, False), ({"offline": False}, {"WANDB_MODE": "offline"}, True), ({"offline": True}, {"WANDB_MODE": "disabled"}, False)],
)
def test_configure_wandb_offline_by_default_env_wins(init, env, offline):
    assert configure_wandb(init, env)["offline"] is offline


def test_configure_wandb_stable_id_and_resume():
    env = {"SLURM_JOB_ID": "99", "SLURM_CLUSTER_NAME": "c"}
    out = configure_wandb({"project": "p", "resume": None}, env)
    assert out["id"] == "slurm-c-99" and out["resume"] == "allow"
    assert configure_wandb({"id": "mine"}, env)["id"] == "mine"
    assert "id" not in configure_wandb({}, {**env, "WANDB_RUN_ID": "theirs"})
    assert "id" not in configure_wandb({}, {})


def test_redact_keys_and_environment_values():
    env = {"WANDB_API_KEY": FAKE_KEY, "MY_SERVICE_TOKEN": "tok-1234567890", "SHORT_TOKEN": "abc"}
    cfg = {"a": {"api_key": "x", "hf_token": "hf_x", "pad_token": "<pad>", "max_tokens": 8, "tokens": "keep"}, "notes": f"key={FAKE_KEY}", "l": ["tok-1234567890", 3], "abc": "abc"}
    out = redact(cfg, env)
    assert out["a"] == {"api_key": REDACTED, "hf_token": REDACTED, "pad_token": "<pad>", "max_tokens": 8, "tokens": "keep"}
    assert out["notes"] == f"key={REDACTED}" and out["l"] == [REDACTED, 3] and out["abc"] == "abc"
    assert cfg["a"]["api_key"] == "x"  # a copy
    assert is_secret_key("password") and is_secret_key("access_token") and not is_secret_key("num_tokens")


# ---------------------------------------------------------------- strategies and precision
def test_ddp_backend_follows_the_device():
    assert strategies.default_backend("cpu") == "gloo"
    assert strategies.default_backend("cuda") == "nccl"
    assert strategies.resolve_strategy("ddp") == "ddp"


def test_half_true_precision_is_refused_mixed_is_fine():
    with pytest.raises(ValueError, match="trainer.precision"):
        strategies.check_precision("bf16-true")
    strategies.check_precision("bf16-mixed")
    strategies.check_precision(None)


@pytest.mark.skipif(strategies.deepspeed_available(), reason="DeepSpeed is installed here")
def test_deepspeed_without_the_extra_says_how_to_install():
    with pytest.raises(ImportError, match=r"trainer\.strategy.*tokensieve\[deepspeed\]"):
        strategies.resolve_strategy("deepspeed_stage_2")


# ---------------------------------------------------------------- SIGUSR1 → HPC checkpoint → resume
def test_hpc_checkpoint_numbering(tmp_path):
    assert hpc_checkpoint_path(tmp_path / "none") == tmp_path / "none" / "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").touch()
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_8.ckpt"


@pytest.fixture
def module(tiny_backbone_dir):
    torch.manual_seed(0)
    return FlexSelectDistill(backbone=str(tiny_backbone_dir), compressor_kwargs={"d_model": 32}, reference_layer=2, lr=1e-2)


def _loader(n: int = 4):
    return DataLoader([make_batch(batch_size=1, frames=4, height=56, width=56, seed=i) for i in range(n)], batch_size=None, collate_fn=lambda b: b)


class _SignalAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _trainer(tmp_path, max_steps, callbacks, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, callbacks=callbacks, **kw)


def test_sigusr1_saves_hpc_checkpoint_stops_and_resumes(module, tmp_path, capsys):
    before = signal.getsignal(signal.SIGUSR1)
    requeue = SlurmRequeue(requeue=False)
    ckpt_dir = tmp_path / "checkpoints"
    trainer = _trainer(tmp_path, 6, [_SignalAt(2), requeue, JobLog(every_n_steps=1), ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None)])
    trainer.fit(module, _loader())
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored
    assert requeue.requeued and trainer.global_step == 2
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert requeue.checkpoint == hpc and torch.load(hpc, weights_only=True)["global_step"] == 2
    assert not list(ckpt_dir.glob("*.ckpt"))  # nothing written after the snapshot
    out = capsys.readouterr().out
    assert "[tokensieve] SIGUSR1: saved" in out and "[tokensieve] fit stopped for requeue at global_step 2/6" in out

    resumed = _trainer(tmp_path, 6, [SlurmRequeue(requeue=False), JobLog(), ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None)])
    resumed.fit(module, _loader(), ckpt_path=str(hpc))
    assert resumed.global_step == 6
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    out = capsys.readouterr().out
    assert f"global_step 2/6, resumed from {hpc}" in out and "[tokensieve] fit finished at global_step 6/6" in out


# ---------------------------------------------------------------- the CLI under (simulated) SLURM
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from tokensieve.data.samples import sample_videos
    from tokensieve.data.shards import write_shards

    out = tmp_path_factory.mktemp("cli-shards")
    write_shards(sample_videos()[:1], out, clip_seconds=2.0, max_side=64, progress=False)
    return out


def test_run_cli_under_slurm_wires_requeue_wandb_id_and_redacts(tiny_backbone_dir, tiny_shards, tmp_path, monkeypatch, capsys):
    from tokensieve.train.cli import run_cli

    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ts-unit", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_CLUSTER_NAME": "unit", "SLURM_RESTART_COUNT": "0"}
    for k, v in {**slurm_env, "WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "flexselect.yaml").read_text())
    recipe["model"]["init_args"].update(backbone=str(tiny_backbone_dir), compressor_kwargs={"d_model": 32})
    recipe["data"].update(train_shards=str(tiny_shards), val_shards=None, num_frames=4, size=[56, 56], batch_size=2, num_workers=0)
    export = {"class_path": "tokensieve.train.callbacks.ExportCompressor", "init_args": {"dirpath": str(tmp_path / "export"), "log_artifact": True}}
    recipe["trainer"].update(default_root_dir=str(tmp_path), max_steps=2, limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False, callbacks=[export])
    recipe["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), notes=f"oops: {FAKE_KEY}")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = signal.getsignal(signal.SIGUSR1)
    cli = run_cli(["fit", "--config", str(path)])
    try:
        trainer = cli.trainer
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
        assert sum(isinstance(c, SlurmRequeue) for c in trainer.callbacks) == 1 and sum(isinstance(c, JobLog) for c in trainer.callbacks) == 1
        assert trainer.global_step == 2 and trainer.logger.experiment.id == "slurm-unit-4242"
        # the recipe's ExportCompressor: exported folder, logged as an (offline) W&B model artifact
        (exporter,) = [c for c in trainer.callbacks if isinstance(c, ExportCompressor)]
        assert {p.name for p in exporter.exported.iterdir()} >= {"config.json", "model.safetensors", "recipe.yaml"}
        assert exporter.artifact.type == "model" and {"config.json", "model.safetensors"} <= set(exporter.artifact.manifest.entries)
    finally:
        cli.trainer.logger.experiment.finish()
    assert signal.getsignal(signal.SIGUSR1) == before
    assert "[tokensieve] fit start: job 4242 restart 0, world size 1, global_step 0/2, from scratch" in capsys.readouterr().out
    saved = (tmp_path / "config.yaml").read_text()
    assert f"notes: 'oops: {REDACTED}'" in saved and "id: slurm-unit-4242" in saved and "resume: allow" in saved
    for file in [tmp_path / "config.yaml", *(p for p in (tmp_path / "wandb").rglob("*") if p.is_file())]:
        assert FAKE_KEY.encode() not in file.read_bytes(), f"secret leaked into {file}"
