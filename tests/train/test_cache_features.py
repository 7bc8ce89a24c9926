"""Feature-cache shards: cached visual tokens equal a fresh encode; training runs from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from tokensieve.data.reader import VideoShardDataset, make_loader
from tokensieve.data.shards import write_shards
from tokensieve.data.video import write_clip
from tokensieve.train.cache_features import cache_features
from tokensieve.train.datamodule import VideoDataModule
from tokensieve.train.features import cached_teacher, visual_from_features

NUM_FRAMES, SIZE = 4, (56, 84)
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "flexselect.yaml"


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> Path:
    """Six textured synthetic clips in three shards."""
    root = tmp_path_factory.mktemp("raw")
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one", "two", "three"):
        base = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
        clip = np.concatenate([np.roll(base, 3 * i, axis=2) for i in range(20)])
        (videos / f"{name}.mp4").write_bytes(write_clip(clip, fps=10))
    write_shards(videos, root / "shards", clip_seconds=1.0, maxcount=2, cut="reencode", progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def cached(raw_shards, tiny_backbone, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features")
    summary = cache_features(
        tiny_backbone, raw_shards, out, num_frames=NUM_FRAMES, size=SIZE, batch_size=2, teacher_layer=2, dtype="fp16", device="cpu", progress=False
    )
    assert summary["samples"] == 6 and summary["skipped"] == {}
    return out


def _batches(urls, size=SIZE):
    return list(make_loader(VideoShardDataset(urls, NUM_FRAMES, size), batch_size=2))


def test_cached_features_equal_a_fresh_encode(raw_shards, cached, tiny_backbone):
    assert json.loads((cached / "sizes.json").read_text()) == {"features-000000.tar": 6}
    raw, features = _batches(raw_shards), _batches(cached)
    assert [b.keys for b in raw] == [b.keys for b in features]
    for fresh_batch, cached_batch in zip(raw, features):
        assert cached_batch.frames.shape == (2, 0, 0, 0, 3)
        assert cached_batch.features["tokens"].dtype == torch.float16
        torch.testing.assert_close(cached_batch.timestamps, fresh_batch.timestamps)
        assert cached_batch.questions == fresh_batch.questions
        fresh = tiny_backbone.encode_video(fresh_batch)
        visual = visual_from_features(cached_batch, dtype=fresh.tokens.dtype)
        # fp16 storage: relative error ~ 2**-11
        torch.testing.assert_close(visual.tokens, fresh.tokens, rtol=2e-3, atol=2e-3)
        assert torch.equal(visual.positions, fresh.positions)
        assert torch.equal(visual.frame_index, fresh.frame_index) and visual.valid.all()
        assert visual.grid == fresh.grid
        assert torch.equal(visual.cache["grid_thw"], fresh.cache["grid_thw"])
        torch.testing.assert_close(visual.cache["second_per_grid_ts"], fresh.cache["second_per_grid_ts"])
        assert cached_teacher(cached_batch) == (2, "max")
        teacher = tiny_backbone.teacher_signals(fresh_batch, fresh, layer=2, reduction="max", with_logits=False)
        torch.testing.assert_close(cached_batch.features["teacher_attention"], teacher.attention, rtol=1e-4, atol=1e-6)
        # the text side rebuilt from the cache gives the same answer logits
        logits = tiny_backbone(cached_batch, visual)
        torch.testing.assert_close(logits, tiny_backbone(fresh_batch, fresh), rtol=1e-2, atol=1e-2)


def _recipe_model(backbone_dir: Path) -> dict:
    """The tiny FlexSelect recipe's model section with the test's backbone."""
    model = yaml.safe_load(RECIPE.read_text())["model"]
    model["init_args"]["backbone"] = str(backbone_dir)
    return model


def test_training_from_cached_shards_skips_the_vision_tower(cached, raw_shards, tiny_backbone_dir, tmp_path, monkeypatch):
    import importlib

    spec = _recipe_model(tiny_backbone_dir)
    module_name, cls_name = spec["class_path"].rsplit(".", 1)
    torch.manual_seed(0)
    module = getattr(importlib.import_module(module_name), cls_name)(**spec["init_args"])

    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran on a feature-cache batch")

    calls = {"teacher": 0}
    teacher_signals = module.backbone.teacher_signals

    def counted_teacher(*args, **kwargs):
        calls["teacher"] += 1
        return teacher_signals(*args, **kwargs)

    monkeypatch.setattr(module.backbone, "encode_video", no_vision)
    monkeypatch.setattr(module.backbone, "teacher_signals", counted_teacher)
    data = VideoDataModule(train_shards=str(cached), val_shards=str(cached), num_frames=NUM_FRAMES, size=SIZE, batch_size=2, num_workers=0, shuffle_buffer=4)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert any(not torch.equal(v, module.compressor.state_dict()[k]) for k, v in before.items())
    if not module.hparams.get("kl_weight"):
        assert calls["teacher"] == 0  # the cached layer-2 attention was used
    assert "val/spearman" in trainer.callback_metrics


def test_cache_features_refuses_jitter_and_overwrite(raw_shards, cached, tiny_backbone):
    with pytest.raises(ValueError, match="uniform"):
        cache_features(tiny_backbone, raw_shards, cached, sample_policy="jitter", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        cache_features(tiny_backbone, raw_shards, cached, num_frames=NUM_FRAMES, size=SIZE, device="cpu", progress=False)


def test_cache_features_cli(raw_shards, tiny_backbone_dir, tmp_path):
    from tokensieve.cli import main

    out = tmp_path / "cli-features"
    args = ["cache-features", "--backbone", str(tiny_backbone_dir), "--shards", str(raw_shards), "--out", str(out),
            "--num-frames", "2", "--size", "56", "56", "--dtype", "bf16", "--device", "cpu", "--maxcount", "4"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["shards"] == {"features-000000.tar": 4, "features-000001.tar": 2}
    batch = next(iter(make_loader(VideoShardDataset(out, 2), batch_size=6)))
    assert batch.features["tokens"].dtype == torch.bfloat16 and "teacher_attention" not in batch.features
    assert batch.meta[0]["features"]["dtype"] == "bf16"
