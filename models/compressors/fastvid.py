"""FastVID: dynamic temporal segmentation (DySeg) + spatio-temporal pruning (STPrune).

Source: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
arXiv 2503.11187; reference repo LunarShen/FastVID (the "FastVID" block of
``LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``; its Qwen2.5-VL variant takes the
frame feature as the mean of the frame's merged tokens).

Signals: vision-tower saliency (``VisualTokens.saliency``: the reference's per-token
[CLS]-style attention, ``frame_attn_weights``) and the visual tokens. Applies before the LLM
(``pre_llm``; the reference prunes right before the first decoder layer, which is the same
thing). Kept tokens keep their original (M-RoPE) positions.

Defaults follow the reference code (the environment defaults read in ``set_my_kwargs``; no
paper/code disagreement is recorded): retention ``r = 0.10`` (replaced by the budget), ``c = 8``,
``tau = 0.9`` (DySeg), ``d = 0.4``, ``p = 4``, ``beta = 0.6`` (``fastvid_DTM_alpha``), and
DPC-KNN with ``k = 4`` neighbours (hard-coded).

Reference rule:

1. **DySeg.** Frame features ``g_t``; ``s_t = cos(g_t, g_{t+1})``; cut after frame ``t`` for the
   ``c - 1`` smallest ``s_t`` and wherever ``s_t < tau``.
2. **STPrune**, per frame ``m = int(n_f * r)`` tokens: ``m - int(m * d)`` *salient* (top
   attention) and ``int(m * d)`` *contextual*. In a segment of ``L`` frames the anchor frames
   are the last frame and every ``p``-th frame before it; each anchor gets
   ``(L * int(m d)) // ceil(L / p)`` contextual tokens, the other frames none.
3. **DTM.** In each anchor frame, DPC-KNN (see :mod:`.dpc_knn`) over the frame's non-salient
   tokens; the top-scoring ones are the anchor tokens. Every non-salient token of the
   *whole segment* (anchor and non-anchor frames) is assigned to its most cosine-similar anchor
   token of that anchor frame (argmax) — the assignment is repeated for each anchor frame — and
   an anchor token with ``c`` assigned tokens becomes ``w * anchor + (1 - w) * mean(assigned)``,
   ``w = max(1 / (c + 1), beta)``.

What this implementation changes, and why:

- **Exact budget.** ``K = num_keep(n, budget)`` (:func:`tokensieve.models.budget.num_keep`) is
  split over frames in proportion to their sizes (largest remainder, ties to the earlier
  frame): that is each frame's ``m``. The segment's contextual total ``sum int(m_f d)`` is split
  evenly over its anchors (largest remainder, ties to the earlier anchor) instead of
  ``// ceil(L / p)``, which drops the remainder. An anchor cannot hold more contextual tokens
  than it has non-salient tokens; the excess (only at high budgets) becomes extra salient
  tokens of the segment's non-anchor frames (split in proportion to their free tokens).
- **Frame feature** ``g_t`` = mean of the frame's tokens (as the reference's Qwen2.5-VL path;
  its LLaVA-OneVision path uses the SigLIP pooling head, which a compressor cannot see).
- **Determinism.** The reference adds ``rand * 1e-6`` to the density; ties here break toward the
  lower index everywhere (salient top-k, DPC-KNN, DySeg cuts).
- ``c - 1`` is clamped to the number of frame pairs; a partial last frame is handled like any
  other frame (fewer tokens); keeping every token is the identity (no merging).
- Output tokens are convex combinations of the inputs; a merged token is represented by its
  anchor token's original index.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.dpc_knn import dpc_knn
from tokensieve.models.compressors.frames import SaliencyMerge, frame_sizes, split_count, top_indices
from tokensieve.models.types import VisualTokens


def dyseg(frame_features: torch.Tensor, c: int = 8, tau: float = 0.9) -> list[int]:
    """DySeg segment lengths for frame features ``[T, D]``.

    ``s_t = cos(g_t, g_{t+1})``; cut after frame ``t`` for the ``min(c - 1, T - 1)`` smallest
    ``s_t`` (ties to the earlier pair) and wherever ``s_t < tau``. Returns the segment lengths
    in order (they sum to T).
    """
    t = frame_features.shape[0]
    if t <= 1:
        return [t] if t else []
    g = F.normalize(frame_features.detach().float(), dim=-1, eps=1e-8)
    sim = (g[:-1] * g[1:]).sum(-1)
    n_top = max(0, min(c - 1, t - 1))
    cuts = set(torch.sort(sim, stable=True).indices[:n_top].tolist())
    cuts |= set((sim < tau).nonzero().squeeze(1).tolist())
    bounds = [-1] + sorted(cuts) + [t - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]


def anchor_frames(length: int, p: int) -> list[int]:
    """Anchor positions in a segment of ``length`` frames: the last and every ``p``-th before it."""
    return [j for j in range(length) if (length - 1 - j) % p == 0]


class FastVID(SaliencyMerge):
    """FastVID (DySeg + STPrune with density-based token merging), exact budget.

    Args:
        c: DySeg minimum number of segments (reference 8).
        tau: DySeg similarity threshold (reference 0.9).
        d: contextual share of each frame's kept tokens (reference 0.4).
        p: anchor-frame stride inside a segment (reference 4).
        beta: lower bound of the anchor token's weight in a merge (reference 0.6).
        k: DPC-KNN neighbours (reference 4).

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (padding at the end of each
    sample), ``visual.saliency [B, M]`` (required), ``visual.grid = (t, h, w)``, tokens in
    (t, h, w) row-major order.
    Output: ``Selection.index [B, K]`` ascending representative original indices,
    ``Selection.tokens [B, K, D]`` (salient tokens unchanged, contextual tokens merged),
    ``valid [B, K]`` when samples keep different counts (padded slots repeat a valid index and
    token). ``K = num_keep(n_valid, budget)`` (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        ValueError: ``visual.saliency`` is None or mis-shaped; padding not at the end of a
            sample; more valid tokens than the grid holds; bad hyper-parameters or budget.
    """

    name = "fastvid"
    needs_saliency: ClassVar[bool] = True

    def __init__(self, c: int = 8, tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6, k: int = 4):
        super().__init__()
        if c < 1 or p < 1 or k < 1:
            raise ValueError(f"c, p, k must be >= 1, got c={c}, p={p}, k={k}")
        if not 0.0 <= d <= 1.0 or not 0.0 <= beta <= 1.0:
            raise ValueError(f"d and beta must be in [0, 1], got d={d}, beta={beta}")
        self.c, self.tau, self.d, self.p, self.beta, self.k = c, tau, d, p, beta, k

    def _compress(self, visual: VisualTokens, saliency: torch.Tensor, b: int, budget: Budget):
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        x = visual.tokens[b, :n]
        device = x.device
        k_total = num_keep(n, budget)
        if k_total >= n:
            return torch.arange(n, device=device), x
        hw = visual.grid[1] * visual.grid[2]
        starts = [f * hw for f in range(len(sizes))]
        sal = saliency[:n].detach().float()

        # per-frame kept m, split into salient + contextual as the reference does
        m = split_count(k_total, sizes, sizes)
        n_ctx = [int(mf * self.d) for mf in m]
        n_sal = [mf - cf for mf, cf in zip(m, n_ctx)]

        frame_feat = torch.stack([x[s : s + z].detach().float().mean(0) for s, z in zip(starts, sizes)])
        segments = dyseg(frame_feat, self.c, self.tau)

        # contextual counts of anchor frames; overflow -> extra salient in non-anchor frames
        ctx_of = [0] * len(sizes)
        seg_of: list[tuple[int, int]] = []  # (segment start frame, length) per segment
        first = 0
        for length in segments:
            frames = list(range(first, first + length))
            anchors = [first + j for j in anchor_frames(length, self.p)]
            total_ctx = sum(n_ctx[f] for f in frames)
            caps = [sizes[f] - n_sal[f] for f in anchors]
            held = min(total_ctx, sum(caps))
            for f, cnt in zip(anchors, split_count(held, [1] * len(anchors), caps)):
                ctx_of[f] = cnt
            spill = total_ctx - held
            if spill:
                non_anchor = [f for f in frames if f not in anchors]
                free = [sizes[f] - n_sal[f] for f in non_anchor]
                for f, extra in zip(non_anchor, split_count(spill, free, free)):
                    n_sal[f] += extra
            seg_of.append((first, length))
            first += length

        out_idx, out_tok = [], []
        rest_of: list[torch.Tensor] = []  # local (in-frame) positions of non-salient tokens
        for f, (s, z) in enumerate(zip(starts, sizes)):
            keep = top_indices(sal[s : s + z], n_sal[f])
            out_idx.append(s + keep)
            out_tok.append(x[s + keep])
            mask = torch.ones(z, dtype=torch.bool, device=device)
            mask[keep] = False
            rest_of.append(mask.nonzero().squeeze(1))

        for first, length in seg_of:
            frames = range(first, first + length)
            pool = torch.cat([starts[f] + rest_of[f] for f in frames])  # sample-local indices
            if pool.numel() == 0:
                continue
            pool_x = x[pool].float()  # merge arithmetic in float32 (exact counts under bf16)
            with torch.no_grad():
                pool_n = F.normalize(pool_x.detach(), dim=-1, eps=1e-8)
            for f in frames:
                c = ctx_of[f]
                if c == 0:
                    continue
                cand = starts[f] + rest_of[f]
                centers = dpc_knn(x[cand], c, self.k).centers
                # DPC-KNN centres come back ascending; the reference orders by score, which does
                # not change the merged set.
                target = cand[centers]
                with torch.no_grad():
                    tn = F.normalize(x[target].detach().float(), dim=-1, eps=1e-8)
                    assign = (pool_n @ tn.T).argmax(dim=-1)
                    one_hot = F.one_hot(assign, c).float()  # [pool, c]
                    counts = one_hot.sum(0)
                    w = (1.0 / (counts + 1.0)).clamp(min=self.beta).unsqueeze(-1)
                anchor = x[target].float()
                mean = (one_hot.T @ pool_x) / counts.clamp(min=1).unsqueeze(-1)
                merged = torch.where(counts.unsqueeze(-1) > 0, w * anchor + (1 - w) * mean, anchor)
                out_idx.append(target)
                out_tok.append(merged)
        return torch.cat(out_idx), torch.cat(out_tok)
