"""Frozen Qwen2-VL backbone (``Qwen2VLForConditionalGeneration``, model_type ``qwen2_vl``).

Everything but two variant details lives in :mod:`tokensieve.models.backbones.qwen_vl`:
temporal M-RoPE ids are the temporal-patch index (``get_rope_index`` takes no time
spacing), and every vision block attends fully within a frame group in the processor's
patch order (saliency reads the last block; no window permutation to undo).

Source: Qwen2-VL (arXiv 2409.12191); transformers ``models/qwen2_vl/modeling_qwen2_vl.py`` (5.23).
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLForConditionalGeneration

from tokensieve.models.backbones.qwen_saliency import VisionSaliencyRecorder
from tokensieve.models.backbones.qwen_vl import QwenVLBackbone


class Qwen2VLBackbone(QwenVLBackbone):
    """Frozen Qwen2-VL; see :class:`~tokensieve.models.backbones.qwen_vl.QwenVLBackbone`."""

    family = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration

    def _saliency_recorder(self, visual_model, grid_thw: torch.Tensor) -> VisionSaliencyRecorder:
        return VisionSaliencyRecorder(visual_model, len(visual_model.blocks) - 1)
