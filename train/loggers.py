"""W&B set-up for training runs: offline by default, one run per SLURM job, no secrets written.

- :func:`slurm_run_id`: a stable W&B run id from the SLURM job (``slurm-<cluster>-<job id>``, or
  ``...-<array job id>_<task id>`` for an array task), so a requeued job resumes the same run.
- :func:`configure_wandb`: fills a ``WandbLogger``'s init arguments from the environment
  (run id, ``resume="allow"``, online/offline from ``WANDB_MODE``).
- :func:`redact`: replaces secret values in configs and hyperparameters before they are saved
  or logged (keys such as ``api_key``/``token``/``password``; any value that contains the
  value of a secret environment variable such as ``WANDB_API_KEY`` or ``HF_TOKEN``).
- :func:`log_compressor_artifact`: an exported compressor folder as a W&B ``model`` artifact.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

REDACTED = "<redacted>"

SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
    "OPENAI_API_KEY",
)
"""Environment variables whose values never reach a saved config, a log or W&B."""

_SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|token|secret|password|passwd|credentials?|auth)$", re.IGNORECASE)
"""Config keys whose string values are secrets: ``api_key``, ``token``, ``hf_token``,
``access_token``, ``secret``, ``password`` … (but not ``tokens``, ``max_tokens``, ``num_tokens``)."""

_SECRET_ENV_NAME = re.compile(r"(API[_-]?KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
_MIN_SECRET_LEN = 8


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables (:data:`SECRET_ENV_VARS` and any
    ``*_API_KEY`` / ``*_TOKEN`` / ``*_SECRET`` / ``*_PASSWORD``), at least 8 characters long."""
    environ = os.environ if environ is None else environ
    names = set(SECRET_ENV_VARS) | {k for k in environ if _SECRET_ENV_NAME.search(k)}
    return sorted({environ[k] for k in names if len(environ.get(k) or "") >= _MIN_SECRET_LEN}, key=len, reverse=True)


_TOKENIZER_KEY = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask|image|video)_token$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True for config keys that name a secret (``api_key``, ``hf_token``, ``password`` …);
    tokenizer keys such as ``pad_token`` are not secrets."""
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not _TOKENIZER_KEY.match(key)


def redact(obj, environ: Mapping[str, str] | None = None):
    """A copy of ``obj`` (dicts, lists, tuples, argparse/jsonargparse Namespaces, scalars) with secrets replaced.

    A string under a secret key (:func:`is_secret_key`) becomes :data:`REDACTED`; any string
    containing a secret environment value (:func:`secret_values`) has it replaced. Other
    values are returned unchanged (not copied).
    """
    secrets = secret_values(environ)

    def scrub(value, key: str | None = None):
        if isinstance(value, str):
            if key is not None and is_secret_key(key) and value:
                return REDACTED
            for secret in secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, Mapping):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(scrub(v) for v in value)
        if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
            out = type(value)()
            for k, v in vars(value).items():
                setattr(out, k, scrub(v, k))
            return out
        return value

    return scrub(obj)


def slurm_run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """``slurm-<SLURM_CLUSTER_NAME>-<job>`` for the current SLURM job, or None outside SLURM.

    ``<job>`` is ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for an array task, else
    ``SLURM_JOB_ID``. The id survives ``scontrol requeue`` (SLURM keeps the job id), so the
    requeued job resumes the same W&B run. Job ids restart when a cluster's state is wiped;
    the cluster name keeps two clusters apart, not two lives of one cluster.
    """
    environ = os.environ if environ is None else environ
    array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else environ.get("SLURM_JOB_ID")
    if not job:
        return None
    cluster = environ.get("SLURM_CLUSTER_NAME")
    run_id = f"slurm-{cluster}-{job}" if cluster else f"slurm-{job}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)


def configure_wandb(init_args: dict, environ: Mapping[str, str] | None = None) -> dict:
    """Init arguments for ``pytorch_lightning.loggers.WandbLogger``, completed from the environment.

    - ``offline``: ``WANDB_MODE`` wins when set (``offline``/``dryrun`` → True, ``online`` →
      False); else the recipe's value; else True (offline by default: a batch job cannot log in).
    - ``id``: kept when the recipe (``id`` or ``version``) or ``WANDB_RUN_ID`` sets it; else
      :func:`slurm_run_id` under SLURM.
    - ``resume``: ``"allow"`` unless set, so a requeued job appends to its run.

    ``WANDB_MODE=disabled`` is left to wandb itself (``offline`` is set False so that
    ``WandbLogger`` does not turn it into ``dryrun``).
    """
    environ = os.environ if environ is None else environ
    out = dict(init_args or {})
    mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if mode in ("offline", "dryrun"):
        out["offline"] = True
    elif mode in ("online", "disabled"):
        out["offline"] = False  # "disabled": WandbLogger(offline=True) would overwrite it with "dryrun"
    elif out.get("offline") is None:
        out["offline"] = True
    if not (out.get("id") or out.get("version") or environ.get("WANDB_RUN_ID")):
        run_id = slurm_run_id(environ)
        if run_id:
            out["id"] = run_id
    if out.get("resume") is None:
        # WandbLogger defaults to "allow", but LightningCLI passes every wandb.init argument
        # it knows, ``resume: null`` included, which would override that default
        out["resume"] = "allow"
    return out


def log_compressor_artifact(run, export_dir: str | Path, name: str | None = None, aliases: list[str] | None = None):
    """Log an exported compressor folder (``config.json``, ``model.safetensors``, ``recipe.yaml``)
    as a W&B artifact of type ``model`` on ``run`` (a ``wandb`` Run). Returns the artifact.

    Raises:
        FileNotFoundError: ``export_dir`` lacks ``config.json`` or ``model.safetensors``.
    """
    import wandb

    export_dir = Path(export_dir)
    missing = [f for f in ("config.json", "model.safetensors") if not (export_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{export_dir}: not an exported compressor (missing {', '.join(missing)})")
    artifact = wandb.Artifact(name or f"compressor-{run.id}", type="model", metadata={"source": str(export_dir)})
    artifact.add_dir(str(export_dir))
    run.log_artifact(artifact, aliases=aliases or ["latest"])
    return artifact
