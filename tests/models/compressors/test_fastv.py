"""FastV's selection rule (models/compressors/fastv.py); the in-LLM run is tested in tests/models/backbones/test_in_llm.py."""

import pytest
import torch

from tokensieve.models.compressors import FastV
from tokensieve.models.types import VisualTokens


def _visual(m: int, valid=None) -> VisualTokens:
    valid = torch.ones(1, m, dtype=torch.bool) if valid is None else valid
    return VisualTokens(tokens=torch.zeros(valid.shape[0], m, 4), valid=valid, positions=torch.arange(m).expand(valid.shape[0], m), frame_index=torch.zeros(valid.shape[0], m, dtype=torch.long), grid=(1, 1, m))


def test_keeps_the_most_attended_tokens_like_the_reference():
    # FastV reference, LlamaModel.forward (use_fast_v branch):
    #   image_attention_score = last_layer_attention_avg_last_tok[image_start:image_start+image_len]
    #   top_attention_rank_index = image_attention_score.topk(int(image_len * (1 - R))).indices + image_start
    # N = 6, R = 0.5 → keep 3: the scores 0.5, 0.3, 0.3 at tokens 1, 3, 4; kept in sequence order.
    attention = torch.tensor([[0.10, 0.50, 0.05, 0.30, 0.30, 0.02]])
    sel = FastV(layer=2)(_visual(6), budget=0.5, attention=attention)
    assert sel.index.tolist() == [[1, 3, 4]]


def test_padding_is_never_kept_and_counts_follow_the_budget_rule():
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 9.0, 9.0]])
    sel = FastV()(_visual(6, valid), budget=0.5, attention=attention)
    assert sel.num_kept.tolist() == [3, 2]
    assert sel.index[0].tolist() == [3, 4, 5] and sel.index[1][sel.valid[1]].tolist() == [2, 3]


def test_needs_the_llm_attention():
    with pytest.raises(ValueError, match="inside the LLM"):
        FastV()(_visual(4), budget=0.5)
    assert FastV.applies == "in_llm" and FastV.needs_attention
