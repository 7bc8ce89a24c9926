"""Evaluation harness: metrics, report files, resuming, the CLI verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokensieve.data.types import VideoBatch
from tokensieve.eval import harness
from tokensieve.eval.refbench.generator import make_sample


def refbench_batches(n: int = 6, batch_size: int = 3, split: str = "val", seed: int = 0) -> list[VideoBatch]:
    """Generated refbench samples as batches (raw frames, no mp4 round trip)."""
    out = []
    for start in range(0, n, batch_size):
        samples = [make_sample(seed, split, i) for i in range(start, min(n, start + batch_size))]
        out.append(
            VideoBatch(
                frames=torch.stack([torch.from_numpy(f) for f, _ in samples]),
                timestamps=(torch.arange(16, dtype=torch.float32) / 8).expand(len(samples), -1).clone(),
                frame_mask=torch.ones(len(samples), 16, dtype=torch.bool),
                questions=[r["question"] for _, r in samples],
                options=[r["options"] for _, r in samples],
                answers=[r["answer"] for _, r in samples],
                keys=[f"{split}_{start + i:06d}" for i in range(len(samples))],
                meta=[r for _, r in samples],
            )
        )
    return out


def test_bootstrap_ci_brackets_the_mean():
    correct = np.array([1] * 80 + [0] * 20)
    lo, hi = harness.bootstrap_ci(correct)
    assert lo < 0.8 < hi and 0.65 < lo and hi < 0.95
    assert harness.bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def test_prefill_flops_grow_with_length():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2, vocab_size=100)
    f10, f20 = harness.llm_prefill_flops(cfg, 10), harness.llm_prefill_flops(cfg, 20)
    assert 0 < f10 < f20 < 2.2 * f10
    # one layer, L = 1: projections 2·64·(2·64 + 2·32) + attention 2·2·64 + MLP 2·3·64·128 + head 2·64·100
    one = SimpleNamespace(**{**vars(cfg), "num_hidden_layers": 1})
    assert harness.llm_prefill_flops(one, 1) == 2 * 64 * 192 + 4 * 64 + 6 * 64 * 128 + 2 * 64 * 100


def test_harness_writes_reports_and_resumes(tiny_backbone_dir, tmp_path, monkeypatch):
    batches = refbench_batches()
    out = tmp_path / "bench"
    res = harness.run_benchmark(tiny_backbone_dir, "generated", ["uniform", "random"], [0.1, 0.5], out, batches=batches, resamples=50, progress=False)
    keys = set(res["cells"])
    assert keys == {"full@1.0", *(f"{m}@{b}" for m in ("oracle", "uniform", "random") for b in (0.1, 0.5))}
    for name in ("results.json", "results.md", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    full = res["cells"]["full@1.0"]
    assert full["acc_pct_full"] == 100.0 and full["agreement"] == 1.0 and abs(full["kl"]) < 1e-6
    assert full["kept_tokens"] == 128 and full["evidence_recall"] == 1.0
    oracle = res["cells"]["oracle@0.1"]
    assert oracle["evidence_recall"] == 1.0 and oracle["kept_tokens"] >= 13
    uni = res["cells"]["uniform@0.1"]
    assert uni["kept_tokens"] == 13 and uni["prefill_gflops"] < full["prefill_gflops"]
    for row in res["cells"].values():
        assert row["samples"] == 6 and 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
        assert row["prefill_ms"] > 0 and row["kl"] >= -1e-6
    assert "| 0.1 | oracle |" in (out / "results.md").read_text()
    for cell in json.loads((out / "results.json").read_text())["cells"].values():  # TokDense: accuracy % per kept token
        assert abs(cell["tokdense"] - 100 * cell["accuracy"] / cell["kept_tokens"]) < 1e-9
        by_type = cell["accuracy_by_type"]  # samples 0-5 cycle through the first six question types
        assert set(by_type) == {batches[0].meta[0]["qtype"], *(m["qtype"] for b in batches for m in b.meta)}
        assert abs(np.mean(list(by_type.values())) - cell["accuracy"]) < 1e-6  # one sample per type
    assert "## Accuracy by question type" in (out / "results.md").read_text()

    # a rerun with one more compressor only evaluates the new cells
    calls = []
    real = harness._run_cell
    monkeypatch.setattr(harness, "_run_cell", lambda *a, **k: calls.append((a[2], a[4])) or real(*a, **k))
    res2 = harness.run_benchmark(tiny_backbone_dir, "generated", ["uniform", "random", "pool"], [0.1, 0.5], out, batches=batches, resamples=50, progress=False)
    assert sorted(calls) == [("pool", 0.1), ("pool", 0.5)]
    assert {k: v for k, v in res2["cells"].items() if k in keys} == res["cells"]
    assert json.loads((out / "results.json").read_text())["cells"].keys() == res2["cells"].keys()
    # nothing left to do: no cell runs, the backbone is not even loaded
    calls.clear()
    harness.run_benchmark(tiny_backbone_dir, "generated", ["uniform", "random", "pool"], [0.1, 0.5], out, batches=batches, resamples=50, progress=False)
    assert calls == []


def test_results_of_another_run_are_refused(tiny_backbone_dir, tmp_path):
    out = tmp_path / "bench"
    harness.run_benchmark(tiny_backbone_dir, "generated", ["uniform"], [0.5], out, batches=refbench_batches(3), resamples=10, progress=False)
    with pytest.raises(ValueError, match="another --out"):
        harness.run_benchmark(tiny_backbone_dir, "other-data", ["uniform"], [0.5], out, batches=refbench_batches(3), resamples=10, progress=False)
    # the same folder with retrained weights is another backbone too
    import shutil

    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_backbone_dir, retrained)
    harness.run_benchmark(retrained, "generated", ["uniform"], [0.5], tmp_path / "r", batches=refbench_batches(3), resamples=10, progress=False)
    st = retrained / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1  # the last weight byte
    st.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="another --out"):
        harness.run_benchmark(retrained, "generated", ["uniform"], [0.5], tmp_path / "r", batches=refbench_batches(3), resamples=10, progress=False)


def test_in_llm_pruner_counts_its_full_layers_in_the_flops(tiny_backbone_dir, tmp_path):
    """FastV runs its first K layers over every visual token: its LLM FLOPs lie between a
    pre-LLM selection of the same size and the full prefill, at K/L of the way."""
    from transformers import AutoConfig

    res = harness.run_benchmark(tiny_backbone_dir, "generated", ["full", "uniform", "fastv"], [0.25], tmp_path / "b", batches=refbench_batches(3), resamples=10, progress=False)
    cells = {c["method"]: c for c in res["cells"].values()}
    full, pre, fastv = cells["full"]["llm_gflops"], cells["uniform"]["llm_gflops"], cells["fastv"]["llm_gflops"]
    assert cells["fastv"]["kept_tokens"] == cells["uniform"]["kept_tokens"]
    layers = AutoConfig.from_pretrained(tiny_backbone_dir).text_config.num_hidden_layers
    share = min(1.0, 2 / layers)  # FastV's default K = 2
    assert pre < full and abs(fastv - (share * full + (1 - share) * pre)) < 1e-6 * full


def test_training_free_expands_to_every_registered_training_free_method():
    free = harness.default_compressors()
    assert "random" in free and "divprune" in free and "flexselect" not in free
    assert harness.expand_specs(["oracle", "training-free", "random", "runs/x/export"]) == ["oracle", *free, "runs/x/export"]


def test_eval_cli_on_shards(tiny_backbone_dir, tmp_path):
    from tokensieve.cli import main
    from tokensieve.eval.refbench.generator import write_split

    write_split(tmp_path / "shards", "test", 4, progress=False)
    out = tmp_path / "eval"
    assert main(["eval", "--backbone", str(tiny_backbone_dir), "--data", str(tmp_path / "shards" / "test"), "--compressors", "uniform", "--budgets", "0.25", "--out", str(out), "--batch-size", "2"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {"full@1.0", "oracle@0.25", "uniform@0.25"} and cells["full@1.0"]["samples"] == 4
