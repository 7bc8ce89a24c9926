"""FastV: prune visual tokens inside the LLM by the last token's attention at layer K − 1.

Source: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models", arXiv 2403.06764; reference repo pkunlp-icler/FastV
(``src/transformers/src/transformers/models/llama/modeling_llama.py``, the ``use_fast_v``
branch of ``LlamaModel.forward``).

Defaults from the reference: K = 2, R = 50 % (keep the top ``(1 − R)·N`` image tokens by
``last_layer_attention.mean(dim=1)[0][-1][image_start:image_end]``, i.e. the last token's
attention at layer K − 1 averaged over heads). Kept tokens keep their positions.

Signals: LLM attention at layer K − 1 (computed by the backbone from that layer's own q/k,
so no eager attention is needed). Applies inside the LLM: run it through
``backbone.forward_in_llm`` (``tokensieve.apply`` and the evaluation harness do). Changes from
the reference: the kept count follows the library's budget rule (``num_keep``) instead of
``int(N·(1 − R))``; ties break toward the lower index; batches > 1 with different kept
counts are supported (the reference handles batch 1).
"""

from __future__ import annotations

import torch

from tokensieve.models.budget import Budget
from tokensieve.models.compressors.base import Compressor, select_topk
from tokensieve.models.types import Query, Selection, VisualTokens


class FastV(Compressor):
    """Keep the visual tokens that receive most of the last prompt token's attention at layer K − 1.

    Args:
        layer: K, the first LLM layer that sees only the kept tokens (reference default 2).

    ``forward(visual, query, budget, attention)``: ``attention float [B, M]`` is the last
    token's attention to each visual token at layer K − 1, mean over heads (supplied by
    ``backbone.forward_in_llm``). Returns ``Selection.index [B, K]`` ascending, with
    ``num_keep(n_valid, budget)`` tokens per sample.

    Raises:
        ValueError: called without ``attention`` (i.e. outside ``backbone.forward_in_llm``).
    """

    name = "fastv"
    applies = "in_llm"
    needs_attention = True

    def __init__(self, layer: int = 2):
        super().__init__()
        self.layer = layer

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.5, attention: torch.Tensor | None = None) -> Selection:
        if attention is None:
            raise ValueError("fastv prunes inside the LLM: run it through backbone.forward_in_llm(batch, visual, compressor, budget) (tokensieve.apply does)")
        return select_topk(attention, visual.valid, budget)
