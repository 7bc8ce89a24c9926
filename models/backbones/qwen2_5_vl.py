"""Frozen Qwen2.5-VL backbone (``Qwen2_5_VLForConditionalGeneration``) with exact pruned prefill.

Positions follow one rule: the backbone's own M-RoPE ids are computed on the **full**
sequence with ``model.model.get_rope_index`` (``mm_token_type_ids`` = 2 on video tokens,
``second_per_grid_ts`` from the frame timestamps), then the kept tokens' ids are gathered.
Nothing is renumbered: text after the video keeps its original positions too, so the
keep-all selection reproduces the unpruned model exactly.

Source: Qwen2.5-VL (arXiv 2502.13923), transformers ``modeling_qwen2_5_vl.py`` (5.23).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones.base import Backbone
from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor
from tokensieve.models.backbones.tiny import QWEN_VL_CHAT_TEMPLATE
from tokensieve.models.types import Query, Selection, TeacherSignals, VisualTokens


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the reference layer's input is captured."""


@dataclass
class _Layout:
    """One sample's full, unpruned LLM sequence."""

    input_ids: torch.Tensor  # long [L]
    positions: torch.Tensor  # long [3, L] — M-RoPE ids from get_rope_index
    video_start: int  # index of the first video token
    num_visual: int  # M

    @property
    def text_start(self) -> int:
        """First token after ``<|vision_end|>``: the question and the assistant prompt."""
        return self.video_start + self.num_visual + 1


