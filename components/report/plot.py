"""The report's plot: quality against size, the Pareto view of a run and its experiment.

One panel per quality figure the run has: perplexity (lower is better) and the accuracy
of each harness task (higher is better), each against size on disk. This run's
baseline and stages are coloured and named; stages of earlier runs of the same MLflow
experiment are grey; a step line joins the Pareto front across all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def panels(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(metric key, axis label, higher is better) for each panel."""
    base = results["baseline"]["metrics"]
    out = [("perplexity", "perplexity (lower is better)", False)]
    out += [(k, f"{k.split('.')[1]} {k.split('.')[-1]} (higher is better)", True) for k in sorted(base) if k.startswith("task.") and k.endswith(".acc")]
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and quality, by size."""
    front: list[tuple[float, float]] = []
    for size, quality in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or (quality > front[-1][1] if higher_is_better else quality < front[-1][1]):
            front.append((size, quality))
    return front


def quality_vs_size(results: dict[str, Any], earlier: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw the panels into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods and CI
    import matplotlib.pyplot as plt
    from llmpress.components.report import entries

    chosen = panels(results)
    fig, axes = plt.subplots(1, len(chosen), figsize=(6.4 * len(chosen), 4.6), squeeze=False)
    ours = entries(results)
    for ax, (key, label, higher) in zip(axes[0], chosen, strict=True):
        old = [(p["metrics"]["size_bytes"] / 1e6, p["metrics"][key]) for p in earlier if key in p["metrics"] and "size_bytes" in p["metrics"]]
        new = [(name, m["size_bytes"] / 1e6, m[key]) for name, _, m in ours if key in m and "size_bytes" in m]
        if old:
            ax.scatter(*zip(*old, strict=True), color="0.7", s=28, label="earlier runs", zorder=2)
        for i, (name, size, quality) in enumerate(new):
            ax.scatter([size], [quality], s=64, color=f"C{i}", edgecolor="black", zorder=3)
            ax.annotate(name, (size, quality), textcoords="offset points", xytext=(6, 6), fontsize=9)
        front = pareto_front(old + [(s, q) for _, s, q in new], higher)
        if len(front) > 1:
            ax.step(*zip(*front, strict=True), where="post", color="C3", linewidth=1.2, alpha=0.8, label="Pareto front", zorder=1)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if old or len(front) > 1:
            ax.legend(fontsize=8, loc="best")
    return save_figure(fig, f"{results.get('recipe', {}).get('name', 'llmpress run')}: quality against size", path)


def save_figure(fig: Any, title: str, path: str | Path) -> Path:
    """Title ``fig``, write it to ``path`` as the report's plots are written, and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
