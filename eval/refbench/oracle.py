"""The oracle: keep the evidence tokens, pad to the budget with evenly spaced tokens.

It is the benchmark's upper reference: a compressor that knows which tokens determine the
answer. It is not in the compressor registry (it needs each sample's ground truth, which no
real compressor sees); the harness builds it from the batch's json via :func:`evidence_of`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokensieve.models.budget import Budget, num_keep
from tokensieve.models.compressors.base import Compressor, selection_from_indices
from tokensieve.models.types import Query, Selection, VisualTokens


def evidence_of(meta: Sequence[dict]) -> list[list[int]]:
    """Each sample's evidence token indices from its json (``evidence_tokens``; [] when absent)."""
    return [[int(i) for i in (m or {}).get("evidence_tokens", [])] for m in meta]


class OracleSelect(Compressor):
    """Keep every evidence token, then fill the budget with evenly spaced other tokens.

    The kept count is the budget's (``num_keep``), or the number of evidence tokens when that
    is larger (the evidence is never cut). Fillers are the non-evidence valid tokens at
    ``floor((i + 0.5) * n / k)`` — the ``uniform`` rule over what is left.

    Call :meth:`set_evidence` with the batch's evidence before each forward.
    """

    name = "oracle"

    def __init__(self):
        super().__init__()
        self.evidence: list[list[int]] | None = None

    def set_evidence(self, evidence: list[list[int]]) -> OracleSelect:
        self.evidence = evidence
        return self

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        if self.evidence is None or len(self.evidence) != visual.batch_size:
            raise ValueError("oracle: call set_evidence(evidence_of(batch.meta)) with one list per sample first")
        picks = []
        for b, valid in enumerate(visual.valid):
            positions = valid.nonzero().squeeze(1)
            allowed = set(positions.tolist())
            ev = sorted({i for i in self.evidence[b] if i in allowed})
            k = max(num_keep(positions.numel(), budget), len(ev))
            rest = torch.tensor([p for p in positions.tolist() if p not in set(ev)], dtype=torch.long)
            need = k - len(ev)
            if need > 0 and rest.numel():
                slots = ((torch.arange(need, dtype=torch.float64) + 0.5) * rest.numel() / need).floor().long()
                fill = rest[slots].tolist()
            else:
                fill = []
            picks.append(torch.tensor(ev + fill, dtype=torch.long))
        return selection_from_indices(picks, visual.tokens.device)


def evidence_recall(selection: Selection, evidence: list[list[int]]) -> list[float | None]:
    """Per sample, the fraction of its evidence tokens whose index the selection keeps (None: no evidence).

    For merging methods the kept index is the token a merged group is anchored at, so recall
    counts anchors, not everything merged into them.
    """
    out: list[float | None] = []
    valid = selection.valid
    for b, ev in enumerate(evidence):
        if not ev:
            out.append(None)
            continue
        idx = selection.index[b] if valid is None else selection.index[b][valid[b]]
        kept = set(idx.tolist())
        out.append(sum(1 for i in ev if i in kept) / len(ev))
    return out
