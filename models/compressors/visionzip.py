"""VisionZip: dominant tokens by vision-tower attention + contextual tokens by similarity merging.

Source: "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv 2412.04467; reference repo dvlab-research/VisionZip (the ``forward`` of its patched CLIP
/ SigLIP encoder: "Dominant Visual Tokens" / "Contextual Visual Tokens").

Signals: vision-tower saliency (``VisualTokens.saliency``, the attention each token receives
inside the vision tower — the reference's [CLS] attention at layer -2, or the mean attention
for SigLIP towers without a [CLS]) and the visual tokens. Applies before the LLM
(``pre_llm``), per frame group (the reference works per image; its video adaptations per frame).

Reference rule, per image of ``n`` tokens keeping ``dominant + contextual`` (README / code
default ``visionzip(model, dominant=54, contextual=10)``, 64 tokens per image):

1. dominant: the ``dominant`` tokens with the highest attention;
2. among the rest (in index order), ``step = max(1, n_rest // contextual)`` and the targets are
   rest positions ``0, step, 2 step, …`` (first ``contextual`` of them);
3. every other remaining token is assigned to its most similar target (cosine, argmax) and
   the contextual token is ``target + mean(assigned)`` (``counts`` clamped to 1, so a target
   with nothing assigned stays itself).

What this implementation changes, and why:

- **Convex merge (default).** The reference's ``target + mean(assigned)`` is a *sum*: it roughly
  doubles the token's norm in the LLM's input space, where token norms matter (the LLM never
  saw such tokens in training). We output ``0.5 * target + 0.5 * mean(assigned)`` — the same
  direction with the same relative weights, exactly half the reference vector — and the
  target itself when nothing is assigned; every merged token is then a convex combination of
  input tokens. ``merge="sum"`` reproduces the reference (not convex).
- **Similarity space.** The reference compares vision-tower *keys* at layer -2; a compressor
  sees only the LLM-input tokens, so cosine is taken on ``visual.tokens``.
- **Exact budget.** ``K = num_keep(n, budget)`` per sample is split over the frame groups in
  proportion to their sizes (largest remainder, ties to the earlier frame). A frame keeping
  ``k`` tokens takes ``round_half_up(k * 10 / 64)`` contextual tokens and the rest dominant —
  the reference's 54 : 10 ratio (54 + 10 at k = 64, 108 + 20 at k = 128).
- The reference's CLIP path also keeps the [CLS] token among the dominant ones; the LLM-input
  tokens here have no [CLS], so nothing is added.
- A partial last frame is handled like any other (fewer tokens); ties keep the lower index;
  keeping every token is the identity.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.frames import SaliencyMerge, frame_sizes, split_count, top_indices
from tokensieve.models.types import VisualTokens


class VisionZip(SaliencyMerge):
    """VisionZip per frame group: top-saliency dominant tokens + merged contextual tokens.

    Args:
        dominant: dominant share of the ratio (reference 54).
        contextual: contextual share of the ratio (reference 10).
        merge: ``"mean"`` (default): contextual token = ``0.5 * target + 0.5 * mean(assigned)``,
            a convex combination; ``"sum"``: the reference's ``target + mean(assigned)``.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (padding at the end of each
    sample), ``visual.saliency [B, M]`` (required), ``visual.grid = (t, h, w)``, tokens in
    (t, h, w) row-major order.
    Output: ``Selection.index [B, K]`` ascending representative original indices (a contextual
    token is represented by its target), ``Selection.tokens [B, K, D]``, ``valid [B, K]`` when
    samples keep different counts (padded slots repeat a valid index and token).
    ``K = num_keep(n_valid, budget)`` (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        ValueError: ``visual.saliency`` is None or mis-shaped; padding not at the end of a
            sample; more valid tokens than the grid holds; bad ``merge``; bad budget.
    """

    name = "visionzip"
    needs_saliency: ClassVar[bool] = True

    def __init__(self, dominant: int = 54, contextual: int = 10, merge: str = "mean"):
        super().__init__()
        if dominant < 0 or contextual < 0 or dominant + contextual == 0:
            raise ValueError(f"need dominant, contextual >= 0 with a positive sum, got {dominant}, {contextual}")
        if merge not in ("mean", "sum"):
            raise ValueError(f"merge must be 'mean' or 'sum', got {merge!r}")
        self.dominant = dominant
        self.contextual = contextual
        self.merge = merge

    def contextual_count(self, k: int) -> int:
        """Contextual tokens of a frame keeping ``k``: ``round_half_up(k * c / (d + c))``."""
        total = self.dominant + self.contextual
        return (2 * k * self.contextual + total) // (2 * total)

    def _compress(self, visual: VisualTokens, saliency: torch.Tensor, b: int, budget: Budget):
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        x = visual.tokens[b, :n]
        device = x.device
        k_total = num_keep(n, budget)
        if k_total >= n:
            return torch.arange(n, device=device), x
        hw = visual.grid[1] * visual.grid[2]
        out_idx, out_tok = [], []
        for f, (size, k) in enumerate(zip(sizes, split_count(k_total, sizes, sizes))):
            if k == 0:
                continue
            start = f * hw
            xf = x[start : start + size]
            n_ctx = self.contextual_count(k)
            n_dom = k - n_ctx
            dom = top_indices(saliency[start : start + size].detach().float(), n_dom)
            out_idx.append(start + dom)
            out_tok.append(xf[dom])
            if n_ctx == 0:
                continue
            rest_mask = torch.ones(size, dtype=torch.bool, device=device)
            rest_mask[dom] = False
            rest = rest_mask.nonzero().squeeze(1)  # index order, as the reference's masked_select
            step = max(1, rest.numel() // n_ctx)
            target_pos = torch.arange(0, rest.numel(), step, device=device)[:n_ctx]
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
            is_target[target_pos] = True
            targets = rest[target_pos]
            others = rest[~is_target]
            merged = xf[targets].float()  # merge arithmetic in float32
            if others.numel():
                with torch.no_grad():
                    xn = F.normalize(xf.detach().float(), dim=-1, eps=1e-8)
                    assign = (xn[others] @ xn[targets].T).argmax(dim=-1)  # first max on ties
                    one_hot = F.one_hot(assign, n_ctx).float()  # [n_others, n_ctx]
                    counts = one_hot.sum(0)
                mean = (one_hot.T @ xf[others].float()) / counts.clamp(min=1).unsqueeze(-1)
                has = (counts > 0).unsqueeze(-1)
                if self.merge == "mean":
                    merged = torch.where(has, 0.5 * merged + 0.5 * mean, merged)
                else:
                    merged = merged + mean  # reference: target + mean(assigned); mean = 0 if empty
            out_idx.append(start + targets)
            out_tok.append(merged)
        return torch.cat(out_idx), torch.cat(out_tok)
