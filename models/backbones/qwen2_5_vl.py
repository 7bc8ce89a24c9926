"""Frozen Qwen2.5-VL backbone (``Qwen2_5_VLForConditionalGeneration``, model_type ``qwen2_5_vl``).

Everything but two variant details lives in :mod:`tokensieve.models.backbones.qwen_vl`:
temporal M-RoPE ids are spaced by ``tokens_per_second * second_per_grid_ts`` (absolute
time), and the vision tower mixes window and full attention (saliency reads the last
full-attention block and undoes the window permutation).

Source: Qwen2.5-VL Technical Report (arXiv 2502.13923); transformers
``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (5.23).
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from tokensieve.models.backbones.qwen_saliency import VisionSaliencyRecorder
from tokensieve.models.backbones.qwen_vl import QwenVLBackbone
from tokensieve.models.types import VisualTokens


class Qwen25VLBackbone(QwenVLBackbone):
    """Frozen Qwen2.5-VL; see :class:`~tokensieve.models.backbones.qwen_vl.QwenVLBackbone`."""

    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration

    def _rope_kwargs(self, visual: VisualTokens, b: int) -> dict:
        return {"second_per_grid_ts": visual.cache["second_per_grid_ts"][b : b + 1].cpu()}

    def _saliency_recorder(self, visual_model, grid_thw: torch.Tensor) -> VisionSaliencyRecorder:
        def unwindow(per_token: torch.Tensor) -> torch.Tensor:
            window_index, _ = get_vision_window_index(
                grid_thw.to(per_token.device),
                spatial_merge_size=visual_model.spatial_merge_size,
                window_size=visual_model.window_size,
                patch_size=visual_model.patch_size,
                kwargs={},
            )
            return per_token[torch.argsort(window_index)]

        return VisionSaliencyRecorder(visual_model, max(visual_model.fullatt_block_indexes), unwindow)
