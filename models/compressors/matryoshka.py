"""Matryoshka pooling: nested average-pooled token sets per frame, one student for every scale.

Source: "Matryoshka Multimodal Models" (M3), Cai, Yang, Jain, Gao, Lee — arXiv 2405.17430;
reference repo mu-cai/matryoshka-mm (``LlavaMetaForCausalLM.matryoshka_vis_token_process``
in ``llava/model/llava_arch.py``): each image's 24×24 grid is average-pooled to
{576, 144, 36, 9, 1} tokens, and the LLM (full fine-tune or LoRA) is trained with the
cross-entropy averaged over the scales, so one model serves every scale.

This implementation:
    * **Scales** are per-frame retention fractions ``scales`` (default M3's
      ``(1, 1/4, 1/16, 1/64, 1/576)``). On a frame grid ``(h, w)`` scale ``s`` pools to the
      smallest grid of :func:`tokensieve.models.compressors.pool.candidate_grids` (the
      ``pool`` baseline's aspect-preserving family) with ``ph·pw >= s·h·w`` — on 24×24 exactly
      M3's 24², 12², 6², 3², 1² grids. Scales that map to the same grid share the first
      scale's id. The pooling itself is the ``pool`` compressor's (masked cell means,
      representative index = the token nearest the cell centre, original positions kept).
    * **Learned part** (M3 adds no module; its learning is in the LLM). So that the method
      also trains with the LLM frozen — and exports as a compressor — each scale has a
      learned embedding added to its pooled tokens (``scale_embedding``, zero-initialised:
      tells the frozen LLM which granularity it sees), and an optional zero-initialised
      residual bottleneck adapter ``t + W_up·GELU(W_down·LN(t))`` (``adapter_dim``; 0 = off)
      that lets pooled (averaged) tokens move back toward the statistics of the tokens the
      LLM was trained on. Untrained, the module equals the ``pool`` baseline at the same
      grid. LoRA on the student LLM is the training module's option
      (:class:`tokensieve.train.matryoshka.MatryoshkaDistill`), exported beside the compressor.
    * **Any budget**: ``forward(visual, budget=...)`` keeps exactly
      ``K = num_keep(M_b, budget)`` tokens (:func:`tokensieve.models.budget.num_keep`): it
      picks the coarsest trained scale whose grid has at least K usable cells (the trained
      scale closest to the budget from above), then keeps K of its cells by uniform stride
      over the cells in token order (the ``pool`` rule). When no trained scale has K cells
      the unpooled grid is used (the original tokens, no embedding: what the LLM saw
      in training as the full-token teacher). :meth:`at_scale` returns a scale's full set.
    * Video: frames are pooled independently (``visual.grid = (t, h, w)``, row-major);
      padded samples pool only their valid tokens (see :mod:`~tokensieve.models.compressors.pool`).
"""

from __future__ import annotations

import torch
from torch import nn

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import LearnedCompressor
from tokensieve.models.compressors.pool import Pool, _cells, candidate_grids
from tokensieve.models.types import Query, Selection, VisualTokens

M3_SCALES = (1.0, 1 / 4, 1 / 16, 1 / 64, 1 / 576)


class _PlannedPool(Pool):
    """The ``pool`` compressor with a given per-sample plan ``[(ph, pw, cells)]``: reuses its
    masked cell averaging and packing."""

    def __init__(self, plans):
        super().__init__()
        self._plans = plans

    def _plan(self, visual: VisualTokens, budget: Budget):
        return self._plans


