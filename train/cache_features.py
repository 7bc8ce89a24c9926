"""``tokensieve cache-features``: run the frozen backbone's vision side once, write feature-cache shards.

Reads raw video shards with the same reader as training (uniform frame sampling by default:
a cache freezes one choice of frames, so jitter is not available), runs
``backbone.encode_video`` (and, with ``teacher_layer``, ``backbone.teacher_signals`` at that
layer), and writes one feature sample per video sample, under the same key, in the format of
:mod:`tokensieve.data.features` (``{key}.safetensors`` + ``{key}.json``; never pickle).
``sizes.json`` and ``summary.json`` go beside the shards.

Several ranks (``RANK``/``WORLD_SIZE`` set, e.g. one job per GPU) split the input shards
and write ``{prefix}-r{rank:03d}-%06d.tar`` with ``sizes-r{rank:03d}.json``; the reader merges
them. A training recipe then points ``data.train_shards`` at the output folder; nothing else
changes (``CompressorModule.encode`` uses the cached tokens and, when the layer matches, the
cached teacher attention).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
from tqdm.auto import tqdm

from tokensieve.data.features import TOKEN_DTYPES, encode_features
from tokensieve.data.reader import VideoShardDataset, make_loader
from tokensieve.data.types import VideoBatch
from tokensieve.models.types import VisualTokens

log = logging.getLogger(__name__)


def _split_cache(cache: dict, batch_size: int) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor], dict]:
    """Backbone cache → (per-sample tensors, shared tensors, JSON-able values)."""
    per_sample, shared, plain = {}, {}, {}
    for name, value in cache.items():
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] == batch_size:
                per_sample[name] = list(value.detach().cpu())
            else:
                shared[name] = value.detach().cpu()
        else:
            try:
                json.dumps(value)
            except TypeError:
                raise TypeError(f"backbone cache entry {name!r} ({type(value).__name__}) is neither a tensor nor JSON") from None
            plain[name] = value
    return per_sample, shared, plain


def sample_features(
    batch: VideoBatch, visual: VisualTokens, attention: torch.Tensor | None, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """Per-sample tensors to cache (see :mod:`tokensieve.data.features`), padding removed."""
    b = batch.size
    per_sample, shared, _ = _split_cache(visual.cache, b)
    grid = torch.tensor(visual.grid, dtype=torch.long)
    out = []
    for i in range(b):
        m = int(visual.valid[i].sum())
        positions = visual.positions[:, i, :m] if visual.positions.dim() == 3 else visual.positions[i, :m]
        stamps = batch.timestamps[i][batch.frame_mask[i]] if batch.frame_mask.numel() else batch.timestamps[i]
        tensors = {
            "tokens": visual.tokens[i, :m].to(dtype),
            "positions": positions.long(),
            "frame_index": visual.frame_index[i, :m].long(),
            "grid": grid,
            "timestamps": stamps.float(),
        }
        if visual.saliency is not None:
            tensors["saliency"] = visual.saliency[i, :m].float()
        if attention is not None:
            tensors["teacher_attention"] = attention[i, :m].float()
        tensors.update({f"cache.{name}": values[i] for name, values in per_sample.items()})
        tensors.update({f"cache_shared.{name}": value for name, value in shared.items()})
        out.append(tensors)
    return out


def cache_features(
    backbone,
    shards,
    out: str | Path,
    *,
    num_frames: int = 16,
    size=(140, 140),
    sample_policy: str = "uniform",
    fps: float | None = None,
    frame_multiple: int = 1,
    batch_size: int = 4,
    num_workers: int = 0,
    teacher_layer: int | None = None,
    reduction: str = "max",
    dtype: str = "fp16",
    saliency: bool = False,
    maxcount: int = 256,
    maxsize: float = 1e9,
    prefix: str = "features",
    device: str | None = None,
    backbone_kwargs: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write feature-cache shards for ``shards`` into ``out``.

    Args:
        backbone: a loaded backbone, or a folder / hub id for ``tokensieve.models.backbones.load``.
        shards: raw video shards (anything :class:`~tokensieve.data.reader.VideoShardDataset` reads).
        out: output folder.
        num_frames, size, sample_policy, fps, frame_multiple: frame sampling and resizing, as
            for training (``sample_policy`` "uniform" or "fps").
        batch_size, num_workers: loader settings (clips of one batch must share a size).
        teacher_layer: also cache the text→video attention at this LLM layer (``None``: no teacher).
        reduction: "max" or "mean" over heads and text rows (the backbone's ``teacher_signals``).
        dtype: ``"fp16"`` or ``"bf16"`` for the tokens (``"fp32"`` too, for exact tests).
        saliency: also cache the vision-tower saliency (``VisualTokens.saliency``).
        maxcount, maxsize: per output shard.
        prefix: output shard name prefix.
        device: where the backbone runs (default: CUDA when available, else CPU).
        backbone_kwargs: passed to ``load`` when ``backbone`` is a path.
        overwrite: replace existing ``{prefix}-*.tar`` in ``out``.
        progress: tqdm bar over batches.

    Returns:
        Summary (also written as ``summary.json``, ``summary-r{rank}.json`` on several ranks):
        ``out``, ``samples``, ``skipped`` (reason → count), ``shards`` (name → count),
        ``seconds``, ``samples_per_s``, and the settings.

    Raises:
        ValueError: bad ``dtype`` / ``sample_policy``; FileExistsError: ``out`` has shards and
        ``overwrite`` is False.
    """
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TOKEN_DTYPES)}, got {dtype!r}")
    if sample_policy == "jitter":
        raise ValueError("a feature cache freezes one set of frames: use sample_policy 'uniform' or 'fps'")
    if isinstance(backbone, (str, Path)):
        from tokensieve.models.backbones import load

        backbone = load(str(backbone), **(backbone_kwargs or {}))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = VideoShardDataset(shards, num_frames, size, sample_policy, fps=fps, frame_multiple=frame_multiple)
    loader = make_loader(dataset, batch_size, num_workers)
    rank, world = dataset.world
    stem = prefix if world == 1 else f"{prefix}-r{rank:03d}"
    old = sorted(out.glob(f"{stem}-*.tar"))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} '{stem}-*.tar' shards; pass overwrite=True")
    for path in old:
        path.unlink()
    sizes: dict[str, int] = {}
    writer: wds.ShardWriter | None = None

    def done(fname: str) -> None:
        sizes[Path(fname).name] = writer.count

    writer = wds.ShardWriter(str(out / f"{stem}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, post=done, verbose=0)
    skipped: Counter = Counter()
    written = 0
    layer = None if teacher_layer is None else int(teacher_layer)
    common = {
        "backbone": getattr(backbone, "name_or_path", ""),
        "revision": getattr(backbone, "revision", None) or "",
        "dtype": dtype,
        "num_frames": num_frames,
        "size": json.dumps(list(dataset.size)) if dataset.size else repr(dataset.resize),
        "sample_policy": sample_policy,
    }
    if layer is not None:
        common.update(teacher_layer=layer, teacher_reduction=reduction)
    start = time.perf_counter()
    bar = tqdm(loader, desc="cache-features", unit="batch", disable=not progress)
    with torch.no_grad():
        for batch in bar:
            skipped.update(batch.skipped)
            if batch.size == 0:
                continue
            batch = batch.to(device)
            visual = backbone.encode_video(batch, saliency=saliency)
            attention = None
            if layer is not None:
                attention = backbone.teacher_signals(batch, visual, layer=layer, reduction=reduction, with_logits=False).attention
            _, _, plain = _split_cache(visual.cache, batch.size)
            meta = {**common, "cache_json": json.dumps(plain)}
            for i, tensors in enumerate(sample_features(batch, visual, attention, TOKEN_DTYPES[dtype])):
                record = {**batch.meta[i], "question": batch.questions[i], "options": batch.options[i], "answer": batch.answers[i]}
                writer.write({
                    "__key__": batch.keys[i],
                    "safetensors": encode_features(tensors, meta),
                    "json": json.dumps(record).encode("utf-8"),
                })
                written += 1
            bar.set_postfix(samples=written)
    writer.close()
    seconds = time.perf_counter() - start
    sizes_name = "sizes.json" if world == 1 else f"sizes-r{rank:03d}.json"
    (out / sizes_name).write_text(json.dumps(dict(sorted(sizes.items())), indent=2) + "\n")
    summary = {
        "out": str(out),
        "samples": written,
        "skipped": dict(sorted(skipped.items())),
        "shards": dict(sorted(sizes.items())),
        "seconds": round(seconds, 3),
        "samples_per_s": round(written / seconds, 3) if seconds > 0 else None,
        "rank": rank,
        "world_size": world,
        "settings": {**common, "teacher_layer": layer, "teacher_reduction": reduction if layer is not None else None, "saliency": saliency, "device": str(device)},
    }
    (out / ("summary.json" if world == 1 else f"summary-r{rank:03d}.json")).write_text(json.dumps(summary, indent=2) + "\n")
    if progress:
        tqdm.write(f"cached {written} samples into {out} ({seconds:.1f} s); skipped {summary['skipped'] or 'none'}")
    return summary
