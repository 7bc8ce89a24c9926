"""The one rounding rule that turns a budget into a kept-token count.

Every compressor calls :func:`num_keep`; nothing else in the library rounds budgets.
"""

from __future__ import annotations

import math

import torch

Budget = float | int


def check_budget(budget: Budget) -> Budget:
    """Validate a budget and return it unchanged.

    A ``float`` is a retention ratio in (0, 1] of each sample's valid visual tokens; an
    ``int`` is an absolute token count >= 1. ``1`` (int) therefore means one token and
    ``1.0`` (float) means all tokens.

    Raises:
        TypeError: for bools or non-numeric budgets.
        ValueError: for a ratio outside (0, 1] or a count < 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float ratio in (0, 1] or an int token count, got {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        raise ValueError(f"budget ratio must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget token count must be >= 1, got {budget}")
    return budget


def num_keep(n_valid: int, budget: Budget) -> int:
    """Number of tokens to keep out of ``n_valid``.

    Rule: a ratio ``r`` keeps ``floor(r * n + 0.5)`` (round half up), clamped to
    ``[1, n]``; a count ``k`` keeps ``min(k, n)``. ``n_valid == 0`` keeps 0.

    Raises:
        TypeError, ValueError: see :func:`check_budget`.
    """
    check_budget(budget)
    if n_valid <= 0:
        return 0
    if isinstance(budget, int):
        return min(budget, n_valid)
    return max(1, min(n_valid, math.floor(budget * n_valid + 0.5)))


def num_keep_batch(valid: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Per-sample kept counts, ``long [B]``, for a ``bool [B, M]`` validity mask."""
    return torch.tensor([num_keep(int(n), budget) for n in valid.sum(dim=1).tolist()], dtype=torch.long)
