"""Multi-process training: DDP over gloo equals one process at the same global batch; DeepSpeed on a GPU.

DDP: 2 processes x batch 2 against 1 process x batch 4 on the same 16 clips, same order.
Rank r reads the samples r, r+2, r+4, ... (a ``DistributedSampler`` without shuffling, built
per rank by :class:`_InOrder`; Lightning's automatic one always shuffles the training set), so
step s of the 2-process run sees exactly the 4 samples of step s of the 1-process run. The
loss is a per-sample mean and DDP averages the gradients over ranks, so both runs take the
same AdamW steps, up to float32 summation order.

Tolerances, after 4 steps at lr 1e-2: every parameter within ``PARAM_ATOL`` = 1e-5 (measured
~5e-7), except the key biases (``k_proj.bias`` and the key third of the context layers'
``in_proj_bias``); the selector's scores on a held-out batch within ``SCORE_ATOL`` = 1e-5
(measured ~2e-6). Key biases are excluded from the parameter check because a softmax over
keys ignores them: their exact gradient is 0, the computed one is round-off (~1e-9), and
Adam's normalisation turns that into steps of up to ``lr`` in either direction — they drift
apart by ~1e-2 in both directions without changing the function, which the score check shows.

The processes are forked from the test (``strategy="ddp_fork"``), so no interpreter start-up
or backbone reload is paid per rank; on SLURM the same DDP code path runs with one ``srun``
task per rank (see ``tests/slurm/test_real_slurm.py``).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tokensieve.data.reader import collate_videos
from tokensieve.train.module import FlexSelectDistill
from tokensieve.train.strategies import deepspeed_available
from torch.utils.data import DataLoader, DistributedSampler

PARAM_ATOL = 1e-5
SCORE_ATOL = 1e-5
STEPS = 4
LR = 1e-2


def _samples(n: int = 16, frames: int = 4, size: int = 56) -> list[dict]:
    """Decoded-sample dicts as the shard reader yields them (one question, so no padding differences)."""
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "__key__": f"clip{i:02d}",
            "frames": torch.randint(0, 256, (frames, size, size, 3), dtype=torch.uint8, generator=gen),
            "timestamps": torch.arange(frames, dtype=torch.float32) / 4,
            "question": "What is happening in this clip?",
            "options": [],
            "answer": "",
            "meta": {},
        }
        for i in range(n)
    ]


class _InOrder(pl.LightningDataModule):
    """The samples in order, split over ranks without shuffling (rank r: r, r + world, ...)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        samples = _samples()
        sampler = DistributedSampler(samples, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(samples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_videos)


def _fit(backbone_dir, batch_size: int, **trainer_kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = FlexSelectDistill(backbone=str(backbone_dir), compressor_kwargs={"d_model": 32}, reference_layer=2, lr=LR)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False, **trainer_kwargs,
    )
    before = {k: v.detach().clone() for k, v in module.compressor.state_dict().items()}
    trainer.fit(module, datamodule=_InOrder(batch_size))  # with ddp_fork, rank 0's weights come back to this process
    assert any(not torch.equal(v, before[k]) for k, v in module.compressor.state_dict().items()), "no parameter moved"
    return {k: v.detach().clone() for k, v in module.compressor.state_dict().items()}


def _key_bias_mask(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """True where a parameter is a key bias: softmax over keys ignores it, so its exact gradient is 0."""
    mask = torch.zeros_like(tensor, dtype=torch.bool)
    if name == "k_proj.bias":
        mask[:] = True
    elif name.endswith("self_attn.in_proj_bias"):  # [q | k | v] biases of nn.MultiheadAttention
        d = tensor.numel() // 3
        mask[d : 2 * d] = True
    return mask


def _scores(state: dict[str, torch.Tensor], backbone_dir) -> torch.Tensor:
    from tests.conftest import make_batch
    from tokensieve.models.backbones import load
    from tokensieve.models.compressors import get_compressor

    backbone = load(backbone_dir)
    compressor = get_compressor("flexselect", hidden_size=backbone.model.config.text_config.hidden_size, d_model=32)
    compressor.load_state_dict(state)
    batch = make_batch(seed=11)
    visual = backbone.encode_video(batch)
    with torch.no_grad():
        scores = compressor.eval().score(visual, backbone.embed_query(batch, visual))
    return scores.masked_fill(~visual.valid, 0.0)


def test_two_process_ddp_equals_one_process_at_the_same_global_batch(tiny_backbone_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked ranks share the machine's cores
    try:
        single = _fit(tiny_backbone_dir, batch_size=4, devices=1)
        ddp = _fit(tiny_backbone_dir, batch_size=2, devices=2, strategy="ddp_fork")
    finally:
        torch.set_num_threads(threads)
    assert single.keys() == ddp.keys()
    diffs = {k: (single[k] - ddp[k]).abs().masked_fill(_key_bias_mask(k, single[k]), 0).max().item() for k in single}
    worst_param = max(diffs.values())
    key_bias = max((single[k] - ddp[k]).abs()[_key_bias_mask(k, single[k])].max().item() for k in single if _key_bias_mask(k, single[k]).any())
    worst_score = (_scores(single, tiny_backbone_dir) - _scores(ddp, tiny_backbone_dir)).abs().max().item()
    print(f"DDP (2 x 2) vs 1 process (1 x 4): max |param diff| = {worst_param:.2e} (key biases excluded), max |score diff| = {worst_score:.2e}, key biases {key_bias:.2e}")
    assert worst_param <= PARAM_ATOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    assert worst_score <= SCORE_ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed: pip install 'tokensieve[deepspeed]'")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed ZeRO-2 needs a CUDA device; none on this machine")
def test_deepspeed_zero2_checkpoint_holds_only_the_compressor(tiny_backbone_dir, tmp_path):
    from tokensieve.train.export import export_checkpoint
    from tokensieve.train.strategies import consolidate_deepspeed_checkpoint, resolve_strategy

    torch.manual_seed(0)
    module = FlexSelectDistill(backbone=str(tiny_backbone_dir), compressor_kwargs={"d_model": 32}, reference_layer=2, lr=LR)
    loader = DataLoader(_samples(8), batch_size=2, shuffle=False, collate_fn=collate_videos)
    trainer = pl.Trainer(
        max_steps=3, accelerator="gpu", devices=1, strategy=resolve_strategy("deepspeed_stage_2"), precision="bf16-mixed",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert trainer.strategy.exclude_frozen_parameters
    assert all(p.dtype == torch.float32 for p in module.compressor.parameters())  # bf16-mixed keeps fp32 parameters
    ckpt_dir = tmp_path / "zero2.ckpt"
    trainer.save_checkpoint(ckpt_dir)
    single = consolidate_deepspeed_checkpoint(ckpt_dir, tmp_path / "consolidated.ckpt")
    raw = torch.load(single, map_location="cpu", weights_only=True)
    assert raw["state_dict"] and all(k.startswith("compressor.") for k in raw["state_dict"])
    assert export_checkpoint(single, tmp_path / "export").joinpath("model.safetensors").is_file()
