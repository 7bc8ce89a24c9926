"""The evaluation harness: every compressor × budget on one backbone and shard set.

``tokensieve eval --backbone PATH --data SHARDS --compressors a,b,exported_dir --budgets
0.05,0.1,0.25,0.5 --out DIR`` (or :func:`run_benchmark`) measures, per cell:

- ``accuracy`` on multiple-choice answers (argmax of the next-token logits over the option
  letters ``A``.. at the answer position) with a 95% percentile-bootstrap interval
  (``ci_low``, ``ci_high``; 1000 resamples of the samples, fixed seed);
- ``acc_pct_full``: accuracy as % of the full-token accuracy of the same run;
- ``agreement``: share of samples whose predicted letter equals the full-token one;
- ``kl``: ``KL(full ‖ compressed)`` of the answer distribution, a softmax over the option
  letters' logits, nats (:func:`tokensieve.eval.fidelity.kl_full_to_compressed`);
- ``kept_tokens`` / ``retention``: mean visual tokens reaching the LLM, and their share;
- ``tokdense``: TokDense (VQToken, arXiv 2503.16980), accuracy in % per kept visual token;
- ``accuracy_by_type``: accuracy per question type (the samples' ``qtype``, e.g. refbench's
  colour / count / direction …), also a second table in ``results.md``;
- ``evidence_recall``: mean fraction of a sample's evidence tokens (``evidence_tokens`` in
  its json, as written by :mod:`tokensieve.eval.refbench`) kept — NaN without evidence;
- ``prefill_gflops``: analytic prefill GFLOPs per sample — vision tower + merger + LLM over
  the kept tokens (``tokensieve.eval.efficiency.prefill_flops``, causal attention count);
  ``llm_gflops`` is the LLM part, the one a compressor changes (for an in-LLM pruner such
  as FastV, layers before its pruning layer count the full sequence);
- ``prefill_ms``: measured prefill wall time per sample = vision encoding + the compressor's
  own selection + the LLM prefill (encoding is measured once per batch and shared by every
  cell, since no compressor changes it); ``select_ms`` is the compressor's part (for
  in-LLM methods such as FastV, ``backbone.forward_in_llm`` does both, all in ``select_ms``);
- ``peak_mem_mb``: peak memory of the selection + prefill — CUDA: ``max_memory_allocated``;
  CPU: peak resident-set growth over the cell's start, sampled every millisecond.

Rows ``full`` (no compressor, budget 1.0) and ``oracle`` (the evidence tokens, padded to
the budget with evenly spaced tokens; :class:`~tokensieve.eval.refbench.oracle.OracleSelect`)
are always included. Outputs in ``OUT``: ``results.json`` (rewritten after every cell, so a
rerun skips the cells already there), ``results.md`` and ``pareto.png``; with a W&B project
(``wandb_project`` / ``$WANDB_PROJECT``) they are also logged to a run.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tokensieve.data.types import VideoBatch
from tokensieve.eval.fidelity import kl_full_to_compressed
from tokensieve.eval.refbench.oracle import OracleSelect, evidence_of, evidence_recall
from tokensieve.models.budget import Budget, check_budget

LETTERS = "ABCDEFGHIJ"
RESULTS_VERSION = 1


# ----------------------------------------------------------------------------- metrics
def bootstrap_ci(correct: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``correct`` (0/1 per sample)."""
    correct = np.asarray(correct, dtype=float)
    if correct.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, correct.size, size=(resamples, correct.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def llm_prefill_flops(config, seq_len: int) -> float:
    """Analytic FLOPs of one causal LLM prefill over ``seq_len`` tokens (multiply-add = 2 FLOPs).

    Per decoder layer: q/k/v/o projections ``2·L·d·(2·h·hd + 2·kv·hd)``; attention scores
    and the weighted sum over the causal triangle ``2 · 2·h·hd · L(L+1)/2``; the gated MLP
    ``2·L·3·d·d_ff``. Plus the LM head on the last position only (``2·d·V``). Norms,
    rotary embedding and softmax are ignored (lower order). ``config`` is the text config of
    a Hugging Face decoder (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``, ``num_hidden_layers``, ``vocab_size``, optional ``head_dim``).
    """
    d = config.hidden_size
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or d // h
    ff = config.intermediate_size
    n = seq_len
    proj = 2 * n * d * (2 * h * hd + 2 * kv * hd)
    attn = 2 * 2 * h * hd * n * (n + 1) / 2
    mlp = 2 * n * 3 * d * ff
    return float(config.num_hidden_layers * (proj + attn + mlp) + 2 * d * config.vocab_size)


def sample_flops(config, kept: int, seq_len: int, frames: tuple[int, int, int]) -> tuple[float, float]:
    """``(total, llm)`` prefill FLOPs of one sample with ``kept`` visual tokens in a ``seq_len`` prefill.

    Uses ``tokensieve.eval.efficiency.prefill_flops`` (vision + merger + LLM); for a model
    type it does not cover, the LLM part alone from :func:`llm_prefill_flops`.
    """
    try:
        from tokensieve.eval.efficiency import prefill_flops

        t, h, w = frames
        f = prefill_flops(config, kept, seq_len - kept, num_frames=t, height=h, width=w, causal=True)
        return f.total, f.llm
    except (ImportError, ValueError):
        llm = llm_prefill_flops(getattr(config, "text_config", config), seq_len)
        return llm, llm


def letter_ids(tokenizer, n: int = 4) -> list[int]:
    """Token ids of the first ``n`` option letters (each must be one token)."""
    ids = []
    for letter in LETTERS[:n]:
        enc = tokenizer.encode(letter, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"option letter {letter!r} is {len(enc)} tokens in this tokenizer")
        ids.append(enc[0])
    return ids


class PeakMemory:
    """Peak memory during a ``with`` block, in MB above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). CPU: the process's resident
    set, sampled every ``interval`` seconds by a thread (``/proc/self/statm``; falls back to
    ``resource.getrusage`` peak RSS where /proc is missing).
    """

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device, self.interval = device, interval
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._max = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak_mb = (self._max - self._base) / 2**20
        return False


# ----------------------------------------------------------------------------- data
@dataclass
class _Cached:
    """One batch with what every cell shares: visual tokens, query, full-token logits."""

    batch: VideoBatch
    visual: object
    query: object
    full_logits: torch.Tensor  # float [B, n_letters]
    truth: torch.Tensor  # long [B]
    encode_s: float
    full_s: float
    full_seq: list[int]
    evidence: list[list[int]]
    full_peak_mb: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seq_lens(backbone, batch, visual, selection) -> list[int]:
    _, mask, _, _ = backbone.lm_inputs(batch, visual, selection)
    return mask.sum(1).tolist()


@torch.no_grad()
def _cache(backbone, loader, letters: list[int], saliency: bool, progress: bool) -> list[_Cached]:
    out = []
    device = backbone.device
    for batch in tqdm(loader, desc="encode + full tokens", disable=not progress):
        if batch.size == 0:
            continue
        n_opt = {len(o) for o in batch.options} or {4}
        if max(n_opt) > len(letters):
            raise ValueError(f"batch has {max(n_opt)} options but only {len(letters)} letters are scored")
        _sync(device)
        t0 = time.perf_counter()
        visual = backbone.encode_video(batch, saliency=saliency)
        _sync(device)
        t1 = time.perf_counter()
        with PeakMemory(device) as mem:
            logits = backbone(batch, visual)
            _sync(device)
        t2 = time.perf_counter()
        query = backbone.embed_query(batch, visual)
        truth = torch.tensor([LETTERS.index(a.strip()[:1].upper()) if a else -1 for a in batch.answers])
        out.append(_Cached(batch, visual, query, logits[:, letters].float().cpu(), truth, t1 - t0, t2 - t1, _seq_lens(backbone, batch, visual, None), evidence_of(batch.meta), mem.peak_mb))
    if not out:
        raise ValueError("no samples to evaluate")
    return out


# ----------------------------------------------------------------------------- cells
def _cell_key(method: str, budget) -> str:
    return f"{method}@{budget}"


def _in_llm_flops(config, kept: int, seq: int, full_kept: int, full_seq: int, frames, layer: int) -> tuple[float, float]:
    """(total, LLM) FLOPs of an in-LLM pruner: layers < ``layer`` see every visual token, the rest the kept ones."""
    total_k, llm_k = sample_flops(config, kept, seq, frames)
    _, llm_f = sample_flops(config, full_kept, full_seq, frames)
    text = getattr(config, "text_config", config)
    share = min(1.0, layer / text.num_hidden_layers)
    llm = share * llm_f + (1 - share) * llm_k
    return total_k - llm_k + llm, llm


def _summarise(method: str, budget, pred, full_pred, truth, kl, kept, m, recall, seq, select_s, prefill_s, peak_mb, config, frames, full_acc, resamples, in_llm_layer: int | None = None, full_seq=None, qtypes=None) -> dict:
    correct = (pred == truth).float().numpy()
    qtypes = np.array([q or "" for q in (qtypes or [""] * len(correct))])
    lo, hi = bootstrap_ci(correct, resamples)
    acc = float(correct.mean())
    rec = [r for r in recall if r is not None]
    n = len(correct)
    cache: dict = {}
    if in_llm_layer is None:
        flops = [cache.setdefault((int(k), int(s)), sample_flops(config, int(k), int(s), frames)) for k, s in zip(kept.tolist(), seq)]
    else:  # FastV-style: the first layers still run over every visual token
        flops = [cache.setdefault((int(k), int(s), int(mk), int(fs)), _in_llm_flops(config, int(k), int(s), int(mk), int(fs), frames, in_llm_layer)) for k, s, mk, fs in zip(kept.tolist(), seq, m.tolist(), full_seq)]
    row = {
        "method": method,
        "budget": budget,
        "samples": n,
        "accuracy": acc,
        "accuracy_by_type": {str(q): float(correct[qtypes == q].mean()) for q in sorted(set(qtypes.tolist()) - {""})},
        "ci_low": lo,
        "ci_high": hi,
        "acc_pct_full": 100 * acc / full_acc if full_acc else float("nan"),
        "agreement": float((pred == full_pred).float().mean()),
        "kl": float(kl.mean()),
        "kept_tokens": float(kept.float().mean()),
        "retention": float((kept.float() / m.float()).mean()),
        "evidence_recall": float(np.mean(rec)) if rec else float("nan"),
        "prefill_gflops": float(np.mean([f[0] for f in flops])) / 1e9,
        "llm_gflops": float(np.mean([f[1] for f in flops])) / 1e9,
        "seq_len": float(np.mean(seq)),
        "select_ms": 1000 * select_s / n,
        "prefill_ms": 1000 * prefill_s / n,
        "peak_mem_mb": peak_mb,
    }
    row["tokdense"] = tokdense(row)
    return row


@torch.no_grad()
def _run_cell(backbone, cached: list[_Cached], method: str, compressor, budget, letters, config, full_acc, resamples) -> dict:
    device = backbone.device
    preds, full_preds, truths, kls, kepts, ms, recalls, seqs, full_seqs, qtypes = [], [], [], [], [], [], [], [], [], []
    select_s = prefill_s = 0.0
    peak = 0.0
    for c in cached:
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            in_llm = compressor is not None and getattr(compressor, "applies", "pre_llm") == "in_llm"
            if compressor is None:
                selection = None
            elif in_llm:  # prunes inside the LLM: selection and prefill are one call
                in_logits, selection = backbone.forward_in_llm(c.batch, c.visual, compressor, budget)
            else:
                if isinstance(compressor, OracleSelect):
                    compressor.set_evidence(c.evidence)
                selection = compressor(c.visual, c.query if compressor.needs_query else None, budget=budget)
            _sync(device)
            t1 = time.perf_counter()
            if in_llm:
                logits = in_logits[:, letters].float().cpu()
            else:
                logits = backbone(c.batch, c.visual, selection)[:, letters].float().cpu() if selection is not None else c.full_logits
            _sync(device)
            t2 = time.perf_counter()
        peak = max(peak, mem.peak_mb if selection is not None else c.full_peak_mb)
        n_valid = c.visual.valid.sum(1).cpu()
        if selection is None:
            select_s += 0.0
            prefill_s += c.encode_s + c.full_s
            kept = n_valid
            recalls += [1.0 if ev else None for ev in c.evidence]
            seqs += c.full_seq
        else:
            select_s += t1 - t0
            prefill_s += c.encode_s + (t1 - t0) + (t2 - t1)
            kept = selection.num_kept.cpu()
            recalls += evidence_recall(selection, c.evidence)
            seqs += _seq_lens(backbone, c.batch, c.visual, selection)
        n_opt = torch.tensor([len(o) or len(letters) for o in c.batch.options])
        opt_mask = torch.arange(len(letters))[None, :] < n_opt[:, None]
        lg = logits.masked_fill(~opt_mask, float("-inf"))
        fl = c.full_logits.masked_fill(~opt_mask, float("-inf"))
        preds.append(lg.argmax(-1))
        full_preds.append(fl.argmax(-1))
        truths.append(c.truth)
        kls.append(kl_full_to_compressed(fl.masked_fill(~opt_mask, -1e9), lg.masked_fill(~opt_mask, -1e9)))
        kepts.append(kept)
        ms.append(n_valid)
        full_seqs += c.full_seq
        qtypes += [(meta or {}).get("qtype") for meta in c.batch.meta]
    cat = torch.cat
    frames = tuple(cached[0].batch.frames.shape[1:4])
    in_llm_layer = getattr(compressor, "layer", None) if compressor is not None and getattr(compressor, "applies", "pre_llm") == "in_llm" else None
    return _summarise(method, budget, cat(preds), cat(full_preds), cat(truths), cat(kls), cat(kepts), cat(ms), recalls, seqs, select_s, prefill_s, peak, config, frames, full_acc, resamples, in_llm_layer, full_seqs, qtypes)


# ----------------------------------------------------------------------------- entry point
def resolve_compressors(specs: list[str]) -> dict:
    """Display name → compressor (None for ``full``): registry names, ``oracle``, ``full`` or exported folders."""
    from tokensieve.models.compressors import get_compressor, load_compressor

    out: dict = {}
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "full":
            out["full"] = None
        elif spec == "oracle":
            out["oracle"] = OracleSelect()
        elif Path(spec).is_dir():
            comp = load_compressor(spec)
            out[f"{comp.name}:{Path(spec).name}"] = comp
        else:
            out[spec] = get_compressor(spec)
    return out


def expand_specs(specs: list[str]) -> list[str]:
    """``specs`` (compressor names / exported folders, as given to ``--compressors``) with
    ``training-free`` replaced by :func:`default_compressors`, stripped, order kept, duplicates
    and empty entries dropped."""
    out: list[str] = []
    for spec in specs:
        for name in default_compressors() if spec.strip() == "training-free" else [spec.strip()]:
            if name and name not in out:
                out.append(name)
    return out


def default_compressors() -> list[str]:
    """Every registered training-free method (learned ones need an exported folder)."""
    from tokensieve.models.compressors import REGISTRY, LearnedCompressor

    return sorted(name for name, cls in REGISTRY.items() if not issubclass(cls, LearnedCompressor))


def load_results(out: str | Path) -> dict:
    path = Path(out) / "results.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("version") == RESULTS_VERSION:
            return data
    return {"version": RESULTS_VERSION, "cells": {}}


def run_benchmark(
    backbone: str | Path | None,
    data: str | Path | list,
    compressors: list[str] | None = None,
    budgets: list[Budget] = (0.05, 0.1, 0.25, 0.5),
    out: str | Path = "runs/refbench/eval",
    num_frames: int = 16,
    size: tuple[int, int] = (112, 112),
    batch_size: int = 16,
    limit: int | None = None,
    resamples: int = 1000,
    progress: bool = True,
    wandb_project: str | None = None,
    batches: list[VideoBatch] | None = None,
    backbone_kwargs: dict | None = None,
) -> dict:
    """Evaluate ``compressors`` × ``budgets`` (plus ``full`` and ``oracle``) and write the reports.

    Args:
        backbone: folder or hub id (``tokensieve.models.backbones.load``); None: the shipped
            refbench teacher.
        data: shards (dir, brace pattern or list) read with ``VideoShardDataset``.
        compressors: registry names, ``oracle``, exported folders, and ``training-free`` for
            every registered training-free method; None: ``["training-free"]``.
        budgets: retention ratios (or int token counts).
        out: output folder; an existing ``results.json`` there makes finished cells skip.
        limit: evaluate only the first ``limit`` samples.
        batches: pre-built batches instead of ``data`` (tests).

    Returns:
        The results dict (``{"version", "meta", "cells": {key: row}}``), also in ``out/results.json``.
    """
    from tokensieve.models.backbones import load

    budgets = [check_budget(b) for b in budgets]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if backbone is None:
        from tokensieve.eval.refbench import teacher_path

        backbone = teacher_path()
    specs = expand_specs(compressors if compressors is not None else ["training-free"])
    comps = resolve_compressors(["full", "oracle", *[s for s in specs if s not in ("full", "oracle")]])
    results = load_results(out)
    meta = {"backbone": str(backbone), "weights": weights_fingerprint(backbone), "data": str(data), "num_frames": num_frames, "size": list(size), "limit": limit}
    if results.get("meta") and {k: results["meta"].get(k) for k in meta} != meta:
        raise ValueError(f"{out / 'results.json'} was written for {results['meta']}, not {meta}: use another --out")
    results["meta"] = {**meta, "device": None}
    todo = [(name, comp, 1.0 if comp is None else b) for name, comp in comps.items() for b in ([1.0] if comp is None else budgets)]
    todo = [t for t in todo if _cell_key(t[0], t[2]) not in results["cells"]]
    if todo:
        bb = load(backbone, **(backbone_kwargs or {}))
        letters = letter_ids(bb.tokenizer)
        results["meta"]["device"] = str(bb.device)
        if batches is None:
            from itertools import islice

            from tokensieve.data.reader import VideoShardDataset, make_loader

            loader = make_loader(VideoShardDataset(data, num_frames=num_frames, size=tuple(size)), batch_size, 0)
            batches = _limited(loader, limit) if limit else loader
        saliency = any(getattr(c, "needs_saliency", False) for _, c, _ in todo if c is not None)
        cached = _cache(bb, batches, letters, saliency, progress)
        config = bb.model.config
        full_row = results["cells"].get(_cell_key("full", 1.0))
        bar = tqdm(todo, desc="cells", disable=not progress)
        for name, comp, budget in bar:
            bar.set_postfix_str(_cell_key(name, budget))
            full_acc = full_row["accuracy"] if full_row else None
            row = _run_cell(bb, cached, name, comp, budget, letters, config, full_acc, resamples)
            if comp is None:
                full_row = row
                row["acc_pct_full"] = 100.0
            results["cells"][_cell_key(name, budget)] = row
            _write_json(results, out)
    write_reports(results, out)
    _log_wandb(results, out, wandb_project)
    return results


def weights_fingerprint(backbone: str | Path, chunk: int = 1 << 22) -> str | None:
    """A short hash of a local backbone's ``*.safetensors`` (name, size in bytes and the first
    and last ``chunk`` bytes of each), so results of retrained weights in the same folder are
    never mixed into an old ``results.json``.

    Returns:
        16 hex characters, or None for a hub id or a folder without safetensors.
    Raises:
        OSError: a weight file cannot be read.
    """
    import hashlib

    files = sorted(Path(backbone).glob("*.safetensors")) if Path(backbone).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(chunk))
            fh.seek(max(0, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def _limited(loader, limit: int):
    seen = 0
    for batch in loader:
        if seen >= limit:
            return
        if batch.size > limit - seen:
            keep = limit - seen
            batch = VideoBatch(batch.frames[:keep], batch.timestamps[:keep], batch.frame_mask[:keep], batch.questions[:keep], batch.options[:keep], batch.answers[:keep], batch.keys[:keep], batch.meta[:keep], batch.skipped)
        seen += batch.size
        yield batch


def _write_json(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    tmp.replace(out / "results.json")


# ----------------------------------------------------------------------------- reports
def rows_of(results: dict) -> list[dict]:
    """Cells sorted by budget, with ``full`` first and ``oracle`` second in each budget."""
    rank = {"full": 0, "oracle": 1}
    return sorted(results["cells"].values(), key=lambda r: (float(r["budget"]), rank.get(r["method"], 2), -r["accuracy"], r["method"]))


def tokdense(cell: dict) -> float:
    """TokDense (VQToken, "Neural Discrete Token Representation Learning for Extreme Token
    Reduction in Video LLMs", arXiv 2503.16980): accuracy in % per kept visual token of a cell
    (``100 · accuracy / kept_tokens``); NaN when nothing is kept."""
    return 100 * cell["accuracy"] / cell["kept_tokens"] if cell["kept_tokens"] else float("nan")


def markdown_table(results: dict) -> str:
    cols = ("budget", "method", "accuracy [95% CI]", "% of full", "agreement", "KL (nats)", "kept", "TokDense", "evidence recall", "prefill GFLOPs", "LLM GFLOPs", "prefill ms", "select ms", "peak MB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows_of(results):
        rec = "–" if r["evidence_recall"] != r["evidence_recall"] else f"{r['evidence_recall']:.2f}"
        lines.append(
            f"| {r['budget']} | {r['method']} | {100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] | "
            f"{r['acc_pct_full']:.1f} | {r['agreement']:.3f} | {r['kl']:.3f} | {r['kept_tokens']:.1f} | {tokdense(r):.2f} | {rec} | "
            f"{r['prefill_gflops']:.4f} | {r['llm_gflops']:.4f} | {r['prefill_ms']:.2f} | {r['select_ms']:.2f} | {r['peak_mem_mb']:.1f} |"
        )
    return "\n".join(lines)


def type_table(results: dict) -> str:
    """Markdown table of accuracy (%) per question type (the samples' ``qtype``), one row per
    cell; empty when no sample has a type."""
    rows = rows_of(results)
    types = sorted({q for r in rows for q in r.get("accuracy_by_type", {})})
    if not types:
        return ""
    lines = ["| budget | method | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 2)]
    for r in rows:
        by = r.get("accuracy_by_type", {})
        lines.append(f"| {r['budget']} | {r['method']} | " + " | ".join(f"{100 * by[q]:.1f}" if q in by else "–" for q in types) + " |")
    return "\n".join(lines)


def write_reports(results: dict, out: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``pareto.png`` in ``out``."""
    out = Path(out)
    _write_json(results, out)
    meta = results.get("meta", {})
    n = next(iter(results["cells"].values()), {}).get("samples", 0)
    md = [
        "# Token-compression benchmark",
        "",
        f"backbone `{meta.get('backbone')}` · data `{meta.get('data')}` · {n} samples · device {meta.get('device')}",
        "",
        "Accuracy: argmax over the option letters at the answer position, 95% bootstrap CI. "
        "% of full, agreement and KL (over the option letters) are against the full-token model of the same run. "
        "Prefill ms = vision encoding + the compressor's selection + LLM prefill, per sample. "
        "GFLOPs: analytic prefill per sample (vision + merger + LLM; LLM alone in its own column). "
        "Peak MB: memory above the cell's starting level during selection + LLM prefill (CPU: resident set; CUDA: allocated).",
        "",
        markdown_table(results),
        "",
    ]
    by_type = type_table(results)
    if by_type:
        md += ["## Accuracy by question type (%)", "", by_type, ""]
    (out / "results.md").write_text("\n".join(md))
    from tokensieve.eval.plots import pareto_plot

    pareto_plot(results, out / "pareto.png")
    return {"json": out / "results.json", "md": out / "results.md", "png": out / "pareto.png"}


def _log_wandb(results: dict, out: Path, project: str | None) -> None:
    project = project or os.environ.get("WANDB_PROJECT")
    if not project:
        return
    import wandb

    run = wandb.run or wandb.init(project=project, job_type="eval", config=results.get("meta", {}))
    rows = rows_of(results)
    cols = list(rows[0]) if rows else []
    run.log({"eval/results": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows]), "eval/pareto": wandb.Image(str(out / "pareto.png"))})
    for r in rows:
        run.summary[f"eval/{r['method']}@{r['budget']}/accuracy"] = r["accuracy"]
    run.save(str(out / "results.json"), base_path=str(out), policy="now")
    if wandb.run is run and run.job_type == "eval":
        run.finish()


def print_results(results: dict) -> None:
    """Print the table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accuracy vs budget")
    for col in ("budget", "method", "acc", "95% CI", "% full", "agree", "KL", "kept", "ev. recall", "GFLOPs", "ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows_of(results):
        table.add_row(
            str(r["budget"]), r["method"], f"{100 * r['accuracy']:.1f}", f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}",
            f"{r['acc_pct_full']:.1f}", f"{r['agreement']:.3f}", f"{r['kl']:.3f}", f"{r['kept_tokens']:.1f}",
            "–" if math.isnan(r["evidence_recall"]) else f"{r['evidence_recall']:.2f}", f"{r['prefill_gflops']:.4f}", f"{r['prefill_ms']:.1f}",
        )
    Console(width=max(Console().width, 140)).print(table)  # a log or pipe is 80 columns: names would be cut
