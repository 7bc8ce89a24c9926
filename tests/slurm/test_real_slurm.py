"""Under a real SLURM scheduler: submit, preempt (SIGUSR1), requeue, resume, finish once, export.

The tiny recipe is submitted with ``tokensieve slurm submit --gpus-per-node 0`` as 2 CPU tasks
(DDP over gloo). After the log shows step 3, ``scancel --signal=USR1 --batch`` plays SLURM's
pre-timeout signal; the run must save ``hpc_ckpt_1.ckpt``, requeue itself, resume from that
checkpoint after ``cred_expire`` (30 s), reach ``max_steps`` exactly once, keep one W&B run id,
write no secret anywhere, and export a compressor with the same format as a run that was not
preempted. Run with ``python -m pytest -m slurm`` as root; the timings go to ``timing.json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "tiny" / "flexselect.yaml"
MAX_STEPS = 30
SIGNAL_AT_STEP = 3
FAKE_SECRETS = {"WANDB_API_KEY": "fake-wandb-key-3f9a1c0e5b7d2468", "HF_TOKEN": "hf_fakeTokenValue0123456789"}
FIT_ARGS = [
    "--trainer.devices", "2",
    "--trainer.strategy", "ddp",
    f"--trainer.max_steps={MAX_STEPS}",
    "--trainer.max_epochs=-1",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--data.val_shards=null",
    "--data.num_frames=4",
    "--data.size=[56, 56]",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--data.shuffle_buffer=8",
    "--data.epoch_length=auto",
    "--model.init_args.compressor_kwargs={d_model: 64, num_heads: 4, head_dim: 32, context_layers: 1}",
]


def _recipe(workspace: Path, run_dir: Path) -> Path:
    """The tiny recipe with its ``runs/quickstart`` paths pointed at the workspace and ``run_dir``."""
    text = TINY_RECIPE.read_text().replace("runs/quickstart/train", str(run_dir)).replace("runs/quickstart", str(workspace))
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(text)
    return path


def _tokensieve(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokensieve.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _export_format(folder: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return sorted(config), shapes


def test_preempted_job_requeues_resumes_and_finishes_once(slurm_cluster, tiny_workspace, tmp_path):
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    env = {**slurm_cluster.env, **FAKE_SECRETS, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    recipe = _recipe(tiny_workspace, run_dir)

    submitted = _tokensieve(
        "slurm", "submit", str(recipe), "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1",
        "--time", "00:15:00", "--job-name", "ts-requeue", "--", *FIT_ARGS, env=env, cwd=tmp_path,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    log = tmp_path / "slurm-logs" / f"ts-requeue-{job_id}.out"
    script = next((tmp_path / "slurm-logs").glob("ts-requeue-*.sbatch")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --signal=SIGUSR1@90" in script and "#SBATCH --requeue" in script
    assert not any(secret in script for secret in FAKE_SECRETS.values())

    def text() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    try:
        _wait_for(lambda: f"[tokensieve] step {SIGNAL_AT_STEP}/{MAX_STEPS}" in text(), 300, f"step {SIGNAL_AT_STEP} in {log}")
        timings["to_first_signal_s"] = time.monotonic() - t_start
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        _wait_for(lambda: slurm_cluster.job(job_id).get("Restarts") == "1", 120, "the job to be requeued")
        timings["requeued_at_s"] = time.monotonic() - t_start

        # meanwhile (the requeued job waits cred_expire seconds): a run that is not preempted
        plain_dir = tmp_path / "plain"
        plain_env = {k: v for k, v in env.items() if k != "SLURM_CONF"}
        plain = _tokensieve("fit", "--config", str(_recipe(tiny_workspace, plain_dir)), *FIT_ARGS[4:], "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.logger=false", env=plain_env, cwd=tmp_path)
        assert plain.returncode == 0, plain.stderr[-3000:]
        exported_plain = _tokensieve("export", str(plain_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "export-plain"), env=plain_env, cwd=tmp_path)
        assert exported_plain.returncode == 0, exported_plain.stderr[-3000:]

        _wait_for(lambda: slurm_cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 540, "the job to end", poll=2)
        timings["job_done_s"] = time.monotonic() - t_start
    except Exception:
        slurm_cluster.run("scancel", job_id, check=False)
        print(text()[-6000:])
        print(slurm_cluster.log_tails())
        raise
    finally:
        leftovers = slurm_cluster.kill_job_processes(job_id)

    out = text()
    job = slurm_cluster.job(job_id)
    assert job.get("JobState") == "COMPLETED", f"{job}\n{out[-4000:]}"
    assert job.get("Restarts") == "1" and job.get("ExitCode") == "0:0", job

    # two starts of the same job, one requeue, resumed from the HPC checkpoint
    assert re.findall(rf"\[tokensieve\] job {job_id} start \(restart (\d)\)", out) == ["0", "1"], out[-4000:]
    saved = re.findall(r"\[tokensieve\] SIGUSR1: saved (\S+hpc_ckpt_1\.ckpt) at global_step (\d+)", out)
    assert len(saved) == 1, out[-4000:]
    hpc_path, hpc_step = Path(saved[0][0]), int(saved[0][1])
    assert SIGNAL_AT_STEP <= hpc_step < MAX_STEPS
    # the line before `scontrol requeue` (the one after it can be cut off by the kill); the
    # requeue itself is proven by Restarts=1 and the two starts above
    assert out.count(f"[tokensieve] requeueing SLURM job {job_id}") == 1
    starts = re.findall(r"\[tokensieve\] fit start: job \d+ restart (\d), world size (\d), global_step (\d+)/\d+, (.*)", out)
    assert [(r, w, int(s)) for r, w, s, _ in starts] == [("0", "2", 0), ("1", "2", hpc_step)], starts
    assert starts[1][3] == f"resumed from {hpc_path}"
    assert f"Restored all states from the checkpoint at {hpc_path}" in out

    # the final step, exactly once
    assert out.count(f"[tokensieve] fit finished at global_step {MAX_STEPS}/{MAX_STEPS}") == 1, out[-4000:]
    assert out.count("[tokensieve] fit finished") == 1
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hpc = torch.load(hpc_path if hpc_path.is_absolute() else tmp_path / hpc_path, map_location="cpu", weights_only=True)
    assert final["global_step"] == MAX_STEPS and hpc["global_step"] == hpc_step
    for ckpt in (final, hpc):
        assert ckpt["state_dict"] and all(k.startswith("compressor.") for k in ckpt["state_dict"])

    # one W&B run id across both starts
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {re.sub(r"^offline-run-\d{8}_\d{6}-", "", r.name) for r in runs}
    assert len(runs) == 2 and ids == {f"slurm-{slurm_cluster.cluster_name}-{job_id}"}, [r.name for r in runs]

    # no secret in the saved config, the W&B files or the job log
    assert (run_dir / "config.yaml").is_file()
    for path in [run_dir / "config.yaml", log, *(p for p in (run_dir / "wandb").rglob("*") if p.is_file())]:
        data = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in data, f"{name} leaked into {path}"

    # export: same format as the run that was not preempted
    exported = _tokensieve("export", str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "export-slurm"), env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert _export_format(tmp_path / "export-slurm") == _export_format(tmp_path / "export-plain")
    recipe_out = yaml.safe_load((tmp_path / "export-slurm" / "recipe.yaml").read_text())
    assert recipe_out["global_step"] == MAX_STEPS

    timings["total_s"] = time.monotonic() - t_start
    summary = {"job_id": job_id, "hpc_step": hpc_step, "leftover_pids_killed": leftovers, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (tmp_path / "timing.json").write_text(json.dumps(summary, indent=2))
    print(f"real-SLURM requeue test: {json.dumps(summary)}")
