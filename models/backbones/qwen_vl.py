"""Shared Qwen-VL adapter (Qwen2-VL and Qwen2.5-VL): M-RoPE layout and the vision side.

Positions follow one rule: the backbone's own M-RoPE ids are computed on the **full**
sequence with ``model.model.get_rope_index`` (``mm_token_type_ids`` = 2 on video tokens,
plus whatever the variant's temporal spacing needs), then the kept tokens' ids are
gathered. Nothing is renumbered: text after the video keeps its original positions too, so
the keep-all selection reproduces the unpruned model exactly. Decoding continues from the
full sequence's max position + 1, which is what HF's cached ``rope_deltas`` encode.

The variants differ only in (a) the HF model class, (b) the extra ``get_rope_index``
arguments (Qwen2.5-VL spaces temporal ids by ``second_per_grid_ts``; Qwen2-VL uses the
temporal-patch index) and (c) the vision tower's attention layout for saliency (window
attention in Qwen2.5-VL). Sources: Qwen2-VL (arXiv 2409.12191), Qwen2.5-VL (arXiv
2502.13923); transformers ``modeling_qwen2_vl.py`` / ``modeling_qwen2_5_vl.py`` (5.23).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones.decoder import DecoderBackbone, Layout
from tokensieve.models.backbones.qwen_processing import QwenVisionPreprocessor
from tokensieve.models.backbones.qwen_saliency import VisionSaliencyRecorder
from tokensieve.models.backbones.chat_templates import QWEN_VL_CHAT_TEMPLATE
from tokensieve.models.types import VisualTokens


class QwenVLBackbone(DecoderBackbone):
    """Frozen Qwen-VL (M-RoPE) seen through tokensieve's types; subclass per variant.

    Subclasses set ``model_class`` and ``family`` and may override :meth:`_rope_kwargs`
    and :meth:`_saliency_recorder`.
    """

    video_placeholder: ClassVar[str] = "<|video_pad|>"
    default_chat_template: ClassVar[str] = QWEN_VL_CHAT_TEMPLATE

    @classmethod
    def _load_preprocessor(cls, folder: Path, config) -> QwenVisionPreprocessor:
        return QwenVisionPreprocessor.from_pretrained(folder)

    # ------------------------------------------------------------------ variant hooks
    def _rope_kwargs(self, visual: VisualTokens, b: int) -> dict:
        """Extra ``get_rope_index`` arguments for sample ``b`` (none for Qwen2-VL)."""
        return {}

    def _seconds_per_grid(self, batch: VideoBatch) -> torch.Tensor:
        """``float [B]`` seconds per temporal patch, as the HF processor computes it:
        ``temporal_patch_size / sampling fps`` (fps from the frame timestamps; 1 s steps when
        timestamps are degenerate)."""
        ts = batch.timestamps.double().cpu()
        b = ts.shape[0]
        step = (ts[:, -1] - ts[:, 0]) / max(ts.shape[1] - 1, 1) if ts.shape[1] > 1 else torch.ones(b, dtype=torch.double)
        step = torch.where(step > 0, step, torch.ones_like(step))
        return (self.preprocessor.temporal_patch_size * step).float()

    def _saliency_recorder(self, visual_model, grid_thw: torch.Tensor) -> VisionSaliencyRecorder:
        raise NotImplementedError

    # ------------------------------------------------------------------ layout
    def _layouts(self, batch: VideoBatch, visual: VisualTokens) -> list[Layout]:
        grid_thw = visual.cache["grid_thw"]
        out = []
        for b, question in enumerate(batch.questions):
            prefix, suffix = self._prompt_ids(question)
            m = int(visual.valid[b].sum())
            ids = torch.tensor([*prefix, *([self.video_token_id] * m), *suffix], dtype=torch.long)
            types = torch.zeros_like(ids, dtype=torch.int)
            types[len(prefix) : len(prefix) + m] = 2
            pos, _ = self.model.model.get_rope_index(ids[None], types[None], video_grid_thw=grid_thw[b : b + 1].cpu(), **self._rope_kwargs(visual, b))
            out.append(Layout(ids, pos[:, 0], len(prefix), m))
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
            sequence, ``frame_index [B, M]`` (temporal-patch group), ``grid`` (t, h/2, w/2);
            ``cache`` holds ``grid_thw long [B, 3]`` and ``second_per_grid_ts float [B]``.

        Raises:
            ValueError: frames not ``uint8 [T, H, W, 3]`` or H/W not multiples of 28.
        """
        pixel_values, grids = zip(*(self.preprocessor(f) for f in batch.frames))  # on the frames' device: no GPU → CPU round trip of the raw clip
        grid_thw = torch.tensor(grids, dtype=torch.long)
        visual_model = self.model.model.visual
        pixels = torch.cat(pixel_values).to(self.device, visual_model.dtype)
        recorder = self._saliency_recorder(visual_model, grid_thw) if saliency else None
        try:
            feats = self.model.model.get_video_features(pixels, grid_thw.to(self.device)).pooler_output
        finally:
            if recorder is not None:
                recorder.remove()
        tokens = torch.stack(list(feats))  # one resize per batch, so every sample has the same M
        b, m, _ = tokens.shape
        merge = self.preprocessor.merge_size
        grid = (int(grid_thw[0, 0]), int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge)
        visual = VisualTokens(
            tokens=tokens,
            valid=torch.ones(b, m, dtype=torch.bool, device=tokens.device),
            positions=torch.zeros(3, b, m, dtype=torch.long, device=tokens.device),
            frame_index=(torch.arange(m, device=tokens.device) // (grid[1] * grid[2])).expand(b, -1).clone(),
            grid=grid,
            saliency=recorder.saliency(b, m).to(tokens.device) if recorder is not None else None,
            cache={"grid_thw": grid_thw, "second_per_grid_ts": self._seconds_per_grid(batch)},
        )
        layouts = self._layouts(batch, visual)
        visual.positions = torch.stack([lay.positions[:, lay.video_start : lay.video_start + m] for lay in layouts], dim=1).to(tokens.device)
        return visual
