"""QTSplus: a query-aware token gate with an instance-adaptive budget and a small re-encoder.

Source: "Seeing the Forest and the Trees: Query-Aware Tokenizer for Long-Video MLLMs"
(QTSplus); reference repo Siyou-Li/QTSplus (``src/model/qts_plus_tokenizer/qts_plus.py``,
``tokenizer.py``).

Pipeline (per sample, batched):
    1. **Scorer** — cross-attention with the question's token embeddings (the frozen LLM's
       embedding table, ``Query.embeds``) as queries and the visual tokens as keys:
       ``r_j = max_{head, question token} softmax_j(q·k / sqrt(head_dim))`` ∈ [0, 1].
    2. **Budget head** — ``ρ = ρmin + (ρmax − ρmin)·σ(MLP([mean query emb, log M, max r, H(p)]))``
       with ``p = r / Σr`` and ``H`` its entropy; hidden 256, ρ ∈ [0.05, 0.5].
    3. **Selection** — training: the threshold ``t`` solving ``Σ_j σ((z_j − t)/τ) = c`` (Newton
       iterations, safeguarded by bisection) gives a soft keep mask ``s``; the hard mask keeps
       the ``n`` largest ``(z − t)/τ`` (+ Gumbel noise when ``gumbel``), and the kept tokens
       carry straight-through weights (value exactly 1.0, gradient of ``s``) in
       ``Selection.weights``. Inference: hard top-n of ``r``, indices ascending.
    4. **Re-encoder** — ``reencode_layers`` self-attention layers over the kept tokens of each
       sample, with a sinusoidal **absolute time encoding**, added residually:
       ``token + W_out·Enc(W_in·LN(token) + time)``, ``W_out`` zero-initialised (the untrained
       re-encoder is the identity). Output as ``Selection.tokens``; ``Selection.index`` keeps
       the original token indices, so kept tokens keep their original (M-RoPE) positions.

Budget (how ``forward``'s ``budget`` meets the predicted ρ):
    * ``budget=None`` or ``"auto"`` (the default): the method's own budget — ``c = ρ·M_b`` and
      ``n_b = clamp(ceil(ρ·M_b), 1, min(n_max, M_b))`` for a sample with ``M_b`` valid tokens.
    * an explicit ratio / count: it overrides ρ. ``n_b = num_keep(M_b, budget)`` (the library's
      one rounding rule, :func:`tokensieve.models.budget.num_keep`), ``c = n_b``, and ``n_max``
      does not apply. ρ is still predicted and returned by :meth:`QTSplus.select`.

What differs from the reference, and why:
    * Batch > 1 with padding (the reference asserts batch 1): masks everywhere, ragged kept
      counts packed into ``Selection.valid``.
    * Kept tokens keep their original M-RoPE ids (the reference falls back to 1-D positions).
    * The gate works on standardised log-relevance ``z = (log r − mean)/std`` over each sample's
      valid tokens. The reference thresholds raw ``r``, whose values are ~1/M, so for thousands
      of tokens ``σ((r − t)/τ)`` is flat and the gate is close to random; on ``z``, ``τ`` has a
      scale-free meaning. ``τ = 0.5`` follows the paper (the reference code uses 0.1).
    * The threshold's gradient is the implicit one (one Newton step with gradient after the
      solve), not back-propagation through every unrolled Newton iteration.
    * The hard training mask keeps exactly ``n_b`` tokens (the inference count) instead of
      sampling an independent Gumbel-softmax keep/drop per token, so training and inference
      see the same token counts; Gumbel noise on the logits is optional (``gumbel``).
    * The re-encoder adds the paper's absolute time encoding (the reference code has none),
      runs at width ``d_model`` with in/out projections (the reference runs a full LLM-width
      block, ~150M parameters at D = 3584), and is a zero-initialised residual.
    * Scorer and re-encoder are trained from scratch; the reference can initialise them
      from the LLM's layers.
    * Defaults from the paper where paper and code disagree: λ = 0.1 / 0.17 / 0.05,
      n_max = 512, τ = 0.5 (code: 1.0 / 1.7 / 0.05, 2560, 0.1). The penalties live in
      :func:`tokensieve.models.losses.qtsplus_budget_penalty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import LearnedCompressor
from tokensieve.models.types import Query, Selection, VisualTokens

TIME_SOURCES = ("frame_index", "position")


# ----------------------------------------------------------------------------- shared helpers
class _StraightThrough(torch.autograd.Function):
    """Forward: the hard values exactly; backward: the gradient goes to the soft values."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass (bit-exact), ``d/d soft`` in the backward pass."""
    return _StraightThrough.apply(hard, soft)