class Qwen25VLBackbone(Backbone):
    """Frozen Qwen2.5-VL seen through tokensieve's types.

    Args:
        model: a loaded ``Qwen2_5_VLForConditionalGeneration``.
        tokenizer: its tokenizer (chat template falls back to Qwen2.5-VL's if missing).
        preprocessor: patchify/normalise settings.
        reference_layer: default LLM layer whose text→video attention is the teacher signal.
    """

    family = "qwen2_5_vl"

    def __init__(self, model, tokenizer, preprocessor: QwenVisionPreprocessor, reference_layer: int | None = None, name_or_path: str = "", revision: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.name_or_path, self.revision = name_or_path, revision
        text_cfg = model.config.text_config
        self.num_layers = text_cfg.num_hidden_layers
        self.reference_layer = reference_layer if reference_layer is not None else self.num_layers // 2
        self.video_token_id = model.config.video_token_id
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None, revision: str | None = None, reference_layer: int | None = None) -> Qwen25VLBackbone:
        """Load weights, tokenizer and preprocessor settings from a local folder or hub id.

        ``dtype`` and ``attn_implementation`` ("eager", "sdpa", "flash_attention_2") pass
        through to ``from_pretrained``. ``trust_remote_code`` is never set.
        """
        kwargs = {"revision": revision}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(name_or_path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=["*preprocessor_config.json"]))
        return cls(model, tokenizer, QwenVisionPreprocessor.from_pretrained(folder), reference_layer, str(name_or_path), revision)

    # ------------------------------------------------------------------ layout
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @functools.lru_cache(maxsize=4096)
    def _prompt_ids(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids before and after the single ``<|video_pad|>`` of the chat prompt."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        template = self.tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        prefix, sep, suffix = text.partition("<|video_pad|>")
        if not sep:
            raise ValueError("chat template produced no <|video_pad|> placeholder")
        enc = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return tuple(enc(prefix)), tuple(enc(suffix))

    def _layouts(self, batch: VideoBatch, visual: VisualTokens) -> list[_Layout]:
        grid_thw, sec_per_grid = visual.cache["grid_thw"], visual.cache["second_per_grid_ts"]
        out = []
        for b, question in enumerate(batch.questions):
            prefix, suffix = self._prompt_ids(question)
            m = int(visual.valid[b].sum())
            ids = torch.tensor([*prefix, *([self.video_token_id] * m), *suffix], dtype=torch.long)
            types = torch.zeros_like(ids, dtype=torch.int)
            types[len(prefix) : len(prefix) + m] = 2
            pos, _ = self.model.model.get_rope_index(
                ids[None], types[None], video_grid_thw=grid_thw[b : b + 1].cpu(), second_per_grid_ts=sec_per_grid[b : b + 1].cpu()
            )
            out.append(_Layout(ids, pos[:, 0], len(prefix), m))
        return out

    # ------------------------------------------------------------------ vision
    @torch.no_grad()
    def encode_video(self, batch: VideoBatch, saliency: bool = False) -> VisualTokens:
        """Run the vision tower + merger.

        Args:
            batch: ``frames uint8 [B, T, H, W, 3]`` (H, W multiples of 28), ``timestamps [B, T]`` seconds.
            saliency: also return the attention each token receives in the last
                full-attention vision block (``VisualTokens.saliency``).

        Returns:
            VisualTokens with ``tokens [B, M, D]``, M-RoPE ``positions [3, B, M]`` of the full
            sequence, ``frame_index [B, M]`` (temporal-patch group), ``grid`` (t, h/2, w/2).
        """
        pixel_values, grids = zip(*(self.preprocessor(f) for f in batch.frames.cpu()))
        grid_thw = torch.tensor(grids, dtype=torch.long)
        visual_model = self.model.model.visual
        pixels = torch.cat(pixel_values).to(self.device, visual_model.dtype)
        recorder = _SaliencyRecorder(visual_model, grid_thw) if saliency else None
        try:
            feats = self.model.model.get_video_features(pixels, grid_thw.to(self.device)).pooler_output
        finally:
            if recorder is not None:
                recorder.remove()
        tokens = torch.stack(list(feats))  # one resize per batch, so every sample has the same M
        b, m, _ = tokens.shape
        merge = self.preprocessor.merge_size
        grid = (int(grid_thw[0, 0]), int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge)
        # seconds per temporal patch, as the HF processor computes it: temporal_patch_size / sampling fps
        ts = batch.timestamps.double().cpu()
        step = (ts[:, -1] - ts[:, 0]) / max(ts.shape[1] - 1, 1) if ts.shape[1] > 1 else torch.ones(b, dtype=torch.double)
        step = torch.where(step > 0, step, torch.ones_like(step))
        sec_per_grid = (self.preprocessor.temporal_patch_size * step).float()
        visual = VisualTokens(
            tokens=tokens,
            valid=torch.ones(b, m, dtype=torch.bool, device=tokens.device),
            positions=torch.zeros(3, b, m, dtype=torch.long, device=tokens.device),
            frame_index=(torch.arange(m, device=tokens.device) // (grid[1] * grid[2])).expand(b, -1).clone(),
            grid=grid,
            saliency=recorder.saliency(b, m).to(tokens.device) if recorder is not None else None,
            cache={"grid_thw": grid_thw, "second_per_grid_ts": sec_per_grid},
        )
        layouts = self._layouts(batch, visual)
        visual.positions = torch.stack([lay.positions[:, lay.video_start : lay.video_start + m] for lay in layouts], dim=1).to(tokens.device)
        return visual

    # ------------------------------------------------------------------ text side
    def embed_query(self, batch: VideoBatch, visual: VisualTokens) -> Query:
        """Embeddings of the tokens after ``<|vision_end|>`` (question + assistant prompt).

        Returns:
            Query with ``embeds [B, Q, D]`` (right-padded), ``mask [B, Q]`` and M-RoPE
            ``positions [3, B, Q]`` of those tokens in the full sequence.
        """
        layouts = self._layouts(batch, visual)
        q = max(len(lay.input_ids) - lay.text_start for lay in layouts)
        embed = self.model.get_input_embeddings()
        d = embed.embedding_dim
        embeds = torch.zeros(len(layouts), q, d, device=self.device, dtype=embed.weight.dtype)
        mask = torch.zeros(len(layouts), q, dtype=torch.bool, device=self.device)
        positions = torch.zeros(3, len(layouts), q, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for b, lay in enumerate(layouts):
                ids = lay.input_ids[lay.text_start :].to(self.device)
                embeds[b, : len(ids)] = embed(ids)
                mask[b, : len(ids)] = True
                positions[:, b, : len(ids)] = lay.positions[:, lay.text_start :]
        return Query(embeds=embeds, mask=mask, positions=positions)

    def lm_inputs(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None):
        """Assemble the (pruned) LLM input, left-padded.

        Returns:
            ``(inputs_embeds [B, L, D], attention_mask long [B, L], position_ids long [3, B, L],
            spans)`` where ``spans[b] = (pad, video_start, kept, text_start)`` locates sample b's
            pieces in the padded row. Kept visual tokens carry their original positions.
        """
        layouts = self._layouts(batch, visual)
        embed = self.model.get_input_embeddings()
        kept = selection.gather(visual) if selection is not None else visual.tokens
        kept_pos = selection.gather_positions(visual) if selection is not None else visual.positions
        rows, pos_rows, spans = [], [], []
        for b, lay in enumerate(layouts):
            if selection is None:
                keep = visual.valid[b]
            else:
                keep = selection.valid[b] if selection.valid is not None else torch.ones_like(selection.index[b], dtype=torch.bool)
            text = embed(lay.input_ids.to(self.device))
            vs, ts = lay.video_start, lay.text_start - 1  # ts: index of <|vision_end|>
            rows.append(torch.cat([text[:vs], kept[b][keep].to(text.dtype), text[ts:]]))
            lp = lay.positions.to(self.device)
            pos_rows.append(torch.cat([lp[:, :vs], kept_pos[:, b][:, keep], lp[:, ts:]], dim=1))
            spans.append((vs, int(keep.sum())))
        length = max(r.shape[0] for r in rows)
        bsz, d = len(rows), rows[0].shape[-1]
        embeds = rows[0].new_zeros(bsz, length, d)
        mask = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        positions = torch.ones(3, bsz, length, dtype=torch.long, device=self.device)
        out_spans = []
        for b, (row, pos) in enumerate(zip(rows, pos_rows)):
            pad = length - row.shape[0]
            embeds[b, pad:] = row
            mask[b, pad:] = 1
            positions[:, b, pad:] = pos
            vs, k = spans[b]
            out_spans.append((pad, pad + vs, k, pad + vs + k + 1))
        return embeds, mask, positions, out_spans

    def forward(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None) -> torch.Tensor:
        """Next-token logits ``float [B, V]`` at the last prompt position (the answer's first token).

        ``selection=None`` (or keep-all) equals the unpruned model. Gradients flow into
        ``selection.weights`` / merged ``selection.tokens`` when present.
        """
        embeds, mask, positions, _ = self.lm_inputs(batch, visual, selection)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1]

    # ------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_signals(self, batch: VideoBatch, visual: VisualTokens, layer: int | None = None, reduction: str = "max", with_logits: bool = True) -> TeacherSignals:
        """Text→video attention at LLM ``layer``, recomputed from that layer's own q/k projections.

        The input of decoder layer ``layer`` is captured by a hook; q and k are recomputed
        (input RMSNorm → q_proj/k_proj → the model's M-RoPE cos/sin → GQA repeat), and a causal
        softmax over all keys is taken for every text row after ``<|vision_end|>``. The video
        columns are reduced over heads and text rows by ``reduction`` ("max" — FlexSelect's
        default — or "mean"). Works under sdpa / flash attention: no eager weights needed.

        Returns:
            TeacherSignals with ``attention float [B, M]`` (0 at padding) and, when
            ``with_logits``, next-token ``logits [B, V]`` of the full sequence.

        Raises:
            ValueError: ``layer`` out of range or unknown ``reduction``.
        """
        layer = self.reference_layer if layer is None else layer
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"reference layer {layer} out of range [0, {self.num_layers})")
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        embeds, mask, positions, spans = self.lm_inputs(batch, visual, None)
        decoder = self.language_model.layers[layer]
        captured = {}

        def hook(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rope"] = kwargs["position_embeddings"]
            if not with_logits:
                raise _StopForward

        handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
        logits = None
        try:
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False)
            logits = out.logits[:, -1]
        except _StopForward:
            pass
        finally:
            handle.remove()
        attn = decoder.self_attn
        h = decoder.input_layernorm(captured["hidden"])
        bsz, length, _ = h.shape
        q = attn.q_proj(h).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = captured["rope"]
        q, k = hf_qwen.apply_rotary_pos_emb(q, k, cos, sin)
        k = hf_qwen.repeat_kv(k, attn.num_key_value_groups)
        m = visual.num_tokens
        scores = torch.zeros(bsz, m, device=h.device, dtype=torch.float32)
        for b, (pad, vs, kept, ts) in enumerate(spans):
            rows = torch.arange(ts, length, device=h.device)
            logit = (q[b, :, ts:].float() @ k[b].float().transpose(-1, -2)) * attn.scaling  # [H, S, L]
            cols = torch.arange(length, device=h.device)
            allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= pad)  # causal, no left padding
            probs = logit.masked_fill(~allowed, float("-inf")).softmax(dim=-1)[:, :, vs : vs + kept]  # [H, S, M]
            reduced = probs.amax(dim=(0, 1)) if reduction == "max" else probs.mean(dim=(0, 1))
            scores[b, :kept] = reduced
        return TeacherSignals(attention=scores, logits=logits)


