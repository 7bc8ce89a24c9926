"""The single rounding rule."""

import pytest
import torch

from tokensieve.models.budget import check_budget, num_keep, num_keep_batch


@pytest.mark.parametrize(("n", "budget", "k"), [(200, 0.1, 20), (200, 0.25, 50), (10, 0.25, 3), (10, 0.05, 1), (7, 1.0, 7), (7, 3, 3), (7, 30, 7), (0, 0.5, 0), (5, 0.3, 2), (5, 0.5, 3)])
def test_num_keep_round_half_up_clamped(n, budget, k):
    assert num_keep(n, budget) == k


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, 0, -3, True, "0.1", None])
def test_invalid_budgets_raise(bad):
    with pytest.raises((TypeError, ValueError)):
        check_budget(bad)


def test_batch_counts_follow_valid_mask():
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert num_keep_batch(valid, 0.5).tolist() == [2, 1]
