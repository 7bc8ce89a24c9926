"""Prefill cost at 100 / 25 / 10 % of the video tokens: analytic FLOPs, counted FLOPs, time.

Usage::

    python -m tokensieve.eval.bench_prefill                      # 7B presets, FLOPs only
    python -m tokensieve.eval.bench_prefill --backbone DIR --measure --device cuda --dtype bfloat16

Without ``--backbone`` it builds real-size configs — Qwen2.5-VL-7B, Qwen2-VL-7B and
LLaVA-OneVision-7B (values of the released ``config.json`` files; transformers' own defaults
are the 72B text model for Qwen and a 4096-wide LLM for LLaVA-OneVision, so they are
overridden) — and reports, per retention ratio, the analytic FLOPs
(:func:`tokensieve.eval.efficiency.prefill_flops`) and the LLM prefill FLOPs that
``FlopCounterMode`` counts on a **meta-device** model (random init, no memory allocated;
eager attention so the score matrix is counted), with their ratio.

With ``--backbone DIR`` the config comes from ``DIR``; ``--measure`` also loads the model on
``--device``, encodes a synthetic clip, keeps ``ratio`` of the tokens (uniform selection),
and times the LLM prefill with :func:`~tokensieve.eval.efficiency.measure_prefill` (CUDA
events on GPU) and counts its FLOPs on the real tensors. Measuring refuses CPU models over
``--max-cpu-params`` parameters: on a CPU box only the tiny backbones are timed.

Writes everything as JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokensieve.eval.efficiency import count_flops, measure_prefill, num_video_tokens, prefill_flops

RATIOS = (1.0, 0.25, 0.1)

_QWEN_TEXT_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)


def preset_configs() -> dict:
    """Real-size configs (7B) of the three supported architectures, by preset name."""
    from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    return {
        "qwen2_5_vl-7b": Qwen2_5_VLConfig(
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
            text_config=_QWEN_TEXT_7B,
        ),
        "qwen2_vl-7b": Qwen2VLConfig(
            vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584),
            text_config={**_QWEN_TEXT_7B, "max_position_embeddings": 32768},
        ),
        "llava_onevision-7b": LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False),
            text_config=dict(model_type="qwen2", **{k: v for k, v in _QWEN_TEXT_7B.items() if k != "rope_parameters"}, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        ),
    }


def _model_class(config):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}[config.model_type]


def meta_llm_flops(config, num_tokens: int) -> tuple[float, int]:
    """``(FLOPs counted by FlopCounterMode for one LLM prefill of num_tokens, parameter count)`` on a meta-device model."""
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = _model_class(config)(config)
    params = sum(p.numel() for p in model.parameters())
    d = config.text_config.hidden_size
    embeds = torch.zeros(1, num_tokens, d, device="meta")
    mask = torch.ones(1, num_tokens, dtype=torch.long, device="meta")
    pos = torch.arange(num_tokens, device="meta")[None]
    if config.model_type != "llava_onevision":
        pos = pos[None].expand(3, 1, -1)
    flops = count_flops(lambda: model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1, use_cache=False))
    return flops, params


def _synthetic_batch(frames: int, height: int, width: int):
    from tokensieve.data.types import VideoBatch

    gen = torch.Generator().manual_seed(0)
    return VideoBatch(
        frames=torch.randint(0, 256, (1, frames, height, width, 3), dtype=torch.uint8, generator=gen),
        timestamps=(torch.arange(frames, dtype=torch.float32) / 2)[None],
        frame_mask=torch.ones(1, frames, dtype=torch.bool),
        questions=["What happens in this video? Describe the main action and where it takes place."],
    )


def bench_config(name: str, config, frames: int, height: int, width: int, text_tokens: int, ratios=RATIOS, meta: bool = True) -> list[dict]:
    """Analytic (and meta-counted LLM) FLOPs per ratio for one config."""
    from tokensieve.models.budget import num_keep

    m = num_video_tokens(config, frames, height, width)
    rows = []
    for ratio in ratios:
        k = num_keep(m, float(ratio))
        flops = prefill_flops(config, k, text_tokens, frames, height, width)
        row = {"name": name, "model_type": config.model_type, "ratio": ratio, "frames": frames, "height": height, "width": width, "visual_tokens": k, "full_visual_tokens": m, "text_tokens": text_tokens, "flops": flops.to_dict()}
        if meta:
            counted, params = meta_llm_flops(config, k + text_tokens)
            row.update(params=params, llm_flops_counted_meta=counted, llm_counted_over_analytic=counted / flops.llm)
        rows.append(row)
    return rows


def bench_backbone(path: str, frames: int, height: int, width: int, ratios=RATIOS, device: str = "cpu", dtype: str | None = None, attn: str | None = None, repeats: int = 5, max_cpu_params: float = 5e7) -> list[dict]:
    """Time and count the LLM prefill of a real backbone at each ratio (uniform selection).

    Raises:
        RuntimeError: a CPU run of a model over ``max_cpu_params`` parameters.
    """
    from tokensieve.models.backbones import load
    from tokensieve.models.compressors import get_compressor

    backbone = load(path, dtype=dtype, attn_implementation=attn)
    params = sum(p.numel() for p in backbone.parameters())
    if torch.device(device).type == "cpu" and params > max_cpu_params:
        raise RuntimeError(f"{path}: {params / 1e9:.2f}B parameters is too large to time on CPU (limit {max_cpu_params:.0e}); use --device cuda")
    backbone.to(device)
    batch = _synthetic_batch(frames, height, width)
    visual = backbone.encode_video(batch)
    rows = []
    for ratio in ratios:
        sel = get_compressor("uniform")(visual, budget=float(ratio))
        embeds = backbone.lm_inputs(batch, visual, sel)[0]
        k = sel.index.shape[1]
        flops = prefill_flops(backbone.model.config, k, embeds.shape[1] - k, frames, height, width)
        counted = count_flops(lambda: backbone(batch, visual, sel))
        timing = measure_prefill(backbone, batch, visual, sel, repeats=repeats)
        rows.append(
            {
                "name": str(path),
                "model_type": backbone.model.config.model_type,
                "ratio": ratio,
                "visual_tokens": k,
                "full_visual_tokens": visual.num_tokens,
                "text_tokens": embeds.shape[1] - k,
                "params": params,
                "flops": flops.to_dict(),
                "llm_flops_counted": counted,
                "llm_counted_over_analytic": counted / flops.llm,
                "time": timing,
                "attn_implementation": backbone.model.config._attn_implementation,
                "dtype": str(next(backbone.parameters()).dtype),
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'model':<22}{'ratio':>6}{'tokens':>8}{'vision FLOPs':>13}{'proj FLOPs':>11}{'LLM FLOPs':>11}{'counted/an.':>12}{'prefill ms':>12}"]
    for r in rows:
        f = r["flops"]
        ratio = r.get("llm_counted_over_analytic")
        ms = r["time"]["median_s"] * 1000 if "time" in r else None
        lines.append(
            f"{r['name'][-22:]:<22}{r['ratio']:>6.2f}{r['visual_tokens'] + r['text_tokens']:>8}{f['vision']:>13.3e}{f['projector']:>11.3e}{f['llm']:>11.3e}"
            f"{'' if ratio is None else f'{ratio:.4f}':>12}{'' if ms is None else f'{ms:.1f}':>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="backbone folder or hub id (default: the 7B presets, FLOPs only)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=448)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--text-tokens", type=int, default=64, help="non-visual prefill tokens for the presets")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--measure", action="store_true", help="load --backbone and time / count its prefill")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--attn", default=None, help="eager / sdpa / flash_attention_2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-cpu-params", type=float, default=5e7)
    parser.add_argument("--no-meta", action="store_true", help="skip the meta-device FlopCounterMode check")
    parser.add_argument("--out", default="bench_prefill.json")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    if args.backbone is None:
        for name, config in preset_configs().items():
            rows += bench_config(name, config, args.frames, args.height, args.width, args.text_tokens, args.ratios, meta=not args.no_meta)
    elif args.measure:
        rows = bench_backbone(args.backbone, args.frames, args.height, args.width, args.ratios, args.device, args.dtype, args.attn, args.repeats, args.max_cpu_params)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.backbone)
        rows = bench_config(args.backbone, config, args.frames, args.height, args.width, args.text_tokens, args.ratios, meta=not args.no_meta)
    print(_table(rows))
    Path(args.out).write_text(json.dumps({"device": args.device if args.measure else "meta", "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