class _SaliencyRecorder:
    """Attention received per merged token in the last full-attention vision block.

    Hooks the block's attention input, recomputes q/k with the vision RoPE, takes the
    softmax within each frame (the block's ``cu_seqlens`` chunks), averages over heads and
    query patches, then over the ``merge²`` patches of each LLM token, and undoes the
    window permutation so the result is in the merger's output order.
    """

    def __init__(self, visual_model: nn.Module, grid_thw: torch.Tensor):
        self.visual_model, self.grid_thw = visual_model, grid_thw
        block = visual_model.blocks[max(visual_model.fullatt_block_indexes)]
        self.attn = block.attn
        self.captured: dict = {}
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.captured = {"hidden": args[0] if args else kwargs["hidden_states"], **kwargs}

    def remove(self) -> None:
        self.handle.remove()

    def saliency(self, b: int, m: int) -> torch.Tensor:
        attn, hidden = self.attn, self.captured["hidden"]
        n = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = self.captured["position_embeddings"]
        q, k = hf_qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        bounds = self.captured["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qc, kc = q[start:end].transpose(0, 1).float(), k[start:end].transpose(0, 1).float()  # [H, n, hd]
            probs = (qc @ kc.transpose(-1, -2) * attn.scaling).softmax(-1)  # [H, n, n]
            received[start:end] = probs.mean(dim=(0, 1))
        unit = self.visual_model.spatial_merge_unit
        window_index, _ = hf_qwen.get_vision_window_index(
            self.grid_thw.to(hidden.device),
            spatial_merge_size=self.visual_model.spatial_merge_size,
            window_size=self.visual_model.window_size,
            patch_size=self.visual_model.patch_size,
            kwargs={},
        )
        per_token = received.view(-1, unit).mean(-1)[torch.argsort(window_index)]
        return per_token.view(b, m)
