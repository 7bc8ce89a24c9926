"""PruneVid, stage 1 (before the LLM): temporal segmentation, static-token merging and
DPC-KNN clustering of every segment's tokens.

Source: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
Huang, Zhou, Han — arXiv 2412.16117; reference repo ``Visual-AI/PruneVid``
(``models/pllava/modeling_pllava.py``: ``PllavaForConditionalGeneration.merge_frames_dynamic``,
``spatial_merge_tokens``, ``compute_cluster_vectors``, and the module functions
``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``).

Signals: the visual tokens only (features). Applies before the LLM (``pre_llm``), on the
tokens in the LLM's input space (the reference runs it on PLLaVA's projected and pooled
16 x 12 x 12 features). **Stage 2 is out of scope**: inside the LLM, at layer 10, the reference
keeps the top ``alpha = 40%`` of the visual tokens by text-to-video attention (and prunes the KV
cache); that needs the LLM's attention, so it is not part of a pre-LLM compressor.

Reference defaults (``scripts/eval.sh``, "the default setting used in our paper"; the code
reads them from the config, so code and paper agree): ``tau = 0.8`` (static threshold),
``temporal_segment_ratio = 0.25`` (segments = ``int(T * 0.25)`` DPC-KNN clusters of frames),
``cluster_ratio = 0.5`` (replaced by the budget here), DPC-KNN ``k = 7`` neighbours for both
the frame clustering and the token clustering; stage 2: ``selected_layer = 10``, ``alpha = 0.4``.

Reference rule (stage 1), per video of T frames with P positions each:

1. **Segments.** DPC-KNN (:mod:`.dpc_knn`) over the frame means ``mean_p x[t, p]`` into
   ``int(T * temporal_segment_ratio)`` clusters labels the frames; ``refine_clusters`` makes
   the labels contiguous (each label keeps its longest run(s) — every run of the maximal length;
   a label whose longest run is a single frame loses all its runs; dropped runs take the label
   of the longer neighbouring run, the left one on ties, label 0 when there is none) and
   ``segment_lengths`` cuts the frames where the label changes.
2. **Static positions.** In a segment of W frames, position p is static when the mean pairwise
   cosine of its W tokens (off-diagonal mean of the W x W cosine matrix) is ``> tau``; a
   segment of one frame has none (the reference divides 0 by 0 there, and ``nan > tau`` is
   False). Static tokens are averaged over the segment's frames: one token per static position.
3. **Clustering.** The segment's time-averaged static tokens form one pool and each frame's
   dynamic (non-static) tokens form another; each pool is DPC-KNN clustered (k = 7) into
   ``int(size * cluster_ratio)`` clusters and each cluster becomes the **plain mean** of its
   members (``compute_cluster_vectors``); pools of at most 14 tokens are left as they are.

What this implementation changes, and why:

- **Exact budget.** ``K = num_keep(n, budget)`` (:func:`tokensieve.models.budget.num_keep`,
  the only rounding rule). After static merging leaves ``n'`` tokens, ``K`` is split over the
  pools (in time order: segment 0's static pool, then its frames' dynamic pools, then segment
  1 ...) in proportion to their sizes, by the largest remainder, each pool capped at its size
  (:func:`.frames.split_count`) — one common ratio ``K / n'`` instead of ``cluster_ratio``. A
  pool granted ``c`` tokens is DPC-KNN clustered into exactly ``c`` clusters (``c`` = its size:
  kept as is; ``c = 0``: dropped, which only happens when ``K`` is smaller than the number of
  pools). The reference's "pools of <= 14 tokens are not clustered" rule is dropped: it makes
  the kept count depend on pool sizes rather than on the budget.
- **Budgets above what static merging leaves** (``K > n'``; the reference would keep fewer
  tokens): static positions are restored as dynamic ones, the least similar first (lowest mean
  pairwise cosine; ties to the earlier segment, then the lower position), until at least ``K``
  tokens remain. ``K = n`` returns the input unchanged.
- **Representative index** of a merged token: the **smallest original index** among the
  original tokens it averages (for a static cluster, the lowest static position of the cluster
  in the segment's first frame), so kept positions are original ones and ascending; a merged
  token takes the position (M-RoPE id) of its earliest member. Each original token belongs to
  at most one output, so indices are unique.
- ``int(T * temporal_segment_ratio)`` is raised to at least 1 segment cluster, and ``k`` is
  clamped to the number of points (the reference would fail for fewer than 7 frames / tokens).
- DPC-KNN ties break deterministically (no ``rand * 1e-6``; see :mod:`.dpc_knn`).
- A partial last frame (``n`` not a multiple of ``h * w``) has only its first positions: its
  mean is over those, and the missing positions are never static in its segment.
- Batch > 1 with per-sample padding (the reference's ``masked_select(...).view(B, ...)`` needs
  the same static count in every sample, i.e. batch 1).
- Output tokens are convex combinations of the inputs (:meth:`PruneVid.merge_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import Compressor, pack_merged
from tokensieve.models.compressors.dpc_knn import dpc_knn
from tokensieve.models.compressors.frames import frame_sizes, split_count
from tokensieve.models.types import Query, Selection, VisualTokens


def refine_segments(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous frame segments ``[(start, end), ...]`` (inclusive) from per-frame cluster labels.

    Follows the reference's ``refine_clusters`` then ``segment_lengths``: per label, every run of
    its maximal length is kept and its other runs are dropped (all of them when the maximal
    length is 1); each dropped stretch, scanning left to right, takes the label of the longer
    of its neighbouring runs (left on ties; the left run already includes stretches relabelled
    earlier in the scan; label 0 when there is no neighbour); segments are the runs of equal
    labels of the result.
    """
    n = len(labels)
    if n == 0:
        return []
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i - 1))
            start = i
    refined = list(labels)
    for segs in runs.values():
        longest = max(e - s + 1 for s, e in segs)
        for s, e in segs:
            if longest == 1 or e - s + 1 < longest:
                refined[s : e + 1] = [None] * (e - s + 1)
    i = 0
    while i < n:
        if refined[i] is not None:
            i += 1
            continue
        s = i
        while i < n and refined[i] is None:
            i += 1
        e = i - 1
        left_label, left_len = None, 0
        if s > 0:
            left_label = refined[s - 1]
            j = s - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_len = s - 1 - j
        right_label, right_len = None, 0
        if e < n - 1:
            right_label = refined[e + 1]
            j = e + 1
            while j < n and refined[j] == right_label:
                j += 1
            right_len = j - e - 1
        if right_len > left_len:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[s : e + 1] = [0 if new is None else new] * (e - s + 1)
    segments, start = [], 0
    for i in range(1, n + 1):
        if i == n or refined[i] != refined[start]:
            segments.append((start, i - 1))
            start = i
    return segments


