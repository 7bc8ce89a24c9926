"""Losses shared by learned compressors: rank distillation, output distillation, budget penalties.

Source: FlexSelect (arXiv 2506.00993, repo yunzhuzhang0918/flexselect) trains its selector
with ``1 - Spearman(softrank(pred), rank(teacher))`` using a pairwise-sigmoid soft rank.
"""

from __future__ import annotations

import torch


def soft_rank(scores: torch.Tensor, valid: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Differentiable ascending ranks by pairwise sigmoids: ``r_i = 1 + sum_{j != i} sigmoid((s_i - s_j) / tau)``.

    Args:
        scores: ``float [B, M]``.
        valid: ``bool [B, M]``; invalid tokens neither receive nor contribute rank.
        tau: temperature in score units; smaller is closer to the hard rank.

    Returns:
        ``float [B, M]`` ranks in [1, n_valid] (0 at invalid tokens). Memory is O(B·M²).
    """
    scores = scores.masked_fill(~valid, 0.0)  # -inf padding would give nan pairs
    diff = (scores.unsqueeze(2) - scores.unsqueeze(1)) / tau  # [B, M, M]: s_i - s_j
    pair = torch.sigmoid(diff) * (valid.unsqueeze(1) & valid.unsqueeze(2))
    ranks = 1.0 + pair.sum(dim=2) - 0.5 * valid  # the i == j term contributes sigmoid(0) = 0.5
    return ranks * valid


def hard_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ascending 1-based ranks ``float [B, M]`` among valid tokens (0 at invalid ones)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    ranks = masked.argsort(dim=1).argsort(dim=1).float() + 1.0
    ranks = ranks - (~valid).sum(dim=1, keepdim=True)  # invalid tokens sort first
    return ranks * valid


def masked_pearson(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation per sample over valid tokens: ``float [B]``."""
    w = valid.float()
    n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    xc = (x - (x * w).sum(1, keepdim=True) / n) * w
    yc = (y - (y * w).sum(1, keepdim=True) / n) * w
    return (xc * yc).sum(1) / ((xc.square().sum(1) * yc.square().sum(1)).sqrt() + eps)


def spearman_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``mean_b (1 - Pearson(soft_rank(pred_b), rank(target_b)))`` — a scalar in [0, 2].

    Args:
        pred: selector scores ``float [B, M]`` (gradients flow here).
        target: teacher scores ``float [B, M]`` (no gradient needed).
        valid: ``bool [B, M]``.
    """
    return (1.0 - masked_pearson(soft_rank(pred, valid, tau), hard_rank(target.detach(), valid), valid)).mean()



def listmle_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ListMLE: the negative log-likelihood of the teacher's order under a Plackett-Luce model
    with logits ``pred``, per valid token (a scalar, mean over samples).

    Source: Xia et al., "Listwise Approach to Learning to Rank" (ICML 2008). For sample b with
    valid tokens sorted by the teacher, descending, ``π``:
    ``L_b = (1 / k_b) · Σ_{i < k_b} [log Σ_{j ≥ i} exp(pred_{π_j}) − pred_{π_i}]``,
    ``k_b = min(top_k, n_b)`` (``top_k=None``: every valid position) — the top-k variant keeps
    the full denominators but scores only the first k positions, the ones a selector keeps.

    Args:
        pred: selector scores ``float [B, M]`` used as logits (gradients flow here; values at
            invalid tokens, ``-inf`` included, are ignored).
        target: teacher scores ``float [B, M]`` (detached; ties break toward the lower index).
        valid: ``bool [B, M]``.
        top_k: score only the teacher's first ``top_k`` positions.

    Returns:
        Scalar >= 0 (0 only in the limit of infinitely separated, correctly ordered scores).
        Samples without valid tokens contribute 0.

    Raises:
        ValueError: ``top_k < 1``.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    t = target.detach().float().masked_fill(~valid, float("-inf"))
    order = torch.sort(t, dim=1, descending=True, stable=True).indices  # valid first, teacher order
    v = valid.gather(1, order)
    s = pred.float().gather(1, order)
    # padded slots sit after every valid one; give them a finite floor that adds nothing to the sums
    floor = (s.masked_fill(~v, float("inf")).amin(dim=1, keepdim=True) - 100.0).detach()
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    s = torch.where(v, s, floor)
    suffix_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # log Σ_{j >= i} exp s_j
    n = v.sum(dim=1, keepdim=True)
    k = n if top_k is None else n.clamp(max=top_k)
    scored = torch.arange(s.shape[1], device=s.device).unsqueeze(0) < k
    nll = torch.where(scored, suffix_lse - s, torch.zeros_like(s))
    return (nll.sum(dim=1) / k.squeeze(1).clamp_min(1)).mean()


def rank_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tau: float = 0.1, top_k: int | None = None) -> torch.Tensor:
    """A list-wise rank-distillation loss chosen by name: ``"spearman"`` (:func:`spearman_loss`,
    with soft-rank temperature ``tau``) or ``"listmle"`` (:func:`listmle_loss`, with ``top_k``).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "spearman":
        return spearman_loss(pred, target, valid, tau)
    if kind == "listmle":
        return listmle_loss(pred, target, valid, top_k)
    raise ValueError(f"rank loss must be 'spearman' or 'listmle', got {kind!r}")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_b KL(softmax(teacher/T) ‖ softmax(student/T)) · T²`` in nats — distillation of the
    full-token model's next-token distribution into the compressed student.

    Args:
        student_logits: ``float [B, V]`` (gradients flow here).
        teacher_logits: ``float [B, V]`` (detached).
        temperature: T > 0.

    Returns:
        Scalar >= 0; 0 when the distributions agree.
    """
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    log_p = (teacher_logits.detach().float() / temperature).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token ``logits [B, V]`` against answer token ids ``targets long [B]``;
    entries of -100 (no answer) are ignored. Returns ``0.0`` (still attached to the graph) when
    no sample has an answer."""
    keep = targets != -100
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep])


