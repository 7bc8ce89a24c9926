"""VQToken: a learned codebook that represents a whole video with a few dozen code tokens.

Source: "Neural Discrete Token Representation Learning for Extreme Token Reduction in Video
Large Language Models", arXiv 2503.16980; reference repo Hai-chao-Zhang/VQToken.

What the reference does: per video, adaptive k-means (K from 12 to 32 chosen by elbow or
silhouette) over L2-normalised projected features; the cluster means are the tokens the
LLM sees; a "token hash" keeps each grid token's cluster index per frame ``[T, 729]``; a
"VQ-attention" (hash rows → linear → 1-layer ``nn.TransformerDecoder`` over the centroids)
is defined but switched off in the released snapshot; training is plain SFT cross-entropy
(no commitment or codebook loss).

What this implementation does, and why it differs:

- **Learned codebook** (vector-quantize-pytorch ``VectorQuantize``) instead of per-video
  k-means: tokens ``x [M, D]`` are encoded ``z = LN(W · LN(x))`` into ``code_dim``; the
  codebook (``codebook_size`` entries) is k-means-initialised on the first batch, updated by
  EMA (``decay``), and codes whose EMA usage falls below ``threshold_ema_dead_code`` are
  re-seeded from the batch (dead-code handling). One codebook serves every video, so
  coding a video is a nearest-neighbour lookup (no per-video k-means iterations).
- **VQ losses**: commitment ``‖z − sg(e)‖²`` (computed here rather than taken from the
  library so it is also reported in eval mode) plus a reconstruction term
  ``‖dec(e_st) − LN(x)‖²`` through the library's straight-through (rotation-trick) output.
  The reconstruction term is what stops the learned encoder from collapsing every token
  onto one code (the reference has no encoder to collapse, so needs neither).
- **Adaptive codebook size per video** (documented rule, replacing elbow / silhouette):
  ``K_b = min(num_keep(n_b, budget), U_b)`` where ``U_b`` is the number of codes the video
  occupies (codes covering at least ``min_code_share`` of its valid tokens; at least one).
  The ``K_b`` most-used codes are kept (ties: earlier first occurrence); tokens of the
  dropped codes are re-assigned to their nearest kept code. Why: the learned codebook
  already fixes the granularity, so a video's diversity *is* how many codes it occupies
  (a static clip gets fewer tokens than a busy one), while the budget is always honoured
  — elbow / silhouette cost several k-means fits per video and ignore any budget.
- **Token-hash map**: per video, each grid token's slot (kept-code) id, laid out per frame
  ``[T', h·w]`` (−1 at padding). It is embedded as per-frame occupancy: for every frame t
  and slot k, the fraction of tokens in each cell of a ``pool_grid × pool_grid`` spatial
  grid that carry slot k → ``Linear(pool_grid² → d_model)`` + a sinusoidal frame
  embedding + the slot's code tag. A 1-layer transformer decoder whose **queries are the
  K code tokens** (content: the mean of the video's original tokens with that code, plus
  the code tag) cross-attends to these ``T'·K`` hash tokens, so each code token learns
  where and when its code occurs. Output ``token_k = mean_k + W_out · dec_k`` with
  ``W_out`` zero-initialised: before training the LLM receives the per-code means of the
  original tokens (the reference's cluster means, but un-normalised, in LLM space).
- **Positions stay original**: each code token takes the position of its code's first
  occurrence in the video; ``Selection.index`` lists those representatives ascending.

**TokDense** (the paper's token-efficiency metric) is accuracy per kept token:
``tokdense(accuracy, kept_tokens) = accuracy / kept_tokens`` (accuracy in the unit it is
reported in, e.g. % or a fraction; kept tokens = mean visual tokens per sample reaching
the LLM). The paper defines it; the reference code does not compute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import LearnedCompressor, pack_merged
from tokensieve.models.types import Query, Selection, VisualTokens


def tokdense(accuracy: float, kept_tokens: float) -> float:
    """TokDense (VQToken, arXiv 2503.16980): accuracy per kept visual token.

    Args:
        accuracy: accuracy in the unit it is reported in (% or fraction).
        kept_tokens: mean number of visual tokens per sample that reach the LLM (> 0).

    Returns:
        ``accuracy / kept_tokens``.

    Raises:
        ValueError: ``kept_tokens <= 0``.
    """
    if kept_tokens <= 0:
        raise ValueError(f"kept_tokens must be > 0, got {kept_tokens}")
    return float(accuracy) / float(kept_tokens)


@dataclass
class VQCoding:
    """What :meth:`VQToken.compress` computed besides the Selection.

    Attributes:
        codes: ``long [B, M]`` — nearest codebook entry per token (−1 at padding).
        slots: ``long [B, M]`` — the token-hash map: kept-code slot per token after the
            adaptive-K re-assignment, slot ``k`` ↔ ``Selection`` column ``k`` (−1 at padding).
        num_codes: ``long [B]`` — distinct codes each video occupies before the budget cap.
        commitment: scalar ``mean ‖z − sg(e)‖² / code_dim`` over valid tokens.
        reconstruction: scalar ``mean ‖dec(e) − LN(x)‖² / D`` over valid tokens.
    """

    codes: torch.Tensor
    slots: torch.Tensor
    num_codes: torch.Tensor
    commitment: torch.Tensor
    reconstruction: torch.Tensor


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sine/cosine embedding ``float [..., dim]`` of integer ``positions``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / max(half, 1))
    angles = positions.float().unsqueeze(-1) * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class VQToken(LearnedCompressor):
    """VQ tokenizer: a few code tokens per video that carry spatio-temporal structure.

    Args:
        hidden_size: D, hidden size of the visual tokens (LLM input space).
        codebook_size: entries in the shared codebook (an upper bound on K per video).
        code_dim: width of the quantised space.
        decay: EMA decay of the codebook (vector-quantize-pytorch).
        threshold_ema_dead_code: codes whose EMA usage drops below this are re-seeded from
            the batch during training (0 disables).
        kmeans_init: initialise the codebook by k-means on the first batch it sees (in
            any mode — an untrained model's first call initialises it).
        min_code_share: a code counts as occupied by a video only if it covers at least
            this fraction of the video's valid tokens (0 = any token).
        d_model, num_heads: width and heads of the hash-map attention module.
        pool_grid: the hash map's spatial occupancy is pooled to ``pool_grid²`` cells.
        sync_codebook: all-reduce the EMA statistics (and the k-means init) across DDP ranks.
            ``None`` lets vector-quantize-pytorch decide when the module is built — which is
            before Lightning starts the process group, so multi-GPU recipes set ``true``
            (otherwise DDP's buffer broadcast keeps rank 0's codebook and drops the others'
            EMA updates). Only training uses it; eval-mode inference never all-reduces.

    Shapes: ``forward(visual, budget) -> Selection`` with merged ``tokens [B, K, D]``,
    ascending representative ``index [B, K]`` (first occurrence of each code) and
    ``valid [B, K]`` when videos keep different counts; ``K_b <= num_keep(n_b, budget)``.

    Layout assumption: tokens are laid out (t, h, w) row-major with ``visual.grid = (t, h, w)``
    and ``visual.frame_index`` giving t (the backbone layout in DESIGN.md).

    Raises:
        TypeError, ValueError: invalid budget (see :func:`tokensieve.models.budget.check_budget`).
    """

    name = "vqtoken"

    def __init__(
        self,
        hidden_size: int,
        codebook_size: int = 256,
        code_dim: int = 64,
        decay: float = 0.8,
        threshold_ema_dead_code: float = 2.0,
        kmeans_init: bool = True,
        min_code_share: float = 0.0,
        d_model: int = 128,
        num_heads: int = 4,
        pool_grid: int = 4,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize  # imported here: importing the registry stays light

        self.codebook_size, self.code_dim, self.d_model = codebook_size, code_dim, d_model
        self.min_code_share, self.pool_grid = min_code_share, pool_grid
        self.in_norm = nn.LayerNorm(hidden_size)
        self.encoder = nn.Linear(hidden_size, code_dim)
        self.code_norm = nn.LayerNorm(code_dim, elementwise_affine=False)
        self.vq = VectorQuantize(
            dim=code_dim,
            codebook_size=codebook_size,
            decay=decay,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=0.0,  # commitment is computed in _quantize (also in eval mode)
            sync_codebook=sync_codebook,
        )
        self.decoder = nn.Linear(code_dim, hidden_size)
        # hash-map attention: queries = code tokens, memory = embedded hash map
        self.query_in = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model))
        self.tag = nn.Linear(code_dim, d_model)
        self.hash_in = nn.Linear(pool_grid * pool_grid, d_model)
        self.attn = nn.TransformerDecoderLayer(d_model, num_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(d_model, hidden_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------ coding
    def _encode(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        x = visual.tokens.float().masked_fill(~visual.valid.unsqueeze(-1), 0.0)
        target = F.layer_norm(x, x.shape[-1:])
        return self.code_norm(self.encoder(self.in_norm(x))), target

    def _quantize(self, visual: VisualTokens):
        z, target = self._encode(visual)
        valid = visual.valid
        quantized, codes, _ = self.vq(z, mask=valid)
        codes = codes.masked_fill(~valid, -1)
        w = valid.float()
        n = w.sum().clamp_min(1.0)
        commit = (((z - quantized.detach()) ** 2).mean(-1) * w).sum() / n
        recon = (((self.decoder(quantized) - target) ** 2).mean(-1) * w).sum() / n
        return z, codes, commit, recon

    @torch.no_grad()
    def codes(self, visual: VisualTokens) -> torch.Tensor:
        """Nearest codebook entry per token: ``long [B, M]`` (−1 at padding). No EMA update."""
        was = self.training
        self.eval()
        try:
            return self._quantize(visual)[1]
        finally:
            self.train(was)

    @property
    def codebook(self) -> torch.Tensor:
        """``float [codebook_size, code_dim]`` — current code vectors."""
        return self.vq.codebook

    def _assign(self, z: torch.Tensor, codes: torch.Tensor, valid: torch.Tensor, budget: Budget):
        """Adaptive K per video and the token-hash map.

        Returns ``(slots long [B, M], per-sample (first_index long [K_b], code long [K_b]),
        num_codes long [B])``; slot k of sample b is the code whose first occurrence is the
        k-th smallest.
        """
        b_size, m = codes.shape
        embed = self.codebook.detach()
        slots = torch.full_like(codes, -1)
        plans, used = [], []
        for b in range(b_size):
            pos = valid[b].nonzero().squeeze(1)
            n = int(pos.numel())
            if n == 0:
                plans.append((pos.new_zeros(0), pos.new_zeros(0)))
                used.append(0)
                continue
            c = codes[b, pos]
            uniq, inv, counts = torch.unique(c, return_inverse=True, return_counts=True)
            first = torch.full((len(uniq),), m, dtype=torch.long, device=c.device).scatter_reduce(0, inv, pos, "amin")
            eligible = counts >= max(1.0, self.min_code_share * n)
            eligible[counts.argmax()] = True
            used.append(int(eligible.sum()))
            k = min(num_keep(n, budget), used[-1])
            # most-used first; ties toward the earlier first occurrence
            rank_key = torch.where(eligible, counts * (m + 1) + (m - first), torch.full_like(counts, -1))
            kept = torch.sort(rank_key, descending=True, stable=True).indices[:k]
            kept_codes = uniq[kept]
            if k < len(uniq):  # re-assign tokens of dropped codes to their nearest kept code
                dropped = ~torch.isin(c, kept_codes)
                if dropped.any():
                    dist = torch.cdist(z[b, pos[dropped]].detach().float(), embed[kept_codes].float())
                    c = c.clone()
                    c[dropped] = kept_codes[dist.argmin(dim=1)]
            slot_of_code = torch.full((self.codebook_size,), -1, dtype=torch.long, device=c.device)
            slot_of_code[kept_codes] = torch.arange(k, device=c.device)
            local = slot_of_code[c]  # in 0..k-1, in kept order
            first_k = torch.full((k,), m, dtype=torch.long, device=c.device).scatter_reduce(0, local, pos, "amin")
            order = torch.argsort(first_k)  # slots by first occurrence, ascending
            remap = torch.empty_like(order)
            remap[order] = torch.arange(k, device=c.device)
            slots[b, pos] = remap[local]
            plans.append((first_k[order], kept_codes[order]))
        return slots, plans, torch.tensor(used, dtype=torch.long, device=codes.device)

    # ------------------------------------------------------------------ hash-map attention
    def _hash_tokens(self, visual: VisualTokens, slots: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the token-hash map: ``(memory float [B, T'·K, d_model] (without tags), frame_valid bool [B, T'])``."""
        b_size, m = slots.shape
        t, h, w = visual.grid
        t = max(t, int(visual.frame_index.max()) + 1 if m else 1)
        g = self.pool_grid
        p = torch.arange(m, device=slots.device) % (h * w)
        cell = ((p // w) * g // h) * g + (p % w) * g // w  # [M]
        frame = visual.frame_index.clamp(0, t - 1)
        ok = slots >= 0
        # token count per (frame, cell) and per (frame, slot, cell)
        fc = (frame * g * g + cell).masked_fill(~ok, 0)
        denom = torch.zeros(b_size, t * g * g, device=slots.device).scatter_add_(1, fc, ok.float())
        fsc = ((frame * k_max + slots.clamp_min(0)) * g * g + cell).masked_fill(~ok, 0)
        occ = torch.zeros(b_size, t * k_max * g * g, device=slots.device).scatter_add_(1, fsc, ok.float())
        occ = occ.view(b_size, t, k_max, g * g) / denom.view(b_size, t, 1, g * g).clamp_min(1.0)
        frame_valid = denom.view(b_size, t, g * g).sum(-1) > 0
        mem = self.hash_in(occ) + sinusoidal(torch.arange(t, device=slots.device), self.d_model)[None, :, None, :]
        return mem, frame_valid

    def compress(self, visual: VisualTokens, budget: Budget = 0.05) -> tuple[Selection, VQCoding]:
        """Code the video and build the K code tokens; see the module docstring.

        In training mode the codebook is EMA-updated (and dead codes re-seeded) on every call.

        Returns:
            ``(Selection, VQCoding)`` — the Selection carries merged ``tokens`` that are
            differentiable w.r.t. the attention module's parameters.
        """
        check_budget(budget)
        z, codes, commit, recon = self._quantize(visual)
        slots, plans, used = self._assign(z, codes, visual.valid, budget)
        b_size, _, d = visual.tokens.shape
        ks = [int(first.numel()) for first, _ in plans]
        k_max = max(max(ks, default=0), 1)
        x = visual.tokens.float()
        ok = slots >= 0
        # per-slot mean of the original tokens
        sums = torch.zeros(b_size, k_max, d, device=x.device).scatter_add_(1, slots.clamp_min(0).unsqueeze(-1).expand(-1, -1, d), x * ok.unsqueeze(-1))
        cnt = torch.zeros(b_size, k_max, device=x.device).scatter_add_(1, slots.clamp_min(0), ok.float())
        means = sums / cnt.clamp_min(1.0).unsqueeze(-1)
        slot_valid = torch.arange(k_max, device=x.device)[None] < torch.tensor(ks, device=x.device)[:, None]
        slot_codes = torch.zeros(b_size, k_max, dtype=torch.long, device=x.device)
        for b, (_, kc) in enumerate(plans):
            slot_codes[b, : kc.numel()] = kc
        tags = self.tag(self.codebook.detach()[slot_codes].float())  # [B, K, d_model]
        mem, frame_valid = self._hash_tokens(visual, slots, k_max)
        t = mem.shape[1]
        mem = (mem + tags[:, None]).reshape(b_size, t * k_max, self.d_model)
        mem_valid = (frame_valid[:, :, None] & slot_valid[:, None, :]).reshape(b_size, t * k_max)
        q_valid = slot_valid.clone()
        empty = ~q_valid.any(1)  # a sample with no valid token: keep masks non-empty, output unused
        q_valid[empty, 0] = True
        mem_valid[~mem_valid.any(1), 0] = True
        q = self.query_in(means) + tags
        dec = self.attn(q, mem, tgt_key_padding_mask=~q_valid, memory_key_padding_mask=~mem_valid)
        tokens = means + self.out(dec)
        selection = pack_merged([first for first, _ in plans], [tokens[b, :k] for b, k in enumerate(ks)], visual.tokens)
        return selection, VQCoding(codes=codes, slots=slots, num_codes=used, commitment=commit, reconstruction=recon)

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.05) -> Selection:
        return self.compress(visual, budget)[0]
