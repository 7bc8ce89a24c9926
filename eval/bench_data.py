"""``tokensieve bench-data``: is the data layer the bottleneck?

On the same shards it measures

1. **raw decode** — frames/s of :func:`~tokensieve.data.video.decode_frames` called on each
   clip's bytes in one process (the bytes already in memory: no tar reading, no batching);
2. **reader** — frames/s through the full reader (:class:`~tokensieve.data.reader.VideoShardDataset`
   + ``DataLoader``: tar streaming, shuffle buffer, decode, collate, worker IPC) with 0, 1 and 2
   workers, over the same number of clip decodes; its ratio to (1) is the headline number;
3. **training** — steps/s of the tiny FlexSelect recipe's LightningModule (``pl.Trainer``)
   on raw shards vs on feature-cache shards written by ``tokensieve cache-features``.

Prints a table and writes everything it measured, with the machine's conditions (cores,
load average before and after, versions), as JSON. Numbers on a shared machine are noisy:
each measurement is repeated and the median is reported, with every repeat in the JSON.

Usage::

    tokensieve bench-data --out runs/bench-data/bench.json            # builds shards from the sample videos
    tokensieve bench-data --shards runs/quickstart/shards/train --workers 0,1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

SIZE = (140, 140)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _clips(shards: list[str]) -> list[tuple[str, bytes, list | None]]:
    """(key, mp4 bytes, span) of every sample in the shards, read once into memory."""
    out = []
    for shard in shards:
        members: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, m in members.items():
            if "mp4" in m:
                span = json.loads(m["json"]).get("span") if "json" in m else None
                out.append((key, m["mp4"], span))
    return out


def bench_raw_decode(clips, num_frames: int, size, repeats: int, passes: int, threads: int | None) -> dict:
    from tokensieve.data.video import decode_frames

    rates = []
    for _ in range(repeats):
        frames = 0
        start = time.perf_counter()
        for _ in range(passes):
            for key, data, span in clips:
                out, _ = decode_frames(data, num_frames, size, name=key, span=tuple(span) if span else None, threads=threads)
                frames += out.shape[0]
        rates.append(frames / (time.perf_counter() - start))
    return {"frames_per_s": statistics.median(rates), "repeats": [round(r, 1) for r in rates], "clips": len(clips) * passes, "threads": threads}


def bench_reader(shards, num_frames: int, size, workers: int, batch_size: int, samples: int, repeats: int, threads: int | None, backend: str) -> dict:
    from tokensieve.data.reader import VideoShardDataset, make_loader

    rates, skipped = [], 0
    for r in range(repeats):
        dataset = VideoShardDataset(shards, num_frames, size, shuffle_buffer=16, seed=r, epoch_length=samples, decode_threads=threads, backend=backend)
        loader = make_loader(dataset, batch_size, workers, prefetch_factor=4 if workers else None)
        frames = 0
        start = time.perf_counter()
        for batch in loader:
            frames += int(batch.frame_mask.sum())
            skipped += sum(batch.skipped.values())
        rates.append(frames / (time.perf_counter() - start))
    return {"frames_per_s": statistics.median(rates), "repeats": [round(r, 1) for r in rates], "workers": workers, "threads": threads, "backend": backend, "skipped": skipped}


class _StepTimer:
    """Lightning callback: wall time of each training step's end (data loading included)."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Timer(pl.Callback):
            def __init__(self):
                self.ends: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.ends.append(time.perf_counter())

        return Timer()


