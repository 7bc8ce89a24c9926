"""A real one-node SLURM cluster in a temporary folder, for tests (run as root on Linux).

:class:`LocalSlurm` installs Debian's ``slurmctld slurmd munge`` if they are missing, writes a
``slurm.conf`` (one node with this host's name, ``proctrack/linuxproc``, ``task/none``,
``select/cons_tres``, ``AuthInfo=...,cred_expire=<s>``, state and spool folders, logs and pid
files all inside the folder, ports picked free), starts ``munged`` (own key and socket),
``slurmctld`` and ``slurmd`` as root, and waits until the node is idle. Client commands find
the cluster through ``SLURM_CONF`` (see :attr:`LocalSlurm.env`). :meth:`LocalSlurm.stop`
ends the daemons by the PIDs in their pid files, and :meth:`LocalSlurm.kill_job_processes`
ends what a job left behind (with ``proctrack/linuxproc``, processes that outlive the batch
shell keep running), found by ``SLURM_JOB_ID`` and ``SLURM_CONF`` in their environment.

A requeued job is held for ``cred_expire`` seconds (plus a scheduler pass) before it starts again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    """SLURM / munge programs not found on PATH (``/usr/sbin`` included)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def install_if_missing(timeout: float = 900) -> None:
    """``apt-get install -y slurmctld slurmd munge`` (after ``apt-get update`` if the first try fails).

    Raises:
        RuntimeError: still missing afterwards (the message has apt's output tail).
    """
    if not missing_binaries():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout, check=False)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if missing_binaries():
        raise RuntimeError(f"could not install {' '.join(PACKAGES)}: {(result.stdout + result.stderr)[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def kill_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM ``pid``, then SIGKILL after ``grace`` seconds if it is still alive."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalSlurm:
    """One-node SLURM cluster under ``root`` (see the module doc).

    Args:
        root: an empty folder for config, state, spool, logs, pid files and the munge socket.
        cpus: CPUs of the node (``CPUs=``); defaults to ``os.cpu_count()``.
        cred_expire: ``AuthInfo=cred_expire`` seconds (a requeued job waits this long).
        cluster_name: ``ClusterName`` (part of the W&B run id of jobs).
    """

    def __init__(self, root: Path, cpus: int | None = None, cred_expire: int = 30, cluster_name: str = "tokensieve-ci"):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.cred_expire = cred_expire
        self.cluster_name = cluster_name
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.pid_files = {name: self.root / "run" / f"{name}.pid" for name in ("slurmd", "slurmctld", "munged")}

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster (and no inherited job variables)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; returns the completed process."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "run", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        lines = {
            "ClusterName": self.cluster_name,
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={r / 'munge' / 'munge.socket'},cred_expire={self.cred_expire}",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": self.pid_files["slurmctld"],
            "SlurmdPidFile": self.pid_files["slurmd"],
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "PlugStackConfig": r / "plugstack.conf",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "ReturnToService": 2,
            "KillWait": 5,
            "MinJobAge": 900,
            "InactiveLimit": 0,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1024 State=UNKNOWN\n"
        text += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(text)

    def _start_munged(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            ["munged", "--force", f"--socket={m / 'munge.socket'}", f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
             f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
            env=self.env, check=True, capture_output=True, text=True, timeout=30,
        )

    def start(self, timeout: float = 90) -> LocalSlurm:
        """Write the config, start munged, slurmctld and slurmd; wait for the node to be idle.

        Raises:
            RuntimeError: the node is not idle within ``timeout`` seconds (the message has the
                daemon log tails).
        """
        self._write_conf()
        self._start_munged()
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, capture_output=True, text=True, timeout=30)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", self.node], env=self.env, check=True, capture_output=True, text=True, timeout=30)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = result.stdout.strip()
            if state == "idle":
                return self
            time.sleep(1)
        raise RuntimeError(f"SLURM node not idle after {timeout} s (state {state!r}):\n{self.log_tails()}")

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of the daemon logs, for error messages."""
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict of its ``Key=Value`` fields (empty if unknown)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def job_processes(self, job_id: str) -> list[int]:
        """PIDs of live processes whose environment has this cluster's ``SLURM_CONF`` and ``SLURM_JOB_ID=job_id``."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={self.conf}".encode()}
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                env = set((proc / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env and _alive(int(proc.name)):
                pids.append(int(proc.name))
        return pids

    def kill_job_processes(self, job_id: str) -> list[int]:
        """End (by PID) what is left of a job; returns the PIDs that were found."""
        pids = self.job_processes(job_id)
        for pid in pids:
            kill_pid(pid, grace=5)
        return pids

    def stop(self) -> None:
        """End slurmd, slurmctld and munged by the PIDs in their pid files."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = _read_pid(self.pid_files[name])
            if pid is not None:
                kill_pid(pid)