def temporal_segments(frame_means: torch.Tensor, ratio: float = 0.25, k: int = 7) -> list[tuple[int, int]]:
    """PruneVid's segmentation of ``frame_means [T, D]`` into contiguous ``[(start, end), ...]``.

    DPC-KNN with ``max(1, int(T * ratio))`` clusters and ``k`` neighbours labels the frames
    (each frame joins its nearest centre); :func:`refine_segments` makes the labels contiguous.
    """
    t = frame_means.shape[0]
    if t == 0:
        return []
    res = dpc_knn(frame_means, max(1, int(t * ratio)), k)
    return refine_segments(res.assignment.tolist())


def mean_pairwise_cosine(frames: torch.Tensor) -> torch.Tensor:
    """``float [P]``: per position, the mean cosine over ordered pairs of distinct frames of
    ``frames [W, P, D]`` (W >= 2) — the reference's ``(sim.sum(-2) - 1).sum(-2) / (W (W - 1))``."""
    w = frames.shape[0]
    unit = F.normalize(frames.float(), dim=-1, eps=1e-8)
    gram = torch.einsum("wpd,tpd->pwt", unit, unit)  # [P, W, W]
    off = gram.sum(dim=(-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (w * (w - 1))


class PruneVid(Compressor):
    """PruneVid stage 1: segments, static merging and DPC-KNN clusters, exactly K tokens.

    Args:
        tau: static threshold on the mean pairwise cosine (reference 0.8).
        temporal_segment_ratio: frame clusters per frame for the segmentation (reference 0.25).
        k: DPC-KNN neighbours for the frame and token clustering (reference 7).

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (each sample's valid tokens
    are a prefix; padding at the end), ``visual.grid = (t, h, w)`` with tokens in (t, h, w)
    row-major order. ``query`` is ignored.
    Output: ``Selection.index [B, K]`` — ascending, for each output token the smallest original
    index among the tokens it averages; ``Selection.tokens [B, K, D]`` — those averages
    (convex combinations, see :meth:`merge_weights`); ``Selection.valid [B, K]`` when samples
    keep different counts (padded slots repeat the last kept index and token).
    ``K = num_keep(n_valid, budget)`` per sample (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        TypeError, ValueError: an invalid budget (:func:`tokensieve.models.budget.check_budget`).
        ValueError: padding not at the end of a sample, more valid tokens than the grid holds,
            or bad hyper-parameters.
    """

    name = "prunevid"

    def __init__(self, tau: float = 0.8, temporal_segment_ratio: float = 0.25, k: int = 7):
        super().__init__()
        if not 0.0 < temporal_segment_ratio <= 1.0:
            raise ValueError(f"temporal_segment_ratio must be in (0, 1], got {temporal_segment_ratio}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.tau, self.temporal_segment_ratio, self.k = tau, temporal_segment_ratio, k

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        indices, merged = [], []
        for b, (rows, cols, vals, reps) in enumerate(self._plan(visual, budget)):
            x = visual.tokens[b]
            dtype = torch.promote_types(x.dtype, torch.float32)
            out = torch.zeros(reps.numel(), x.shape[-1], dtype=dtype, device=x.device)
            out = out.index_add(0, rows, x[cols].to(dtype) * vals.to(dtype).unsqueeze(-1))
            indices.append(reps)
            merged.append(out)
        return pack_merged(indices, merged, visual.tokens)

    def merge_weights(self, visual: VisualTokens, budget: Budget = 0.25) -> list[torch.Tensor]:
        """Per sample, ``float64 [K_b, M]``: row g holds the weights of the original tokens
        averaged into output g (non-negative, zero on padding, rows sum to 1), so
        ``forward(...).tokens[b, :K_b] == merge_weights(...)[b] @ visual.tokens[b]``; rows are in
        ascending representative order, like the Selection."""
        out = []
        for rows, cols, vals, reps in self._plan(visual, budget):
            w = torch.zeros(reps.numel(), visual.num_tokens, dtype=torch.float64, device=visual.tokens.device)
            w.index_put_((rows, cols), vals, accumulate=True)
            out.append(w[torch.argsort(reps)])
        return out

    def _plan(self, visual: VisualTokens, budget: Budget):
        """Per sample ``(rows, cols, vals, reps)``: output ``rows[e]`` takes ``vals[e]`` (float64)
        of original token ``cols[e]``; ``reps [K]`` are the representative original indices."""
        check_budget(budget)
        return [self._plan_sample(visual, b, budget) for b in range(visual.batch_size)]

    def _plan_sample(self, visual: VisualTokens, b: int, budget: Budget):
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        device = visual.tokens.device
        k_total = num_keep(n, budget)
        if k_total >= n:  # nothing to merge (also n == 0)
            ar = torch.arange(n, device=device)
            return ar, ar, torch.ones(n, dtype=torch.float64, device=device), ar
        hw = visual.grid[1] * visual.grid[2]
        t = len(sizes)
        with torch.no_grad():
            x = visual.tokens[b, :n].detach().float()
            grid = x.new_zeros(t * hw, x.shape[-1])
            grid[:n] = x
            grid = grid.view(t, hw, -1)
            present = (torch.arange(t * hw, device=device) < n).view(t, hw)
            means = torch.stack([grid[f, : sizes[f]].mean(0) for f in range(t)])
            segments = temporal_segments(means, self.temporal_segment_ratio, self.k)

            # static positions per segment, with their similarity (for restoring)
            static: list[torch.Tensor] = []
            candidates = []  # (similarity, segment, position)
            for g, (s, e) in enumerate(segments):
                if e == s:
                    static.append(torch.zeros(0, dtype=torch.long, device=device))
                    continue
                sim = mean_pairwise_cosine(grid[s : e + 1])
                pos = ((sim > self.tau) & present[s : e + 1].all(0)).nonzero().squeeze(1)
                static.append(pos)
                candidates += [(v, g, int(p)) for v, p in zip(sim[pos].tolist(), pos.tolist())]
            remaining = n - sum(int(p.numel()) * (e - s) for p, (s, e) in zip(static, segments))
            if remaining < k_total:  # restore the least similar static positions first
                restored: dict[int, set[int]] = {}
                for _, g, p in sorted(candidates):
                    if remaining >= k_total:
                        break
                    restored.setdefault(g, set()).add(p)
                    s, e = segments[g]
                    remaining += e - s
                for g, ps in restored.items():
                    keep = torch.tensor([p not in ps for p in static[g].tolist()], dtype=torch.bool, device=device)
                    static[g] = static[g][keep]

            # pools in time order: original indices [W', N] (W' frames averaged) + features [N, D]
            pools: list[tuple[torch.Tensor, torch.Tensor]] = []
            for g, (s, e) in enumerate(segments):
                sp = static[g]
                if sp.numel():
                    cols = torch.arange(s, e + 1, device=device).unsqueeze(1) * hw + sp.unsqueeze(0)
                    pools.append((cols, x[cols].mean(0)))
                for f in range(s, e + 1):
                    mask = torch.ones(sizes[f], dtype=torch.bool, device=device)
                    mask[sp[sp < sizes[f]]] = False
                    cols = (f * hw + mask.nonzero().squeeze(1)).unsqueeze(0)
                    pools.append((cols, x[cols[0]]))
            pool_sizes = [int(c.shape[1]) for c, _ in pools]
            counts = split_count(k_total, pool_sizes, pool_sizes)

            rows, cols_all, vals, reps = [], [], [], []
            offset = 0
            for (cols, feats), c in zip(pools, counts):
                if c == 0:
                    continue
                size = cols.shape[1]
                if c >= size:
                    assign = torch.arange(size, device=device)
                else:
                    assign = dpc_knn(feats, c, self.k).assignment
                members = torch.bincount(assign, minlength=c).double()
                w_frames = cols.shape[0]
                rows.append((offset + assign).expand(w_frames, -1).reshape(-1))
                cols_all.append(cols.reshape(-1))
                vals.append((1.0 / (members[assign] * w_frames)).expand(w_frames, -1).reshape(-1))
                rep = torch.full((c,), n, dtype=torch.long, device=device)
                reps.append(rep.scatter_reduce(0, assign, cols[0], reduce="amin"))
                offset += c
        return torch.cat(rows), torch.cat(cols_all), torch.cat(vals), torch.cat(reps)
