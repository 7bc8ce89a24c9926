"""``pool``: spatial average pooling of each frame group's token grid down to the budget.

Paper: "Matryoshka Multimodal Models" (M3), Cai, Yang, Jain, Gao, Lee — arXiv 2405.17430.
Reference code: ``mu-cai/matryoshka-mm`` (``LlavaMetaForCausalLM.matryoshka_vis_token_process``
in ``llava/model/llava_arch.py``): per image, ``F.avg_pool2d`` over the square token grid
with ``kernel_size = stride = int(sqrt(H·W / scale))``, scales {1, 9, 36, 144, 576}.
M3 trains the LLM on the pooled scales; used here training-free, it is the pooling
baseline (LLaVA-Video / LLaVA-OneVision pool their video grids in the same spirit).

What this implementation does:
    * K = :func:`tokensieve.models.budget.num_keep` of the sample's valid tokens;
    * each frame group's ``(h, w)`` grid is pooled to a ``(ph, pw)`` grid with
      ``torch.nn.functional.adaptive_avg_pool2d`` (PyTorch's cell ``i`` spans rows
      ``floor(i·h/ph)`` to ``ceil((i+1)·h/ph)``, so cells may overlap by one row/column when
      ph does not divide h); the same (ph, pw) is used for every frame;
    * the grid is the smallest one (fewest cells per frame) from an aspect-preserving
      family — every ``(ph, round(ph·w/h))`` and ``(round(pw·h/w), pw)`` — whose usable
      cells over all frames number at least K (for unpadded samples: the smallest with
      ``ph·pw >= K / t``); ``(h, w)`` itself (one token per cell) always qualifies;
    * if that grid gives C > K cells, K cells are kept by uniform stride over the cells in
      token order (cell ``floor((i + 0.5)·C / K)``, as ``uniform`` does): the tokens of the
      dropped cells are discarded, not merged;
    * a kept token is the mean of the valid tokens of its cell; its index is the original
      token nearest the cell's centre, ``(floor((i + 0.5)·h/ph), floor((j + 0.5)·w/pw))``
      — always inside the cell and distinct across cells.

Defaults from the reference: none to take — M3's ``matryoshka_vis_token_scale`` (tokens per
image) is what ``budget`` sets here (an int budget of ``t·36`` reproduces M3's 36-token
scale on a 24x24 grid per frame: a 6x6 grid, as ``avg_pool2d(kernel=4, stride=4)`` gives).

Signals needed: visual features and the token grid ``visual.grid = (t, h, w)`` with the
backbone's (t, h, w) row-major order (token index ``f*h*w + y*w + x``). Applies before
the LLM.

Changes from the reference: adaptive (any output grid, non-square inputs) instead of a
fixed square kernel; exact K by the stride trim above; per-frame pooling of video frame
groups; padded samples: a cell averages only its valid tokens (a cell with none is not
usable), and when the centre token of a cell is padding the nearest unused valid token of
the cell (ties: lower index) represents it; a cell left without one is not usable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.compressors.base import Compressor, pack_merged
from tokensieve.models.types import Query, Selection, VisualTokens


def _bounds(size: int, out: int) -> list[tuple[int, int]]:
    """adaptive_avg_pool's [start, stop) per output cell along one axis."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def candidate_grids(h: int, w: int) -> list[tuple[int, int]]:
    """The aspect-preserving pooled grids of an ``(h, w)`` grid, fewest cells first."""
    grids = {(h, w)}
    for ph in range(1, h + 1):
        grids.add((ph, min(w, max(1, math.floor(ph * w / h + 0.5)))))
    for pw in range(1, w + 1):
        grids.add((min(h, max(1, math.floor(pw * h / w + 0.5))), pw))
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0], g[1]))


