"""``tokensieve slurm submit RECIPE``: render an sbatch script from a recipe, check it, submit it.

The script (``templates/single_node.sbatch`` or ``templates/multi_node.sbatch``, rendered with
:class:`string.Template`) asks for ``--nodes`` x ``--ntasks-per-node`` tasks — one per GPU, or
``trainer.devices`` CPU processes when ``--gpus-per-node 0`` — and launches
``srun tokensieve fit --config RECIPE ...`` so that every task is one Lightning rank. It is
preemption-ready: ``--requeue``, ``--open-mode=append`` (one log per job id across restarts),
``--signal=SIGUSR1@<lead>``, and a batch shell that hands a SIGUSR1 it receives on to the tasks.
``tokensieve.train.cli`` does the rest under SLURM (HPC checkpoint, requeue, resume).

Only ``yaml`` and the standard library are imported: submitting never loads torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

import yaml

SIGNAL_LEAD_SECONDS = 90
"""Default seconds before the time limit at which SLURM sends SIGUSR1 (``--signal=SIGUSR1@90``)."""

GPU_ACCELERATORS = (None, "auto", "gpu", "cuda")
CPU_ACCELERATORS = (None, "auto", "cpu")

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


class AllocationError(ValueError):
    """The recipe (plus fit overrides) and the requested allocation disagree; the message names the field."""


class SubmitError(RuntimeError):
    """``sbatch`` is missing or refused the script (its stderr is in the message)."""


def time_limit_seconds(text: str) -> int:
    """Seconds in a SLURM ``--time`` value.

    Accepts SLURM's forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.

    Raises:
        AllocationError: any other form, or a zero limit (names ``--time``).
    """
    m = _TIME.match(text.strip())
    if not m:
        raise AllocationError(f"--time {text!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    d, a, b, c = (int(g) if g is not None else None for g in m.group("d", "a", "b", "c"))
    if d is None:
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise AllocationError(f"--time {text!r} is zero")
    return seconds


@dataclass
class Allocation:
    """What to ask SLURM for.

    Args:
        nodes: ``--nodes``.
        gpus_per_node: ``--gpus-per-node``; 0 means a CPU run (``trainer.accelerator: cpu``).
        time: ``--time`` (SLURM format, e.g. ``24:00:00`` or ``1-00:00:00``).
        partition: ``--partition``; None leaves the cluster's default.
        cpus_per_task: ``--cpus-per-task``; None means ``data.num_workers + 1`` from the recipe.
        job_name: ``--job-name``; None means ``tokensieve-<recipe folder>-<recipe name>``.
        signal_lead: seconds before the time limit at which SIGUSR1 arrives.
        log_dir: folder for ``<job-name>-<job id>.out`` (relative to ``workdir``).
        workdir: the job's working directory (``--chdir``); relative recipe paths resolve here.
        sbatch_args: extra ``#SBATCH`` options verbatim, e.g. ``["--account=abc", "--qos=high"]``.
        env_setup: shell lines run before ``srun`` (e.g. ``module load cuda``); None means:
            activate the virtual environment that runs this command, if any.
    """

    nodes: int
    gpus_per_node: int
    time: str
    partition: str | None = None
    cpus_per_task: int | None = None
    job_name: str | None = None
    signal_lead: int = SIGNAL_LEAD_SECONDS
    log_dir: str = "slurm-logs"
    workdir: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    env_setup: list[str] | None = None


def _override(fit_args: list[str], key: str) -> str | None:
    """The last value of ``--key V`` / ``--key=V`` in the fit arguments, or None."""
    value = None
    for i, arg in enumerate(fit_args):
        if arg == f"--{key}" and i + 1 < len(fit_args):
            value = fit_args[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def _yaml_value(text: str | None, default):
    return default if text is None else yaml.safe_load(text)


def _device_count(devices) -> int | str:
    """``trainer.devices`` as a count, or ``"auto"`` (also for -1 / None), or the raw value if unparseable."""
    if devices is None or devices == "auto" or devices == -1 or devices == "-1":
        return "auto"
    if isinstance(devices, bool):
        return devices
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text)
        ids = [p for p in text.split(",") if p.strip()]
        if ids and all(p.strip().isdigit() for p in ids):
            return len(ids)
    return devices


def check_allocation(recipe: dict, alloc: Allocation, fit_args: list[str] = (), recipe_name: str = "recipe") -> tuple[int, list[str]]:
    """Check the recipe's ``trainer`` section (with fit overrides) against the allocation.

    Lightning refuses to start when ``trainer.devices`` x ``trainer.num_nodes`` differ from
    SLURM's tasks; this check fails earlier, at submission, and names the field.

    Args:
        recipe: the parsed recipe (``trainer:`` section is read).
        alloc: the allocation asked for.
        fit_args: extra ``tokensieve fit`` arguments; ``--trainer.devices``, ``--trainer.num_nodes``
            and ``--trainer.accelerator`` there override the recipe.
        recipe_name: used in messages.

    Returns:
        ``(ntasks_per_node, extra_fit_args)``: one task per GPU (or ``trainer.devices`` CPU
        processes with ``--gpus-per-node 0``), and fit arguments to add
        (``--trainer.accelerator=cpu`` for a CPU run whose recipe says ``auto``).

    Raises:
        AllocationError: a mismatch; the message names ``trainer.devices``,
            ``trainer.num_nodes``, ``trainer.accelerator``, ``--nodes`` or ``--gpus-per-node``.
    """
    if alloc.nodes < 1:
        raise AllocationError(f"--nodes must be >= 1, got {alloc.nodes}")
    if alloc.gpus_per_node < 0:
        raise AllocationError(f"--gpus-per-node must be >= 0, got {alloc.gpus_per_node}")
    trainer = recipe.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise AllocationError(f"{recipe_name}: trainer must be a mapping, got {type(trainer).__name__}")
    devices = _yaml_value(_override(fit_args, "trainer.devices"), trainer.get("devices", "auto"))
    num_nodes = _yaml_value(_override(fit_args, "trainer.num_nodes"), trainer.get("num_nodes", 1))
    accelerator = _yaml_value(_override(fit_args, "trainer.accelerator"), trainer.get("accelerator", "auto"))
    accelerator = accelerator.lower() if isinstance(accelerator, str) else accelerator

    if num_nodes != alloc.nodes:
        raise AllocationError(
            f"{recipe_name}: trainer.num_nodes is {num_nodes!r} but the allocation has --nodes {alloc.nodes}; "
            f"set trainer.num_nodes: {alloc.nodes} (or pass --trainer.num_nodes {alloc.nodes}) or submit with --nodes {num_nodes}"
        )
    count = _device_count(devices)
    extra: list[str] = []
    if alloc.gpus_per_node > 0:
        if accelerator not in GPU_ACCELERATORS:
            raise AllocationError(
                f"{recipe_name}: trainer.accelerator is {accelerator!r} but --gpus-per-node {alloc.gpus_per_node} asks for GPUs; "
                "use --gpus-per-node 0 for a CPU run, or set trainer.accelerator: gpu"
            )
        if count != "auto" and count != alloc.gpus_per_node:
            raise AllocationError(
                f"{recipe_name}: trainer.devices is {devices!r} but --gpus-per-node {alloc.gpus_per_node} starts one task per GPU; "
                f"set trainer.devices: {alloc.gpus_per_node} (or \"auto\") or submit with a matching --gpus-per-node"
            )
        return alloc.gpus_per_node, extra
    if accelerator not in CPU_ACCELERATORS:
        raise AllocationError(
            f"{recipe_name}: trainer.accelerator is {accelerator!r} but --gpus-per-node 0 is a CPU allocation; "
            "set trainer.accelerator: cpu (or pass --trainer.accelerator cpu), or ask for GPUs with --gpus-per-node"
        )
    if accelerator != "cpu":
        extra.append("--trainer.accelerator=cpu")
    if count == "auto":
        count = 1  # Lightning's CPU accelerator: "auto" is one process
    is_count = isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()) or devices in (None, "auto", -1, "-1")
    if not is_count or not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise AllocationError(f"{recipe_name}: trainer.devices is {devices!r}; a CPU run needs a process count >= 1 (it becomes --ntasks-per-node)")
    return count, extra


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def default_env_setup(workdir: Path) -> list[str]:
    """Shell lines that activate the virtual environment running this command (none outside a venv)."""
    prefix = Path(sys.prefix)
    if sys.prefix != getattr(sys, "base_prefix", sys.prefix) and (prefix / "bin" / "activate").is_file():
        return [f"source {shlex.quote(_relative(prefix / 'bin' / 'activate', workdir))}"]
    return []


def default_job_name(recipe_path: Path) -> str:
    """``tokensieve-<recipe folder>-<recipe stem>``, e.g. ``tokensieve-qwen2_5_vl_7b-flexselect``."""
    name = f"tokensieve-{recipe_path.resolve().parent.name}-{recipe_path.stem}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def render_script(recipe_path: str | Path, alloc: Allocation, fit_args: list[str] = ()) -> str:
    """The sbatch script for ``recipe_path`` on ``alloc`` (see the module doc).

    Args:
        recipe_path: the YAML recipe (read to check the allocation; passed to ``tokensieve fit``).
        alloc: the allocation.
        fit_args: extra ``tokensieve fit`` arguments, appended after ``--config RECIPE``.

    Raises:
        FileNotFoundError: no recipe at ``recipe_path``.
        AllocationError: see :func:`check_allocation` and :func:`time_limit_seconds`; also when
            the time limit is not longer than the SIGUSR1 lead (``--signal-lead``).
    """
    recipe_path = Path(recipe_path)
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path}: no such recipe")
    recipe = yaml.safe_load(recipe_path.read_text()) or {}
    fit_args = list(fit_args)
    ntasks, extra_fit = check_allocation(recipe, alloc, fit_args, str(recipe_path))
    limit = time_limit_seconds(alloc.time)
    if limit <= alloc.signal_lead:
        raise AllocationError(f"--time {alloc.time} ({limit} s) must be longer than the SIGUSR1 lead --signal-lead {alloc.signal_lead} s")
    workdir = Path(alloc.workdir or Path.cwd()).resolve()
    cpus = alloc.cpus_per_task
    if cpus is None:
        cpus = int((recipe.get("data") or {}).get("num_workers") or 0) + 1
    if cpus < 1:
        raise AllocationError(f"--cpus-per-task must be >= 1, got {cpus}")
    job_name = alloc.job_name or default_job_name(recipe_path)
    directives = [f"--job-name={job_name}"]
    if alloc.partition:
        directives.append(f"--partition={alloc.partition}")
    directives += [f"--nodes={alloc.nodes}", f"--ntasks-per-node={ntasks}"]
    if alloc.gpus_per_node:
        directives.append(f"--gpus-per-node={alloc.gpus_per_node}")
    directives += [
        f"--cpus-per-task={cpus}",
        f"--time={alloc.time}",
        f"--chdir={workdir}",
        f"--output={alloc.log_dir}/%x-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=SIGUSR1@{alloc.signal_lead}",
        *alloc.sbatch_args,
    ]
    env_setup = default_env_setup(workdir) if alloc.env_setup is None else list(alloc.env_setup)
    command = shlex.join(["tokensieve", "fit", "--config", _relative(recipe_path, workdir), *extra_fit, *fit_args])
    template = "multi_node.sbatch" if alloc.nodes > 1 else "single_node.sbatch"
    text = resources.files("tokensieve.slurm").joinpath("templates", template).read_text()
    return Template(text).substitute(
        header=f"rendered by `tokensieve slurm submit` from {_relative(recipe_path, workdir)}",
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        nodes=alloc.nodes,
        ntasks_per_node=ntasks,
        unit="GPU" if alloc.gpus_per_node else "CPU process",
        signal_lead=alloc.signal_lead,
        env_setup="".join(f"{line}\n" for line in env_setup),
        command=command,
    )


def submit(recipe_path: str | Path, alloc: Allocation, fit_args: list[str] = (), dry_run: bool = False) -> str | None:
    """Render the script; print it (``dry_run``) or write it under ``log_dir`` and ``sbatch`` it.

    Returns:
        The job id (``sbatch --parsable``), or None with ``dry_run``.

    Raises:
        AllocationError, FileNotFoundError: see :func:`render_script`.
        SubmitError: ``sbatch`` is not on PATH or exits non-zero.
    """
    script = render_script(recipe_path, alloc, fit_args)
    if dry_run:
        print(script, end="")
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the script)")
    workdir = Path(alloc.workdir or Path.cwd()).resolve()
    log_dir = workdir / alloc.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    job_name = alloc.job_name or default_job_name(Path(recipe_path))
    path = log_dir / f"{job_name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.sbatch"
    path.write_text(script)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, cwd=workdir, check=False)
    if result.returncode != 0:
        raise SubmitError(f"sbatch {path} failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: script {path}, log {log_dir / f'{job_name}-{job_id}.out'}")
    return job_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve slurm", description="SLURM jobs for tokensieve recipes.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser(
        "submit",
        help="render an sbatch script for a recipe and submit it",
        description="Render an sbatch script that runs `srun tokensieve fit --config RECIPE` with one task per GPU "
        "(or trainer.devices CPU processes with --gpus-per-node 0), check the recipe against the allocation, and sbatch it. "
        "Arguments after `--` (or unknown --options) go to `tokensieve fit`, e.g. -- --trainer.max_steps 1000.",
    )
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one task each; 0 for a CPU run")
    p.add_argument("--time", required=True, help="time limit, SLURM format (e.g. 24:00:00, 2-00:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: data.num_workers + 1 from the recipe")
    p.add_argument("--job-name", default=None)
    p.add_argument("--signal-lead", type=int, default=SIGNAL_LEAD_SECONDS, help="seconds before the time limit at which SIGUSR1 arrives")
    p.add_argument("--log-dir", default="slurm-logs", help="folder (relative to the working directory) for <job-name>-<jobid>.out")
    p.add_argument("--workdir", default=None, help="the job's working directory (default: here)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION", help="extra #SBATCH option, e.g. --sbatch-arg=--account=abc (repeatable)")
    p.add_argument("--env-setup", action="append", default=None, metavar="LINE", help="shell line before srun (repeatable; default: activate the current venv)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tokensieve slurm ...``; returns the exit status (2 on a recipe/allocation error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    args, unknown = build_parser().parse_known_args(argv)
    alloc = Allocation(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        job_name=args.job_name,
        signal_lead=args.signal_lead,
        log_dir=args.log_dir,
        workdir=args.workdir,
        sbatch_args=args.sbatch_arg,
        env_setup=args.env_setup,
    )
    try:
        submit(args.recipe, alloc, [*unknown, *tail], dry_run=args.dry_run)
    except (AllocationError, FileNotFoundError, SubmitError) as exn:
        print(f"tokensieve slurm submit: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
