"""Inference with a compressor plugged into a backbone, and output fidelity against full tokens.

Fidelity per method × budget, on held-out clips:
- kept visual tokens (mean per sample) and retention (kept / M);
- ``KL(full ‖ compressed)`` of the next-token distributions at the answer position, nats;
- top-1 agreement: how often the compressed model's argmax next token equals the full model's;
- the compressor's own selection time per sample (ms), and as a fraction of the full-token
  prefill time (vision tower + LLM forward) measured on the same batches. In-LLM methods
  (FastV) select during the forward, so their time is that of the whole pruned LLM forward.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tokensieve.data.types import VideoBatch
from tokensieve.models.backbones import Backbone
from tokensieve.models.budget import Budget, check_budget
from tokensieve.models.compressors import Compressor
from tokensieve.models.types import Selection, VisualTokens


@dataclass
class CompressedVLM:
    """A backbone that runs every prefill through ``compressor`` at ``budget``.

    Calling the object returns next-token logits ``[B, V]`` of the pruned prefill.
    """

    backbone: Backbone
    compressor: Compressor
    budget: Budget

    def __post_init__(self):
        check_budget(self.budget)

    @torch.no_grad()
    def __call__(self, batch: VideoBatch) -> torch.Tensor:
        visual = self.backbone.encode_video(batch, saliency=self.compressor.needs_saliency)
        query = self.backbone.embed_query(batch, visual) if self.compressor.needs_query else None
        return compressed_forward(self.backbone, batch, visual, query, self.compressor, self.budget)[0]


def compressed_forward(backbone: Backbone, batch: VideoBatch, visual: VisualTokens, query, compressor: Compressor, budget: Budget) -> tuple[torch.Tensor, Selection]:
    """Run ``compressor`` at ``budget`` and the backbone on what it keeps.

    Pre-LLM methods select first, then the backbone runs on the kept tokens; in-LLM methods
    (``compressor.applies == "in_llm"``, e.g. FastV) run through ``backbone.forward_in_llm``.

    Returns:
        ``(logits [B, V], selection)``.
    """
    if compressor.applies == "in_llm":
        return backbone.forward_in_llm(batch, visual, compressor, budget)
    selection = compressor(visual, query if compressor.needs_query else None, budget=budget)
    return backbone(batch, visual, selection), selection


def apply(backbone: Backbone, compressor: Compressor, budget: Budget) -> CompressedVLM:
    """Plug ``compressor`` into ``backbone`` at ``budget`` (ratio in (0, 1] or token count).

    Raises:
        TypeError, ValueError: invalid budget (see ``tokensieve.models.budget.check_budget``).
    """
    return CompressedVLM(backbone, compressor.eval(), budget)


def kl_full_to_compressed(full_logits: torch.Tensor, comp_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_full ‖ p_comp)`` per sample in nats, from logits ``[B, V]`` → ``[B]``."""
    log_p = full_logits.float().log_softmax(-1)
    log_q = comp_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def fidelity_table(backbone: Backbone, compressors: dict[str, Compressor], budgets: list[Budget], batches, progress: bool = True) -> list[dict]:
    """Evaluate every compressor at every budget on the same clips.

    Args:
        backbone: frozen backbone.
        compressors: display name → compressor.
        budgets: retention ratios or token counts.
        batches: iterable of :class:`VideoBatch` (empty batches are skipped).

    Returns:
        One row per (budget, method): ``{"budget", "method", "kept_tokens", "retention",
        "kl", "top1_agreement", "select_ms", "select_vs_prefill", "samples"}`` — means over
        samples; times are wall-clock on the backbone's device (CPU here).
    """
    need_saliency = any(c.needs_saliency for c in compressors.values())
    sums: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    prefill_s, n_samples = 0.0, 0
    for batch in tqdm(batches, desc="fidelity", disable=not progress):
        if batch.size == 0:
            continue
        start = time.perf_counter()
        visual = backbone.encode_video(batch, saliency=need_saliency)
        full = backbone(batch, visual)
        prefill_s += time.perf_counter() - start
        n_samples += batch.size
        query = backbone.embed_query(batch, visual)
        m = visual.valid.sum(1).float()
        for budget in budgets:
            for name, comp in compressors.items():
                start = time.perf_counter()
                if comp.applies == "in_llm":  # selection happens inside the forward: time the whole pruned forward
                    logits, sel = backbone.forward_in_llm(batch, visual, comp, budget)
                    select_s = time.perf_counter() - start
                else:
                    sel = comp(visual, query if comp.needs_query else None, budget=budget)
                    select_s = time.perf_counter() - start
                    logits = backbone(batch, visual, sel)
                acc = sums[(budget, name)]
                kept = sel.num_kept.float()
                acc["kept_tokens"] += kept.sum().item()
                acc["retention"] += (kept / m).sum().item()
                acc["kl"] += kl_full_to_compressed(full, logits).sum().item()
                acc["top1_agreement"] += (full.argmax(-1) == logits.argmax(-1)).float().sum().item()
                acc["select_ms"] += 1000 * select_s
                acc["samples"] += batch.size
    prefill_ms = 1000 * prefill_s / max(n_samples, 1)
    rows = []
    for (budget, name), acc in sums.items():
        n = acc.pop("samples")
        row = {"budget": budget, "method": name, **{k: v / n for k, v in acc.items()}}
        in_llm = compressors[name].applies == "in_llm"
        rows.append({**row, "select_vs_prefill": row["select_ms"] / prefill_ms, "prefill_ms": prefill_ms, "select_includes_forward": in_llm, "samples": int(n)})
    return rows


def print_table(rows: list[dict], title: str = "fidelity vs full tokens") -> None:
    """Print rows as a rich table, budgets × methods."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("budget", "method", "kept tokens", "retention", "KL(full‖comp) nats", "top-1 agreement", "select ms/sample", "÷ full prefill"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["budget"]), r["method"], f"{r['kept_tokens']:.1f}", f"{r['retention']:.3f}", f"{r['kl']:.4f}",
            f"{r['top1_agreement']:.3f}", f"{r['select_ms']:.2f}", f"{r['select_vs_prefill']:.3f}",
        )
    Console(width=max(140, Console().width)).print(table)


def save_rows(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return path
