"""LLaVA-Scissor: semantic connected components within frames, then across time, then every
original token merged into its nearest compressed token.

Source: "LLaVA-Scissor: Token Compression with Semantic Connected Components for Video LLMs",
Sun, Zhao, Wei, Hou — arXiv 2506.21862; reference repo ``HumanMLLM/LLaVA-Scissor``
(``llava/model/llava_arch_zip.py``: ``approximate_components``, ``UnionFind`` and the
``mm_use_zip`` branch of ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``).

Signals: the visual tokens only (features). Applies before the LLM (``pre_llm``), on the
projected (and, in the reference, 2x2-pooled) tokens of each frame.

Reference defaults: similarity threshold ``tau = 0.9`` and error tolerance ``epsilon = 0.05``
(README and the released models' ``config.json``: ``mm_zip_tau``, ``mm_zip_epsilon``; the code's
fall-back when the config lacks the key is ``tau = 0.95``) — 0.9 is followed here. The README
says to "adjust ``mm_zip_tau`` to control the token retention ratio": the reference has no
budget argument; the count follows from ``tau``.

Reference rule, per video (frames of P tokens, cosine = dot product of L2-normalised tokens):

1. **Spatial.** In each frame, the graph "cosine > tau" (self included) is split into
   connected components; each component becomes the plain mean of its tokens.
2. **Temporal.** Over all step-1 tokens of the video (every frame, not just neighbours), the
   same graph and threshold give components again; each becomes the plain mean of its step-1
   tokens (a mean of means: not weighted by how many originals each holds). These are the
   ``C`` "anchors".
3. **Merge back.** Every original token (all of them, whichever component it came from) is
   assigned to the anchor of highest cosine; output ``k`` is
   ``(anchor_k + sum of its assigned tokens) / (count_k + 1)``.

What this implementation changes, and why:

- **Exact budget.** ``K = num_keep(n, budget)`` (:func:`tokensieve.models.budget.num_keep`,
  the only rounding rule) replaces the fixed ``tau``, as the README suggests, by searching
  ``tau``: steps 1-2 run first at ``tau``; when they give ``C != K`` components, ``tau`` is
  bisected — over ``[-1, tau]`` when ``C > K`` (a lower threshold joins more), over ``[tau, 1]``
  when ``C < K`` (at 1 no pair qualifies, so every token is its own component) — for at most
  ``search_steps`` halvings, stopping early at ``C == K``. If no probe hits ``K`` exactly, the
  upper end of the final bracket (which has ``C >= K``) is used and only the ``K`` largest
  components (most original tokens; ties to the smaller representative index) keep their
  anchors; in step 3 the tokens of the other components merge into their nearest kept anchor
  like every other token.
- **Exact components.** The reference approximates them: with ``epsilon`` it samples
  ``min(n, ceil(ln n / epsilon^2))`` nodes at random and unions only their neighbourhoods (all
  nodes are sampled below about 3,300 tokens), and it collects each component as the nodes
  whose *direct* union-find parent is the root, so nodes deeper in the tree drop out of step
  1/2 (they still join in step 3). Here components are exact (label propagation with pointer
  jumping, :func:`connected_components`) and deterministic; ``epsilon`` has no counterpart.
- **Representative index** of output ``k``: the **smallest original index** among the tokens
  of its component (a member of its anchor, so it carries weight in the output); ascending and
  unique since components are disjoint. A merged token therefore takes the position (M-RoPE
  id) of its component's earliest token; the reference renumbers positions instead.
- Ties in step 3 go to the anchor with the smaller representative index (``argmax`` keeps the
  first maximum); cosines are clamped to ``[-1, 1]`` and use ``eps = 1e-8`` in the norm.
- Cosines of step-1 means are computed as cosines of their sums from the token Gram matrix
  (``S x x^T S^T``, scale-invariant, so equal to the reference's normalised means up to
  rounding), so each ``tau`` probe costs O(n^2) time and memory, n the sample's valid tokens;
  one sample takes at most ``1 + search_steps`` probes.
- ``K = n`` returns the input unchanged. A partial last frame (``n`` not a multiple of
  ``h * w``) is clustered over the positions it has. Batch > 1 with per-sample padding.
- Output tokens are convex combinations of the inputs (:meth:`LLaVAScissor.merge_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import Compressor, pack_merged
from tokensieve.models.compressors.frames import frame_sizes
from tokensieve.models.types import Query, Selection, VisualTokens


def connected_components(adj: torch.Tensor) -> torch.Tensor:
    """Connected components of the undirected graphs ``adj bool [..., N, N]`` (symmetric).

    Returns:
        ``long [..., N]``: for every node, the smallest node index of its component.

    Min-label propagation with pointer jumping: each node takes the smallest label among
    itself and its neighbours, then labels are shortcut (``l <- l[l]``) until stable; repeat
    until nothing changes. A label is always a node of the same component, and at the fixed
    point labels agree across every edge, so each component carries its minimum index.
    Sparse graphs (at most 32 edges per node on average) propagate over the edge list, denser
    ones over the dense matrix; the result is the same.
    """
    n = adj.shape[-1]
    lead = adj.shape[:-1]
    flat = adj.reshape(-1, n, n)
    batch = flat.shape[0]
    offset = torch.arange(batch, device=adj.device).unsqueeze(1) * n
    labels = torch.arange(batch * n, device=adj.device)
    if n == 0:
        return labels.view(lead)
    if int(torch.count_nonzero(flat)) <= 32 * batch * n:
        b, i, j = flat.nonzero(as_tuple=True)
        src, dst = b * n + i, b * n + j

        def step(lab: torch.Tensor) -> torch.Tensor:
            return lab.scatter_reduce(0, src, lab[dst], reduce="amin")

    else:

        def step(lab: torch.Tensor) -> torch.Tensor:
            local = (lab.view(batch, n) - offset).int()
            nb = torch.where(flat, local.unsqueeze(-2), n).amin(dim=-1).long() + offset
            return torch.minimum(lab, nb.reshape(-1))

    while True:
        new = step(labels)
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            return (labels.view(batch, n) - offset).view(lead)
        labels = new


@dataclass
class ScissorPartition:
    """Steps 1-2 of LLaVA-Scissor for one sample at one threshold.

    Attributes:
        tau: the threshold used.
        group: ``long [n]`` — step-1 component of each token, numbered by smallest member.
        group_size: ``long [G]`` — tokens per step-1 component.
        component: ``long [G]`` — step-2 component of each step-1 component, numbered by
            smallest original member.
        num_components: C.
    """

    tau: float
    group: torch.Tensor
    group_size: torch.Tensor
    component: torch.Tensor
    num_components: int


def _renumber(keys: torch.Tensor) -> torch.Tensor:
    """Dense ids 0.. of ``keys``, ordered by key value."""
    return torch.unique(keys, sorted=True, return_inverse=True)[1]


class LLaVAScissor(Compressor):
    """LLaVA-Scissor (spatial + temporal semantic connected components, merge back), exactly K.

    Args:
        tau: similarity threshold, the search's first probe (reference 0.9).
        search_steps: most bisection steps on ``tau`` before falling back to keeping the
            largest components.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (each sample's valid tokens
    are a prefix; padding at the end), ``visual.grid = (t, h, w)`` with tokens in (t, h, w)
    row-major order. ``query`` is ignored.
    Output: ``Selection.index [B, K]`` — ascending, the smallest original index of each kept
    component; ``Selection.tokens [B, K, D]`` — ``(anchor + assigned tokens) / (count + 1)``,
    convex combinations of the sample's valid tokens (:meth:`merge_weights`);
    ``Selection.valid [B, K]`` when samples keep different counts (padded slots repeat the last
    kept index and token). ``K = num_keep(n_valid, budget)`` per sample
    (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        TypeError, ValueError: an invalid budget (:func:`tokensieve.models.budget.check_budget`).
        ValueError: padding not at the end of a sample, more valid tokens than the grid holds,
            or bad hyper-parameters.
    """

    name = "llava_scissor"

    def __init__(self, tau: float = 0.9, search_steps: int = 12):
        super().__init__()
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [-1, 1], got {tau}")
        if search_steps < 0:
            raise ValueError(f"search_steps must be >= 0, got {search_steps}")
        self.tau, self.search_steps = tau, search_steps

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
        """Per sample, ``float64 [K_b, M]``: row g holds the weights of the original tokens in
        output g (non-negative, zero on padding, rows sum to 1), so
        ``forward(...).tokens[b, :K_b] == merge_weights(...)[b] @ visual.tokens[b]``."""
        out = []
        for rows, cols, vals, reps in self._plan(visual, budget):
            w = torch.zeros(reps.numel(), visual.num_tokens, dtype=torch.float64, device=visual.tokens.device)
            w.index_put_((rows, cols), vals, accumulate=True)
            out.append(w)  # reps are already ascending
        return out

    def partition(self, visual: VisualTokens, b: int, tau: float) -> ScissorPartition:
        """Steps 1-2 (spatial, then temporal components) of sample ``b`` at threshold ``tau``."""
        x, gram, cos, sim1, present = self._frames(visual, b)
        return self._partition(x, gram, cos, sim1, present, tau)

    def _frames(self, visual: VisualTokens, b: int):
        """Valid tokens ``x [n, D]`` (float32); ``gram = x x^T`` and the token cosines ``cos``,
        both ``[n, n]``, computed once and reused by every threshold; the within-frame cosines
        ``[T, hw, hw]``; the presence mask ``[T, hw]``."""
        sizes = frame_sizes(visual, b)
        n = sum(sizes)
        hw = visual.grid[1] * visual.grid[2]
        t = len(sizes)
        x = visual.tokens[b, :n].detach().float()
        gram = x @ x.T
        norm = gram.diagonal().clamp_min(1e-16).sqrt()
        slots = torch.arange(t * hw, device=x.device).view(t, hw)
        present = slots < n
        slots = slots.clamp(max=max(n - 1, 0))
        cos = (gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))).clamp(-1.0, 1.0)
        sim1 = cos[slots.unsqueeze(-1), slots.unsqueeze(-2)]  # [T, hw, hw]
        return x, gram, cos, sim1, present

    @staticmethod
    def _partition(
        x: torch.Tensor, gram: torch.Tensor, cos: torch.Tensor, sim1: torch.Tensor, present: torch.Tensor, tau: float
    ) -> ScissorPartition:
        n = x.shape[0]
        t, hw = present.shape
        adj1 = (sim1 > tau) & present.unsqueeze(-1) & present.unsqueeze(-2)
        lab1 = connected_components(adj1)  # [T, hw]: smallest position of the component
        keys = (torch.arange(t, device=x.device).unsqueeze(1) * hw + lab1).reshape(-1)[:n]
        group = _renumber(keys)
        g = int(group.max()) + 1 if n else 0
        group_size = torch.bincount(group, minlength=g)
        # cosine of the step-1 means = cosine of their sums: S gram S^T, S the [G, n] membership
        if g == n:  # every token alone: group == arange(n)
            adj2 = cos > tau
        else:
            rows = torch.zeros(g, n, dtype=gram.dtype, device=gram.device).index_add(0, group, gram)
            sums_gram = torch.zeros(g, g, dtype=gram.dtype, device=gram.device).index_add(1, group, rows)
            norm = sums_gram.diagonal().clamp_min(1e-16).sqrt()
            adj2 = (sums_gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))).clamp(-1.0, 1.0) > tau
        component = _renumber(connected_components(adj2))  # groups are numbered by smallest member
        c = int(component.max()) + 1 if g else 0
        return ScissorPartition(tau, group, group_size, component, c)

    def _plan(self, visual: VisualTokens, budget: Budget):
        check_budget(budget)
        return [self._plan_sample(visual, b, budget) for b in range(visual.batch_size)]

    def _plan_sample(self, visual: VisualTokens, b: int, budget: Budget):
        """``(rows, cols, vals, reps)``: output ``rows[e]`` takes ``vals[e]`` (float64) of
        original token ``cols[e]``; ``reps [K]`` ascending representative indices."""
        n = int(visual.valid[b].sum())
        device = visual.tokens.device
        k_total = num_keep(n, budget)
        if k_total >= n:
            frame_sizes(visual, b)  # validates the layout
            ar = torch.arange(n, device=device)
            return ar, ar, torch.ones(n, dtype=torch.float64, device=device), ar
        with torch.no_grad():
            x, gram, cos, sim1, present = self._frames(visual, b)
            part = self._search(x, gram, cos, sim1, present, k_total)
            return self._merge_back(x, part, k_total)

    def _search(self, x, gram, cos, sim1, present, k_total: int) -> ScissorPartition:
        """Bisect ``tau`` for exactly K components (see the module docstring)."""
        first = self._partition(x, gram, cos, sim1, present, self.tau)
        if first.num_components == k_total:
            return first
        if first.num_components > k_total:
            lo, hi, best = -1.0, self.tau, first
        else:
            lo, hi, best = self.tau, 1.0, None
        for _ in range(self.search_steps):
            mid = (lo + hi) / 2
            part = self._partition(x, gram, cos, sim1, present, mid)
            if part.num_components == k_total:
                return part
            if part.num_components > k_total:
                hi, best = mid, part
            else:
                lo = mid
        return best if best is not None else self._partition(x, gram, cos, sim1, present, hi)

    @staticmethod
    def _merge_back(x: torch.Tensor, part: ScissorPartition, k_total: int):
        n = x.shape[0]
        device = x.device
        c = part.num_components
        comp_of_token = part.component[part.group]  # [n]
        comp_size = torch.bincount(comp_of_token, minlength=c)
        # keep the K largest components (ties: smaller representative, i.e. component id)
        order = torch.sort(comp_size, descending=True, stable=True).indices[:k_total]
        kept = torch.sort(order).values
        slot = torch.full((c,), -1, dtype=torch.long, device=device)
        slot[kept] = torch.arange(k_total, device=device)

        # anchors: mean over a component's step-1 means = sum_i a_i x_i
        groups_per_comp = torch.bincount(part.component, minlength=c).double()
        a = 1.0 / (groups_per_comp[comp_of_token] * part.group_size[part.group].double())  # [n]
        in_kept = slot[comp_of_token] >= 0
        a_rows = slot[comp_of_token][in_kept]
        a_cols = torch.arange(n, device=device)[in_kept]
        anchors = torch.zeros(k_total, x.shape[-1], dtype=x.dtype, device=device)
        anchors = anchors.index_add(0, a_rows, x[a_cols] * a[in_kept].to(x.dtype).unsqueeze(-1))

        # step 3: every token joins its nearest anchor (cosine; ties to the first anchor)
        sim = F.normalize(x, dim=-1, eps=1e-8) @ F.normalize(anchors, dim=-1, eps=1e-8).T
        assign = sim.argmax(dim=-1)
        denom = torch.bincount(assign, minlength=k_total).double() + 1.0

        rows = torch.cat([a_rows, assign])
        cols = torch.cat([a_cols, torch.arange(n, device=device)])
        vals = torch.cat([a[in_kept] / denom[a_rows], 1.0 / denom[assign]])
        reps = torch.full((c,), n, dtype=torch.long, device=device)
        reps = reps.scatter_reduce(0, comp_of_token, torch.arange(n, device=device), reduce="amin")[kept]
        return rows, cols, vals, reps
