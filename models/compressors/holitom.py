"""HoliTom, outer-LLM stage: global temporal segmentation, static-token merging, DPC-KNN
clustering and attention-based selection of dynamic tokens.

Source: "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
arXiv 2505.21334; reference repo cokeshao/HoliTom (``holitom/llava_arch.py``:
``select_static_windows``, ``get_static_dynamic_features``, ``merge_tokens_by_density``,
``merge_tokens_by_attention_density``, ``cluster_dpc_knn``, ``merge_tokens_by_clustering``).

Signals: vision-tower saliency (``VisualTokens.saliency``: the reference's vision-tower
attention per token, pooled like the tokens) and the visual tokens. Applies before the LLM
(``pre_llm``). The inner-LLM stage (at layer 18, keep 50% of the tokens by last-token
attention and merge the rest into their nearest kept token) is **out of scope**: it runs inside
the LLM, not in a pre-LLM compressor.

Reference defaults (environment variables in the code): retention ``RETAIN_RATIO = 0.1``
(replaced by the budget), ``T = tau = 0.80`` (0.65 for the 10%-retention runs), ``BETA = 0.6``,
``K = 7`` DPC-KNN neighbours (used as ``min(K, clusters)``), ``D = 0`` (dynamic tokens are all
chosen by attention, none clustered), ``MAX_WINDOW_SIZE = 1024`` (no practical limit), beta
merging on (``NO_BETA`` unset).

Reference rule (outer stage):

1. ``sim[t, p] = cos(x_t[p], x_{t+1}[p])`` for every position ``p`` of consecutive frames.
2. A window ``[s, e]`` has ``S(s, e)`` static positions (``sim > tau`` for every pair inside it)
   and removes ``S(s, e) * (e - s)`` tokens when its static tokens are averaged over time; a
   dynamic programme partitions the frames into windows maximising the total removed
   (``dp[i] = max(dp[i-1], max_j dp[j] + S(j+1, i) * (i - j - 1))``, strict ``>`` so ties
   keep shorter windows).
3. The ratio is rescaled to what is left: ``r' = min(r / ((N - removed) / N), 1)``.
4. Per window of length > 1: its static tokens (time-averaged) are clustered by DPC-KNN into
   ``round(S r')`` clusters; each non-centre joins its nearest centre (Euclidean) and the
   output is ``beta * centre + (1 - beta) * mean(members)`` (the centre alone if it has none).
   Per frame: ``ceil(n_dynamic r')`` dynamic tokens with the highest attention.

What this implementation changes, and why:

- **Exact budget.** ``K = num_keep(n, budget)`` (:func:`tokensieve.models.budget.num_keep`).
  The reference's rounding (``round`` for clusters, ``ceil`` per frame) keeps about, not
  exactly, ``K``; here ``K`` is split over the pools (each window's static pool, then each of
  its frames' dynamic pools, in time order) in proportion to their sizes by the largest
  remainder (ties to the earlier pool) — the same single ratio ``r'`` for every pool.
- **Budgets above what static merging leaves** (``K > N - removed``; the reference then just
  keeps fewer tokens): static positions are restored as dynamic, the weakest first (lowest
  minimum similarity inside their window; ties to the earlier window, then position), until
  at least ``K`` tokens remain; a budget of 1.0 is therefore the identity.
- ``tau=None`` (default) picks 0.65 when ``K / n <= 0.10`` and 0.80 otherwise, the
  reference's two settings.
- A merged static token is represented by its centre's position in the window's first frame
  (where the reference places it). DPC-KNN ties break deterministically (see :mod:`.dpc_knn`).
- A partial last frame has only its first positions: the missing ones are never static.
- Output tokens are convex combinations of the inputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.dpc_knn import dpc_knn
from tokensieve.models.compressors.frames import SaliencyMerge, frame_sizes, split_count, top_indices
from tokensieve.models.types import VisualTokens


def static_windows(static: torch.Tensor, max_window: int = 1024) -> list[tuple[int, int]]:
    """HoliTom's DP partition of frames into windows ``[(start, end), ...]`` (inclusive).

    Args:
        static: ``bool [T - 1, P]`` — ``static[t, p]``: position ``p`` is similar (``> tau``)
            between frames ``t`` and ``t + 1``.
        max_window: longest window (reference default 1024).

    A window ``[s, e]`` scores ``#{p : static[s..e-1, p] all True} * (e - s)``; the partition
    maximises the total score (ties keep the shorter window, as the reference's strict ``>``).
    """
    t = static.shape[0] + 1
    # count[s][e] = number of positions static across every pair from s to e-1
    count = [[0] * t for _ in range(t)]
    for s in range(t - 1):
        run = torch.cumprod(static[s:].long(), dim=0).sum(-1).tolist()  # e = s+1, s+2, ...
        for i, v in enumerate(run):
            count[s][s + 1 + i] = int(v)
    dp = [0] * t
    prev = [0] * t
    for i in range(t):
        best = dp[i - 1] if i > 0 else 0
        best_j = i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            val = (dp[j] if j >= 0 else 0) + count[j + 1][i] * (i - j - 1)
            if val > best:
                best, best_j = val, j + 1
        dp[i], prev[i] = best, best_j
    windows = []
    i = t - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1]


class HoliTom(SaliencyMerge):
    """HoliTom outer-LLM stage (static merge + DPC-KNN clusters + attention top-k), exact budget.

    Args:
        tau: static-position threshold; None = 0.65 at ``K / n <= 0.10`` else 0.80.
        beta: centre weight in a cluster's output (reference 0.6).
        k: DPC-KNN neighbours (reference 7; used as ``min(k, clusters)`` like the reference).
        max_window: longest static window (reference 1024).

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (padding at the end of each
    sample), ``visual.saliency [B, M]`` (required), ``visual.grid = (t, h, w)``, tokens in
    (t, h, w) row-major order.
    Output: ``Selection.index [B, K]`` ascending representative original indices,
    ``Selection.tokens [B, K, D]``, ``valid [B, K]`` when samples keep different counts (padded
    slots repeat a valid index and token). ``K = num_keep(n_valid, budget)``
    (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        ValueError: ``visual.saliency`` is None or mis-shaped; padding not at the end of a
            sample; more valid tokens than the grid holds; bad hyper-parameters or budget.
    """

    name = "holitom"
    needs_saliency: ClassVar[bool] = True

    def __init__(self, tau: float | None = None, beta: float = 0.6, k: int = 7, max_window: int = 1024):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if k < 1 or max_window < 1:
            raise ValueError(f"k and max_window must be >= 1, got k={k}, max_window={max_window}")
        self.tau, self.beta, self.k, self.max_window = tau, beta, k, max_window

    def threshold(self, k_total: int, n: int) -> float:
        """The static threshold used for a sample keeping ``k_total`` of ``n`` tokens."""
        if self.tau is not None:
            return self.tau
        return 0.65 if k_total * 10 <= n else 0.80

    def _compress(self, visual: VisualTokens, saliency: torch.Tensor, b: int, budget: Budget):
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        x = visual.tokens[b, :n]
        device = x.device
        k_total = num_keep(n, budget)
        if k_total >= n:
            return torch.arange(n, device=device), x
        hw = visual.grid[1] * visual.grid[2]
        t = len(sizes)
        sal = saliency[:n].detach().float()
        tau = self.threshold(k_total, n)

        # [T, hw] similarity of the same position in consecutive frames (-inf where missing)
        with torch.no_grad():
            grid = x.new_zeros(t * hw, x.shape[-1], dtype=torch.float32)
            grid[:n] = x.detach().float()
            grid = F.normalize(grid.view(t, hw, -1), dim=-1, eps=1e-8)
            present = torch.zeros(t * hw, dtype=torch.bool, device=device)
            present[:n] = True
            present = present.view(t, hw)
            sim = (grid[:-1] * grid[1:]).sum(-1)
            sim = sim.masked_fill(~(present[:-1] & present[1:]), float("-inf"))
        windows = static_windows(sim > tau, self.max_window)

        # static positions per window, with their weakest similarity (for restoring)
        static_pos: list[torch.Tensor] = []
        candidates = []  # (min similarity, window, position)
        for w, (s, e) in enumerate(windows):
            if e == s:
                static_pos.append(torch.zeros(0, dtype=torch.long, device=device))
                continue
            run = sim[s:e]
            pos = (run > tau).all(dim=0).nonzero().squeeze(1)
            static_pos.append(pos)
            weakest = run[:, pos].min(dim=0).values.tolist()
            candidates += [(v, w, int(p)) for v, p in zip(weakest, pos.tolist())]
        remaining = n - sum(int(p.numel()) * (e - s) for p, (s, e) in zip(static_pos, windows))
        if remaining < k_total:  # restore the weakest static positions until K tokens remain
            restored: dict[int, set[int]] = {}
            for v, w, p in sorted(candidates, key=lambda c: (c[0], c[1], c[2])):
                if remaining >= k_total:
                    break
                restored.setdefault(w, set()).add(p)
                s, e = windows[w]
                remaining += e - s
            for w, ps in restored.items():
                keep = torch.tensor([int(p) not in ps for p in static_pos[w].tolist()], dtype=torch.bool, device=device)
                static_pos[w] = static_pos[w][keep]

        # pools in time order: (kind, window or frame, candidate local indices)
        pools: list[tuple[str, int, torch.Tensor]] = []
        for w, (s, e) in enumerate(windows):
            if static_pos[w].numel():
                pools.append(("static", w, static_pos[w]))
            for f in range(s, e + 1):
                mask = torch.ones(sizes[f], dtype=torch.bool, device=device)
                sp = static_pos[w]
                mask[sp[sp < sizes[f]]] = False
                pools.append(("dynamic", f, f * hw + mask.nonzero().squeeze(1)))
        pool_sizes = [int(p[2].numel()) for p in pools]
        counts = split_count(k_total, pool_sizes, pool_sizes)

        out_idx, out_tok = [], []
        for (kind, i, cand), c in zip(pools, counts):
            if c == 0:
                continue
            if kind == "dynamic":
                keep = cand[top_indices(sal[cand], c)]
                out_idx.append(keep)
                out_tok.append(x[keep])
                continue
            s, e = windows[i]
            feats = torch.stack([x[f * hw + cand].float() for f in range(s, e + 1)]).mean(0)  # time average
            res = dpc_knn(feats, c, min(self.k, c))
            centers = feats[res.centers]
            with torch.no_grad():
                members = torch.ones(cand.numel(), dtype=torch.bool, device=device)
                members[res.centers] = False
                one_hot = F.one_hot(res.assignment, c).float() * members.unsqueeze(-1).float()
                n_members = one_hot.sum(0).unsqueeze(-1)
            mean = (one_hot.T @ feats) / n_members.clamp(min=1)
            merged = torch.where(n_members > 0, self.beta * centers + (1 - self.beta) * mean, centers)
            out_idx.append(s * hw + cand[res.centers])
            out_tok.append(merged)
        return torch.cat(out_idx), torch.cat(out_tok)