def bench_training(backbone_dir: Path, shards, num_frames: int, size, batch_size: int, workers: int, steps: int, work: Path) -> dict:
    import pytorch_lightning as pl
    import torch
    import yaml

    from tokensieve.train.datamodule import VideoDataModule

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "flexselect.yaml").read_text())
    spec = recipe["model"]
    module_name, cls_name = spec["class_path"].rsplit(".", 1)
    import importlib

    cls = getattr(importlib.import_module(module_name), cls_name)
    init = {**spec["init_args"], "backbone": str(backbone_dir)}
    torch.manual_seed(0)
    module = cls(**init)
    data = VideoDataModule(train_shards=str(shards), num_frames=num_frames, size=tuple(size), batch_size=batch_size, num_workers=workers, shuffle_buffer=16, train_policy="uniform")
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_steps=steps + 1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=str(work),
    )
    trainer.fit(module, datamodule=data)
    ends = timer.ends
    timed = len(ends) - 1  # the first step (and worker start-up before it) is warm-up
    seconds = ends[-1] - ends[0]
    return {"steps_per_s": timed / seconds if seconds > 0 else None, "steps": timed, "seconds": round(seconds, 3), "workers": workers, "batch_size": batch_size}


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    from tokensieve.data.reader import expand_urls
    from tokensieve.data.video import torchcodec_available

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    conditions = {
        "cpu_count": os.cpu_count(),
        "loadavg_start": _load(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torchcodec": torchcodec_available(),
    }
    import av

    conditions["pyav"] = av.__version__
    if args.shards:
        shards = args.shards
    else:
        from tokensieve.data.samples import sample_videos
        from tokensieve.data.shards import write_shards

        shards = str(work / "shards")
        write_shards(sample_videos(), shards, clip_seconds=2.0, clip_stride=0.5, max_side=320, maxcount=4, overwrite=True, progress=False)
    urls = expand_urls(shards)
    clips = _clips(urls)
    size = tuple(args.size)
    result: dict = {"conditions": conditions, "shards": shards, "num_shards": len(urls), "clips": len(clips), "num_frames": args.num_frames, "size": list(size)}
    print(f"bench-data: {len(clips)} clips in {len(urls)} shards, T={args.num_frames}, size={size}, {os.cpu_count()} cores, load {conditions['loadavg_start']}", flush=True)

    samples = len(clips) * args.passes
    result["raw_decode"] = bench_raw_decode(clips, args.num_frames, size, args.repeats, args.passes, None)
    result["raw_decode_1thread"] = bench_raw_decode(clips, args.num_frames, size, args.repeats, args.passes, 1)
    raw = result["raw_decode"]["frames_per_s"]
    result["reader"] = []
    for workers in args.workers:
        # decode threads: None = the reader's default (FFmpeg's choice with 0-1 workers, cores / workers
        # inside 2+ workers); 2 = two FFmpeg threads per worker, oversubscribing a 2-core machine
        for threads in ([None, 2] if workers >= 2 else [None]):
            row = bench_reader(shards, args.num_frames, size, workers, args.batch_size, samples, args.repeats, threads, "pyav")
            row["ratio_to_raw"] = row["frames_per_s"] / raw
            result["reader"].append(row)
            print(f"  reader workers={workers} threads={threads}: {row['frames_per_s']:.0f} frames/s ({row['ratio_to_raw']:.2f} x raw)", flush=True)
    if conditions["torchcodec"]:
        row = bench_reader(shards, args.num_frames, size, max(args.workers), args.batch_size, samples, args.repeats, None, "torchcodec")
        row["ratio_to_raw"] = row["frames_per_s"] / raw
        result["reader"].append(row)

    if args.train_steps > 0:
        from tokensieve.models.backbones.tiny import make_tiny_qwen2_5_vl
        from tokensieve.train.cache_features import cache_features

        backbone = Path(args.backbone) if args.backbone else make_tiny_qwen2_5_vl(work / "backbone")
        import yaml

        layer = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "flexselect.yaml").read_text())["model"]["init_args"].get("reference_layer")
        cache = cache_features(backbone, shards, work / "features", num_frames=args.num_frames, size=size, batch_size=args.batch_size, teacher_layer=layer, maxcount=4, device="cpu", overwrite=True, progress=False)
        result["cache_features"] = {k: cache[k] for k in ("samples", "seconds", "samples_per_s")}
        workers = max(w for w in args.workers if w <= len(urls)) if args.workers else 0
        result["train_raw"] = bench_training(backbone, shards, args.num_frames, size, args.batch_size, workers, args.train_steps, work / "train-raw")
        result["train_cached"] = bench_training(backbone, str(work / "features"), args.num_frames, size, args.batch_size, workers, args.train_steps, work / "train-cached")
        raw_steps, cached_steps = result["train_raw"]["steps_per_s"], result["train_cached"]["steps_per_s"]
        result["cached_speedup"] = cached_steps / raw_steps if raw_steps and cached_steps else None
    conditions["loadavg_end"] = _load()

    rows = [("measure", "rate", "vs raw decode"), ("raw decode (FFmpeg threads)", f"{raw:.0f} frames/s", "1.00")]
    one = result["raw_decode_1thread"]["frames_per_s"]
    rows.append(("raw decode (1 thread)", f"{one:.0f} frames/s", f"{one / raw:.2f}"))
    for row in result["reader"]:
        label = f"reader {row['backend']}, {row['workers']} workers" + ("" if row["threads"] is None else f", {row['threads']} decode threads each")
        rows.append((label, f"{row['frames_per_s']:.0f} frames/s", f"{row['ratio_to_raw']:.2f}"))
    if "train_raw" in result:
        rows.append(("train steps, raw shards", f"{result['train_raw']['steps_per_s']:.2f} steps/s", ""))
        rows.append(("train steps, feature cache", f"{result['train_cached']['steps_per_s']:.2f} steps/s", f"speed-up {result['cached_speedup']:.1f}x"))
    print(_table(rows))
    print(f"load average: start {conditions['loadavg_start']}, end {conditions['loadavg_end']} on {conditions['cpu_count']} cores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokensieve bench-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shards to read (default: built from the sample videos under --work)")
    p.add_argument("--work", default="runs/bench-data", help="scratch folder (shards, tiny backbone, feature cache)")
    p.add_argument("--out", default="runs/bench-data/bench.json")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=list(SIZE), metavar=("H", "W"))
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--passes", type=int, default=2, help="clip decodes per measurement = clips x passes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=12, help="timed training steps per run (0: skip the training benchmark)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: a fresh tiny Qwen2.5-VL)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads in this process (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
