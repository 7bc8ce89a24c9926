"""``tokensieve slurm submit``: rendering, allocation checks, sbatch call (no cluster needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from tokensieve.cli import main as tokensieve_main
from tokensieve.slurm.submit import Allocation, AllocationError, check_allocation, main, render_script, submit, time_limit_seconds

REPO = Path(__file__).resolve().parents[2]
RECIPE_7B = REPO / "recipes" / "qwen2_5_vl_7b" / "flexselect.yaml"
TINY = REPO / "recipes" / "tiny" / "flexselect.yaml"


def _recipe(tmp_path: Path, trainer: dict, data: dict | None = None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer, "data": data or {"num_workers": 3}}))
    return path


def test_multi_node_gpu_script_has_the_directives_and_srun():
    script = render_script(RECIPE_7B, Allocation(nodes=2, gpus_per_node=8, time="24:00:00", partition="gpu", workdir=str(REPO), env_setup=[]))
    for line in [
        "#SBATCH --job-name=tokensieve-qwen2_5_vl_7b-flexselect",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=24:00:00",
        "#SBATCH --output=slurm-logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=SIGUSR1@90",
        "srun --kill-on-bad-exit=1 tokensieve fit --config recipes/qwen2_5_vl_7b/flexselect.yaml &",
    ]:
        assert line in script, line
    assert "2 nodes x 8 task(s), one per GPU" in script
    assert "$" not in "".join(line for line in script.splitlines() if line.startswith("#SBATCH"))


def test_cpu_allocation_takes_tasks_from_devices_and_forces_cpu(tmp_path):
    recipe = _recipe(tmp_path, {"accelerator": "auto", "devices": 2})
    script = render_script(recipe, Allocation(nodes=1, gpus_per_node=0, time="30", workdir=str(tmp_path), env_setup=["module load x"]))
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    assert "#SBATCH --cpus-per-task=4" in script  # data.num_workers + 1
    assert "tokensieve fit --config recipe.yaml --trainer.accelerator=cpu &" in script
    assert "module load x\n" in script and "One node, 2 task(s), one per CPU process" in script


@pytest.mark.parametrize(
    ("trainer", "alloc", "field"),
    [
        ({"devices": 4}, {"gpus_per_node": 8}, "trainer.devices"),
        ({"devices": [0, 1]}, {"gpus_per_node": 8}, "trainer.devices"),
        ({"devices": 8, "num_nodes": 1}, {"gpus_per_node": 8, "nodes": 2}, "trainer.num_nodes"),
        ({"accelerator": "cpu", "devices": 8}, {"gpus_per_node": 8}, "trainer.accelerator"),
        ({"accelerator": "gpu", "devices": 1}, {"gpus_per_node": 0}, "trainer.accelerator"),
        ({"accelerator": "cpu", "devices": "0,1"}, {"gpus_per_node": 0}, "trainer.devices"),
        ({"devices": 8}, {"gpus_per_node": -1}, "--gpus-per-node"),
    ],
)
def test_mismatches_name_the_field(trainer, alloc, field):
    with pytest.raises(AllocationError, match=field.replace(".", r"\.")):
        check_allocation({"trainer": trainer}, Allocation(time="1:00:00", **{"nodes": 1, **alloc}))


@pytest.mark.parametrize("devices", ["auto", -1, None, 8, "8", [0, 1, 2, 3, 4, 5, 6, 7], "0,1,2,3,4,5,6,7"])
def test_gpu_devices_that_match(devices):
    trainer = {} if devices is None else {"devices": devices}
    assert check_allocation({"trainer": trainer}, Allocation(nodes=1, gpus_per_node=8, time="1:00:00")) == (8, [])


def test_fit_overrides_are_checked_instead_of_the_recipe():
    recipe = {"trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1}}
    alloc = Allocation(nodes=2, gpus_per_node=0, time="10")
    assert check_allocation(recipe, alloc, ["--trainer.devices", "3", "--trainer.num_nodes=2"]) == (3, [])
    with pytest.raises(AllocationError, match="trainer.num_nodes"):
        check_allocation(recipe, alloc, ["--trainer.devices", "3"])


@pytest.mark.parametrize(("text", "seconds"), [("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800), ("1-2:3", 93780), ("1-0:0:5", 86405)])
def test_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_bad_time_and_short_time_are_refused(tmp_path):
    with pytest.raises(AllocationError, match="--time"):
        time_limit_seconds("1h")
    recipe = _recipe(tmp_path, {"accelerator": "cpu", "devices": 1})
    with pytest.raises(AllocationError, match="--signal-lead"):
        render_script(recipe, Allocation(nodes=1, gpus_per_node=0, time="1:00"))


def test_main_dry_run_passes_extra_fit_args_and_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, {"accelerator": "cpu", "devices": 1})
    rc = tokensieve_main(["slurm", "submit", str(recipe), "--gpus-per-node", "0", "--time", "10", "--dry-run", "--trainer.max_steps", "5", "--", "--data.batch_size", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert "tokensieve fit --config recipe.yaml --trainer.max_steps 5 --data.batch_size 2 &" in out
    assert not (tmp_path / "slurm-logs").exists()  # a dry run writes nothing
    assert main(["submit", str(recipe), "--gpus-per-node", "4", "--time", "10", "--dry-run"]) == 2
    assert "trainer.accelerator" in capsys.readouterr().err


def test_submit_writes_the_script_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch-args\necho "4242;cluster"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-never-in-a-script-0123")
    recipe = _recipe(tmp_path, {"accelerator": "cpu", "devices": 2})
    job = submit(recipe, Allocation(nodes=1, gpus_per_node=0, time="20", workdir=str(tmp_path), job_name="t"))
    assert job == "4242"
    scripts = list((tmp_path / "slurm-logs").glob("t-*.sbatch"))
    assert len(scripts) == 1 and (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(scripts[0])]
    assert "fake-key-never" not in scripts[0].read_text()
    assert "slurm-logs/t-4242.out" in capsys.readouterr().out


def test_tiny_recipe_fits_a_cpu_allocation():
    recipe = yaml.safe_load(TINY.read_text())
    assert check_allocation(recipe, Allocation(nodes=1, gpus_per_node=0, time="10")) == (1, [])
