"""``tokensieve quickstart``: the whole workflow, end to end, on the bundled sample videos.

1. build the tiny Qwen2.5-VL backbone (``make-tiny-backbone``) and save it;
2. cut the sample videos into 2-second clips and write WebDataset shards, split **by video**
   (train: ``bikes.mp4``; held out: ``bigbuckbunny.mp4``), so no held-out frame is ever trained on;
3. validate the untrained selector (Spearman with the teacher on held-out clips);
4. train it (``fit``; W&B offline), then validate the checkpoint again;
5. export the checkpoint and load it back with ``tokensieve.load_compressor``;
6. run the backbone with it at 10 / 25 / 50 % of the visual tokens next to every registered
   training-free method (uniform, random, pool, divprune, ...), print the fidelity table and write everything to ``OUT/quickstart.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "flexselect.yaml"
DEFAULT_ROOT = "runs/quickstart"


def _write_recipe(out: Path, max_epochs: int | None) -> Path:
    """Copy the tiny recipe with its ``runs/quickstart`` paths pointed at ``out``."""
    text = RECIPE.read_text().replace(DEFAULT_ROOT, str(out))
    cfg = yaml.safe_load(text)
    if max_epochs is not None:
        cfg["trainer"]["max_epochs"] = max_epochs
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _spearman(cli) -> float:
    return float(cli.trainer.callback_metrics["val/spearman"])


def run_quickstart(out: Path, max_epochs: int | None = None) -> dict:
    """Run all steps into ``out``; returns (and writes) the summary dict."""
    from tokensieve.data.samples import sample_videos
    from tokensieve.data.shards import write_shards
    from tokensieve.eval.fidelity import fidelity_table, print_table
    from tokensieve.models.backbones import load
    from tokensieve.models.backbones.tiny import make_tiny_qwen2_5_vl
    from tokensieve.models.compressors import REGISTRY, LearnedCompressor, get_compressor, load_compressor
    from tokensieve.train.cli import run_cli
    from tokensieve.train.export import export_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from run_cli(args), not from our command line
    times: dict[str, float] = {}

    def step(name: str, fn):
        print(f"\n=== {name}")
        t0 = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - t0, 2)
        return result

    step("make tiny backbone", lambda: make_tiny_qwen2_5_vl(out / "backbone"))
    def shard():
        videos = {p.name: p for p in sample_videos()}
        # overlapping clips never straddle the split: each split comes from its own video
        train = write_shards([videos["bikes.mp4"]], out / "shards" / "train", clip_seconds=2.0, clip_stride=0.25, max_side=320, overwrite=True)
        val = write_shards([videos["bigbuckbunny.mp4"]], out / "shards" / "val", clip_seconds=2.0, clip_stride=0.5, max_side=320, overwrite=True)
        return {"train": train, "val": val}

    shard_summary = step("shard sample videos", shard)
    recipe = _write_recipe(out, max_epochs)
    no_log = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    before = step("validate untrained selector", lambda: _spearman(run_cli(["validate", "--config", str(recipe), *no_log])))
    step("fit", lambda: run_cli(["fit", "--config", str(recipe)]))
    ckpt = out / "train" / "checkpoints" / "last.ckpt"
    after = step("validate trained checkpoint", lambda: _spearman(run_cli(["validate", "--config", str(recipe), *no_log, "--ckpt_path", str(ckpt)])))
    print(f"\nheld-out Spearman(selector, teacher): untrained {before:.3f} → trained {after:.3f}")
    export_dir = step("export", lambda: export_checkpoint(ckpt, out / "export"))

    def evaluate():
        from tokensieve.data.reader import VideoShardDataset, make_loader

        backbone = load(out / "backbone")
        # the trained selector next to every registered training-free method, at the same budgets
        compressors = {"flexselect": load_compressor(export_dir)}
        compressors.update({name: get_compressor(name) for name, cls in REGISTRY.items() if not issubclass(cls, LearnedCompressor)})
        cfg = yaml.safe_load(recipe.read_text())["data"]
        loader = make_loader(VideoShardDataset(str(out / "shards" / "val"), num_frames=cfg["num_frames"], size=tuple(cfg["size"])), 4, 0)
        return fidelity_table(backbone, compressors, [0.1, 0.25, 0.5], loader)

    rows = step("apply at budgets 10/25/50%", evaluate)
    print_table(rows, title="held-out clips: pruned vs full-token next-token distribution")
    summary = {"spearman_before": before, "spearman_after": after, "fidelity": rows, "shards": shard_summary, "seconds": times, "export": str(export_dir)}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'quickstart.json'}; step times (s): {times}")
    return summary
