"""Train a whole Qwen2.5-VL-architecture VLM from scratch: the reference benchmark's teacher.

Unlike :class:`~tokensieve.train.module.CompressorModule` (frozen backbone, trainable
compressor), :class:`RefBenchTeacher` builds a small random-init
``Qwen2_5_VLForConditionalGeneration`` (architecture from :func:`teacher_config`), loads it
through the public backbone API (``tokensieve.models.backbones.load``) and **unfreezes every
weight**. The loss is cross-entropy on the answer letter at the last prompt position, taken
from the adapter's own ``encode_video`` → ``forward`` path, so the positions (M-RoPE ids, chat
template) are exactly the ones used at inference.

Token-dropout augmentation (``drop_prob``): a share of the training samples sees only a
subset of its visual tokens — the evidence tokens (from the sample's json) plus random
fillers at a random retention in ``drop_range``, or random tokens only. The selection goes
through the same ``Selection`` path as every compressor, so the teacher learns to read an
answer from a pruned prefill without being told which compressor made it.

At the end of ``fit`` the model, tokenizer and preprocessor settings are written to
``export_dir`` (``save_pretrained``), with ``teacher_card.json`` (recipe, seed, steps, wall
time, validation accuracy), so ``tokensieve.models.backbones.load(export_dir)`` opens it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokensieve.data.types import VideoBatch
from tokensieve.eval.refbench.questions import COLOR_NAMES, DIRECTIONS, SHAPES
from tokensieve.models.backbones import Backbone, load
from tokensieve.models.backbones.chat_templates import QWEN_VL_CHAT_TEMPLATE_NO_SYSTEM
from tokensieve.models.backbones.tiny import QWEN_PREPROCESSOR, save_backbone
from tokensieve.models.compressors import selection_from_indices
from tokensieve.train.module import CompressorModule

LETTERS = ("A", "B", "C", "D")

TEACHER_CHAT_TEMPLATE = QWEN_VL_CHAT_TEMPLATE_NO_SYSTEM
"""Qwen2.5-VL's chat format without the default system turn: 36 fewer prompt tokens per sample
with the byte-level tokenizer, which matters when training on a CPU."""


def teacher_config(vision_hidden: int = 96, vision_depth: int = 2, vision_heads: int = 4, window_size: int = 112, text_hidden: int = 128, text_layers: int = 4, text_heads: int = 4, kv_heads: int = 2, mlp_ratio: int = 3, word_tokens: bool = False):
    """A ``Qwen2_5_VLConfig`` and byte-level tokenizer for a small teacher.

    With ``word_tokens`` the tokenizer also holds the refbench's question words and the chat
    roles as single tokens (BPE merges, :func:`~tokensieve.eval.refbench.questions.question_words`),
    as a trained vocabulary would: the prompt shrinks from ~100 byte tokens to ~35, and the
    word a question turns on ("the *circle*") is one token the answer position can attend to
    instead of a spelling spread over 6–8 bytes. Off by default: the one run made with it
    (split evidence-attention loss, lr 3e-3) stayed at chance for its first 1,200 steps, where
    byte-level runs had reached 38–47 %.

    Same layout as :func:`tokensieve.models.backbones.tiny.make_tiny_qwen2_5_vl` (patch 14,
    temporal patch 2, 2×2 merge, window attention with the last block full, M-RoPE), with
    the widths and depths as arguments. ``window_size`` (pixels) of 112 makes a window one
    whole 112×112 frame: the non-flash attention path loops over windows in Python, so
    fewer windows train much faster on a CPU.

    Returns:
        ``(config, tokenizer)``.
    """
    from transformers import Qwen2_5_VLConfig

    from tokensieve.models.backbones.tiny import QWEN_SPECIAL_TOKENS, make_byte_tokenizer

    words: tuple[str, ...] = ()
    if word_tokens:
        from tokensieve.eval.refbench.questions import question_words

        words = ("user", "assistant", *question_words())
    tok = make_byte_tokenizer(chat_template=TEACHER_CHAT_TEMPLATE, words=words)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = text_hidden // text_heads
    quarter = head_dim // 8
    rest = head_dim // 2 - quarter
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=mlp_ratio * vision_hidden,
            num_heads=vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=window_size,
            fullatt_block_indexes=[vision_depth - 1],
            out_hidden_size=text_hidden,
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=text_hidden,
            intermediate_size=mlp_ratio * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [quarter, rest // 2, rest - rest // 2]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return config, tok


def save_teacher(model, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` the model and tokenizer into ``out`` with Qwen's ``preprocessor_config.json``."""
    return save_backbone(model, tokenizer, out, QWEN_PREPROCESSOR)


