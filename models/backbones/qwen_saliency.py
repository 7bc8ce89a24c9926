"""Vision-tower saliency for Qwen-VL towers: attention received per merged token.

VisionZip / FastVID / HoliTom score tokens by the "[CLS] attention" of the vision tower;
Qwen towers have no [CLS], so the signal is the attention each patch *receives* in one
full-attention block (mean over heads and query patches), averaged over the ``merge²``
patches that the merger folds into one LLM token. Softmax is taken within each frame group
(the block's ``cu_seqlens`` chunks), so per frame the values sum to ``1 / merge²``.

Qwen2.5-VL reorders patches into windows before the blocks (undone here with the inverse of
``get_vision_window_index``) and has only some full-attention blocks (the last one is
used); Qwen2-VL blocks all attend fully within a frame and keep the processor's order (the
last block is used). Source: transformers ``modeling_qwen2_vl.py`` /
``modeling_qwen2_5_vl.py`` (5.23), ``vision_utils.get_vision_window_index``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


class VisionSaliencyRecorder:
    """Hooks one vision block's attention and turns it into per-token saliency.

    Args:
        visual_model: the HF vision tower (``blocks``, ``spatial_merge_size``).
        block_index: which block's attention to read.
        token_order: maps ``received [N/merge²]`` in the tower's internal order to the
            merger's output order (identity when None).
    """

    def __init__(self, visual_model: nn.Module, block_index: int, token_order: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.visual_model = visual_model
        self.attn = visual_model.blocks[block_index].attn
        self.token_order = token_order
        self.rope = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb_vision
        self.captured: dict = {}
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.captured = {"hidden": args[0] if args else kwargs["hidden_states"], **kwargs}

    def remove(self) -> None:
        self.handle.remove()

    def saliency(self, b: int, m: int) -> torch.Tensor:
        """``float32 [b, m]`` — received attention per LLM token (merger output order)."""
        attn, hidden = self.attn, self.captured["hidden"]
        n = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = self.captured["position_embeddings"]
        q, k = self.rope(q, k, cos, sin)
        received = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        bounds = self.captured["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qc, kc = q[start:end].transpose(0, 1).float(), k[start:end].transpose(0, 1).float()  # [H, n, hd]
            probs = (qc @ kc.transpose(-1, -2) * attn.scaling).softmax(-1)  # [H, n, n]
            received[start:end] = probs.mean(dim=(0, 1))
        unit = self.visual_model.spatial_merge_size**2
        per_token = received.view(-1, unit).mean(-1)
        if self.token_order is not None:
            per_token = self.token_order(per_token)
        return per_token.view(b, m)
