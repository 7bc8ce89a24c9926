"""EVS parity: a hand-derived 3-frame 2x2 example and a transcription of vLLM's retention mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.models.compressors.evs import EVS, evs_scores

# Grid (t, h, w) = (3, 2, 2); token index = f*4 + y*2 + x. 2-D tokens.
# frame 0: four directions; frame 1: positions 0-2 unchanged (position 1 rescaled: same
# direction), position 3 turned by 90 degrees; frame 2: position 1 turned by 60 degrees,
# position 2 reversed, positions 0 and 3 unchanged.
F0 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]
F1 = [[1.0, 0.0], [0.0, 5.0], [1.0, 1.0], [1.0, 1.0]]
F2 = [[1.0, 0.0], [3**0.5 / 2, 0.5], [-1.0, -1.0], [1.0, 1.0]]
TOKENS = torch.tensor([F0 + F1 + F2])

# Derived by hand from vLLM vllm/multimodal/evs.py compute_retention_mask():
#   dissimilarity 1 - cos(e_t, e_{t-1}); frame 0 = 255
#   frame 1 (tokens 4-7):  [0, 0, 0, 1]
#   frame 2 (tokens 8-11): [0, 0.5, 2, 0]
#   stable descending order: 0, 1, 2, 3, 10 (2), 7 (1), 9 (0.5), then 4, 5, 6, 8, 11 (0)
#   (the five "0"s are 0 only up to float rounding, in vLLM as here, so their order is not
#   pinned: the test stops at 7 and checks 12)
ORDER = [0, 1, 2, 3, 10, 7, 9, 4, 5, 6, 8, 11]


def test_hand_derived_scores(make_visual):
    visual = make_visual(1, (3, 2, 2), 2, tokens=TOKENS)
    expected = torch.tensor([[255.0] * 4 + [0, 0, 0, 1] + [0, 0.5, 2, 0]])
    torch.testing.assert_close(evs_scores(visual), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [*range(1, 8), 12])
def test_hand_derived_selection(k, make_visual):
    visual = make_visual(1, (3, 2, 2), 2, tokens=TOKENS)
    assert EVS()(visual, budget=k).index[0].tolist() == sorted(ORDER[:k])


def test_ratio_budget_and_the_missing_one_frame_floor(make_visual):
    visual = make_visual(1, (3, 2, 2), 2, tokens=TOKENS)
    # q = 0.5: vLLM keeps max(4, int(12 * 0.5)) = 6; num_keep(12, 0.5) = 6 -> same tokens
    assert EVS()(visual, budget=0.5).index[0].tolist() == [0, 1, 2, 3, 7, 10]
    # q = 0.9: vLLM keeps max(4, int(1.2)) = 4 (all of frame 0); we keep num_keep(12, 0.1) = 1
    assert EVS()(visual, budget=0.1).index[0].tolist() == [0]


def test_padding_is_never_kept_and_a_padded_predecessor_counts_as_new(make_visual):
    """Sample 1 has only frame 0 and half of frame 1 valid (6 tokens)."""
    tokens = TOKENS.expand(2, -1, -1)
    visual = make_visual(2, (3, 2, 2), 2, n_valid=[12, 6], tokens=tokens)
    sel = EVS()(visual, budget=0.5)
    assert sel.index[0].tolist() == [0, 1, 2, 3, 7, 10]
    assert sel.index[1, :3].tolist() == [0, 1, 2]  # num_keep(6, 0.5) = 3: frame 0 first
    assert sel.valid[1].tolist() == [True] * 3 + [False] * 3


def _vllm_retention_mask(embeds: torch.Tensor, thw: tuple[int, int, int], q: float) -> torch.Tensor:
    """vLLM's compute_retention_mask (spatial_merge_size 1), transcribed."""
    T, H, W = thw
    e = embeds.reshape(T, H, W, -1)
    dissim = 1 - F.cosine_similarity(e[1:], e[:-1], dim=-1)
    dissim = torch.cat([255 * torch.ones_like(e[:1, :, :, 0]), dissim], dim=0).reshape(-1)
    order = torch.argsort(dissim, descending=True, stable=True)
    keep = max(H * W, int(T * H * W * (1 - q)))
    mask = torch.zeros_like(dissim, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("thw", [(4, 3, 5), (8, 2, 2), (1, 4, 4)])
def test_matches_vllm_when_given_vllms_count(q, thw, make_visual):
    T, H, W = thw
    gen = torch.Generator().manual_seed(int(q * 100) + T)
    visual = make_visual(1, thw, 8, tokens=torch.randn(1, T * H * W, 8, generator=gen))
    mask = _vllm_retention_mask(visual.tokens[0], thw, q)
    vllm_k = max(H * W, int(T * H * W * (1 - q)))
    sel = EVS()(visual, budget=vllm_k)  # an int budget: our K is then exactly vLLM's
    assert sel.index[0].tolist() == mask.nonzero().squeeze(1).tolist()
