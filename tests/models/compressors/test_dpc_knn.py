"""DPC-KNN density-peak clustering (models/compressors/dpc_knn.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.models.compressors.dpc_knn import dpc_knn


def test_dpc_knn_matches_hand_computed_formula():
    # Expectation derived by hand from HoliTom `cluster_dpc_knn` (= FastVID's density block):
    # points 0, 1, 3 on a line (D = 1, so dist = |xi - xj|), k = 2 (self included):
    #   rho = exp(-[(0+1)/2, (0+1)/2, (0+4)/2]) = [e^-.5, e^-.5, e^-2]
    #   tie rho0 == rho1 -> token 0 counts as denser; delta = [max dist 3, d(1,0)=1, d(3,1)=2]
    #   score = rho * delta = [3 e^-.5, e^-.5, 2 e^-2] -> two centres {0, 1}; token 2 joins 1.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    res = dpc_knn(x, num_centers=2, k=2)
    assert torch.allclose(res.density, torch.tensor([math.exp(-0.5), math.exp(-0.5), math.exp(-2.0)]))
    assert torch.allclose(res.score, torch.tensor([3 * math.exp(-0.5), math.exp(-0.5), 2 * math.exp(-2.0)]))
    assert res.centers.tolist() == [0, 1]
    assert res.assignment.tolist() == [0, 1, 1]
    assert torch.allclose(res.dist, torch.tensor([[0.0, 1, 3], [1, 0, 2], [3, 2, 0]]))


def test_dpc_knn_distance_is_scaled_by_sqrt_dim():
    x = torch.tensor([[0.0, 0, 0, 0], [2.0, 2, 2, 2]])  # euclidean 4, D = 4 -> 4 / 2 = 2
    res = dpc_knn(x, 1, k=1)
    assert res.dist[0, 1].item() == pytest.approx(2.0)


def test_dpc_knn_one_centre_per_separated_cluster():
    # three tight blobs on different axes: each blob's densest point is a density peak
    torch.manual_seed(0)
    blobs = [torch.eye(4)[i] * 3 + 0.01 * torch.randn(n, 4) for i, n in ((0, 5), (1, 4), (2, 4))]
    x = torch.cat(blobs)
    label = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)
    res = dpc_knn(x, 3, k=3)
    assert sorted(label[res.centers].tolist()) == [0, 1, 2]
    assert torch.equal(label[res.centers][res.assignment], label)  # everyone joins its own blob
    assert torch.equal(res.centers, torch.sort(res.centers).values)
    assert res.assignment[res.centers].tolist() == [0, 1, 2]


def test_dpc_knn_is_deterministic_with_ties_and_clamps():
    x = torch.ones(6, 3)  # all identical: every density and distance ties
    a, b = dpc_knn(x, 2, k=7), dpc_knn(x, 2, k=7)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assignment, b.assignment)
    assert a.centers.tolist() == [0, 1]  # ties -> lower index
    assert dpc_knn(x, 10, k=2).centers.tolist() == list(range(6))  # clamped to N
    assert dpc_knn(x, 0, k=2).centers.numel() == 0
    assert dpc_knn(torch.zeros(0, 3), 2, k=2).centers.numel() == 0
    with pytest.raises(ValueError, match="x \\[N, D\\]"):
        dpc_knn(torch.zeros(2, 3, 4), 1, 1)
