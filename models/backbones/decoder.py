"""The LLM side shared by every adapter: sequence layout, pruned prefill, generate, teacher.

One sample's full sequence is ``prefix · M visual tokens · suffix`` where the suffix starts
with exactly one *template* token that is always kept (Qwen's ``<|vision_end|>``, LLaVA's
``image_newline``), followed by the question and the assistant prompt. An adapter supplies
the layout (token ids and the position ids of the **full** sequence) and its vision side;
this class gathers kept tokens, left-pads a batch, and never renumbers a position.

Positions, in one rule (REFERENCES.md): compute position ids on the full sequence, gather
the kept ones. Position ids are held as ``long [P, L]`` per sample (P = 3 for M-RoPE, 1 for
1-D RoPE) and handed to the model as ``[3, B, L]`` or ``[B, L]``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones.base import Backbone
from tokensieve.models.backbones.generation import decode
from tokensieve.models.backbones.teacher import capture_layer, text_to_video_attention
from tokensieve.models.types import Query, Selection, TeacherSignals, VisualTokens


@dataclass
class Layout:
    """One sample's full, unpruned LLM sequence.

    Attributes:
        input_ids: ``long [L]`` — as the HF processor would produce them (visual slots hold
            the video placeholder id).
        positions: ``long [P, L]`` — the model's own position ids of the full sequence.
        video_start: index of the first visual token.
        num_visual: M.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    video_start: int
    num_visual: int

    @property
    def template_index(self) -> int:
        """Index of the always-kept template token right after the visual tokens."""
        return self.video_start + self.num_visual

    @property
    def text_start(self) -> int:
        """First token after the template token: the question and the assistant prompt."""
        return self.video_start + self.num_visual + 1

    @property
    def next_position(self) -> int:
        """Position id of the first generated token: the full sequence's max position + 1."""
        return int(self.positions.max()) + 1