def qtsplus_budget_penalty(
    rho: torch.Tensor,
    n_valid: torch.Tensor,
    running_mean: float | torch.Tensor,
    n_max: int = 512,
    lambda_t: float = 0.1,
    lambda_m: float = 0.17,
    lambda_s: float = 0.05,
) -> dict[str, torch.Tensor]:
    """QTSplus's budget regularisers on the predicted retention ratio ρ.

    Source: "Seeing the Forest and the Trees: Query-Aware Tokenizer for Long-Video MLLMs"
    (QTSplus), repo Siyou-Li/QTSplus (``QTSplusTokenizer.forward``):
    ``flops = λt·mean((ρM)² / n_max²)`` (attention cost proxy), ``kv = λm·mean(ρM / n_max)``
    (KV-cache proxy), ``smooth = λs·mean((ρ − ρ̄)²)`` with ρ̄ the running mean of ρ over
    training. Defaults are the paper's (λ = 0.1 / 0.17 / 0.05, n_max = 512); the reference
    code's config uses 1.0 / 1.7 / 0.05 and n_max = 2560.

    Args:
        rho: ``float [B]`` predicted ratios (gradients flow here).
        n_valid: ``[B]`` valid visual tokens per sample (M).
        running_mean: ρ̄ (a float or 0-d tensor, detached).

    Returns:
        ``{"flops", "kv", "smooth"}`` scalar tensors, already weighted by their λ.
    """
    kept = rho * n_valid.to(rho.dtype)
    return {
        "flops": lambda_t * (kept.square() / float(n_max) ** 2).mean(),
        "kv": lambda_m * (kept / float(n_max)).mean(),
        "smooth": lambda_s * (rho - torch.as_tensor(running_mean, dtype=rho.dtype, device=rho.device).detach()).square().mean(),
    }
