"""Pareto plots of a harness run: accuracy vs retention and vs measured prefill time (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def pareto_plot(results: dict, path: str | Path) -> Path:
    """Two panels — accuracy (95% CI bars) vs kept-token retention, and vs prefill ms per sample.

    One line per method over its budgets; ``full`` is a dashed horizontal line (left) and a
    star (right); ``oracle`` is drawn in black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results["cells"].values())
    methods = sorted({c["method"] for c in cells}, key=lambda m: (m != "oracle", m))
    full = next((c for c in cells if c["method"] == "full"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(m for m in methods if m != "full"):
        rows = sorted((c for c in cells if c["method"] == method), key=lambda c: c["retention"])
        acc = [100 * c["accuracy"] for c in rows]
        err = [[100 * (c["accuracy"] - c["ci_low"]) for c in rows], [100 * (c["ci_high"] - c["accuracy"]) for c in rows]]
        style = {"color": "black", "linewidth": 2.2, "marker": "s"} if method == "oracle" else {"color": cmap(i % 20), "marker": "o"}
        axes[0].errorbar([c["retention"] for c in rows], acc, yerr=err, label=method, capsize=2, **style)
        axes[1].plot([c["prefill_ms"] for c in rows], acc, label=method, **style)
    if full is not None:
        axes[0].axhline(100 * full["accuracy"], color="grey", linestyle="--", label="full tokens")
        axes[1].plot([full["prefill_ms"]], [100 * full["accuracy"]], marker="*", markersize=14, color="grey", linestyle="none", label="full tokens")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("kept visual tokens / all (retention, log scale)")
    axes[1].set_xlabel("measured prefill ms per sample (vision + selection + LLM)")
    for ax in axes:
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right", ncol=2)
    meta = results.get("meta", {})
    fig.suptitle(f"{Path(str(meta.get('backbone', ''))).name} on {Path(str(meta.get('data', ''))).name}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