def build_teacher(out: str | Path, seed: int = 0, **arch) -> Path:
    """Create a random-init teacher (seeded) with :func:`teacher_config` and save it to ``out``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, tok = teacher_config(**arch)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return save_teacher(model, tok, out)


def letter_ids(tokenizer, letters=LETTERS) -> list[int]:
    """Token id of each answer letter (each must be a single token)."""
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens in this tokenizer")
        ids.append(enc[0])
    return ids


def encode_video_with_grad(backbone: Backbone, batch: VideoBatch):
    """``backbone.encode_video(batch)`` with autograd on (the adapter's method runs under ``no_grad``).

    Calls the undecorated method body (``__wrapped__`` of the ``torch.no_grad`` decorator), so
    the vision path is the adapter's own code.
    """
    fn = type(backbone).encode_video
    fn = getattr(fn, "__wrapped__", fn)
    with torch.enable_grad():
        return fn(backbone, batch)


def batched_window_attention(attn, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs) -> torch.Tensor:
    """Forward of a ``Qwen2_5_VLVisionAttention`` with all its windows in one SDPA call.

    ``transformers`` runs the vision tower's windowed attention as one SDPA call per window
    unless flash-attention is installed (``modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention``):
    a batch of 64 refbench clips is 512 windows per layer. When every window has the same
    length (always so for the teacher: one window is one 112×112 frame group, 64 patches) the
    windows are stacked as a batch ``[n, heads, w, d]`` and attended at once — the same
    arithmetic (on the shipped teacher the outputs are identical, max abs difference 0.0). Otherwise the library's own
    forward runs. Measured: a batch-16 training step on the 2-core CPU went from 0.78 to
    0.57 s; on the H100 a batch-64 step stayed at ~1 s with or without it (bound elsewhere).

    Args:
        attn: the attention module (its ``qkv``, ``proj``, ``num_heads``, ``scaling``).
        hidden_states: ``[S, D]`` patches of the whole batch, windows contiguous.
        cu_seqlens: ``int [n + 1]`` window boundaries.
        position_embeddings: ``(cos, sin)`` of the vision 2-D RoPE, each ``[S, head_dim]``.

    Returns:
        ``[S, D]``, as the library's forward.
    """
    import sys

    hf = sys.modules[type(attn).__module__]
    seq = hidden_states.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n = lengths.numel()
    if n == 0 or seq % n or bool((lengths != seq // n).any()):
        return type(attn).forward(attn, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    q, k, v = attn.qkv(hidden_states).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(n, seq // n, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)  # [n, heads, w, head_dim]
    return attn.proj(out.transpose(1, 2).reshape(seq, -1))


AUX_COLORS, AUX_SHAPES, AUX_MOTIONS = COLOR_NAMES, SHAPES, DIRECTIONS
"""Classes of the per-token auxiliary head: the refbench's own colour, shape and direction lists."""

ANSWER_NEEDS_ALL_EVIDENCE = ("count", "order")
"""Question types whose answer *changes* when an evidence token is pruned (a count drops, a later
colour becomes the first): token dropout never prunes their evidence, so it cannot teach a
wrong label. For the other types a pruned evidence token makes the answer unknowable, not
different, and the sample still trains the teacher to guess from what is left."""


def token_labels(meta: dict, grid: tuple[int, int, int], frames: int = 16, height: int = 112, width: int = 112) -> torch.Tensor:
    """``long [M, 3]``: per visual token, the (colour, shape, motion) class of the object drawn
    last in its cells — 0 for none, else 1 + index in :data:`AUX_COLORS` / :data:`AUX_SHAPES` /
    :data:`AUX_MOTIONS` (motion: the dominant axis of the object's velocity; 0 if static) —
    from the ``objects`` of a refbench json, with the boxes the renderer drew
    (:meth:`~tokensieve.eval.refbench.scene.SceneObject.box`). ``M = t·h·w`` of ``grid``;
    ``frames``, ``height``, ``width`` (pixels) are the json's own when it has them.

    Raises:
        ValueError: an object's colour or shape is not one of the auxiliary classes.
    """
    import numpy as np

    from tokensieve.eval.refbench.scene import SceneObject

    t_n, h, w = grid
    frames, height, width = meta.get("num_frames", frames), meta.get("height", height), meta.get("width", width)
    cell_y, cell_x, tp = height // h, width // w, max(1, frames // t_n)
    out = np.zeros((t_n, h, w, 3), dtype=np.int64)
    fields = set(SceneObject.__dataclass_fields__)
    for o in meta.get("objects", []):
        obj = SceneObject(**{k: v for k, v in o.items() if k in fields})
        shape = 1 + AUX_SHAPES.index(obj.shape)
        vx, vy = obj.vx + obj.dx, obj.vy + obj.dy
        motion = 0 if vx == vy == 0 else 1 + (AUX_MOTIONS.index("left" if vx < 0 else "right") if abs(vx) >= abs(vy) else AUX_MOTIONS.index("up" if vy < 0 else "down"))
        for t in range(obj.start, obj.end):
            x0, y0, x1, y1 = obj.box(t)
            ty0, ty1 = max(0, y0) // cell_y, min(height - 1, y1 - 1) // cell_y + 1
            tx0, tx1 = max(0, x0) // cell_x, min(width - 1, x1 - 1) // cell_x + 1
            out[t // tp, ty0:ty1, tx0:tx1] = (1 + AUX_COLORS.index(obj.color_at(t)), shape, motion)
    return torch.from_numpy(out.reshape(t_n * h * w, 3))


class RefBenchTeacher(CompressorModule):
    """Train every weight of a small Qwen2.5-VL from scratch on the reference benchmark.

    Subclasses :class:`CompressorModule` only to plug into the project's LightningCLI (which
    takes its subclasses); nothing of the frozen-backbone machinery is used.

    Args:
        arch: keyword arguments of :func:`teacher_config` (widths, depths, heads).
        init_seed: seed of the random initialisation.
        init_from: optional folder to start from instead of a random init.
        export_dir: where the trained teacher is saved at the end of ``fit`` (None: nowhere).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to
            ``min_lr_ratio * lr`` over the trainer's ``max_steps``.
        drop_prob: share of training samples that see a pruned prefill.
        drop_range: retention range ``(lo, hi)`` of the pruned prefills.
        evidence_prob: share of pruned samples whose evidence tokens are kept (always kept
            for the types of :data:`ANSWER_NEEDS_ALL_EVIDENCE`).
        label_smoothing: CE label smoothing.
        qtype_weights: optional weight of the answer CE per question type (``{"count": 3.0}``;
            missing types weigh 1); the batch loss is the weighted mean. Raises the share of
            the gradient of a type the teacher learns slowest, without changing the data.
        aux_weight: weight of the auxiliary per-token loss: a linear head on the visual tokens
            (the merger's output) predicts the colour, the shape and the direction of motion of
            the object drawn in each token's cells (or "none"), from the objects listed in the sample's json. Dense
            supervision that makes the vision tower learn colours and shapes in a few hundred
            steps; the head is dropped at export (the teacher is the VLM alone).
        attn_weight, attn_layer: weight of the auxiliary evidence-attention loss: at decoder
            layer ``attn_layer`` the last prompt position's attention (recomputed from the
            layer's own q/k with its M-RoPE, mean over heads, softmax over the whole row
            for the first half of the heads, renormalised over the visual tokens for the
            other half) is pushed onto the sample's evidence tokens, ``-log Σ_evidence p``
            (mean of the two halves). The second half keeps the share of attention the visual
            tokens get against the text tokens free: a count is read from it, while a softmax
            over the evidence alone would average it away. It
            teaches the LLM where to look, the slow part of learning from scratch; the
            answer itself is only ever trained by the answer cross-entropy.
        count_sink: for count questions, the second half of the heads is pushed instead to a
            uniform attention over the evidence tokens **and** the ``<|vision_start|>`` token
            (cross-entropy to that target): the share the sink keeps, ``1 / (n + 1)``, carries
            the count ``n``. Measured on count-only fine-tuning from the stage-2 teacher (3,000
            clips, batch 16, lr 2e-3): 55 % count accuracy after 400 steps and 63 % after 800,
            where the variants without it reached 38–48 %; on a count-heavy mix (stage 5 of the
            shipped teacher) count went from 36 to 82 % test accuracy in 50 CPU minutes
            (``eval/refbench/teacher/README.md``).
        batched_vision_attention: run the vision tower's windows in one attention call
            (:func:`batched_window_attention`; same arithmetic, a quarter less time per step
            on a CPU).
        time_budget_min: wall-clock budget of ``fit`` in minutes (None: none). The schedule's
            progress is ``max(step / max_steps, elapsed / budget)``, so the learning rate is
            fully annealed when either runs out, and training stops at the budget — on a
            busy shared CPU the recipe ends on time with fewer steps instead of overrunning.
            The elapsed training time is stored in every checkpoint and restored on resume
            (``--ckpt_path``), so a run split over several jobs follows the same schedule.
    """

    def __init__(self, arch: dict | None = None, init_seed: int = 0, init_from: str | None = None, export_dir: str | None = None, lr: float = 2e-3, weight_decay: float = 0.01, warmup_steps: int = 200, min_lr_ratio: float = 0.02, drop_prob: float = 0.5, drop_range: tuple[float, float] = (0.05, 0.5), evidence_prob: float = 0.75, label_smoothing: float = 0.0, qtype_weights: dict[str, float] | None = None, aux_weight: float = 0.0, time_budget_min: float | None = None, attn_weight: float = 0.0, attn_layer: int = 1, count_sink: bool = False, batched_vision_attention: bool = True):
        super(CompressorModule, self).__init__()  # skips CompressorModule.__init__: there is no frozen backbone here
        self.save_hyperparameters()  # under LightningCLI also records the class path, so `--ckpt_path` resumes
        from collections import Counter

        if init_from is None:
            folder = Path(tempfile.mkdtemp(prefix="refbench-teacher-init-"))
            build_teacher(folder, seed=init_seed, **(arch or {}))
        else:
            folder = Path(init_from)
        backbone = load(folder)
        if init_from is None:
            shutil.rmtree(folder, ignore_errors=True)
        object.__setattr__(self, "_backbone", backbone)
        self.model = backbone.model  # the HF model: registered, trained and checkpointed
        self.model.requires_grad_(True)
        if batched_vision_attention:  # this instance only: the exported model keeps the library's forward
            import functools

            for block in self.model.model.visual.blocks:
                block.attn.forward = functools.partial(batched_window_attention, block.attn)
        self.letters = letter_ids(backbone.tokenizer)
        hidden = backbone.model.config.text_config.hidden_size
        self.aux_head = torch.nn.Linear(hidden, len(AUX_COLORS) + len(AUX_SHAPES) + len(AUX_MOTIONS) + 3) if aux_weight > 0 else None
        self.skipped: Counter = Counter()
        self._fit_started = None  # perf_counter() at which the elapsed training time was 0
        self._train_device: str | None = None  # set at fit start: on_fit_end runs after the module is moved back to the CPU
        self._resumed_elapsed = 0.0  # training seconds of earlier jobs (from the checkpoint)
        self._val_by_type: dict[str, list[int]] = {}  # qtype -> [correct, total] of the current validation

    # ------------------------------------------------------------------ helpers
    def _targets(self, batch: VideoBatch) -> torch.Tensor:
        return torch.tensor([self.letters[LETTERS.index(a)] for a in batch.answers], device=self.device)

    def _dropout_selection(self, batch: VideoBatch, visual):
        """A Selection that prunes some samples (evidence ∪ random fillers, or random only); None keeps all."""
        hp = self.hparams
        if hp.drop_prob <= 0:
            return None
        m = visual.num_tokens
        picks, pruned = [], False
        for b in range(batch.size):
            if torch.rand(()) >= hp.drop_prob:
                picks.append(torch.arange(m))
                continue
            pruned = True
            lo, hi = hp.drop_range
            keep = max(1, int(round(m * (lo + (hi - lo) * float(torch.rand(()))))))
            chosen = set(torch.randperm(m)[:keep].tolist())
            qtype = (batch.meta[b] or {}).get("qtype")
            keep_evidence = bool(torch.rand(()) < hp.evidence_prob)  # drawn for every sample: the same random stream as before the rule
            if keep_evidence or qtype in ANSWER_NEEDS_ALL_EVIDENCE:
                evidence = [int(i) for i in (batch.meta[b] or {}).get("evidence_tokens", []) if int(i) < m]
                chosen = set(evidence) | set(list(chosen)[: max(0, keep - len(evidence))])
            picks.append(torch.tensor(sorted(chosen), dtype=torch.long))
        return selection_from_indices(picks, visual.tokens.device) if pruned else None

    def answer_logits(self, batch: VideoBatch, selection_fn=None, with_visual: bool = False):
        """Full-vocabulary next-token logits ``[B, V]`` at the answer position (with autograd)."""
        visual = encode_video_with_grad(self.backbone, batch)
        selection = selection_fn(batch, visual) if selection_fn is not None else None
        if not with_visual:
            return self.backbone(batch, visual, selection)
        if not self.hparams.attn_weight:
            return self.backbone(batch, visual, selection), visual, None
        # the adapter's forward, with a hook on the reference layer (same inputs, same positions)
        embeds, mask, positions, spans = self.backbone.lm_inputs(batch, visual, selection)
        layer = self.backbone.language_model.layers[self.hparams.attn_layer]
        captured: dict = {}

        def hook(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rope"] = kwargs["position_embeddings"]

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        attn_loss = self._evidence_attention_loss(batch, layer, captured, spans, selection)
        return out.logits[:, -1], visual, attn_loss

    def _evidence_attention_loss(self, batch: VideoBatch, layer, captured: dict, spans, selection) -> torch.Tensor | None:
        import sys

        attn = layer.self_attn
        hf = sys.modules[type(attn).__module__]
        h = layer.input_layernorm(captured["hidden"])
        bsz, length, _ = h.shape
        q = attn.q_proj(h[:, -1:]).view(bsz, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = captured["rope"]
        q, _ = hf.apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:]) if cos.dim() == 3 else hf.apply_rotary_pos_emb(q, q, cos[..., -1:, :], sin[..., -1:, :])
        _, k = hf.apply_rotary_pos_emb(k, k, cos, sin)
        k = hf.repeat_kv(k, attn.num_key_value_groups)
        logit = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, L]
        losses = []
        for b, (pad, vs, kept, _ts) in enumerate(spans):
            evidence = [int(i) for i in (batch.meta[b] or {}).get("evidence_tokens", [])]
            if not evidence:
                continue
            if selection is None:
                cols = torch.tensor(evidence, device=h.device)
            else:
                index = selection.index[b][: kept] if selection.valid is None else selection.index[b][selection.valid[b]]
                hit = torch.isin(index, torch.tensor(evidence, device=index.device))
                cols = hit.nonzero().squeeze(1)
                if cols.numel() == 0:
                    continue
            # first half of the heads: the whole row (read the evidence alone); second half:
            # renormalised over the visual tokens — where to look among them is supervised, how
            # much to look at them against the text tokens is free (a count is read from that)
            half = max(1, logit.shape[1] // 2)
            in_row = (vs - pad) + cols  # evidence columns of the unpadded row
            row = logit[b, :half, pad:].softmax(-1).mean(0)[in_row].sum()
            loss = -torch.log(row + 1e-6)
            if logit.shape[1] > half:
                if self.hparams.count_sink and (batch.meta[b] or {}).get("qtype") == "count":
                    # counting heads: uniform over the n evidence tokens and <|vision_start|> (a
                    # sink, the column before the first visual token), so the share the sink
                    # keeps, 1 / (n + 1), carries the count
                    logp = logit[b, half:, pad:].log_softmax(-1)
                    second = -torch.cat([logp[:, vs - 1 - pad, None], logp[:, in_row]], 1).mean()
                else:
                    second = -torch.log(logit[b, half:, vs : vs + kept].softmax(-1).mean(0)[cols].sum() + 1e-6)
                loss = 0.5 * (loss + second)
            losses.append(loss)
        return torch.stack(losses).mean() if losses else None

    def aux_loss(self, batch: VideoBatch, visual) -> torch.Tensor:
        """Sum of the CEs of the per-token colour, shape and motion labels (see ``aux_weight``)."""
        labels = torch.stack([token_labels(m or {}, visual.grid) for m in batch.meta]).to(self.device)  # [B, M, 3]
        out = self.aux_head(visual.tokens.float())
        loss, lo = out.new_zeros(()), 0
        for k, names in enumerate((AUX_COLORS, AUX_SHAPES, AUX_MOTIONS)):
            n = len(names) + 1
            loss = loss + F.cross_entropy(out[..., lo : lo + n].reshape(-1, n), labels[..., k].reshape(-1))
            lo += n
        return loss

    # ------------------------------------------------------------------ loops
    def elapsed_seconds(self) -> float:
        """Training wall time so far, earlier jobs of a resumed run included (seconds)."""
        return time.perf_counter() - self._fit_started if self._fit_started is not None else self._resumed_elapsed

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter() - self._resumed_elapsed
        self._train_device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        self.model.train()  # the backbone loader left it in eval mode (no dropout either way)

    def on_validation_start(self) -> None:
        pass

    def on_test_start(self) -> None:
        pass

    def _answer_loss(self, batch: VideoBatch, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Answer CE over the batch, weighted per question type by ``qtype_weights``."""
        hp = self.hparams
        ce = F.cross_entropy(logits.float(), target, label_smoothing=hp.label_smoothing, reduction="none")
        if not hp.qtype_weights:
            return ce.mean()
        weights = torch.tensor([float(hp.qtype_weights.get((m or {}).get("qtype"), 1.0)) for m in batch.meta], device=ce.device)
        return (weights * ce).sum() / weights.sum().clamp_min(1e-9)

    def training_step(self, batch: VideoBatch, batch_idx: int):
        if self._count_skipped(batch):
            return None
        logits, visual, attn_loss = self.answer_logits(batch, self._dropout_selection, with_visual=True)
        target = self._targets(batch)
        loss = self._answer_loss(batch, logits, target)
        if attn_loss is not None:
            self.log("train/attn", attn_loss, batch_size=batch.size)
            loss = loss + self.hparams.attn_weight * attn_loss
        if self.aux_head is not None:
            aux = self.aux_loss(batch, visual)
            self.log("train/aux", aux, batch_size=batch.size)
            loss = loss + self.hparams.aux_weight * aux
        acc = (logits[:, self.letters].argmax(-1) == torch.tensor([LETTERS.index(a) for a in batch.answers], device=self.device)).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size)
        self.log("train/acc", acc, prog_bar=True, batch_size=batch.size)
        self._report(float(loss.detach()), float(acc))
        return loss

    def _report(self, loss: float, acc: float, every: int = 50) -> None:
        """A plain progress line every ``every`` steps (readable in a redirected log)."""
        sums = self.__dict__.setdefault("_running", [0.0, 0.0, 0])
        sums[0] += loss
        sums[1] += acc
        sums[2] += 1
        step = self.global_step + 1
        if step % every == 0 and self.trainer is not None and self.trainer.is_global_zero:
            elapsed = self.elapsed_seconds()
            print(f"[teacher] step {step} loss {sums[0] / sums[2]:.4f} acc {sums[1] / sums[2]:.3f} elapsed {elapsed / 60:.1f} min", flush=True)
            sums[:] = [0.0, 0.0, 0]

    def on_validation_epoch_start(self) -> None:
        self._val_by_type = {}

    def _val_totals(self) -> tuple[int, int]:
        """(correct, total) of the current (or last) validation, over every question type."""
        return sum(c for c, _ in self._val_by_type.values()), sum(n for _, n in self._val_by_type.values())

    def validation_step(self, batch: VideoBatch, batch_idx: int):
        if batch.size == 0:
            return None
        with torch.no_grad():
            logits = self.answer_logits(batch)
        loss = F.cross_entropy(logits.float(), self._targets(batch))
        pred = logits[:, self.letters].argmax(-1)
        truth = torch.tensor([LETTERS.index(a) for a in batch.answers], device=self.device)
        for meta, hit in zip(batch.meta, (pred == truth).tolist()):
            counts = self._val_by_type.setdefault((meta or {}).get("qtype") or "?", [0, 0])
            counts[0] += int(hit)
            counts[1] += 1
        self.log("val/loss", loss, batch_size=batch.size, sync_dist=True)
        self.log("val/acc", (pred == truth).float().mean(), prog_bar=True, batch_size=batch.size, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        correct, total = self._val_totals()
        if total and self.trainer is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            by_type = " ".join(f"{q} {c / n:.2f}" for q, (c, n) in sorted(self._val_by_type.items()))
            print(f"[teacher] step {self.global_step} val acc {correct / total:.4f} ({total} samples) | {by_type}", flush=True)

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.98))
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0 else 10000

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            frac = min(1.0, max((step - hp.warmup_steps) / max(1, total - hp.warmup_steps), self._time_fraction()))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _time_fraction(self) -> float:
        """Share of ``time_budget_min`` spent since the end of warm-up (0 without a budget)."""
        budget = self.hparams.time_budget_min
        warm = self.__dict__.get("_warm_at")  # elapsed seconds at the end of warm-up
        if not budget or warm is None:
            return 0.0
        return (self.elapsed_seconds() - warm) / max(1e-9, 60 * budget - warm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step >= self.hparams.warmup_steps and "_warm_at" not in self.__dict__:
            self._warm_at = self.elapsed_seconds()
        budget = self.hparams.time_budget_min
        if budget and self._fit_started is not None and self.elapsed_seconds() >= 60 * budget:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokensieve"] = {"teacher": True, "arch": dict(self.hparams.arch or {}), "elapsed_s": self.elapsed_seconds(), "warm_at_s": self.__dict__.get("_warm_at")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        record = checkpoint.get("tokensieve") or {}
        self._resumed_elapsed = float(record.get("elapsed_s") or 0.0)
        if record.get("warm_at_s") is not None:
            self._warm_at = float(record["warm_at_s"])

    def on_fit_end(self) -> None:
        hp = self.hparams
        if not hp.export_dir or self.trainer is None or not self.trainer.is_global_zero:
            return
        out = save_teacher(self.model, self.backbone.tokenizer, hp.export_dir)
        params = sum(p.numel() for p in self.model.parameters())
        val_correct, val_total = self._val_totals()
        card = {
            "what": "reference teacher of the tokensieve refbench (Qwen2.5-VL architecture, trained from scratch)",
            "hyper_parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(hp).items()},
            "parameters": params,
            "global_step": int(self.trainer.global_step),
            "train_seconds": round(self.elapsed_seconds(), 1) if self._fit_started is not None else None,
            "device": self._train_device or self.device.type,
            "val_acc": val_correct / val_total if val_total else None,
            "val_samples": val_total,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        config = getattr(self.trainer, "_tokensieve_config", None)
        if config is not None:
            card["config"] = config
        (out / "teacher_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
