"""Boxplots of the benchmark commands: one horizontal box per method, written atomically as a small PNG."""

from __future__ import annotations

from pathlib import Path

from custom.io import atomic_path


def method_boxplot(values: dict, xlabel: str, title: str, path: Path, log: bool = False) -> None:
    """``values``: ``{method label: [numbers]}`` (one box each, top to bottom); ``log``: logarithmic axis (for
    methods whose errors differ by orders of magnitude; zeros are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)[::-1]
    data = [[v for v in values[n] if not log or v > 0] for n in names]
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.32 * len(names)))
    ax.boxplot(data, vert=False, showfliers=False, widths=0.6)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
