"""Rank losses: soft rank approaches the hard rank; the Spearman loss is minimised by the right order."""

import torch

from tokensieve.models.losses import hard_rank, masked_pearson, soft_rank, spearman_loss


def test_soft_rank_approaches_hard_rank_and_ignores_padding():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.9, 5.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    expected = torch.tensor([[2.0, 1.0, 4.0, 3.0, 0.0]])
    assert torch.equal(hard_rank(scores, valid), expected)
    torch.testing.assert_close(soft_rank(scores, valid, tau=1e-3), expected, atol=1e-3, rtol=0)
    assert not torch.isnan(soft_rank(scores.masked_fill(~valid, float("-inf")), valid)).any()


def test_spearman_loss_zero_for_same_order_two_for_reversed():
    target = torch.arange(10.0)[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    assert spearman_loss(target * 10, target, valid, tau=1e-2) < 1e-3
    assert spearman_loss(-target * 10, target, valid, tau=1e-2) > 1.99


def test_spearman_loss_decreases_under_gradient_descent():
    torch.manual_seed(0)
    target = torch.randn(2, 30)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 25:] = False
    pred = torch.randn(2, 30, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=0.05)
    losses = []
    for _ in range(60):
        loss = spearman_loss(pred, target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_masked_pearson_excludes_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    y = torch.tensor([[2.0, 4.0, 6.0, -100.0]])
    valid = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(masked_pearson(x, y, valid), torch.tensor([1.0]))
