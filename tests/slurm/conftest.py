"""Fixtures for the real-SLURM tests: a one-node cluster and a tiny training workspace."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, install_if_missing


def _require_root_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the real-SLURM tests need Linux")
    if os.geteuid() != 0:
        pytest.skip("the real-SLURM tests start slurmctld/slurmd/munged as root: run them as root")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster (2 CPUs or the machine's count, cred_expire=30 s); stopped by PID afterwards."""
    _require_root_linux()
    install_if_missing()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cred_expire=30)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def split_shard(src: Path, out_dir: Path, parts: int = 2) -> list[Path]:
    """Split a WebDataset tar into ``parts`` shards with the same number of samples each
    (left-over samples are dropped) and write their ``sizes.json`` (for ``epoch_length: auto``)."""
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
        for m in members:
            samples.setdefault(m.name.split(".", 1)[0], []).append((m, tar.extractfile(m).read()))
    keys = list(samples)
    per = len(keys) // parts
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(parts):
        path = out_dir / f"clips-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in keys[i * per : (i + 1) * per]:
                for info, data in samples[key]:
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    (out_dir / "sizes.json").write_text(json.dumps({p.name: per for p in paths}))
    return paths


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """``backbone/`` (tiny Qwen2.5-VL) and ``shards/train/`` (two equal shards of sample clips)."""
    from tokensieve.data.samples import sample_videos
    from tokensieve.data.shards import write_shards
    from tokensieve.models.backbones.tiny import make_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("tiny-workspace")
    make_tiny_qwen2_5_vl(root / "backbone")
    write_shards(sample_videos(), root / "all", clip_seconds=2.0, clip_stride=0.5, max_side=160, maxcount=100000, progress=False)
    split_shard(next((root / "all").glob("*.tar")), root / "shards" / "train")
    return root