class DecoderBackbone(Backbone):
    """Shared LLM-side implementation; adapters add ``encode_video`` and the layout.

    Subclasses set ``model_class`` (the HF ``*ForConditionalGeneration``),
    ``video_placeholder`` (the string the chat template emits for a video),
    ``default_chat_template`` (used when the tokenizer has none), and implement
    :meth:`_load_preprocessor`, :meth:`encode_video` and :meth:`_layouts`.

    Args:
        model: the loaded HF model.
        tokenizer: its tokenizer.
        preprocessor: frames → pixel values (adapter-specific).
        reference_layer: default LLM layer of the teacher signal (middle layer if None).
        name_or_path, revision: identify the weights.
    """

    family: ClassVar[str] = ""  # the config's model_type
    model_class: ClassVar[type]
    video_placeholder: ClassVar[str]
    default_chat_template: ClassVar[str]
    preprocessor_files: ClassVar[tuple[str, ...]] = ("video_preprocessor_config.json", "preprocessor_config.json")

    def __init__(self, model, tokenizer, preprocessor, reference_layer: int | None = None, name_or_path: str = "", revision: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.name_or_path, self.revision = name_or_path, revision
        self.num_layers = model.config.text_config.num_hidden_layers
        self.reference_layer = reference_layer if reference_layer is not None else self.num_layers // 2
        self._check_layer(self.reference_layer)
        self.video_token_id = model.config.video_token_id
        self._prompt_cache: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.freeze()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None, revision: str | None = None, reference_layer: int | None = None):
        """Load weights, tokenizer and preprocessor settings from a local folder or hub id.

        ``dtype`` (a ``torch.dtype`` or its name) and ``attn_implementation`` ("eager", "sdpa",
        "flash_attention_2") pass through to ``from_pretrained``; ``trust_remote_code`` is
        never set.

        Raises:
            ValueError: the folder's config is not this adapter's ``model_type``.
        """
        from transformers import AutoConfig, AutoTokenizer

        model_type = AutoConfig.from_pretrained(str(name_or_path), revision=revision).model_type
        if model_type != cls.family:
            raise ValueError(f"{name_or_path}: config.json has model_type {model_type!r}, but {cls.__name__} loads {cls.family!r}; use tokensieve.models.backbones.load")
        kwargs = {"revision": revision}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = cls.model_class.from_pretrained(str(name_or_path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=["*preprocessor_config.json"]))
        return cls(model, tokenizer, cls._load_preprocessor(folder, model.config), reference_layer, str(name_or_path), revision)

    @classmethod
    def _load_preprocessor(cls, folder: Path, config):
        raise NotImplementedError

    # ------------------------------------------------------------------ layout
    @property
    def language_model(self):
        """The decoder stack (``model.model.language_model``) — what LoRA wraps."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"reference layer {layer} out of range [0, {self.num_layers})")

    def _prompt_ids(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids before and after the video placeholder of the chat prompt (placeholder excluded; cached per question)."""
        cached = self._prompt_cache.get(question)
        if cached is not None:
            return cached
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        template = self.tokenizer.chat_template or self.default_chat_template
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
        prefix, sep, suffix = text.partition(self.video_placeholder)
        if not sep:
            raise ValueError(f"chat template produced no {self.video_placeholder} placeholder")
        enc = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        if len(self._prompt_cache) >= 4096:
            self._prompt_cache.clear()
        self._prompt_cache[question] = (tuple(enc(prefix)), tuple(enc(suffix)))
        return self._prompt_cache[question]

    def _layouts(self, batch: VideoBatch, visual: VisualTokens) -> list[Layout]:
        raise NotImplementedError

    def _embed_layout(self, layout: Layout) -> torch.Tensor:
        """Input embeddings ``[L, D]`` of a layout's non-visual tokens (visual rows are replaced later)."""
        return self.model.get_input_embeddings()(layout.input_ids.to(self.device))

    # ------------------------------------------------------------------ text side
    def embed_query(self, batch: VideoBatch, visual: VisualTokens) -> Query:
        """Embeddings of the tokens after the template token (question + assistant prompt).

        Returns:
            Query with ``embeds [B, Q, D]`` (right-padded), ``mask [B, Q]`` and ``positions``
            (``[3, B, Q]`` M-RoPE or ``[B, Q]``) of those tokens in the full sequence.
        """
        layouts = self._layouts(batch, visual)
        q = max(len(lay.input_ids) - lay.text_start for lay in layouts)
        embed = self.model.get_input_embeddings()
        p = layouts[0].positions.shape[0]
        embeds = torch.zeros(len(layouts), q, embed.embedding_dim, device=self.device, dtype=embed.weight.dtype)
        mask = torch.zeros(len(layouts), q, dtype=torch.bool, device=self.device)
        positions = torch.zeros(p, len(layouts), q, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for b, lay in enumerate(layouts):
                ids = lay.input_ids[lay.text_start :].to(self.device)
                embeds[b, : len(ids)] = embed(ids)
                mask[b, : len(ids)] = True
                positions[:, b, : len(ids)] = lay.positions[:, lay.text_start :]
        return Query(embeds=embeds, mask=mask, positions=positions if p == 3 else positions[0])

    def lm_inputs(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None):
        """Assemble the (pruned) LLM input, left-padded.

        Returns:
            ``(inputs_embeds [B, L, D], attention_mask long [B, L], position_ids, spans)`` where
            ``position_ids`` is ``long [3, B, L]`` (M-RoPE) or ``long [B, L]`` (1-D) and
            ``spans[b] = (pad, video_start, kept, text_start)`` locates sample b's pieces in
            the padded row. Kept visual tokens carry their original positions; the template
            token and the text keep theirs too (nothing is renumbered).
        """
        layouts = self._layouts(batch, visual)
        kept = selection.gather(visual) if selection is not None else visual.tokens
        kept_pos = selection.gather_positions(visual) if selection is not None else visual.positions
        if kept_pos.dim() == 2:
            kept_pos = kept_pos[None]
        rows, pos_rows, counts = [], [], []
        for b, lay in enumerate(layouts):
            if selection is None:
                keep = visual.valid[b]
            else:
                keep = selection.valid[b] if selection.valid is not None else torch.ones_like(selection.index[b], dtype=torch.bool)
            text = self._embed_layout(lay)
            vs, tt = lay.video_start, lay.template_index
            rows.append(torch.cat([text[:vs], kept[b][keep].to(text.dtype), text[tt:]]))
            lp = lay.positions.to(self.device)
            pos_rows.append(torch.cat([lp[:, :vs], kept_pos[:, b].to(self.device)[:, keep], lp[:, tt:]], dim=1))
            counts.append(int(keep.sum()))
        length = max(r.shape[0] for r in rows)
        bsz, d, p = len(rows), rows[0].shape[-1], pos_rows[0].shape[0]
        embeds = rows[0].new_zeros(bsz, length, d)
        mask = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        positions = torch.ones(p, bsz, length, dtype=torch.long, device=self.device)
        spans = []
        for b, (row, pos, lay) in enumerate(zip(rows, pos_rows, layouts)):
            pad = length - row.shape[0]
            embeds[b, pad:] = row
            mask[b, pad:] = 1
            positions[:, b, pad:] = pos
            spans.append((pad, pad + lay.video_start, counts[b], pad + lay.video_start + counts[b] + 1))
        return embeds, mask, positions if p == 3 else positions[0], spans

    def forward(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None) -> torch.Tensor:
        """Next-token logits ``float [B, V]`` at the last prompt position (the answer's first token).

        ``selection=None`` (or keep-all) equals the unpruned model. Gradients flow into
        ``selection.weights`` / merged ``selection.tokens`` (and LoRA adapters) when present.
        """
        embeds, mask, positions, _ = self.lm_inputs(batch, visual, selection)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1]

    def forward_in_llm(self, batch: VideoBatch, visual: VisualTokens, compressor, budget) -> tuple[torch.Tensor, Selection]:
        """Prune *inside* the LLM at layer K = ``compressor.layer`` (FastV-style), keeping positions.

        Layers ``0 .. K-1`` run on the full sequence. The last prompt token's attention to the
        video at layer ``K-1`` (recomputed from that layer's q/k, mean over heads) is handed to
        ``compressor(visual, query, budget, attention=...)``; layers ``K ..`` then see only the
        kept visual tokens, carrying the hidden states and original position ids they had in
        the full sequence. Implemented as two forward passes: the second runs the pruned
        sequence with layer K's input replaced by the gathered full-sequence states, so its
        layers ``< K`` are recomputed and discarded (wasted work that a fused kernel would
        skip: measured times of in-LLM methods are upper bounds).

        Returns:
            ``(logits [B, V], selection)`` — next-token logits at the answer position.

        Raises:
            ValueError: ``compressor.layer`` not in ``[1, num_layers)``.
        """
        k = int(compressor.layer)
        if not 1 <= k < self.num_layers:
            raise ValueError(f"in-LLM pruning layer K={k} must be in [1, {self.num_layers})")
        embeds, mask, positions, spans = self.lm_inputs(batch, visual, None)

        def run_full():
            return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)

        captured, _ = capture_layer(run_full, self.language_model.layers[k - 1], need_output=True, stop_early=True)
        attention = text_to_video_attention(self.language_model.layers[k - 1], captured["hidden"], captured["rope"], spans, visual.num_tokens, "mean", rows="last")
        query = self.embed_query(batch, visual) if compressor.needs_query else None
        selection = compressor(visual, query, budget=budget, attention=attention)
        embeds2, mask2, positions2, spans2 = self.lm_inputs(batch, visual, selection)
        hidden_k = captured["output"]
        gathered = torch.zeros_like(embeds2, dtype=hidden_k.dtype)
        for b, ((pad, vs, m, _), (pad2, vs2, kept, _)) in enumerate(zip(spans, spans2)):
            index = selection.index[b] if selection.valid is None else selection.index[b][selection.valid[b]]
            source = torch.cat([torch.arange(pad, vs, device=self.device), vs + index.to(self.device), torch.arange(vs + m, embeds.shape[1], device=self.device)])
            gathered[b, pad2:] = hidden_k[b, source]

        def replace_input(module, args, kwargs):
            if args:
                return (gathered, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": gathered}

        handle = self.language_model.layers[k].register_forward_pre_hook(replace_input, with_kwargs=True)
        try:
            out = self.model(inputs_embeds=embeds2, attention_mask=mask2, position_ids=positions2, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        return out.logits[:, -1], selection

    @torch.no_grad()
    def generate(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Answer tokens after a (pruned) prefill, greedy by default.

        Decoding continues from each sample's full-sequence max position + 1 (not from the
        pruned prefill length), so a pruned prefill sees the same answer positions as the
        unpruned one. See :mod:`tokensieve.models.backbones.generation` for why the loop is
        ours rather than ``model.generate``.

        Args:
            max_new_tokens: upper bound on new tokens.
            **kwargs: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``generator``,
                ``eos_token_id``, ``pad_token_id`` (defaults from the model's generation config).

        Returns:
            ``long [B, N]`` new tokens (finished rows padded with ``pad_token_id``).

        Raises:
            TypeError: an unsupported keyword argument.
        """
        allowed = {"do_sample", "temperature", "top_k", "top_p", "generator", "eos_token_id", "pad_token_id"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"generate() got unsupported arguments {sorted(unknown)}; supported: {sorted(allowed)}")
        gen_cfg = self.model.generation_config
        eos = kwargs.pop("eos_token_id", gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id)
        pad = kwargs.pop("pad_token_id", None)
        if pad is None:
            pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else self.tokenizer.pad_token_id
        if pad is None:
            pad = eos if isinstance(eos, int) else list(eos)[0]
        embeds, mask, positions, _ = self.lm_inputs(batch, visual, selection)
        next_pos = torch.tensor([lay.next_position for lay in self._layouts(batch, visual)], dtype=torch.long)
        return decode(self.model, embeds, mask, positions, next_pos, max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs)

    # ------------------------------------------------------------------ teacher
    def _adapters_disabled(self):
        """Teacher signals come from the frozen base: LoRA adapters (if any) are switched off."""
        lora = getattr(self, "_lora", None)
        return lora.disable_adapter() if lora is not None else contextlib.nullcontext()

    @torch.no_grad()
    def teacher_signals(self, batch: VideoBatch, visual: VisualTokens, layer: int | None = None, reduction: str = "max", with_logits: bool = True, with_hidden: bool = False) -> TeacherSignals:
        """Text→video attention at LLM ``layer``, recomputed from that layer's own q/k projections.

        The input of decoder layer ``layer`` is captured by a hook; q and k are recomputed
        (input RMSNorm → q_proj/k_proj → the model's RoPE cos/sin → GQA repeat), and a causal
        softmax over all keys is taken for every text row after the template token. The
        video columns are reduced over heads and text rows by ``reduction`` ("max" —
        FlexSelect's default — or "mean"). Works under sdpa / flash attention. Runs on the
        full (unpruned) sequence with LoRA adapters disabled.

        Returns:
            TeacherSignals with ``attention float32 [B, M]`` (0 at padding), next-token
            ``logits [B, V]`` when ``with_logits``, and when ``with_hidden`` the visual tokens'
            ``hidden_states [B, M, D]`` at the *output* of decoder layer ``layer`` (HF's
            ``hidden_states[layer + 1]``; 0 at padding).

        Raises:
            ValueError: ``layer`` out of range or unknown ``reduction``.
        """
        layer = self.reference_layer if layer is None else layer
        self._check_layer(layer)
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        embeds, mask, positions, spans = self.lm_inputs(batch, visual, None)
        decoder = self.language_model.layers[layer]
        with self._adapters_disabled():

            def run():
                return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=False).logits[:, -1]

            captured, logits = capture_layer(run, decoder, need_output=with_hidden, stop_early=not with_logits)
            attention = text_to_video_attention(decoder, captured["hidden"], captured["rope"], spans, visual.num_tokens, reduction)
        hidden = None
        if with_hidden:
            out = captured["output"]
            hidden = out.new_zeros(out.shape[0], visual.num_tokens, out.shape[-1])
            for b, (_, vs, kept, _) in enumerate(spans):
                hidden[b, :kept] = out[b, vs : vs + kept]
        return TeacherSignals(attention=attention, logits=logits, hidden_states=hidden)
