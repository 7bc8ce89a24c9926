"""``tome``: merge similar visual tokens by repeated bipartite soft matching (Token Merging).

Paper: "Token Merging: Your ViT But Faster", Bolya, Fu, Dai, Zhang, Feichtenhofer,
Hoffman — ICLR 2023, arXiv 2210.09461.
Reference code: ``facebookresearch/ToMe`` (``tome/merge.py``: ``bipartite_soft_matching``
and ``merge_wavg``).

What the reference does (and each round here matches):
    * tokens alternate into set A (even positions, ``::2``) and set B (odd, ``1::2``);
    * the metric is L2-normalised, ``scores = A @ B^T`` (cosine); each A token draws one
      edge to its most similar B token (``scores.max(-1)``);
    * edges are ranked by similarity and the top ``r`` A tokens are merged into their B
      partners; ``r <= floor(n / 2)`` per round ("at most 50%");
    * merging is size-weighted: ``x = merge(x * size, "sum") / merge(size, "sum")``, with
      sizes (number of original tokens in a group) tracked across rounds.

Defaults from the reference: none apply — ToMe merges a fixed ``r`` per transformer
layer; here there is no layer loop, so rounds repeat, each taking the largest allowed
``r = min(n - K, floor(n / 2))``, until K tokens remain (K from
:func:`tokensieve.models.budget.num_keep`).

Signals needed: visual features only. Applies before the LLM, on the tokens in the LLM's
input space.

Changes from the reference:
    * metric: the reference matches on the attention keys of the layer being run; before
      the LLM there are no keys, so the (merged) tokens themselves are the metric;
    * order: the reference returns ``[unmerged A (in score order), B]``; here the current
      tokens are kept sorted by their representative original index before every round,
      so the A/B alternation stays spatio-temporal (neighbours in the (t, h, w) order);
    * edge ranking uses a stable sort (ties: lower A index first); ``argmax`` ties go to
      the lower B index;
    * output: each merged token is the plain mean of the original tokens in its group —
      identical to the reference's recursive size-weighted mean, computed directly from
      the inputs (so it is an exact convex combination and carries gradient to the
      inputs). Its ``Selection.index`` is the **smallest original index in the group**,
      so kept positions are original ones and ascending; a merged token therefore takes
      the position (M-RoPE id) of its earliest member;
    * no proportional attention (there is no attention to scale); batch > 1 with padding
      (only valid tokens are merged; each sample merges to its own K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import Compressor, pack_merged
from tokensieve.models.types import Query, Selection, VisualTokens


def tome_groups(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the rows of ``x`` down to ``k`` groups by repeated bipartite soft matching.

    Args:
        x: ``float [n, D]`` tokens of one sample (valid tokens only, in original order).
        k: number of groups to end with, ``1 <= k <= n`` (``k >= n`` merges nothing).

    Returns:
        ``(group, rep)``: ``group long [n]`` — the output slot (0..k-1) of each row;
        ``rep long [k]`` — the smallest row index in each group, ascending, so slot g is
        represented by row ``rep[g]``.
    """
    n = x.shape[0]
    dev = x.device
    dtype = torch.promote_types(x.dtype, torch.float32)
    total = x.detach().to(dtype).clone()  # [m, D] sum of the original tokens of each current token
    size = torch.ones(n, dtype=dtype, device=dev)  # [m] original tokens per current token
    rep = torch.arange(n, device=dev)  # [m] smallest original index per current token (ascending)
    group = torch.arange(n, device=dev)  # [n] current token of each original token
    while total.shape[0] > max(k, 1):
        m = total.shape[0]
        r = min(m - k, m // 2)
        metric = F.normalize(total, dim=-1)  # same direction as the size-weighted mean
        a_idx = torch.arange(0, m, 2, device=dev)
        b_idx = torch.arange(1, m, 2, device=dev)
        scores = metric[a_idx] @ metric[b_idx].T  # [|A|, |B|]
        node_max, node_idx = scores.max(dim=-1).values, scores.argmax(dim=-1)
        edge = torch.sort(node_max, descending=True, stable=True).indices
        src = a_idx[edge[:r]]  # current tokens merged away
        dst = b_idx[node_idx[edge[:r]]]  # their partners

        total = total.index_add(0, dst, total[src])
        size = size.index_add(0, dst, size[src])
        rep = rep.scatter_reduce(0, dst, rep[src], reduce="amin")

        target = torch.arange(m, device=dev)
        target[src] = dst  # where each current token goes
        keep = torch.ones(m, dtype=torch.bool, device=dev)
        keep[src] = False
        survivors = keep.nonzero().squeeze(1)
        survivors = survivors[torch.argsort(rep[survivors])]
        new_slot = torch.empty(m, dtype=torch.long, device=dev)
        new_slot[survivors] = torch.arange(survivors.numel(), device=dev)
        group = new_slot[target][group]
        total, size, rep = total[survivors], size[survivors], rep[survivors]
    return group, rep


class ToMe(Compressor):
    """Merge each sample's valid tokens down to K by ToMe's bipartite soft matching.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]`` (padded tokens are never
    merged or kept). ``query`` is ignored. Output: ``Selection.index [B, K]`` — for each
    merged token the smallest original index in its group (ascending) — and
    ``Selection.tokens [B, K, D]`` — the mean of the group's original tokens (ToMe's
    size-weighted mean); ``Selection.valid [B, K]`` when samples keep different counts.
    K = ``num_keep(n_valid_b, budget)`` (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        TypeError, ValueError: an invalid ``budget`` (see :func:`tokensieve.models.budget.check_budget`).
    """

    name = "tome"

    def _plan(self, visual: VisualTokens, budget: Budget):
        """Per sample: (valid positions ``[n]``, group ``[n]``, representative rows ``[k]``)."""
        check_budget(budget)
        plans = []
        for b in range(visual.batch_size):
            positions = visual.valid[b].nonzero().squeeze(1)
            k = num_keep(positions.numel(), budget)
            if k == 0:
                empty = torch.empty(0, dtype=torch.long, device=positions.device)
                plans.append((positions, empty, empty))
                continue
            group, rep = tome_groups(visual.tokens[b, positions], k)
            plans.append((positions, group, rep))
        return plans

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        indices, merged = [], []
        for b, (positions, group, rep) in enumerate(self._plan(visual, budget)):
            k = rep.numel()
            x = visual.tokens[b, positions]
            sums = torch.zeros(k, x.shape[-1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
            sums = sums.index_add(0, group, x.to(sums.dtype))
            counts = torch.bincount(group, minlength=k).to(sums.dtype).clamp_min(1)
            indices.append(positions[rep])
            merged.append(sums / counts.unsqueeze(1))
        return pack_merged(indices, merged, visual.tokens)

    def merge_weights(self, visual: VisualTokens, budget: Budget = 0.25) -> list[torch.Tensor]:
        """Per sample, ``float [K_b, M]``: row g holds the weights of the original tokens
        averaged into merged token g (non-negative, zero on padding, each row sums to 1), so
        ``forward(...).tokens[b, :K_b] == merge_weights(...)[b] @ visual.tokens[b]``."""
        out = []
        for positions, group, rep in self._plan(visual, budget):
            k = rep.numel()
            w = torch.zeros(k, visual.num_tokens, dtype=torch.float64, device=visual.tokens.device)
            if k:
                w[group, positions] = 1.0
                w = w / w.sum(dim=1, keepdim=True)
            out.append(w)
        return out
