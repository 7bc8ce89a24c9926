"""GRPO keep-set policy: Plackett–Luce sampling and log-probs, advantages, clipped update, inference."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokensieve.models.budget import num_keep
from tokensieve.models.compressors.base import select_topk
from tokensieve.models.compressors.grpo import (
    GRPOSelector,
    clipped_policy_loss,
    group_advantages,
    gumbel_topk,
    plackett_luce_logprob,
    selections_from_order,
)
from tokensieve.models.types import Query

from .conftest import build_visual

D = 16


def _query(B: int, Q: int = 3, seed: int = 0) -> Query:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, Q, dtype=torch.bool)
    mask[-1, -1] = False
    return Query(embeds=torch.randn(B, Q, D, generator=gen), mask=mask)


def _policy(**kw) -> GRPOSelector:
    torch.manual_seed(0)
    return GRPOSelector(hidden_size=D, scorer={"d_model": 16, "num_heads": 2, "head_dim": 8, "context_layers": 0}, **kw)


def test_advantages_are_zero_mean_per_group():
    rewards = torch.randn(5, 8) * torch.tensor([0.1, 1, 10, 100, 1000])[:, None]
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    # unit scale where the group's rewards differ; zero where they tie
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(5), atol=5e-3, rtol=0)
    assert torch.equal(group_advantages(torch.full((2, 4), 3.0)), torch.zeros(2, 4))


def test_plackett_luce_logprob_is_a_distribution_over_ordered_keep_sets():
    logits = torch.randn(2, 5)
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    for b in range(2):
        n = int(valid[b].sum())
        perms = torch.tensor(list(itertools.permutations(range(n), 3)))
        order = perms[None].expand(2, -1, -1).contiguous()
        lp = plackett_luce_logprob(logits.masked_fill(~valid, float("-inf")), valid, order, torch.ones(2, 3, dtype=torch.bool))
        torch.testing.assert_close(lp[b].sum(-1).exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_gumbel_topk_first_pick_follows_softmax_and_picks_are_distinct():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    order, step_valid = gumbel_topk(logits, torch.tensor([3]), 20000, gen)
    assert order.shape == (1, 20000, 3) and bool(step_valid.all())
    freq = torch.bincount(order[0, :, 0], minlength=5).float() / 20000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.015, rtol=0)
    assert not (order == 4).any(), "a padded token was sampled"
    srt = order.sort(-1).values
    assert bool((srt[..., 1:] != srt[..., :-1]).all()), "a token was picked twice"


def test_logprob_gradients_are_finite_with_padding():
    visual = build_visual(3, (2, 3, 3), D, n_valid=[18, 10, 2], seed=1)
    policy = _policy()
    query = _query(3)
    order, step_valid, _ = policy.sample(visual, query, 0.5, group_size=4)
    assert step_valid.sum(1).tolist() == [num_keep(n, 0.5) for n in (18, 10, 2)]
    lp = policy.log_prob(visual, query, order, step_valid)
    assert lp.shape == (3, 4, order.shape[-1])
    assert bool((lp[~step_valid[:, None, :].expand_as(lp)] == 0).all())
    lp.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for sel in selections_from_order(order, step_valid):
        for b, n in enumerate((18, 10, 2)):
            k = int(sel.num_kept[b])
            assert bool((sel.index[b, :k] < n).all())


def test_clipped_loss_clips_and_penalises_distance_to_reference():
    old = torch.zeros(1, 2, 3)
    adv = torch.tensor([[1.0, -1.0]])
    sv = torch.ones(1, 3, dtype=torch.bool)
    new = torch.full((1, 2, 3), 0.5, requires_grad=True)  # ratio e^0.5 > 1 + eps
    loss, stats = clipped_policy_loss(new, old, old, adv, sv, clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    assert stats["clip_frac"] == 1.0
    # positive advantage beyond the clip: no gradient; negative advantage: the unclipped term keeps it
    assert torch.equal(new.grad[0, 0], torch.zeros(3))
    assert bool((new.grad[0, 1] != 0).all())
    same = torch.zeros(1, 2, 3)
    loss0, stats0 = clipped_policy_loss(same, old, old, adv, sv, kl_coef=1.0)
    assert float(stats0["kl_ref"]) == 0.0 and abs(float(loss0)) < 1e-7
    _, stats1 = clipped_policy_loss(same, old, old - 1.0, adv, sv, kl_coef=1.0)
    assert float(stats1["kl_ref"]) > 0


def test_expected_reward_rises_under_grpo_with_a_synthetic_reward():
    """Reward = share of the kept tokens that lie in a target set; GRPO steps raise its expectation."""
    visual = build_visual(2, (2, 4, 4), D, n_valid=[32, 24], seed=2)
    query = _query(2)
    policy = _policy()
    reference = _policy()
    target = torch.zeros(2, 32)
    target[:, ::3] = 1.0
    opt = torch.optim.Adam(policy.parameters(), lr=3e-2)

    def rewards(order, step_valid):
        hit = torch.gather(target[:, None, :].expand(-1, order.shape[1], -1), 2, order) * step_valid[:, None, :]
        return hit.sum(-1) / step_valid.sum(-1, keepdim=True)

    def expected(seed=123):
        order, sv, _ = policy.sample(visual, query, 0.25, 256, torch.Generator().manual_seed(seed))
        return rewards(order, sv).mean().item()

    before = expected()
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        order, sv, logits = policy.sample(visual, query, 0.25, 8, gen)
        old = plackett_luce_logprob(logits, visual.valid, order, sv)
        with torch.no_grad():
            ref = reference.log_prob(visual, query, order, sv)
        adv = group_advantages(rewards(order, sv))
        for _ in range(2):
            loss, _ = clipped_policy_loss(policy.log_prob(visual, query, order, sv), old, ref, adv, sv)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = expected()
    assert after > before + 0.05, (before, after)


@pytest.mark.parametrize("budget", [0.1, 0.5, 4])
def test_inference_is_deterministic_top_k_with_padding(budget):
    visual = build_visual(3, (2, 3, 4), D, n_valid=[24, 13, 3], seed=3)
    query = _query(3)
    policy = _policy().eval()
    a = policy(visual, query, budget)
    b = policy(visual, query, budget)
    assert torch.equal(a.index, b.index)
    ref = select_topk(policy.logits(visual, query), visual.valid, budget)
    assert torch.equal(a.index, ref.index)
    for i, n in enumerate((24, 13, 3)):
        k = int(a.num_kept[i])
        assert k == num_keep(n, budget)
        assert bool(visual.valid[i, a.index[i, :k]].all())
        assert torch.all(a.index[i, 1 : k] > a.index[i, : k - 1])


def test_requires_query_and_positive_temperature():
    with pytest.raises(ValueError):
        _policy()(build_visual(1, (1, 2, 2), D), None, 0.5)
    with pytest.raises(ValueError):
        _policy(temperature=0.0)
