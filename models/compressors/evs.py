"""``evs``: drop tokens that did not change since the previous frame group (Efficient Video Sampling).

Paper: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
Inference", Bagrov et al. (NVIDIA), arXiv 2510.14624.
Reference code: vLLM ``vllm/multimodal/evs.py`` (``compute_retention_mask`` and
``compute_retained_tokens_count``).

What the reference code does (and this file matches):
    * the embeddings are viewed as ``[T, H, W, C]`` (after spatial merging);
    * per position, ``dissimilarity = 1 - cosine_similarity(e_t, e_{t-1})`` for t >= 1
      (``torch.nn.functional.cosine_similarity``, eps 1e-8);
    * frame 0 gets dissimilarity 255 (cosine dissimilarity lies in [0, 2]) so it ranks
      first and is always kept;
    * a single global, stable, descending sort over all ``T·H·W`` tokens and the top k
      are kept (ties: lower index first); kept tokens keep their original M-RoPE ids.

Paper vs code: the paper describes L1 differences of raw RGB patches against a
percentile threshold; the reference code (vLLM) uses cosine dissimilarity of the
embeddings and a top-k. This file follows the code.

How our K relates to vLLM's: vLLM keeps ``k = max(H·W, int(T·H·W·(1 - q)))`` for a
pruning rate q — truncation, with a floor of one full frame. Here K is
:func:`tokensieve.models.budget.num_keep` of the sample's valid tokens and the budget
(a retention ratio ``1 - q`` rounds half up; an int is an absolute count) and **no
one-frame floor is applied**, so every method in the library is compared at the same K.
Consequences: for budgets at or above one frame's worth K differs from vLLM's only by
rounding (to reproduce vLLM exactly pass ``budget=max(h*w, int(t*h*w*(1 - q)))`` as an
int); below one frame's worth we keep the first K tokens of frame 0 (row-major order —
the stable sort over the 255 scores), where vLLM would keep all of frame 0.

Defaults: vLLM has no default pruning rate (``video_pruning_rate`` is user-set); the
``budget`` default 0.25 is the library's.

Signals needed: visual features and the token grid ``visual.grid = (t, h, w)`` with the
backbone's (t, h, w) row-major token order (token index ``f*h*w + y*w + x``). Applies
before the LLM.

Other changes from the reference: batch > 1 with padding (``visual.valid``) — padded
tokens are never kept, and a valid token whose same-position predecessor is padding has
no reference and is ranked like a frame-0 token (255); scores are computed in float32 at
least.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget
from tokensieve.models.compressors.base import Compressor, select_topk
from tokensieve.models.types import Query, Selection, VisualTokens

FIRST_FRAME_SCORE = 255.0  # vLLM's forced-keep dissimilarity for frame 0 (real ones lie in [0, 2])


def evs_scores(visual: VisualTokens) -> torch.Tensor:
    """EVS dissimilarity of each token to the same position in the previous frame group.

    Returns:
        ``float [B, M]`` — ``1 - cos(e_t, e_{t-1})``; :data:`FIRST_FRAME_SCORE` for frame 0
        and for tokens whose predecessor is padding. Padded tokens' own scores are
        meaningless (callers mask them).

    Raises:
        ValueError: ``visual.grid`` does not match the token count (``t*h*w != M``).
    """
    t, h, w = visual.grid
    B, M, _ = visual.tokens.shape
    if t * h * w != M:
        raise ValueError(f"evs needs the (t, h, w) token grid: grid {visual.grid} gives {t * h * w} tokens, got M={M}")
    hw = h * w
    x = visual.tokens.detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    scores = torch.full((B, M), FIRST_FRAME_SCORE, dtype=x.dtype, device=x.device)
    if t > 1:
        dissim = 1.0 - F.cosine_similarity(x[:, hw:], x[:, :-hw], dim=-1)  # [B, (t-1)*hw]
        has_prev = visual.valid[:, :-hw]
        scores[:, hw:] = torch.where(has_prev, dissim, scores[:, hw:])
    return scores


class EVS(Compressor):
    """Keep the K valid tokens that changed most since the previous frame group; frame 0 first.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]``, ``visual.grid = (t, h, w)``
    with ``t*h*w == M`` (padded samples: the invalid tokens are masked). ``query`` is ignored.
    Output: ``Selection.index [B, K]`` ascending, K = ``num_keep(n_valid_b, budget)``
    (:func:`tokensieve.models.budget.num_keep`; no one-frame floor, see the module
    docstring); ``Selection.valid [B, K]`` when samples keep different counts.

    Raises:
        ValueError: the grid does not match M, or an invalid ``budget`` (out of range).
        TypeError: a non-numeric ``budget``.
    """

    name = "evs"

    @torch.no_grad()
    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        check_budget(budget)
        return select_topk(evs_scores(visual), visual.valid, budget)
