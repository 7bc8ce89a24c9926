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
