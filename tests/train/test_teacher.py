"""The refbench reference teacher: every weight trains, the time-budget schedule survives a resume."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch

from tests.eval.test_harness import refbench_batches
from tokensieve.train.teacher import RefBenchTeacher, batched_window_attention, encode_video_with_grad, token_labels

SMALL = {"vision_hidden": 32, "vision_depth": 1, "vision_heads": 2, "text_hidden": 64, "text_layers": 2, "text_heads": 2, "kv_heads": 1, "mlp_ratio": 2}


def _teacher(**kw) -> RefBenchTeacher:
    torch.manual_seed(0)
    return RefBenchTeacher(arch=SMALL, init_seed=0, lr=3e-3, warmup_steps=1, drop_prob=0.0, aux_weight=0.5, attn_weight=1.0, **kw)


def test_training_steps_lower_the_loss_and_move_every_weight():
    teacher = _teacher()
    batch = refbench_batches(4, 4)[0]
    before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.model.train()
    losses = []
    for _ in range(8):
        logits, visual, attn = teacher.answer_logits(batch, with_visual=True)
        loss = torch.nn.functional.cross_entropy(logits, teacher._targets(batch)) + attn + 0.5 * teacher.aux_loss(batch, visual)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    frozen = [n for n, p in teacher.model.named_parameters() if torch.equal(p, before[n]) and "embed_tokens" not in n]
    assert not frozen, frozen  # unlike the compressors, the teacher trains the whole VLM (vision tower included)


def test_batched_window_attention_is_the_library_forward():
    batch = refbench_batches(2, 2)[0]
    library, batched = _teacher(batched_vision_attention=False), _teacher()  # same seed: same weights
    assert torch.equal(library.model.model.visual.blocks[0].attn.qkv.weight, batched.model.model.visual.blocks[0].attn.qkv.weight)
    a, b = encode_video_with_grad(library.backbone, batch), encode_video_with_grad(batched.backbone, batch)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-5, atol=1e-5)
    b.tokens.sum().backward()  # differentiable
    assert batched.model.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # windows of unequal length: the library's own forward runs
    attn = batched.model.model.visual.blocks[0].attn
    hidden = torch.randn(10, attn.qkv.in_features)
    rope = (torch.ones(10, attn.head_dim), torch.zeros(10, attn.head_dim))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    torch.testing.assert_close(batched_window_attention(attn, hidden, cu, position_embeddings=rope), type(attn).forward(attn, hidden, cu, position_embeddings=rope))


def test_token_dropout_keeps_the_evidence_whose_loss_would_change_the_answer():
    teacher = _teacher()
    teacher.hparams.update(drop_prob=1.0, drop_range=(0.05, 0.05), evidence_prob=0.0)  # prune every sample to ~6 random tokens
    batch = refbench_batches(7, 7)[0]  # one sample of each question type
    visual = teacher.backbone.encode_video(batch)
    torch.manual_seed(0)
    selection = teacher._dropout_selection(batch, visual)
    for b, meta in enumerate(batch.meta):
        kept = set(selection.index[b][selection.valid[b]].tolist()) if selection.valid is not None else set(selection.index[b].tolist())
        evidence = set(meta["evidence_tokens"])
        if meta["qtype"] in ("count", "order"):  # a pruned evidence token would change the label
            assert evidence <= kept, meta["qtype"]
    assert any(not set(m["evidence_tokens"]) <= set(selection.index[b].tolist()) for b, m in enumerate(batch.meta) if m["qtype"] not in ("count", "order"))


def test_count_sink_changes_the_attention_loss_of_count_questions_only():
    plain, sink = _teacher(), _teacher(count_sink=True)  # same seed: same weights
    without_count, with_count = refbench_batches(3, 3)[0], refbench_batches(4, 4)[0]  # types cycle: colour, shape, direction, count
    assert "count" not in [m["qtype"] for m in without_count.meta] and with_count.meta[3]["qtype"] == "count"
    loss = {}
    for name, teacher in (("plain", plain), ("sink", sink)):
        for key, batch in (("without", without_count), ("with", with_count)):
            loss[name, key] = teacher.answer_logits(batch, with_visual=True)[2]
    torch.testing.assert_close(loss["sink", "without"], loss["plain", "without"])
    assert not torch.allclose(loss["sink", "with"], loss["plain", "with"])
    loss["sink", "with"].backward()
    assert sink.model.model.language_model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_qtype_weights_weigh_the_answer_loss():
    batch = refbench_batches(7, 7)[0]
    logits = torch.randn(7, 300)
    plain, weighted = _teacher(), _teacher(qtype_weights={"count": 3.0})
    target = plain._targets(batch)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = torch.tensor([3.0 if m["qtype"] == "count" else 1.0 for m in batch.meta])
    torch.testing.assert_close(plain._answer_loss(batch, logits, target), ce.mean())
    torch.testing.assert_close(weighted._answer_loss(batch, logits, target), (w * ce).sum() / w.sum())


def test_token_labels_mark_the_object_cells():
    batch = refbench_batches(1, 1)[0]
    labels = token_labels(batch.meta[0], (8, 4, 4))
    assert labels.shape == (128, 3)
    marked = set(labels[:, 0].nonzero().squeeze(1).tolist())
    assert set(batch.meta[0]["evidence_tokens"]) <= marked  # evidence = cells of the target object


def test_token_labels_give_the_direction_target_its_motion():
    from tokensieve.eval.refbench.generator import make_sample
    from tokensieve.train.teacher import AUX_MOTIONS

    for i in (2, 9, 16, 23):
        _, r = make_sample(0, "val", i)
        labels = token_labels(r, (8, 4, 4))
        motions = labels[r["evidence_tokens"], 2].tolist()
        assert motions == [1 + AUX_MOTIONS.index(r["answer_text"])] * len(motions)
        assert int((labels[:, 2] > 0).sum()) >= len(motions)  # static distractors are 0


def test_elapsed_time_and_warmup_survive_a_checkpoint_round_trip():
    teacher = _teacher(time_budget_min=10.0)
    teacher._resumed_elapsed = 0.0
    teacher.on_fit_start()
    teacher._fit_started -= 120.0  # pretend 2 min of training
    teacher._warm_at = 30.0
    ckpt: dict = {}
    teacher.on_save_checkpoint(ckpt)
    assert 119.0 < ckpt["tokensieve"]["elapsed_s"] < 130.0 and ckpt["tokensieve"]["warm_at_s"] == 30.0

    resumed = _teacher(time_budget_min=10.0)
    resumed.on_load_checkpoint(ckpt)
    resumed.on_fit_start()
    assert resumed.elapsed_seconds() >= ckpt["tokensieve"]["elapsed_s"]
    assert abs(resumed._time_fraction() - (ckpt["tokensieve"]["elapsed_s"] - 30.0) / (600 - 30.0)) < 0.01


def test_fit_exports_a_loadable_teacher_with_its_card(tmp_path):
    from tokensieve.eval.refbench.generator import write_split
    from tokensieve.models.backbones import load
    from tokensieve.train.datamodule import VideoDataModule

    write_split(tmp_path / "shards", "train", 4, progress=False)
    write_split(tmp_path / "shards", "val", 2, progress=False)
    data = VideoDataModule(train_shards=str(tmp_path / "shards" / "train"), val_shards=str(tmp_path / "shards" / "val"), num_frames=16, size=(112, 112), batch_size=2, num_workers=0, train_policy="uniform")
    teacher = _teacher(export_dir=str(tmp_path / "export"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(teacher, datamodule=data)
    card = json.loads((tmp_path / "export" / "teacher_card.json").read_text())
    assert card["global_step"] == 2 and card["device"] == "cpu" and card["train_seconds"] > 0
    assert card["val_samples"] == 2 and 0.0 <= card["val_acc"] <= 1.0  # totals derived from the per-type counts
    assert sum(n for _, n in teacher._val_by_type.values()) == 2 and set(teacher._val_by_type) <= {"color", "shape"}
    assert card["hyper_parameters"]["arch"] == SMALL and card["hyper_parameters"]["attn_weight"] == 1.0
    reloaded = load(tmp_path / "export")
    for name, p in teacher.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], p.cpu()), name
