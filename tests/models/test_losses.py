"""Rank losses: soft rank approaches the hard rank; the Spearman loss is minimised by the right order."""

import pytest
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


# ---------------------------------------------------------------- ListMLE, output distillation, QTSplus budget terms
import math

from tokensieve.models.losses import answer_cross_entropy, kl_to_teacher, listmle_loss, qtsplus_budget_penalty, rank_loss


def test_listmle_matches_the_plackett_luce_formula_and_ignores_padding():
    pred = torch.tensor([[0.5, 2.0, -1.0, 7.0]])
    target = torch.tensor([[1.0, 3.0, 2.0, 0.0]])  # teacher order: 1, 2, 0 (3 is padding)
    valid = torch.tensor([[True, True, True, False]])
    s = [2.0, -1.0, 0.5]
    expected = sum(math.log(sum(math.exp(x) for x in s[i:])) - s[i] for i in range(3)) / 3
    torch.testing.assert_close(listmle_loss(pred, target, valid), torch.tensor(expected))
    top1 = math.log(sum(math.exp(x) for x in s)) - s[0]
    torch.testing.assert_close(listmle_loss(pred, target, valid, top_k=1), torch.tensor(top1))
    pred_inf = pred.masked_fill(~valid, float("-inf")).requires_grad_(True)
    listmle_loss(pred_inf, target, valid).backward()
    assert torch.isfinite(pred_inf.grad).all() and pred_inf.grad[0, 3] == 0


def test_listmle_decreases_and_rank_loss_dispatches():
    torch.manual_seed(0)
    target = torch.randn(2, 30)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 20:] = False
    pred = torch.randn(2, 30, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=0.1)
    first = None
    for _ in range(60):
        loss = rank_loss("listmle", pred, target, valid)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert rank_loss("spearman", target, target, valid, tau=1e-3) < 1e-2
    with pytest.raises(ValueError, match="listmle"):
        rank_loss("l2", pred, target, valid)


def test_kl_and_answer_ce():
    logits = torch.randn(3, 11)
    assert kl_to_teacher(logits, logits).abs() < 1e-6
    assert kl_to_teacher(logits, torch.randn(3, 11)) > 0
    targets = torch.tensor([2, -100, 5])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(answer_cross_entropy(logits, targets), expected)
    none = answer_cross_entropy(logits.requires_grad_(True), torch.full((3,), -100))
    assert none.item() == 0.0 and none.requires_grad


def test_qtsplus_budget_penalty_terms():
    rho = torch.tensor([0.1, 0.3], requires_grad=True)
    n = torch.tensor([1024, 512])
    out = qtsplus_budget_penalty(rho, n, running_mean=0.2, n_max=512)
    kept = torch.tensor([102.4, 153.6])
    torch.testing.assert_close(out["flops"], 0.1 * (kept**2 / 512**2).mean())
    torch.testing.assert_close(out["kv"], 0.17 * (kept / 512).mean())
    torch.testing.assert_close(out["smooth"], 0.05 * torch.tensor([0.01, 0.01]).mean())
    sum(out.values()).backward()
    assert rho.grad.abs().sum() > 0