def standardize(scores: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample ``(x − mean)/std`` over valid entries of ``float [B, M]`` (0 at invalid ones)."""
    w = valid.to(scores.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    x = scores.masked_fill(~valid, 0.0)
    mean = x.sum(1, keepdim=True) / n
    var = ((x - mean).square() * w).sum(1, keepdim=True) / n
    return ((x - mean) / (var.sqrt() + eps)) * w


def solve_threshold(z: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, tau: float, iters: int = 30) -> torch.Tensor:
    """Threshold ``t [B]`` with ``Σ_{valid j} σ((z_j − t)/τ) = target``.

    Safeguarded Newton (a step leaving the bracket bisects instead) without gradient, then one
    Newton step with gradient: at the root this gives the implicit-function gradient
    ``dt/dθ = −(∂f/∂θ)/(∂f/∂t)`` with respect to ``z`` and ``target``.

    Args:
        z: ``float [B, M]`` gate logits (finite at valid entries).
        valid: ``bool [B, M]``.
        target: ``float [B]`` soft kept count; clamped into ``[0.5, n_valid − 0.5]`` so a root exists.
        tau: temperature > 0.
    """
    n = valid.sum(1).to(z.dtype)
    c = torch.minimum(torch.maximum(target, torch.full_like(target, 0.5)), (n - 0.5).clamp_min(0.5))
    zf = z.masked_fill(~valid, 0.0)

    def f(t, zz, cc):
        s = torch.sigmoid((zz - t.unsqueeze(1)) / tau) * valid
        return s.sum(1) - cc, s

    with torch.no_grad():
        zd, cd = zf.detach(), c.detach()
        lo = zd.masked_fill(~valid, float("inf")).amin(1) - 30.0 * tau
        hi = zd.masked_fill(~valid, float("-inf")).amax(1) + 30.0 * tau
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
        hi = torch.where(torch.isfinite(hi), hi, torch.ones_like(hi))
        t = 0.5 * (lo + hi)
        for _ in range(iters):
            g, s = f(t, zd, cd)
            lo = torch.where(g > 0, t, lo)  # too many kept: the root is above t
            hi = torch.where(g > 0, hi, t)
            slope = -(s * (1 - s)).sum(1) / tau
            step = t - g / slope.clamp(max=-1e-12)
            t = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
    g, s = f(t, zf, c)
    slope = (-(s * (1 - s)).sum(1) / tau).detach().clamp(max=-1e-12)
    return t - g / slope


def pack_keep_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bool [B, M]`` keep mask → ``(index long [B, K], valid bool [B, K])``, K = max kept count.

    Indices ascend; padded slots repeat the sample's last kept index (0 when it keeps nothing).
    """
    b, m = keep.shape
    ar = torch.arange(m, device=keep.device).expand(b, -1)
    order = torch.sort(torch.where(keep, ar, ar + m), dim=1).values
    counts = keep.sum(1)
    k = max(int(counts.max()) if b else 0, 1)
    order = order[:, :k]
    valid = torch.arange(k, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    last = order.gather(1, (counts - 1).clamp_min(0).unsqueeze(1))
    index = torch.where(valid, order, last) % m
    index = torch.where(counts.unsqueeze(1) > 0, index, torch.zeros_like(index))
    return index, valid


def topk_mask(logits: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``bool [B, M]``: each sample's ``counts[b]`` highest valid ``logits`` (ties: lower index)."""
    masked = logits.detach().float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return (rank < counts.unsqueeze(1)) & valid


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal encoding of real-valued times ``t [...]`` → ``[..., dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    angles = t.float().unsqueeze(-1) * freqs
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(out, (0, dim - 2 * half))


# ----------------------------------------------------------------------------- the method
@dataclass
class QTSplusOutput:
    """What :meth:`QTSplus.select` returns besides the selection.

    Attributes:
        selection: the :class:`Selection` (``tokens`` re-encoded when the re-encoder is on;
            ``weights`` straight-through in training mode).
        rho: ``float [B]`` predicted retention ratio (gradients flow to the budget head).
        relevance: ``float [B, M]`` the scorer's ``r`` (0 at padding).
        soft_mask: ``float [B, M]`` the threshold gate ``σ((z − t)/τ)`` (training; else None).
        n_keep: ``long [B]`` kept tokens per sample.
    """

    selection: Selection
    rho: torch.Tensor
    relevance: torch.Tensor
    soft_mask: torch.Tensor | None
    n_keep: torch.Tensor


class QTSplus(LearnedCompressor):
    """Query-aware gate with an adaptive budget and a time-aware re-encoder (see module docstring).

    Args:
        hidden_size: D of the visual tokens and query embeddings (the LLM width).
        d_model: width of the scorer heads (``num_heads·head_dim`` is used) and of the re-encoder.
        num_heads, head_dim: cross-attention scoring heads.
        budget_hidden: budget-head MLP width (paper: 256).
        rho_min, rho_max: range of the predicted ratio (paper: 0.05, 0.5).
        n_max: cap on the kept count under the predicted budget (paper: 512).
        tau: gate temperature in standardised-score units (paper: 0.5).
        newton_iters: threshold-solver iterations.
        gumbel: add Gumbel noise to the gate logits before the hard training mask (reference: on).
        reencode_layers: self-attention layers over kept tokens (0: no re-encoder, tokens
            are gathered unchanged).
        reencode_heads: heads of those layers (must divide ``d_model``).
        time_source: "frame_index" (``visual.frame_index``, any backbone) or "position"
            (the temporal M-RoPE id ``visual.positions[0]``, which Qwen2.5-VL spaces by
            absolute time — 2 ids per second — or the 1-D id elsewhere), minus the sample's
            smallest value, times ``time_scale``.
        time_scale: multiplier of the time values before the sinusoid.

    Shapes: ``forward(visual [B, M, D], query [B, Q, D], budget) -> Selection`` with
    ``index [B, K]``, ``tokens [B, K, D]`` (when re-encoding), ``weights [B, K]`` (training),
    ``valid [B, K]`` (ragged counts).

    Raises:
        ValueError: no query; unknown ``time_source``; ``reencode_heads`` not dividing ``d_model``.
        TypeError / ValueError: an invalid explicit budget (see ``check_budget``).
    """

    name = "qtsplus"
    needs_query = True

    def __init__(
        self,
        hidden_size: int,
        d_model: int = 256,
        num_heads: int = 8,
        head_dim: int = 32,
        budget_hidden: int = 256,
        rho_min: float = 0.05,
        rho_max: float = 0.5,
        n_max: int = 512,
        tau: float = 0.5,
        newton_iters: int = 30,
        gumbel: bool = True,
        reencode_layers: int = 1,
        reencode_heads: int = 4,
        time_source: str = "frame_index",
        time_scale: float = 1.0,
    ):
        super().__init__()
        if time_source not in TIME_SOURCES:
            raise ValueError(f"time_source must be one of {TIME_SOURCES}, got {time_source!r}")
        if reencode_layers and d_model % reencode_heads:
            raise ValueError(f"reencode_heads={reencode_heads} must divide d_model={d_model}")
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {rho_min}, {rho_max}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rho_min, self.rho_max, self.n_max = rho_min, rho_max, n_max
        self.tau, self.newton_iters, self.gumbel = tau, newton_iters, gumbel
        self.time_source, self.time_scale, self.d_model = time_source, time_scale, d_model
        # scorer: pre-norm q (question) / k (visual) projections, as the reference's scoring layer
        self.q_norm = nn.LayerNorm(hidden_size)
        self.kv_norm = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim)
        # budget head: [mean query emb, log M, max r, H(p)] -> hidden -> 1
        self.budget_head = nn.Sequential(nn.Linear(hidden_size + 3, budget_hidden), nn.GELU(), nn.Linear(budget_hidden, 1))
        # re-encoder over kept tokens, zero-initialised residual
        self.reencoder = None
        if reencode_layers:
            self.re_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model))
            self.reencoder = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, reencode_heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(reencode_layers)
            )
            self.re_out = nn.Linear(d_model, hidden_size)
            nn.init.zeros_(self.re_out.weight)
            nn.init.zeros_(self.re_out.bias)
        # running mean of ρ over training, for the smoothness penalty (saved with the weights)
        self.register_buffer("rho_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("rho_count", torch.zeros((), dtype=torch.float64))

    # ------------------------------------------------------------------ pieces
    def relevance(self, visual: VisualTokens, query: Query | None) -> torch.Tensor:
        """``r float [B, M]`` ∈ [0, 1]: softmax over valid visual tokens of q·k/sqrt(head_dim),
        max over heads and question tokens (0 at padding)."""
        query = self._require_query(query)
        b, m, _ = visual.tokens.shape
        k = self.k_proj(self.kv_norm(visual.tokens.float())).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        qn = query.embeds.shape[1]
        q = self.q_proj(self.q_norm(query.embeds.float())).view(b, qn, self.num_heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, Q, M]
        logits = logits.masked_fill(~visual.valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1).nan_to_num(0.0)  # a sample without valid tokens: all zero
        probs = probs * query.mask[:, None, :, None]
        return probs.amax(dim=(1, 2)) * visual.valid

    def predict_rho(self, query: Query, r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``ρ float [B]`` in ``[rho_min, rho_max]`` from the budget head."""
        qm = query.mask.unsqueeze(-1).float()
        sq = (query.embeds.float() * qm).sum(1) / qm.sum(1).clamp_min(1.0)
        n = valid.sum(1).float()
        p = r / r.sum(1, keepdim=True).clamp_min(1e-8)
        entropy = -(p * (p + 1e-8).log() * valid).sum(1)
        feats = torch.cat([sq, n.clamp_min(1.0).log().unsqueeze(1), r.amax(1).unsqueeze(1), entropy.unsqueeze(1)], dim=1)
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(self.budget_head(feats).squeeze(1))

    def _times(self, visual: VisualTokens) -> torch.Tensor:
        if self.time_source == "frame_index":
            t = visual.frame_index.float()
        else:
            t = (visual.positions[0] if visual.positions.dim() == 3 else visual.positions).float()
        start = t.masked_fill(~visual.valid, float("inf")).amin(1, keepdim=True)
        start = torch.where(torch.isfinite(start), start, torch.zeros_like(start))
        return (t - start) * self.time_scale

    def reencode(self, visual: VisualTokens, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """Re-encoded kept tokens ``float [B, K, D]`` (visual dtype), or None without a re-encoder."""
        if self.reencoder is None:
            return None
        x = torch.gather(visual.tokens, 1, index.unsqueeze(-1).expand(-1, -1, visual.tokens.shape[-1]))
        times = torch.gather(self._times(visual), 1, index)
        h = self.re_in(x.float()) + sinusoidal(times, self.d_model)
        pad = ~valid
        for layer in self.reencoder:
            h = layer(h, src_key_padding_mask=pad)
        return (x.float() + self.re_out(h)).to(visual.tokens.dtype)

    # ------------------------------------------------------------------ selection
    def _counts(self, valid: torch.Tensor, rho: torch.Tensor, budget) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard counts ``long [B]``, soft target ``float [B]``) under the budget rule."""
        n = valid.sum(1)
        if budget is None or budget == "auto":
            soft = rho * n.to(rho.dtype)
            hard = torch.ceil(soft.detach()).long().clamp_min(1)
            hard = torch.minimum(hard, torch.minimum(n, torch.full_like(n, self.n_max)))
            return hard, soft
        check_budget(budget)
        hard = torch.tensor([num_keep(int(x), budget) for x in n.tolist()], dtype=torch.long, device=valid.device)
        return hard, hard.to(rho.dtype)

    def select(self, visual: VisualTokens, query: Query | None = None, budget: Budget | str | None = None) -> QTSplusOutput:
        """Score, predict ρ and select. Training mode: threshold gate + straight-through hard
        mask (``Selection.weights``); eval mode: hard top-n of ``r`` (no weights)."""
        if isinstance(budget, str) and budget != "auto":
            raise ValueError(f"budget must be a ratio, a count, None or 'auto', got {budget!r}")
        query = self._require_query(query)
        valid = visual.valid
        r = self.relevance(visual, query)
        rho = self.predict_rho(query, r, valid)
        counts, soft_target = self._counts(valid, rho, budget)
        soft = None
        if self.training:
            z = standardize(torch.log(r.clamp_min(1e-12)), valid)
            t = solve_threshold(z, valid, soft_target, self.tau, self.newton_iters)
            gate = (z - t.unsqueeze(1)) / self.tau
            soft = torch.sigmoid(gate) * valid
            noisy = gate
            if self.gumbel:
                u = torch.rand_like(gate).clamp(1e-9, 1 - 1e-9)
                noisy = gate - torch.log(-torch.log(u))
            keep = topk_mask(noisy, valid, counts)
            st = straight_through(keep.to(soft.dtype), soft)
        else:
            keep = topk_mask(r, valid, counts)
        index, slot_valid = pack_keep_mask(keep)
        weights = torch.gather(st, 1, index) if soft is not None else None
        tokens = self.reencode(visual, index, slot_valid)
        selection = Selection(index=index, tokens=tokens, weights=weights, valid=None if bool(slot_valid.all()) else slot_valid)
        return QTSplusOutput(selection=selection, rho=rho, relevance=r, soft_mask=soft, n_keep=keep.sum(1))

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget | str | None = None) -> Selection:
        """Select tokens; ``budget=None``/``"auto"`` uses the predicted ρ, an explicit ratio or
        count overrides it (see the module docstring)."""
        return self.select(visual, query, budget).selection

    # ------------------------------------------------------------------ running mean of ρ
    def update_running_rho(self, rho: torch.Tensor) -> float:
        """Add a batch of ρ to the running mean and return the new mean (reference: cumulative)."""
        self.rho_sum += rho.detach().double().sum()
        self.rho_count += rho.numel()
        return float(self.rho_sum / self.rho_count.clamp_min(1.0))
