"""Procedural video QA with ground-truth evidence, written as WebDataset shards.

``python -m tokensieve.eval.refbench --out runs/refbench/shards`` writes ``train/``, ``val/``
and ``test/`` folders of ``refbench-%06d.tar`` shards (``{key}.mp4`` + ``{key}.json``), each
with ``sizes.json``, plus ``OUT/summary.json``. Sample ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, SPLIT_IDS[s], i])``: the benchmark is a pure function of
``(seed, split, index)`` and the :class:`RefBenchConfig`.

Each json holds ``question`` / ``options`` / ``answer`` (a letter ``"A"``..``"D"``), plus
``qtype``, ``answer_text``, ``evidence`` (``[{"frame", "box": [x0, y0, x1, y1]}]`` pixels of
the stored clip), ``evidence_tokens`` (their visual-token indices for a Qwen2-VL-style
backbone, see :mod:`tokensieve.eval.refbench.evidence`), ``token_grid`` ``[t, h, w]``,
``num_tokens`` and ``objects`` (every rendered object, for inspection).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokensieve.eval.refbench.evidence import TokenGrid
from tokensieve.eval.refbench.questions import LETTERS, QUESTION_TYPES, Geometry, Retry
from tokensieve.eval.refbench.scene import Scene, make_background, render

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 16000, "val": 256, "test": 1024}


@dataclass
class RefBenchConfig:
    """Benchmark geometry and mix.

    Attributes:
        frames, height, width, fps: clip geometry (16 frames of 112×112 at 8 fps → a
            Qwen2.5-VL grid of 8 × 4 × 4 = 128 visual tokens).
        types: question types (keys of :data:`~tokensieve.eval.refbench.questions.QUESTION_TYPES`),
            cycled in order so the mix is exact; repeat a type to weight it up (a training mix).
        max_evidence_tokens: samples whose evidence covers more tokens are redrawn, so the
            oracle fits in 10% of the tokens (``num_keep(128, 0.1) = 13``).
        clutter: background blobs and bars per clip.
        pan: maximum background pan, pixels per frame.
        crf: x264 quality of the stored mp4 (low = faithful colours on small objects).
        aligned: objects sit inside one merged-token cell and move whole cells per temporal
            group (see :mod:`~tokensieve.eval.refbench.questions`); False places them freely
            (14–20 px, straddling cells), which a from-scratch teacher fails to learn shapes from.

    Raises:
        ValueError: ``types`` is empty or names an unknown question type.
    """

    frames: int = 16
    height: int = 112
    width: int = 112
    fps: float = 8.0
    types: list[str] = field(default_factory=lambda: list(QUESTION_TYPES))
    max_evidence_tokens: int = 12
    clutter: int = 14
    pan: float = 1.5
    crf: int = 14
    aligned: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(QUESTION_TYPES))
        if not self.types or unknown:
            raise ValueError(f"RefBenchConfig.types: unknown question type(s) {unknown or '(none given)'}; known: {sorted(QUESTION_TYPES)}")

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.frames, self.height, self.width)


def make_sample(seed: int, split: str, index: int, config: RefBenchConfig | None = None) -> tuple[np.ndarray, dict]:
    """Draw one sample: ``(frames uint8 [T, H, W, 3], record)`` (the record is the shard json).

    Raises:
        KeyError: unknown split or question type.
    """
    cfg = config or RefBenchConfig()
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    qtype = cfg.types[index % len(cfg.types)]
    builder = QUESTION_TYPES[qtype]
    answer = int(rng.integers(0, len(LETTERS)))
    geo = Geometry(cfg.frames, cfg.height, cfg.width) if cfg.aligned else Geometry(cfg.frames, cfg.height, cfg.width, min_size=16, max_size=20, aligned=False)
    grid = cfg.grid
    for _ in range(200):
        try:
            built = builder(rng, geo, answer)
        except Retry:
            continue
        tokens = grid.evidence_tokens(built.evidence)
        if len(tokens) <= cfg.max_evidence_tokens:
            break
    else:  # pragma: no cover - the builders succeed within a few draws
        raise RuntimeError(f"could not draw a {qtype} sample ({split} #{index})")
    margin = int(np.ceil(cfg.pan * cfg.frames / 2)) + 2
    background = make_background(rng, cfg.height + 2 * margin, cfg.width + 2 * margin, cfg.clutter)
    pan = tuple(float(v) for v in rng.uniform(-cfg.pan, cfg.pan, size=2))
    frames = render(Scene(cfg.frames, cfg.height, cfg.width, background, pan, built.objects))
    record = {
        "question": built.question,
        "options": built.options,
        "answer": LETTERS[built.answer],
        "answer_text": built.options[built.answer],
        "qtype": qtype,
        "evidence": built.evidence,
        "evidence_tokens": tokens,
        "token_grid": list(grid.shape),
        "num_tokens": grid.num_tokens,
        "objects": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()} for o in built.objects],
        "source": "refbench",
        "split": split,
        "index": index,
        "seed": seed,
        "fps": cfg.fps,
        "num_frames": cfg.frames,
        "height": cfg.height,
        "width": cfg.width,
    }
    return frames, record


def _write_shard(folder: str, split: str, shard: int, lo: int, hi: int, seed: int, cfg: RefBenchConfig) -> tuple[str, int, dict[str, int]]:
    """Write samples ``lo..hi-1`` of ``split`` to ``folder/refbench-{shard:06d}.tar``; returns (name, count, qtype counts)."""
    import webdataset as wds

    from tokensieve.data.video import write_clip

    name = f"refbench-{shard:06d}.tar"
    qtypes: dict[str, int] = {}
    with wds.TarWriter(str(Path(folder) / name)) as writer:
        for i in range(lo, hi):
            frames, record = make_sample(seed, split, i, cfg)
            qtypes[record["qtype"]] = qtypes.get(record["qtype"], 0) + 1
            writer.write({"__key__": f"{split}_{i:06d}", "mp4": write_clip(frames, cfg.fps, crf=cfg.crf, threads=1), "json": json.dumps(record).encode("utf-8")})
    return name, hi - lo, qtypes


def write_split(out_dir: str | Path, split: str, count: int, seed: int = 0, config: RefBenchConfig | None = None, maxcount: int = 1000, progress: bool = True, workers: int = 1) -> dict:
    """Write ``count`` samples of ``split`` to ``out_dir/split/refbench-%06d.tar`` (+ ``sizes.json``).

    Shard ``k`` holds samples ``k * maxcount`` … ``(k + 1) * maxcount - 1``. Every sample is a
    pure function of ``(seed, split, index)``, so ``workers > 1`` writes shards in parallel
    processes and produces the same files as one worker.

    Returns ``{"dir", "samples", "shards": {name: count}, "qtypes": {type: count}}``.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    cfg = config or RefBenchConfig()
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("refbench-*.tar"):
        old.unlink()
    jobs = [(str(folder), split, k, lo, min(lo + maxcount, count), seed, cfg) for k, lo in enumerate(range(0, count, maxcount))]
    bar = tqdm(total=count, desc=f"refbench {split}", disable=not progress)
    sizes: dict[str, int] = {}
    qtypes: dict[str, int] = {}

    def collect(result) -> None:
        name, n, counts = result
        sizes[name] = n
        for q, c in counts.items():
            qtypes[q] = qtypes.get(q, 0) + c
        bar.update(n)

    try:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                collect(_write_shard(*job))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for result in pool.map(_write_shard, *zip(*jobs)):
                    collect(result)
    finally:
        bar.close()
    (folder / "sizes.json").write_text(json.dumps(dict(sorted(sizes.items())), indent=2) + "\n")
    return {"dir": str(folder), "samples": count, "shards": dict(sorted(sizes.items())), "qtypes": dict(sorted(qtypes.items()))}


