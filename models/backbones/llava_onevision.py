"""Frozen LLaVA-OneVision backbone (``LlavaOnevisionForConditionalGeneration``, model_type
``llava_onevision``; also LLaVA-Video checkpoints converted to this class).

Video path, as transformers 5.23 runs it (``LlavaOnevisionModel.get_video_features``): each
frame is resized to the SigLIP tower's ``image_size`` and encoded; the features of
``vision_feature_layer`` go through the 2-layer projector, are pooled per frame by 2×2
bilinear interpolation to ``ceil(h/2) × ceil(w/2)`` (``apply_pooling``), flattened over
frames, and **one** ``image_newline`` embedding is appended after the whole video. The
processor expands ``<video>`` into ``frames × ceil(h/2) × ceil(w/2) + 1`` placeholder ids.

The newline is not a visual token here: ``VisualTokens`` holds the ``T·h·w`` pooled frame
tokens (so ``grid`` and ``frame_index`` describe every token and compressors never see or
drop it); the newline is the always-kept *template* token after the video, like Qwen's
``<|vision_end|>`` — a pruned sequence is ``prefix · kept tokens · newline · question``.

Positions are 1-D RoPE ids ``arange(L)`` of the **full** sequence; kept tokens, the newline
and the text keep theirs, and decoding continues from ``L`` (not the pruned length).

Sources: LLaVA-OneVision: Easy Visual Task Transfer (arXiv 2408.03326); transformers
``models/llava_onevision/modeling_llava_onevision.py`` and ``processing_llava_onevision.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones.chat_templates import LLAVA_OV_CHAT_TEMPLATE
from tokensieve.models.backbones.decoder import DecoderBackbone, Layout
from tokensieve.models.backbones.llava_processing import SiglipVideoPreprocessor
from tokensieve.models.types import VisualTokens


class LlavaOnevisionBackbone(DecoderBackbone):
    """Frozen LLaVA-OneVision seen through tokensieve's types.

    Raises:
        ValueError: the config's ``vision_feature_select_strategy`` is not "full" (a SigLIP
            tower has no [CLS] to drop; the pooled grid would not be square).
    """

    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    video_placeholder = "<video>"
    default_chat_template = LLAVA_OV_CHAT_TEMPLATE

    def __init__(self, model, tokenizer, preprocessor, reference_layer=None, name_or_path="", revision=None):
        strategy = model.config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"{name_or_path or 'config'}: vision_feature_select_strategy {strategy!r} is not supported (only 'full')")
        super().__init__(model, tokenizer, preprocessor, reference_layer, name_or_path, revision)

    @classmethod
    def _load_preprocessor(cls, folder: Path, config) -> SiglipVideoPreprocessor:
        return SiglipVideoPreprocessor.from_pretrained(folder, config.vision_config.image_size)

    # ------------------------------------------------------------------ geometry
    @property
    def patch_grid(self) -> int:
        """Patches per side of one frame: ``image_size // patch_size``."""
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def pooled_grid(self) -> int:
        """Tokens per side of one frame after pooling: ``ceil(patch_grid / 2)``."""
        return math.ceil(self.patch_grid / 2)

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholder ids the processor writes for a video: ``frames · pooled² + 1`` (newline)."""
        return num_frames * self.pooled_grid**2 + 1

    # ------------------------------------------------------------------ layout
    def _layouts(self, batch: VideoBatch, visual: VisualTokens) -> list[Layout]:
        out = []
        for b, question in enumerate(batch.questions):
            prefix, suffix = self._prompt_ids(question)
            m = int(visual.valid[b].sum())
            # m frame tokens + the newline slot: the processor's m + 1 <video> ids
            ids = torch.tensor([*prefix, *([self.video_token_id] * (m + 1)), *suffix], dtype=torch.long)
            out.append(Layout(ids, torch.arange(len(ids))[None], len(prefix), m))
        return out

    def _embed_layout(self, layout: Layout) -> torch.Tensor:
        rows = super()._embed_layout(layout)
        newline = self.model.model.image_newline.to(rows.dtype)
        return torch.cat([rows[: layout.template_index], newline[None], rows[layout.template_index + 1 :]])

    # ------------------------------------------------------------------ vision
    def _feature_layer_index(self) -> int:
        """Index into the tower's ``hidden_states`` (0 = embeddings) that feeds the projector."""
        layer = self.model.config.vision_feature_layer
        n = self.model.config.vision_config.num_hidden_layers + 1
        return max(i % n for i in layer) if isinstance(layer, (list, tuple)) else layer % n

    @torch.no_grad()
    def encode_video(self, batch: VideoBatch, saliency: bool = False) -> VisualTokens:
        """SigLIP tower → projector → per-frame 2×2 bilinear pooling.

        Args:
            batch: ``frames uint8 [B, T, H, W, 3]`` (any H, W; resized to ``image_size``).
            saliency: also return the attention each patch receives in the last SigLIP layer
                feeding the projector (mean over heads and query patches), pooled like the
                tokens (``VisualTokens.saliency``).

        Returns:
            VisualTokens with ``tokens [B, M, D]`` (M = T·h·w, newline excluded), 1-D
            ``positions [B, M]`` of the full sequence, ``frame_index [B, M]``, ``grid (T, h, w)``.

        Raises:
            ValueError: frames not ``uint8 [T, H, W, 3]``; saliency asked for with the
                embeddings as the feature layer.
        """
        pixels = torch.stack([self.preprocessor(f) for f in batch.frames.cpu()])  # [B, T, 3, S, S]
        bsz, t = pixels.shape[:2]
        tower = self.model.model.vision_tower
        recorder = _SiglipSaliency(tower, self._feature_layer_index()) if saliency else None
        try:
            feats = self.model.model.get_video_features(pixels.to(self.device, tower.dtype)).pooler_output
        finally:
            if recorder is not None:
                recorder.remove()
        tokens = feats[:, :-1]  # drop the appended image_newline: it is a template token
        m = tokens.shape[1]
        side = self.pooled_grid
        grid = (t, side, side)
        ids = torch.arange(m, device=tokens.device)
        visual = VisualTokens(
            tokens=tokens,
            valid=torch.ones(bsz, m, dtype=torch.bool, device=tokens.device),
            positions=torch.zeros(bsz, m, dtype=torch.long, device=tokens.device),
            frame_index=(ids // (side * side)).expand(bsz, -1).clone(),
            grid=grid,
            saliency=recorder.saliency(bsz, t, self.patch_grid).to(tokens.device) if recorder is not None else None,
            cache={"num_frames": t},
        )
        layouts = self._layouts(batch, visual)
        visual.positions = torch.stack([lay.positions[0, lay.video_start : lay.video_start + m] for lay in layouts]).to(tokens.device)
        return visual


class _SiglipSaliency:
    """Attention received per patch in one SigLIP layer, pooled like the video tokens."""

    def __init__(self, tower, feature_index: int):
        if feature_index == 0:
            raise ValueError("vision_feature_layer selects the embeddings: no attention to read saliency from")
        encoder = getattr(tower, "vision_model", tower).encoder
        self.attn = encoder.layers[feature_index - 1].self_attn
        self.hidden = None
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.hidden = args[0] if args else kwargs["hidden_states"]

    def remove(self) -> None:
        self.handle.remove()

    def saliency(self, bsz: int, frames: int, side: int) -> torch.Tensor:
        """``float32 [B, T·ceil(side/2)²]`` — per frame, the mean received attention pooled 2×2."""
        attn, h = self.attn, self.hidden
        n = h.shape[1]
        q = attn.q_proj(h).view(h.shape[0], n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_proj(h).view(h.shape[0], n, attn.num_heads, attn.head_dim).transpose(1, 2).float()
        received = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(dim=(1, 2))  # [B·T, N]
        pooled_side = math.ceil(side / 2)
        pooled = F.interpolate(received.view(-1, 1, side, side), size=(pooled_side, pooled_side), mode="bilinear")
        return pooled.reshape(bsz, frames * pooled_side * pooled_side)
