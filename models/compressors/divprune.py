"""``divprune``: keep a maximally diverse subset of the visual tokens (greedy max-min).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
Alvar, Singh, Akbari, Zhang — CVPR 2025, arXiv 2503.02175.
Reference code: ``vbdi/divprune`` (function ``DivPrune`` in its patched LLaVA
``llava_arch.py``; the same function is ported as ``divprune`` in ModelTC/llmc's
``token_reduction/divprune.py``).

What the reference does (and this file matches):
    * distance ``D = 1 - cos(X, X)`` over the projected visual tokens of one sample;
    * first pick: ``scores = topk(D, 2, dim=0, largest=False).values[1]`` — the
      second-smallest entry of each column, i.e. each token's distance to its nearest
      *other* token (the smallest entry is the token's own distance, 0) — then
      ``argmax(scores)``: the most isolated token;
    * then, K - 1 times, ``argmax_j min_{s in S} D[s, j]`` (Eqn. 3 of the paper);
    * ties go to the lowest index (``torch.argmax`` returns the first maximum);
    * the kept tokens are re-sorted into their original order (the reference sorts
      ``keep_indexs`` before gathering), so positions are the original ones.

Defaults from the reference: none beyond the budget (``SUBSET_RATIO`` = 0.098 in its
scripts is a retention ratio; pass it as ``budget``). The reference rounds the kept count
with ``int(round(ratio * n))``; here the count is :func:`tokensieve.models.budget.num_keep`.

Signals needed: visual features only (no query, no attention). Applies before the LLM,
on the tokens in the LLM's input space (after the projector / merger).

Changes from the reference:
    * the first pick uses ``min_{j != i} D[i, j]`` (diagonal excluded explicitly) rather
      than "second-smallest entry of the column"; the two agree unless a token's own
      rounding-noise distance is not the smallest in its column (exact duplicates give 0
      either way);
    * already selected tokens are excluded from later picks (their running distance is set
      to -inf). The reference leaves them in the argmax, which can only pick one again when
      every remaining token is an exact duplicate of a selected one; here the K indices
      are always distinct;
    * cosine uses ``F.normalize`` (eps 1e-12), so an all-zero token has distance 1 to all
      others instead of the reference's NaN; distances are computed in float32 at least;
    * the full M x M distance matrix is never stored: nearest-neighbour distances are
      computed in row chunks and the greedy loop keeps a running min-distance vector
      (O(K·M·D) time, O(chunk·M) memory); batch > 1 with padding is supported (only valid
      tokens are candidates), where the reference asserts batch size 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.types import Query, Selection, VisualTokens


def divprune_order(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Greedy max-min diverse subset of the rows of ``x``, in pick order.

    Args:
        x: ``float [n, D]`` token features of one sample (valid tokens only).
        k: number of rows to pick, ``0 <= k <= n``.
        chunk: rows per block when computing nearest-neighbour distances.

    Returns:
        ``long [k]`` — distinct row indices in the order they were picked.
    """
    n = x.shape[0]
    if k <= 0 or n == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    dtype = torch.promote_types(x.dtype, torch.float32)
    xn = F.normalize(x.detach().to(dtype), dim=-1)

    # first pick: the token whose nearest other token is farthest away
    nn_dist = torch.full((n,), float("inf"), dtype=dtype, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d = 1.0 - xn[start:stop] @ xn.T  # [rows, n]
        rows = torch.arange(stop - start, device=x.device)
        d[rows, rows + start] = float("inf")  # exclude the token itself
        nn_dist[start:stop] = d.min(dim=1).values
    first = int(torch.argmax(nn_dist))

    picks = torch.empty(k, dtype=torch.long, device=x.device)
    picks[0] = first
    min_dist = 1.0 - xn @ xn[first]  # running min_{s in S} D[s, j]
    min_dist[first] = float("-inf")
    for i in range(1, k):
        j = int(torch.argmax(min_dist))
        picks[i] = j
        min_dist = torch.minimum(min_dist, 1.0 - xn @ xn[j])  # picked tokens stay at -inf
        min_dist[j] = float("-inf")
    return picks


class DivPrune(Compressor):
    """Keep the K valid tokens chosen by DivPrune's greedy max-min cosine diversity.

    Input: ``visual.tokens [B, M, D]`` with ``visual.valid [B, M]``; padded tokens are never
    candidates. ``query`` is ignored. Output: ``Selection.index [B, K]`` ascending (original
    order, original positions), K = ``num_keep(n_valid_b, budget)`` per sample
    (:func:`tokensieve.models.budget.num_keep`); ``Selection.valid [B, K]`` is set when
    samples keep different counts (padded slots repeat a kept index).

    Raises:
        TypeError, ValueError: an invalid ``budget`` (see :func:`tokensieve.models.budget.check_budget`).
    """

    name = "divprune"

    @torch.no_grad()
    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        check_budget(budget)
        picks = []
        for b in range(visual.batch_size):
            positions = visual.valid[b].nonzero().squeeze(1)
            k = num_keep(positions.numel(), budget)
            if k >= positions.numel():
                picks.append(positions)
                continue
            picks.append(positions[divprune_order(visual.tokens[b, positions], k)])
        return selection_from_indices(picks, visual.tokens.device)
