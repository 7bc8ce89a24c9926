"""A stochastic keep-set policy trained by group-relative policy optimisation against a full-token teacher.

Source: MARC, "Memory-Augmented RL Token Compression for Efficient Video Understanding"
(C-GRPO; repo Gimlettt/MARC, code not public). The paper distils a 64-frame teacher into a
student that sees few tokens, optimising the compression policy with GRPO and a
"retention reward"; the reward formula, group size and weights are not published, so
everything below is designed here (and documented in ``tokensieve.train.grpo``).

The policy:

- **Scorer** — FlexSelect's light query-aware attention head
  (:class:`~tokensieve.models.compressors.flexselect.FlexSelect`, used by composition, so a
  trained FlexSelect export can warm-start it): per-token logits ``s [B, M]`` (``-inf`` at
  padding), divided by ``temperature``.
- **Keep-sets of size K** (``K_b = num_keep(n_b, budget)``) are drawn without replacement
  by **Gumbel-top-k**: ``argtop-K(s + Gumbel)``, which samples the ordered K-prefix of a
  **Plackett–Luce** ranking (Yellott 1977; Kool et al. 2019, arXiv 1903.06059).
- **Log-probability**: the action is the ordered sequence ``σ`` returned by Gumbel-top-k; its
  Plackett–Luce log-probability is exact and factorises over picks,
  ``log π(σ) = Σ_t [s_{σ_t} − logsumexp_{j ∉ σ_<t} s_j]``, computed stably with a reverse
  log-cumsum-exp over the picked scores plus the log-mass of the unpicked tokens.
  (The probability of the *unordered* set sums this over K! orderings; it is not needed:
  the reward depends on the set only, so the ordered sequence is a valid action space, and
  PPO ratios of the same ordered action under two policies are exact.) Per-pick log-probs
  are returned so the clipped update can act per pick, as GRPO acts per token.
- **Inference is deterministic**: top-K of the scores (:func:`select_topk`), indices ascending.

Shapes: B batch, G group size, M visual tokens, K = max kept count in the batch.
"""

from __future__ import annotations

import torch

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import LearnedCompressor, select_topk, selection_from_indices
from tokensieve.models.compressors.flexselect import FlexSelect
from tokensieve.models.types import Query, Selection, VisualTokens

NEG = -1.0e30  # finite stand-in for -inf: keeps log-sum-exp gradients free of NaN at padding


