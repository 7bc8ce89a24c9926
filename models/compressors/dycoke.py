"""DyCoke, stage 1: temporal token merging (TTM) — drop visual tokens that repeat an anchor frame.

Source: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
arXiv 2411.15024; reference repo KD-TAO/DyCoke (``dycole_ttm`` in ``llava/model/llava_arch.py``).

Signals: visual tokens only (no saliency, no query). Applies before the LLM (``pre_llm``).

Reference rule (stage 1). Frames are taken in windows of 4, ``[a, a+1, a+2, a+3]``:

- frame ``a`` (the window's anchor) is kept in full;
- frame ``a+1`` keeps its ``int((1 - K) * n)`` tokens least similar (cosine) to the token at the
  same position of frame ``a``; frame ``a+2`` likewise against frame ``a``; frame ``a+3`` against
  frame ``a+2`` (pairs (0,1), (2,3) then (0,2) — the code's two similarity loops);
- drop only, no averaging. README default ``K = 0.7`` (``dycoke_k``), so a non-anchor frame keeps
  ``int(0.3 n)`` tokens and stage 1 keeps ``(1 + 3 * 0.3) / 4 = 47.5%``; at most it can drop the
  three non-anchor frames, so stage 1 alone never goes below the anchors' 25%.

Stage 2 (decode-time KV-cache pruning at layer L = 3 keeping ``1 - P`` of the image tokens when
the attention pattern changes) is **out of scope**: it lives inside the LLM's decode loop, not
in a pre-LLM compressor.

What this implementation changes, and why:

- **Exact budget.** The library keeps exactly ``num_keep(n, budget)`` tokens
  (:func:`tokensieve.models.budget.num_keep`), so the per-frame counts are derived from the
  budget instead of ``K``: with ``A`` anchor tokens and ``K_total >= A``, the ``K_total - A``
  non-anchor tokens are split over the non-anchor frames in proportion to their sizes
  (largest-remainder rule, ties to the earlier frame). When the budget gives every non-anchor
  frame the same ``int((1 - K) n)`` the result is the reference's.
- **Below 25% (``K_total < A``)**, which stage 1 cannot reach, the non-anchor frames keep
  nothing and the anchors are pruned too: ``K_total`` is split over the anchor frames in
  proportion to their sizes; the first anchor keeps evenly strided positions (``floor((i + 0.5)
  n / k)``), every later anchor keeps its tokens least similar to the same position of the
  previous anchor (the TTM criterion applied one window apart).
- **Reference indexing quirks not reproduced**: the code scores frame ``a+1`` with
  ``similarities[(i - 2) // 2]`` — the *previous* pair's similarity (frame 1 uses the last
  pair's) and frame ``a+3`` with pair ``(a, a+1)``'s; the last window's frame ``a+2`` is never
  pruned (``range(0, T - 4, 4)``); and an odd trailing frame is silently dropped. We use each
  frame's own anchor as the paper describes, prune every window alike, and keep every frame.
- A partial last frame (``n`` not a multiple of ``h * w``) compares its positions with the
  same positions of its anchor. Ties keep the lower index. Keeping every token is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.compressors.frames import frame_sizes, split_count, top_indices
from tokensieve.models.types import Query, Selection, VisualTokens


def dycoke_anchor(frame: int, window: int = 4) -> int | None:
    """The frame that ``frame`` is compared with in stage 1 (None for a window's first frame).

    Window ``[a, a+1, a+2, a+3]``: ``a+1 -> a``, ``a+2 -> a``, ``a+3 -> a+2`` (the reference's
    pairs (0, 1), (2, 3) and (0, 2)). For other window sizes, odd offsets compare with the frame
    before and even offsets with the window's first frame.
    """
    off = frame % window
    if off == 0:
        return None
    return frame - 1 if off % 2 == 1 else frame - off


class DyCoke(Compressor):
    """DyCoke stage 1 (TTM): keep each window's first frame, drop tokens that repeat their anchor.

    Args:
        window: frames per window (reference: 4).

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (padding at the end of each
    sample), ``visual.grid = (t, h, w)`` with tokens in (t, h, w) row-major order.
    Output: ``Selection.index [B, K]`` ascending (drop-only: no ``tokens``), ``valid [B, K]``
    when samples keep different counts. ``K = num_keep(n_valid, budget)`` per sample
    (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        ValueError: padding not at the end of a sample, or more valid tokens than the grid holds;
            ``TypeError`` / ``ValueError`` for a bad budget (see ``check_budget``).
    """

    name = "dycoke"

    def __init__(self, window: int = 4):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        picks = [self._select(visual, b, budget) for b in range(visual.batch_size)]
        return selection_from_indices(picks, visual.tokens.device)

    @torch.no_grad()
    def _select(self, visual: VisualTokens, b: int, budget: Budget) -> torch.Tensor:
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        k_total = num_keep(n, budget)
        device = visual.tokens.device
        hw = visual.grid[1] * visual.grid[2]
        if k_total >= n:
            return torch.arange(n, device=device)
        x = visual.tokens[b, :n].detach().float()
        starts = [f * hw for f in range(len(sizes))]
        anchors = [f for f in range(len(sizes)) if f % self.window == 0]
        others = [f for f in range(len(sizes)) if f % self.window != 0]
        n_anchor = sum(sizes[f] for f in anchors)

        def dissimilarity(f: int, g: int) -> torch.Tensor:
            """1 - cos between frame f's tokens and the same positions of frame g."""
            m = min(sizes[f], sizes[g])
            xf = x[starts[f] : starts[f] + m]
            xg = x[starts[g] : starts[g] + m]
            return 1.0 - F.cosine_similarity(xf, xg, dim=-1, eps=1e-8)

        keep: list[torch.Tensor] = []
        if k_total >= n_anchor:
            for f in anchors:
                keep.append(torch.arange(starts[f], starts[f] + sizes[f], device=device))
            counts = split_count(k_total - n_anchor, [sizes[f] for f in others])
            for f, c in zip(others, counts):
                if c:
                    keep.append(starts[f] + top_indices(dissimilarity(f, dycoke_anchor(f, self.window)), c))
        else:
            counts = split_count(k_total, [sizes[f] for f in anchors])
            for j, (f, c) in enumerate(zip(anchors, counts)):
                if c == 0:
                    continue
                if j == 0:
                    slots = ((torch.arange(c, dtype=torch.float64) + 0.5) * sizes[f] / c).floor().long()
                    keep.append(starts[f] + slots.to(device))
                else:
                    prev = anchors[j - 1]
                    d = dissimilarity(f, prev)
                    keep.append(starts[f] + top_indices(d, c))
        return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=device)
