"""Figures of a run's ``results.json`` (``fmtl-edge report RUN --plot FILE.png``).

Three panels: total test loss against device time per method (the trade-off MAS is about), energy
per method (hatched when estimated), and the averaged task-affinity matrix of the first method that
measured one. Needs matplotlib (``pip install 'fmtl-edge[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def plot_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write the summary figure of ``results`` to ``path`` (PNG, PDF or SVG by extension).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'fmtl-edge[plot]' (or pip install matplotlib)") from e
    import numpy as np

    methods = results["methods"]
    names = list(methods)
    tasks = results["tasks"]
    with_aff = [n for n in names if methods[n].get("affinity") is not None]
    ncols = 3 if with_aff else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.8))
    ax = axes[0]
    for n in names:
        m = methods[n]
        ax.scatter(m["device_s"], m["total_test_loss"], s=60)
        ax.annotate(n, (m["device_s"], m["total_test_loss"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("device time (s, sum over client executions)")
    ax.set_ylabel("total test loss (Σ over tasks)")
    ax.set_title("loss vs device time (lower-left is better)")
    ax.grid(alpha=0.3)

    ax = axes[1]
    energy = [methods[n]["energy_j"] or 0.0 for n in names]
    estimated = [bool(methods[n]["energy_estimated"]) for n in names]
    bars = ax.bar(names, energy)
    for b, est, n in zip(bars, estimated, names):
        if est:
            b.set_hatch("//")
        if methods[n]["energy_j"] is None:
            ax.annotate("unknown", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom")
    ax.set_ylabel("energy (J)")
    src = "; ".join(sorted({methods[n]["energy_source"] for n in names}))
    ax.set_title("energy per method" + (" (hatched: estimated)" if any(estimated) else ""))
    ax.set_xlabel(src, fontsize=8)
    ax.tick_params(axis="x", rotation=20)

    if with_aff:
        ax = axes[2]
        S = np.asarray(methods[with_aff[0]]["affinity"], dtype=float)
        lim = float(np.abs(S).max()) or 1.0
        im = ax.imshow(S, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("task j (loss affected)")
        ax.set_ylabel("task i (lookahead step)")
        ax.set_title(f"task affinity S[i, j] ({with_aff[0]})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"fmtl-edge · {results['dataset']} · {len(tasks)} tasks · {results['clients']} clients")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