def gumbel_topk(logits: torch.Tensor, counts: torch.Tensor, group_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` ordered keep-sequences per sample by Gumbel-top-k (Plackett–Luce).

    Args:
        logits: ``float [B, M]`` policy logits, ``-inf`` (or very negative) at padding.
        counts: ``long [B]`` picks per sample (``K_b``), each ``<=`` its valid tokens.
        group_size: G.
        generator: optional RNG for the Gumbel noise (on ``logits``' device).

    Returns:
        ``(order long [B, G, K], step_valid bool [B, K])`` with K = ``max(counts)``; ``order``
        lists picks in sampled order; steps ``t >= K_b`` are padding (``step_valid`` False).
    """
    b_size, m = logits.shape
    k_max = int(counts.max()) if counts.numel() else 0
    u = torch.rand(b_size, group_size, m, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    keys = logits.detach().float().unsqueeze(1) + gumbel
    order = keys.topk(k_max, dim=-1).indices if k_max else keys.new_zeros(b_size, group_size, 0, dtype=torch.long)
    step_valid = torch.arange(k_max, device=logits.device)[None, :] < counts.to(logits.device)[:, None]
    return order, step_valid


def plackett_luce_logprob(logits: torch.Tensor, valid: torch.Tensor, order: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
    """Exact per-pick Plackett–Luce log-probabilities of ordered keep-sequences.

    ``log π(σ_t | σ_<t) = s_{σ_t} − logsumexp_{j valid, j ∉ σ_<t} s_j``.

    Args:
        logits: ``float [B, M]`` (gradients flow here).
        valid: ``bool [B, M]`` — tokens that may be picked.
        order: ``long [B, G, K]`` picks in order (distinct valid tokens on valid steps).
        step_valid: ``bool [B, K]``.

    Returns:
        ``float [B, G, K]`` — 0 on padded steps; the sequence log-prob is the sum over K.
    """
    s = torch.where(valid, logits.float(), torch.full_like(logits, NEG, dtype=torch.float32))
    b_size, g, k = order.shape
    sv = step_valid[:, None, :].expand(b_size, g, k)
    picked = torch.gather(s.unsqueeze(1).expand(b_size, g, -1), 2, order)
    picked = torch.where(sv, picked, torch.full_like(picked, NEG))
    taken = torch.zeros(b_size, g, s.shape[1], dtype=torch.bool, device=s.device)
    taken.scatter_(2, order, sv)
    rest = torch.logsumexp(torch.where(taken, torch.full_like(taken, NEG, dtype=torch.float32), s.unsqueeze(1)), dim=-1)  # [B, G]
    tail = torch.flip(torch.logcumsumexp(torch.flip(picked, [-1]), dim=-1), [-1])  # lse(picked[t:])
    denom = torch.logaddexp(tail, rest.unsqueeze(-1))
    return torch.where(sv, picked - denom, torch.zeros_like(picked))


def selections_from_order(order: torch.Tensor, step_valid: torch.Tensor) -> list[Selection]:
    """One :class:`Selection` per group member: ``G`` selections of the B samples (indices ascending)."""
    b_size, g, _ = order.shape
    counts = step_valid.sum(1).tolist()
    return [selection_from_indices([order[b, j, : counts[b]] for b in range(b_size)], order.device) for j in range(g)]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages ``(r − mean_G r) / (std_G r + eps)`` per sample: ``float [B, G]`` → ``[B, G]``.

    Zero-mean within every group; a group whose rewards are all equal gets zero advantage.
    ``std`` is the population standard deviation.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def clipped_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, step_valid: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.04) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective per pick (DeepSeekMath, arXiv 2402.03300, eq. 3), negated for minimisation.

    ``L = −mean_{b,g} mean_t [min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) − β·KL_t]`` with
    ``ρ_t = π_θ(σ_t|σ_<t) / π_old(σ_t|σ_<t)`` and the unbiased, non-negative estimator
    ``KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1`` of ``KL(π_θ ‖ π_ref)``.

    Args:
        new_logp, old_logp, ref_logp: ``float [B, G, K]`` per-pick log-probs (gradients flow
            through ``new_logp`` only).
        advantages: ``float [B, G]``.
        step_valid: ``bool [B, K]``.

    Returns:
        ``(loss, stats)`` with stats ``clip_frac``, ``kl_ref`` and ``ratio`` (means over valid picks).
    """
    mask = step_valid[:, None, :].expand_as(new_logp).float()
    per_seq = mask.sum(-1).clamp_min(1.0)
    log_ratio = torch.where(mask.bool(), new_logp - old_logp.detach(), torch.zeros_like(new_logp))
    ratio = log_ratio.exp()
    adv = advantages.detach()[..., None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    d = torch.where(mask.bool(), ref_logp.detach() - new_logp, torch.zeros_like(new_logp))
    kl = d.exp() - d - 1.0
    objective = ((surrogate - kl_coef * kl) * mask).sum(-1) / per_seq  # [B, G]
    loss = -objective.mean()
    n = mask.sum().clamp_min(1.0)
    clipped = ((ratio - 1.0).abs() > clip_eps).float()
    stats = {"clip_frac": (clipped * mask).sum() / n, "kl_ref": (kl.detach() * mask).sum() / n, "ratio": (ratio.detach() * mask).sum() / n}
    return loss, stats


class GRPOSelector(LearnedCompressor):
    """Keep-set policy: FlexSelect-style scorer → Plackett–Luce over tokens; top-K at inference.

    Args:
        hidden_size: D, hidden size of the visual tokens and query embeddings.
        scorer: keyword arguments of the composed
            :class:`~tokensieve.models.compressors.flexselect.FlexSelect` (``d_model``,
            ``num_heads``, ``head_dim``, ``context_layers``, ``scorer`` …; its defaults when
            omitted). Only its ``score`` is used: FlexSelect's ``group_frames`` budgeting does
            not apply to the policy (one Plackett–Luce over the whole video).
        temperature: logits are the scorer's scores divided by this (> 0).

    Shapes: ``logits(visual, query) -> float [B, M]`` (``-inf`` at padding);
    ``sample(...) -> (order [B, G, K], step_valid [B, K])``; ``forward -> Selection``.

    Raises:
        ValueError: no query (the scorer is query-aware); ``temperature <= 0``.
    """

    name = "grpo"
    needs_query = True

    def __init__(self, hidden_size: int, scorer: dict | None = None, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.scorer = FlexSelect(hidden_size, **(scorer or {}))

    def logits(self, visual: VisualTokens, query: Query | None) -> torch.Tensor:
        """Plackett–Luce logits ``float [B, M]`` (``-inf`` at padding)."""
        return self.scorer.score(visual, self._require_query(query)) / self.temperature

    def score(self, visual: VisualTokens, query: Query | None) -> torch.Tensor:
        """Alias of :meth:`logits` (the interface learned selectors share)."""
        return self.logits(visual, query)

    @torch.no_grad()
    def sample(self, visual: VisualTokens, query: Query | None, budget: Budget, group_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw G keep-sequences per sample: ``(order [B, G, K], step_valid [B, K], logits [B, M])``."""
        check_budget(budget)
        logits = self.logits(visual, query)
        counts = torch.tensor([num_keep(int(n), budget) for n in visual.valid.sum(1).tolist()], dtype=torch.long, device=logits.device)
        order, step_valid = gumbel_topk(logits, counts, group_size, generator)
        return order, step_valid, logits

    def log_prob(self, visual: VisualTokens, query: Query | None, order: torch.Tensor, step_valid: torch.Tensor) -> torch.Tensor:
        """Per-pick log-probs ``float [B, G, K]`` of ``order`` under the current policy."""
        return plackett_luce_logprob(self.logits(visual, query), visual.valid, order, step_valid)

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        return select_topk(self.logits(visual, query), visual.valid, budget)