class Matryoshka(LearnedCompressor):
    """M3-style nested pooling with per-scale embeddings and an optional token adapter.

    Args:
        hidden_size: D of the visual tokens.
        scales: per-frame retention fractions, finest first or in any order (each in [0, 1];
            0 means one token per frame).
        scale_embedding: learn one D-vector per scale, added to that scale's pooled tokens.
        adapter_dim: bottleneck width of the residual token adapter (0: no adapter).

    Shapes: ``forward(visual [B, M, D], query=None, budget) -> Selection`` with ascending
    ``index [B, K]``, merged ``tokens [B, K, D]`` and ``valid [B, K]`` for ragged counts;
    ``at_scale(visual, s) -> (Selection, scale_id)`` for the s-th configured scale.

    Raises:
        ValueError: empty or out-of-range ``scales``; ``visual.grid`` not matching M.
        TypeError / ValueError: an invalid ``budget`` (see ``check_budget``).
    """

    name = "matryoshka"

    def __init__(self, hidden_size: int, scales: list[float] | None = None, scale_embedding: bool = True, adapter_dim: int = 64):
        super().__init__()
        scales = list(M3_SCALES if scales is None else scales)
        if not scales or any(not 0.0 <= float(s) <= 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of fractions in [0, 1], got {scales}")
        self.scales = [float(s) for s in scales]
        self.embed = nn.Parameter(torch.zeros(len(self.scales), hidden_size)) if scale_embedding else None
        self.adapter = None
        if adapter_dim:
            self.adapter = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, adapter_dim), nn.GELU(), nn.Linear(adapter_dim, hidden_size))
            nn.init.zeros_(self.adapter[-1].weight)
            nn.init.zeros_(self.adapter[-1].bias)

    # ------------------------------------------------------------------ grids
    def grids(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """Distinct trained grids on an ``(h, w)`` frame: ``[(scale_id, ph, pw)]``, fewest cells
        first; a grid reached by several scales keeps the first scale's id."""
        candidates = candidate_grids(h, w)
        seen: dict[tuple[int, int], int] = {}
        for sid, s in enumerate(self.scales):
            grid = next(g for g in candidates if g[0] * g[1] >= s * h * w)
            seen.setdefault(grid, sid)
        return sorted(((sid, ph, pw) for (ph, pw), sid in seen.items()), key=lambda g: (g[1] * g[2], g[1]))

    def _check_grid(self, visual: VisualTokens) -> tuple[int, int, int]:
        t, h, w = visual.grid
        if t * h * w != visual.num_tokens:
            raise ValueError(f"matryoshka needs the (t, h, w) token grid: grid {visual.grid} gives {t * h * w} tokens, got M={visual.num_tokens}")
        return t, h, w

    def _finish(self, visual: VisualTokens, plans, scale_ids: list[int | None]) -> Selection:
        """Pool by ``plans`` and add each sample's scale embedding + the adapter."""
        sel = _PlannedPool(plans)(visual, budget=1.0)
        tokens = sel.tokens.float()
        if self.embed is not None:
            rows = torch.stack([self.embed[s] if s is not None else torch.zeros_like(self.embed[0]) for s in scale_ids])
            tokens = tokens + rows.unsqueeze(1)
        if self.adapter is not None:
            tokens = tokens + self.adapter(tokens)
        learned = torch.tensor([s is not None for s in scale_ids], device=tokens.device).view(-1, 1, 1)
        tokens = torch.where(learned, tokens, sel.tokens.float())  # the unpooled fallback stays the input
        return Selection(index=sel.index, tokens=tokens.to(visual.tokens.dtype), valid=sel.valid)

    # ------------------------------------------------------------------ public
    def at_scale(self, visual: VisualTokens, scale: int) -> tuple[Selection, int]:
        """Every usable pooled cell of configured scale ``scale`` (an index into ``scales``).

        Returns:
            ``(selection, scale_id)`` — ``scale_id`` is the id whose embedding was used (the
            first scale with the same grid on this input).
        """
        t, h, w = self._check_grid(visual)
        grid = {g[1:]: g[0] for g in self.grids(h, w)}
        s = self.scales[scale]
        ph, pw = next(g for g in candidate_grids(h, w) if g[0] * g[1] >= s * h * w)
        sid = grid[(ph, pw)]
        plans = [(ph, pw, _cells(visual.valid[b].reshape(t, h, w).cpu(), ph, pw)) for b in range(visual.batch_size)]
        return self._finish(visual, plans, [sid] * visual.batch_size), sid

    def scale_ids(self, visual: VisualTokens) -> list[int]:
        """Configured scale indices giving distinct grids on this input (what training loops over)."""
        _, h, w = self._check_grid(visual)
        return [g[0] for g in self.grids(h, w)]

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        """Exactly ``num_keep(M_b, budget)`` tokens per sample from the coarsest trained scale with
        enough usable cells (see the module docstring)."""
        check_budget(budget)
        t, h, w = self._check_grid(visual)
        trained = self.grids(h, w)
        plans, ids = [], []
        for b in range(visual.batch_size):
            valid = visual.valid[b].reshape(t, h, w).cpu()
            per_frame = valid.flatten(1).sum(1)
            k = num_keep(int(per_frame.sum()), budget)
            choice = None
            for sid, ph, pw in trained:
                if int(per_frame.clamp(max=ph * pw).sum()) < k:  # upper bound on usable cells
                    continue
                cells = _cells(valid, ph, pw)
                if len(cells) >= k:
                    choice = (sid, ph, pw, cells)
                    break
            if choice is None:  # unpooled grid: one token per cell, the original tokens
                choice = (None, h, w, _cells(valid, h, w))
            sid, ph, pw, cells = choice
            c = len(cells)
            if c > k:
                cells = [cells[((2 * s + 1) * c) // (2 * k)] for s in range(k)]
            plans.append((ph, pw, cells))
            ids.append(sid)
        return self._finish(visual, plans, ids)