def _cells(valid: torch.Tensor, ph: int, pw: int) -> list[tuple[int, int, int, int]]:
    """Usable cells ``(representative token, frame, i, j)`` for one sample, sorted by token.

    ``valid`` is the sample's ``bool [t, h, w]`` mask (on the CPU).
    """
    t, h, w = valid.shape
    rows, cols = _bounds(h, ph), _bounds(w, pw)
    ys = [((2 * i + 1) * h) // (2 * ph) for i in range(ph)]
    xs = [((2 * j + 1) * w) // (2 * pw) for j in range(pw)]
    cells = []
    for f in range(t):
        frame = valid[f]
        if bool(frame.all()):
            cells += [(f * h * w + y * w + x, f, i, j) for i, y in enumerate(ys) for j, x in enumerate(xs)]
            continue
        if not bool(frame.any()):
            continue
        used = {ys[i] * w + xs[j] for i in range(ph) for j in range(pw) if bool(frame[ys[i], xs[j]])}
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                y, x = ys[i], xs[j]
                if bool(frame[y, x]):
                    cells.append((f * h * w + y * w + x, f, i, j))
                    continue
                cy, cx = (i + 0.5) * h / ph - 0.5, (j + 0.5) * w / pw - 0.5
                options = sorted(
                    ((yy - cy) ** 2 + (xx - cx) ** 2, yy * w + xx)
                    for yy in range(r0, r1)
                    for xx in range(c0, c1)
                    if bool(frame[yy, xx]) and yy * w + xx not in used
                )
                if options:
                    used.add(options[0][1])
                    cells.append((f * h * w + options[0][1], f, i, j))
    cells.sort()
    return cells


class Pool(Compressor):
    """Average-pool each frame group's token grid and keep exactly K pooled tokens.

    Input: ``visual.tokens [B, M, D]``, ``visual.valid [B, M]``, ``visual.grid = (t, h, w)``
    with ``t*h*w == M``. ``query`` is ignored. Output: ``Selection.index [B, K]`` — the
    original token nearest each kept cell's centre, ascending — and ``Selection.tokens
    [B, K, D]`` — the mean of the cell's valid tokens; ``Selection.valid [B, K]`` when
    samples keep different counts. K = ``num_keep(n_valid_b, budget)``
    (:func:`tokensieve.models.budget.num_keep`).

    Raises:
        ValueError: the grid does not match M, or an invalid ``budget`` (out of range).
        TypeError: a non-numeric ``budget``.
    """

    name = "pool"

    def _plan(self, visual: VisualTokens, budget: Budget):
        """Per sample: ``(ph, pw, kept cells)``, cells as ``(token, frame, i, j)``."""
        check_budget(budget)
        t, h, w = visual.grid
        if t * h * w != visual.num_tokens:
            raise ValueError(
                f"pool needs the (t, h, w) token grid: grid {visual.grid} gives {t * h * w} tokens, "
                f"got M={visual.num_tokens}"
            )
        grids = candidate_grids(h, w)
        plans = []
        for b in range(visual.batch_size):
            valid = visual.valid[b].reshape(t, h, w).cpu()
            per_frame = valid.flatten(1).sum(1)
            k = num_keep(int(per_frame.sum()), budget)
            if k == 0:
                plans.append((h, w, []))
                continue
            for ph, pw in grids:
                if int(per_frame.clamp(max=ph * pw).sum()) < k:  # upper bound on usable cells
                    continue
                cells = _cells(valid, ph, pw)
                if len(cells) >= k:
                    break
            c = len(cells)
            if c > k:
                cells = [cells[((2 * s + 1) * c) // (2 * k)] for s in range(k)]
            plans.append((ph, pw, cells))
        return plans

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        t, h, w = visual.grid
        dev = visual.tokens.device
        indices, merged = [], []
        for b, (ph, pw, cells) in enumerate(self._plan(visual, budget)):
            if not cells:
                indices.append(torch.empty(0, dtype=torch.long, device=dev))
                merged.append(visual.tokens.new_zeros(0, visual.tokens.shape[-1]))
                continue
            x = visual.tokens[b]
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            m = visual.valid[b].to(x.dtype).unsqueeze(-1)  # [M, 1]
            grid_x = torch.where(m > 0, x, torch.zeros_like(x)).reshape(t, h, w, -1).permute(0, 3, 1, 2)
            sums = F.adaptive_avg_pool2d(grid_x, (ph, pw))  # [t, D, ph, pw] mean over the cell area
            counts = F.adaptive_avg_pool2d(m.reshape(t, h, w, 1).permute(0, 3, 1, 2), (ph, pw))  # valid fraction
            frame = torch.tensor([c[1] for c in cells], device=dev)
            ii = torch.tensor([c[2] for c in cells], device=dev)
            jj = torch.tensor([c[3] for c in cells], device=dev)
            means = sums[frame, :, ii, jj] / counts[frame, 0, ii, jj].unsqueeze(1)  # area cancels
            indices.append(torch.tensor([c[0] for c in cells], dtype=torch.long, device=dev))
            merged.append(means)
        return pack_merged(indices, merged, visual.tokens)

    def merge_weights(self, visual: VisualTokens, budget: Budget = 0.25) -> list[torch.Tensor]:
        """Per sample, ``float [K_b, M]``: row k spreads weight 1 evenly over the valid tokens of
        kept cell k (non-negative, zero on padding, rows sum to 1), so
        ``forward(...).tokens[b, :K_b] == merge_weights(...)[b] @ visual.tokens[b]``."""
        t, h, w = visual.grid
        out = []
        for b, (ph, pw, cells) in enumerate(self._plan(visual, budget)):
            rows, cols = _bounds(h, ph), _bounds(w, pw)
            wts = torch.zeros(len(cells), t, h, w, dtype=torch.float64, device=visual.tokens.device)
            for r, (_, f, i, j) in enumerate(cells):
                wts[r, f, rows[i][0] : rows[i][1], cols[j][0] : cols[j][1]] = 1.0
            wts = wts.reshape(len(cells), -1) * visual.valid[b].to(torch.float64)
            if cells:
                wts = wts / wts.sum(dim=1, keepdim=True)
            out.append(wts)
        return out
