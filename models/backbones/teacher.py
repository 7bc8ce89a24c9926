"""Text→video attention rows recomputed from a decoder layer's own q/k projections.

Works for every Qwen2-style decoder layer (``input_layernorm`` → ``self_attn`` with
``q_proj``/``k_proj``, GQA, RoPE applied by the attention module's own
``apply_rotary_pos_emb``): Qwen2.5-VL and Qwen2-VL (M-RoPE — the layer receives the
already-sectioned cos/sin, so the same call applies it) and LLaVA-OneVision's Qwen2 LLM
(1-D RoPE). No eager attention kernel is needed, so it runs under sdpa / flash attention.

Source: FlexSelect (arXiv 2506.00993) reads these rows as the teacher signal; formulas from
transformers ``modeling_qwen2.py`` / ``modeling_qwen2_5_vl.py`` (5.23).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the reference layer's tensors are captured."""


def capture_layer(run: Callable[[], object], layer: nn.Module, need_output: bool, stop_early: bool) -> tuple[dict, object | None]:
    """Run ``run()`` while recording decoder ``layer``'s input and (optionally) output.

    Args:
        run: a closure calling the model's forward.
        layer: a decoder layer called as ``layer(hidden_states, ..., position_embeddings=...)``.
        need_output: also record the layer's output hidden states.
        stop_early: abort the forward after the needed tensors are recorded (no logits).

    Returns:
        ``(captured, result)`` with ``captured["hidden"] [B, L, D]`` (layer input),
        ``captured["rope"]`` (cos, sin), ``captured["output"]`` when asked, and ``run()``'s
        result (None when stopped early).
    """
    captured: dict = {}

    def pre_hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        if stop_early and not need_output:
            raise _StopForward

    def post_hook(module, args, kwargs, output):
        captured["output"] = output[0] if isinstance(output, tuple) else output
        if stop_early:
            raise _StopForward

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if need_output:
        handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
    result = None
    try:
        result = run()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured, result


def text_to_video_attention(layer: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], spans: list[tuple[int, int, int, int]], num_visual: int, reduction: str, rows: str = "text") -> torch.Tensor:
    """Softmax attention of the text rows onto the video columns, reduced over heads and rows.

    Args:
        layer: the decoder layer (``input_layernorm``, ``self_attn.{q,k}_proj``).
        hidden: ``float [B, L, D]`` — the layer's input (left-padded rows).
        rope: the ``(cos, sin)`` the layer received.
        spans: per sample ``(pad, video_start, kept, text_start)`` in the padded row; text rows
            are ``text_start .. L-1``, video columns ``video_start .. video_start+kept-1``.
        num_visual: M, width of the output.
        reduction: "max" or "mean" over heads and text rows.
        rows: "text" — every text row after the template token (FlexSelect's teacher) — or
            "last" — only the final prompt token's row (FastV's signal).

    Returns:
        ``float32 [B, M]`` — attention per video token, 0 past each sample's ``kept``.

    Raises:
        ValueError: the layer uses sliding-window attention (its rows would not be a plain
            causal softmax).
    """
    attn = layer.self_attn
    hf_module = sys.modules[type(attn).__module__]
    if getattr(attn, "sliding_window", None):
        raise ValueError(f"reference layer {getattr(attn, 'layer_idx', '?')} uses sliding-window attention; pick a full-attention layer")
    h = layer.input_layernorm(hidden)
    bsz, length, _ = h.shape
    q = attn.q_proj(h).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rope
    q, k = hf_module.apply_rotary_pos_emb(q, k, cos, sin)
    k = hf_module.repeat_kv(k, attn.num_key_value_groups)
    scores = torch.zeros(bsz, num_visual, device=h.device, dtype=torch.float32)
    cols = torch.arange(length, device=h.device)
    for b, (pad, vs, kept, ts) in enumerate(spans):
        first = length - 1 if rows == "last" else ts
        row_ids = torch.arange(first, length, device=h.device)
        logit = (q[b, :, first:].float() @ k[b].float().transpose(-1, -2)) * attn.scaling  # [H, S, L]
        allowed = (cols[None, :] <= row_ids[:, None]) & (cols[None, :] >= pad)  # causal, no left padding
        probs = logit.masked_fill(~allowed, float("-inf")).softmax(dim=-1)[:, :, vs : vs + kept]  # [H, S, K]
        scores[b, :kept] = probs.amax(dim=(0, 1)) if reduction == "max" else probs.mean(dim=(0, 1))
    return scores