def generate(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None, config: RefBenchConfig | None = None, progress: bool = True, workers: int = 1) -> dict:
    """Write every split (``sizes``: split → samples, default :data:`DEFAULT_SIZES`) and ``summary.json``;
    ``workers`` processes write shards in parallel (same files as one)."""
    cfg = config or RefBenchConfig()
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    out = Path(out_dir)
    summary = {"seed": seed, "config": asdict(cfg), "splits": {s: write_split(out, s, n, seed, cfg, progress=progress, workers=workers) for s, n in sizes.items() if n > 0}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m tokensieve.eval.refbench``: write the splits (see :func:`generate`) and print
    their sizes. Returns 0; a bad argument (an unknown ``--types`` entry) exits with argparse's
    usage error (status 2), naming the option."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tokensieve.eval.refbench", description="write the reference benchmark's shards")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (same files as 1)")
    p.add_argument("--types", default=None, help="comma-separated question types, cycled in order (repeat a type to weight it up: a training mix); default: each type once")
    for split, n in DEFAULT_SIZES.items():
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} samples (default {n})")
    args = p.parse_args(argv)
    try:
        config = RefBenchConfig(types=[t.strip() for t in args.types.split(",") if t.strip()]) if args.types else RefBenchConfig()
    except ValueError as err:
        p.error(f"--types: {err}")
    summary = generate(args.out, args.seed, {s: getattr(args, s) for s in DEFAULT_SIZES}, config=config, workers=args.workers)
    print(json.dumps({s: v["samples"] for s, v in summary["splits"].items()}), "→", args.out)
    return 0
