"""DPC-KNN density-peak clustering, shared by FastVID and HoliTom, plus the small frame /
count / packing helpers that the merged-token methods (FastVID, HoliTom, VisionZip, DyCoke)
share.

DPC-KNN ("density peaks clustering with k nearest neighbours", as used by PruneVid, FastVID
and HoliTom; reference code: ``cluster_dpc_knn`` in cokeshao/HoliTom ``holitom/llava_arch.py``
and the "Parallel Density Score Computation" block of LunarShen/FastVID
``modeling_qwen2.py``). For tokens ``x [N, D]``:

- distance ``d_ij = ||x_i - x_j||_2 / sqrt(D)``;
- local density ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)``, where the k nearest neighbours
  include the token itself (distance 0), exactly as ``topk(dist, k, largest=False)`` does in
  both references;
- ``delta_i = min_{j : rho_j > rho_i} d_ij`` — distance to the nearest token of higher
  density; the densest token gets the largest distance of the whole matrix;
- score ``rho_i * delta_i``; the ``C`` highest scores are the cluster centres.

Change from the references: they add ``rand * 1e-6`` to the density to break ties, which makes
the output random; here ties are broken deterministically (token ``j`` counts as denser than
``i`` when ``rho_j > rho_i``, or ``rho_j == rho_i`` and ``j < i``; equal scores prefer the lower
index), so the same input always gives the same centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokensieve.models.types import Selection, VisualTokens


@dataclass
class DPCResult:
    """Output of :func:`dpc_knn`.

    Attributes:
        centers: ``long [C]`` — indices of the cluster centres into the N tokens, ascending.
        assignment: ``long [N]`` — for every token, the position in ``centers`` of its nearest
            centre (Euclidean, i.e. argmin of ``dist``); a centre is assigned to itself.
        dist: ``float [N, N]`` — ``cdist(x, x) / sqrt(D)``.
        density: ``float [N]`` — ``rho``.
        score: ``float [N]`` — ``rho * delta``.
    """

    centers: torch.Tensor
    assignment: torch.Tensor
    dist: torch.Tensor
    density: torch.Tensor
    score: torch.Tensor


def dpc_knn(x: torch.Tensor, num_centers: int, k: int) -> DPCResult:
    """Density-peak clustering of ``x [N, D]`` into ``num_centers`` clusters.

    Formula: ``dist = cdist(x, x) / sqrt(D)``; ``rho = exp(-mean of the k smallest squared
    distances)`` (self included); ``delta = distance to the nearest higher-density token``
    (the maximum distance for the densest); score ``rho * delta``; centres = the
    ``num_centers`` highest scores; every token is assigned to its nearest centre.

    Args:
        x: ``float [N, D]`` tokens (any float dtype; computed in float32, no gradient).
        num_centers: C, clamped to ``[0, N]``.
        k: neighbours for the density, clamped to ``[1, N]``.

    Returns:
        :class:`DPCResult`; ``centers`` sorted ascending.
    """
    if x.dim() != 2:
        raise ValueError(f"dpc_knn expects x [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    device = x.device
    num_centers = max(0, min(int(num_centers), n))
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return DPCResult(empty, empty, x.new_zeros(0, 0).float(), x.new_zeros(0).float(), x.new_zeros(0).float())
    with torch.no_grad():
        xf = x.detach().float()
        dist = torch.cdist(xf, xf) / math.sqrt(d)
        kk = max(1, min(int(k), n))
        nearest = torch.topk(dist, kk, dim=-1, largest=False).values
        density = torch.exp(-(nearest**2).mean(dim=-1))
        idx = torch.arange(n, device=device)
        # higher[i, j]: token j is denser than token i (ties: the lower index is denser)
        higher = (density[None, :] > density[:, None]) | (
            (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
        )
        dist_max = dist.max()
        delta = torch.where(higher, dist, dist_max.expand_as(dist)).min(dim=-1).values
        score = density * delta
        order = torch.sort(score, descending=True, stable=True).indices
        centers = torch.sort(order[:num_centers]).values
        if num_centers > 0:
            assignment = dist[:, centers].argmin(dim=-1)
            assignment[centers] = torch.arange(num_centers, device=device)
        else:
            assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    return DPCResult(centers=centers, assignment=assignment, dist=dist, density=density, score=score)


# ----------------------------------------------------------------------------------------
# Shared helpers for the frame-structured training-free methods.
# ----------------------------------------------------------------------------------------


def frame_sizes(visual: VisualTokens, b: int) -> list[int]:
    """Token counts of sample ``b``'s frame groups, in order.

    Tokens are (t, h, w) row-major (``index = t*h*w + y*w + x``); a sample's ``n`` valid tokens
    are a prefix of its row. ``n`` need not be a whole number of frames: the last frame group
    is then partial (its first ``n mod h*w`` positions).

    Raises:
        ValueError: padding not at the end of the sample, or more valid tokens than the grid holds.
    """
    t, h, w = visual.grid
    hw = h * w
    valid = visual.valid[b]
    n = int(valid.sum())
    if n and not bool(valid[:n].all()):
        raise ValueError(f"sample {b}: valid tokens must be a prefix (padding at the end of the sample)")
    if hw <= 0 or n > t * hw:
        raise ValueError(f"sample {b}: {n} valid tokens do not fit grid (t, h, w) = {visual.grid}")
    sizes = [hw] * (n // hw)
    if n % hw:
        sizes.append(n % hw)
    return sizes


def split_count(total: int, weights: list[int], caps: list[int] | None = None) -> list[int]:
    """Split the integer ``total`` over slots in proportion to integer ``weights``.

    Largest-remainder rule in exact integer arithmetic: slot ``i`` gets
    ``floor(total * w_i / W)``, and the leftover units go one each to the largest remainders
    (ties to the earlier slot). With ``caps`` (water-filling): a slot whose proportional share
    exceeds its cap is fixed at the cap and the rest is re-split over the other slots, until
    every share fits. Slots of zero weight get nothing unless every open slot has zero weight
    (then the split is even).

    Raises:
        ValueError: ``total`` exceeds the sum of the caps.
    """
    m = len(weights)
    caps = list(caps) if caps is not None else [total] * m
    if total > sum(caps):
        raise ValueError(f"cannot split {total} over capacities {caps}")
    counts = [0] * m
    remaining = total
    open_slots = [i for i in range(m) if caps[i] > 0]
    while remaining > 0 and open_slots:
        ws = {i: weights[i] for i in open_slots}
        if sum(ws.values()) <= 0:
            ws = {i: 1 for i in open_slots}
        wsum = sum(ws.values())
        over = [i for i in open_slots if remaining * ws[i] > caps[i] * wsum]
        if over:
            for i in over:
                counts[i] = caps[i]
                remaining -= caps[i]
            open_slots = [i for i in open_slots if i not in over]
            continue
        share = {i: remaining * ws[i] // wsum for i in open_slots}
        rem = {i: remaining * ws[i] % wsum for i in open_slots}
        left = remaining - sum(share.values())
        for i in sorted(open_slots, key=lambda j: (-rem[j], j))[:left]:
            share[i] += 1
        for i in open_slots:
            counts[i] = share[i]
        remaining = 0
    return counts


def pack_merged(
    indices: list[torch.Tensor],
    tokens: list[torch.Tensor],
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Selection:
    """Pack per-sample (representative index, merged token) lists into a :class:`Selection`.

    Each sample's entries are sorted by index (ascending); shorter samples are padded by
    repeating their last valid index and token, and ``valid [B, K]`` is set only when samples
    keep different counts. An empty sample is padded with index 0 and a zero token.
    """
    k_max = max((int(i.numel()) for i in indices), default=0)
    bsz = len(indices)
    index = torch.zeros(bsz, k_max, dtype=torch.long, device=device)
    out = torch.zeros(bsz, k_max, hidden, dtype=dtype, device=device)
    valid = torch.zeros(bsz, k_max, dtype=torch.bool, device=device)
    rows_idx, rows_tok = [], []
    for b, (idx, tok) in enumerate(zip(indices, tokens)):
        idx = idx.to(device=device, dtype=torch.long)
        order = torch.argsort(idx)
        idx, tok = idx[order], tok[order].to(dtype)
        n = idx.numel()
        if 0 < n < k_max:
            idx = torch.cat([idx, idx[-1:].expand(k_max - n)])
            tok = torch.cat([tok, tok[-1:].expand(k_max - n, -1)])
        elif n == 0:
            idx = torch.zeros(k_max, dtype=torch.long, device=device)
            tok = torch.zeros(k_max, hidden, dtype=dtype, device=device)
        valid[b, :n] = True
        rows_idx.append(idx)
        rows_tok.append(tok)
    if bsz and k_max:
        index = torch.stack(rows_idx)
        out = torch.stack(rows_tok)
    return Selection(index=index, tokens=out, valid=None if bool(valid.all()) else valid)


def require_saliency(visual: VisualTokens, method: str) -> torch.Tensor:
    """``visual.saliency [B, M]`` or a clear error naming the missing field."""
    if visual.saliency is None:
        raise ValueError(
            f"compressor {method!r} needs vision-tower attention: VisualTokens.saliency is None "
            "(encode with a backbone that fills `saliency` [B, M])"
        )
    if tuple(visual.saliency.shape) != tuple(visual.valid.shape):
        raise ValueError(
            f"compressor {method!r}: VisualTokens.saliency has shape {tuple(visual.saliency.shape)}, "
            f"expected {tuple(visual.valid.shape)}"
        )
    return visual.saliency


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``scores`` (ties to the lower position), in score order."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]
