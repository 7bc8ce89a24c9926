"""Analytic prefill FLOPs vs torch's FlopCounterMode, and the timing helper.

Tolerance: the analytic formula counts exactly the matrix products FlopCounterMode counts
(linear, conv, attention matmuls under eager attention), so the tiny models agree to
rtol 1e-3 (float rounding of large integer sums only); anything else would be a formula bug.
"""

from __future__ import annotations

import json

import pytest
from tests.conftest import make_batch
from tokensieve.eval.efficiency import count_flops, llm_prefill_flops, measure_prefill, num_video_tokens, prefill_flops

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")
FRAMES, HEIGHT, WIDTH = 4, 112, 84


@pytest.fixture(scope="module")
def eager_backbones(tmp_path_factory, tiny_backbone_dir):
    from tests.models.backbones.conftest import _load, tiny_dirs_for

    dirs = tiny_dirs_for(tmp_path_factory, tiny_backbone_dir)
    return {family: _load(path, attn_implementation="eager") for family, path in dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_match_flop_counter(eager_backbones, family):
    from tokensieve.models.compressors import get_compressor

    backbone = eager_backbones[family]
    config = backbone.model.config
    batch = make_batch(2, frames=FRAMES, height=HEIGHT, width=WIDTH)
    visual = backbone.encode_video(batch)
    assert num_video_tokens(config, FRAMES, HEIGHT, WIDTH) == visual.num_tokens
    vision_counted = count_flops(lambda: backbone.encode_video(batch))
    previous = None
    for ratio in (1.0, 0.25, 0.1):
        sel = get_compressor("uniform")(visual, budget=ratio)
        length = backbone.lm_inputs(batch, visual, sel)[0].shape[1]  # padded prefill length
        k = sel.index.shape[1]
        analytic = prefill_flops(config, k, length - k, FRAMES, HEIGHT, WIDTH, batch_size=2)
        counted = count_flops(lambda: backbone(batch, visual, sel))
        assert counted == pytest.approx(analytic.llm, rel=1e-3)
        assert vision_counted == pytest.approx(analytic.vision + analytic.projector, rel=1e-3)
        if previous is not None:  # fewer tokens, fewer LLM FLOPs; the vision side is unchanged
            assert analytic.llm < previous.llm and analytic.vision == previous.vision
        previous = analytic


def test_causal_counts_half_the_scores():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    dense, causal = llm_prefill_flops(cfg, 100), llm_prefill_flops(cfg, 100, causal=True)
    assert dense - causal == pytest.approx(2 * 2 * 2 * 64 * 100 * (100 - 101 / 2))


def test_unsupported_config_and_bad_sizes_are_clear_errors():
    from transformers import GPT2Config, Qwen2VLConfig

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        prefill_flops(GPT2Config(), 10, 10)
    with pytest.raises(ValueError, match="multiples of"):
        prefill_flops(Qwen2VLConfig(), 10, 10, num_frames=2, height=50, width=56)


def test_7b_presets_llava_token_count_and_meta_counter():
    from tokensieve.eval.bench_prefill import bench_config, preset_configs

    presets = preset_configs()
    rows = bench_config("llava_onevision-7b", presets["llava_onevision-7b"], 32, 448, 448, 64, ratios=(1.0, 0.1), meta=False)
    assert rows[0]["full_visual_tokens"] == 32 * 196  # 32 frames × 14² pooled tokens (REFERENCES.md)
    assert rows[1]["flops"]["llm"] < rows[0]["flops"]["llm"] / 5
    meta = bench_config("qwen2_5_vl-7b", presets["qwen2_5_vl-7b"], 4, 112, 112, 16, ratios=(1.0,), meta=True)[0]
    assert 7e9 < meta["params"] < 9e9
    assert meta["llm_counted_over_analytic"] == pytest.approx(1.0, rel=1e-3)


def test_measure_prefill_and_bench_script_on_a_tiny_backbone(eager_backbones, tiny_backbone_dir, tmp_path):
    from tokensieve.eval.bench_prefill import main

    backbone = eager_backbones["qwen2_5_vl"]
    batch = make_batch(1, frames=2)
    visual = backbone.encode_video(batch)
    timing = measure_prefill(backbone, batch, visual, repeats=2, warmup=0)
    assert timing["device"] == "cpu" and len(timing["times_s"]) == 2 and timing["min_s"] > 0
    assert timing["prefill_tokens"] == backbone.lm_inputs(batch, visual)[0].shape[1]
    with pytest.raises(ValueError, match="repeats"):
        measure_prefill(backbone, batch, visual, repeats=0)
    out = tmp_path / "bench.json"
    main(["--backbone", str(tiny_backbone_dir), "--measure", "--frames", "2", "--height", "56", "--width", "56", "--ratios", "1.0", "0.1", "--repeats", "1", "--attn", "eager", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["ratio"] for r in rows] == [1.0, 0.1]
    assert all(r["llm_counted_over_analytic"] == pytest.approx(1.0, rel=1e-3) for r in rows)
    assert rows[0]["time"]["median_s"] > 0 and rows[1]["flops"]["llm"] < rows[0]["flops"]["llm"]
