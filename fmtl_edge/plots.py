"""Figures of a run's ``results.json`` (``fmtl-edge report RUN --plot FILE.png``).

Panels (each only when the results have something to draw in it, so no panel is empty; every axis
has a ``label`` naming it, for tests); a method has one colour in every panel:

- ``scatter-device``: total test loss against device time per method (MAS Fig. 5's trade-off;
  lower-left is better): the global total (``o``) and, for personalised methods, the personalised
  total (``s``, "<method> (pers.)"; layered with personal layers and local have only this one);
  marker *area* proportional to the method's energy (J; an ``x`` marker when unknown), ± 1 std
  error bars on both axes when the results come from ``--seeds`` (std ddof=1); the methods are
  named in a legend inside the axes (no labels beside the points to overlap or leave the axes);
- ``scatter-passes``: the same against sample-passes (training forward+backward per sample,
  lookahead included), which does not depend on the machine's load as device time does;
- ``energy``: energy per method (hatched when estimated);
- ``affinity:<method>``: the averaged task-affinity matrix S[i, j] of each method that measured one
  (at most :data:`MAX_HEATMAPS`), tasks reordered so each chosen group is a contiguous block,
  outlined, with the values written in the cells (×10^k, :func:`cell_scale`, when small) and the
  colour bar in the same units as the cells;
- ``curves``: total test loss against rounds per task from ``--eval-every`` points
  (:func:`fmtl_edge.report.method_curve`; with ``--seeds``, the mean over seeds ± 1 std band).

Needs matplotlib (``pip install 'fmtl-edge[plot]'``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

#: most affinity heatmaps drawn (one per method that measured affinities)
MAX_HEATMAPS = 3
#: marker area (points²) of the method with the most energy; the others scale linearly
MAX_MARKER_AREA = 600.0
MIN_MARKER_AREA = 20.0


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'fmtl-edge[plot]' (or pip install matplotlib)") from e
    return plt


def _multi_seed(results: Mapping[str, Any]) -> bool:
    return len(results.get("seeds") or ()) > 1


def _std(m: Mapping[str, Any], key: str) -> float | None:
    v = (m.get("std") or {}).get(key)
    return None if v is None else float(v)


def marker_areas(energies: Sequence[float | None]) -> list[float]:
    """Marker areas (points²) ∝ energy: the largest gets :data:`MAX_MARKER_AREA`, none below
    :data:`MIN_MARKER_AREA`; unknown energy (None) gets the minimum."""
    known = [e for e in energies if e is not None and math.isfinite(e)]
    top = max(known, default=0.0)
    out = []
    for e in energies:
        if e is None or not math.isfinite(e) or top <= 0:
            out.append(MIN_MARKER_AREA)
        else:
            out.append(max(MIN_MARKER_AREA, MAX_MARKER_AREA * float(e) / top))
    return out


def group_order(tasks: Sequence[str], splits: Sequence[Sequence[str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Task indices ordered group by group (tasks of no group last) and each group's
    ``(start, size)`` block in that order."""
    order: list[int] = []
    blocks = []
    for g in splits or ():
        idx = [tasks.index(t) for t in g if t in tasks and tasks.index(t) not in order]
        if idx:
            blocks.append((len(order), len(idx)))
            order += idx
    order += [i for i in range(len(tasks)) if i not in order]
    return order, blocks


def cell_scale(lim: float) -> int:
    """The power of ten k the heatmap's cell values are multiplied by (values ×10^k shown with two
    decimals) so the largest |S| reads with two significant digits: 0 when max |S| >= 0.1."""
    if not lim > 0 or lim >= 0.1:
        return 0
    return int(math.ceil(-math.log10(lim)))


#: the loss each scatter point shows: (results key, marker, legend suffix); personalised where a method has it
LOSS_KINDS = (("total_test_loss", "o", ""), ("personalised_total_test_loss", "s", " (pers.)"))
#: marker area (points²) of every legend entry: the legend names methods, the plot's areas show energy
LEGEND_MARKER_AREA = 40.0


def method_colours(names: Sequence[str]) -> dict[str, Any]:
    """One colour per method (matplotlib's tab10 cycle in run order), the same in every panel."""
    plt = _plt()
    cycle = plt.get_cmap("tab10").colors
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def scatter_points(results: Mapping[str, Any], xkey: str) -> list[dict[str, Any]]:
    """The points of a scatter panel: per method its global total test loss (``o``) and, where it
    has one, its personalised total (``s``, labelled ``<method> (pers.)``) against ``xkey``; a
    method without either (or without ``xkey``) has none."""
    out = []
    for n, m in results["methods"].items():
        x = m.get(xkey)
        if x is None:
            continue
        for key, marker, suffix in LOSS_KINDS:
            y = m.get(key)
            if y is not None and math.isfinite(y):
                out.append({"method": n, "x": float(x), "y": float(y), "key": key, "marker": marker, "label": n + suffix})
    return out


def _scatter(ax, results, names, xkey: str, xlabel: str, colours) -> None:
    methods = results["methods"]
    seeds = _multi_seed(results)
    areas = dict(zip(names, marker_areas([methods[n].get("energy_j") for n in names])))
    points = scatter_points(results, xkey)
    for p in points:
        n, m = p["method"], methods[p["method"]]
        unknown = m.get("energy_j") is None
        coll = ax.scatter([p["x"]], [p["y"]], s=areas[n], marker="x" if unknown else p["marker"], alpha=0.7,
                          color=colours[n], label=p["label"] + (" (energy unknown)" if unknown else ""))
        coll.set_gid(p["key"])
        if seeds:
            ax.errorbar([p["x"]], [p["y"]], xerr=_std(m, xkey) or 0.0, yerr=_std(m, p["key"]) or 0.0, fmt="none",
                        ecolor="0.3", capsize=3, lw=1)
    ax.margins(0.12)  # the largest markers stay inside the axes
    ax.set_xlabel(xlabel)
    pers = any(p["key"] != "total_test_loss" for p in points)
    ax.set_ylabel("total test loss (Σ over tasks)" + ("; squares: personalised" if pers else ""))
    title = "marker area ∝ energy"
    if seeds:
        title += f"; ± 1 std over {len(results['seeds'])} seeds"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    leg = ax.legend(fontsize=7, loc="best", framealpha=0.8)  # names inside the axes, never on top of each other
    for h in leg.legend_handles:
        if hasattr(h, "set_sizes"):
            h.set_sizes([LEGEND_MARKER_AREA])


def _energy(ax, results, names, colours) -> None:
    methods = results["methods"]
    energy = [methods[n]["energy_j"] or 0.0 for n in names]
    estimated = [bool(methods[n]["energy_estimated"]) for n in names]
    bars = ax.bar(names, energy, color=[colours[n] for n in names])
    for b, est, n in zip(bars, estimated, names):
        if est:
            b.set_hatch("//")
        if methods[n]["energy_j"] is None:
            ax.annotate("unknown", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom")
    if _multi_seed(results):
        ax.errorbar(range(len(names)), energy, yerr=[_std(methods[n], "energy_j") or 0.0 for n in names],
                    fmt="none", ecolor="0.3", capsize=3)
    ax.set_ylabel("energy (J)")
    src = "; ".join(sorted({methods[n]["energy_source"] for n in names}))
    ax.set_title("energy per method" + (" (hatched: estimated)" if any(estimated) else ""), fontsize=9)
    ax.set_xlabel(src, fontsize=8)
    plt = _plt()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")


def _heatmap(fig, ax, tasks, name, m) -> None:
    import numpy as np
    from matplotlib.patches import Rectangle

    S = np.asarray(m["affinity"], dtype=float)
    order, blocks = group_order(tasks, m.get("splits") or [])
    S = S[np.ix_(order, order)]
    labels = [tasks[i] for i in order]
    lim = float(np.abs(S).max()) or 1.0
    n = len(order)
    k = cell_scale(lim)
    shown = S * 10 ** k  # cells and colour bar in the same units
    im = ax.imshow(shown, cmap="RdBu", vmin=-lim * 10 ** k, vmax=lim * 10 ** k)
    for i in range(n):
        for j in range(n):
            v = S[i, j]
            ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=7 if n <= 6 else 5,
                    color="white" if abs(v) > 0.6 * lim else "black", gid="value")
    for start, size in blocks:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, lw=2.2, ec="black",
                               gid="group"))
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("task j (loss affected)")
    ax.set_ylabel("task i (lookahead step)")
    unit = f"; values ×1e{k}" if k else ""
    ax.set_title(f"affinity S[i, j], {name} (outlined: its groups; diagonal: Eq. 4{unit})", fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label(f"S[i, j] ×1e{k}" if k else "S[i, j]")
    bar.ax.set_label("colourbar")


def seed_curves(m: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """A method's ``curve_total`` per seed (``--seeds``), or its own as the one curve."""
    per = m.get("seeds") or {}
    curves = [e.get("curve_total") or [] for e in per.values()] if per else [m.get("curve_total") or []]
    return [c for c in curves if c]


def _curves(ax, results, names, colours) -> None:
    import numpy as np

    methods = results["methods"]
    for n in names:
        curves = seed_curves(methods[n])
        if not curves:
            continue
        pos = sorted(set.intersection(*[{p["position"] for p in c} for c in curves]))
        vals = np.array([[next(p["total_test_loss"] for p in c if p["position"] == q) for q in pos] for c in curves])
        mean = vals.mean(axis=0)
        (line,) = ax.plot(pos, mean, marker=".", label=n, color=colours[n])
        if len(curves) > 1:
            std = vals.std(axis=0, ddof=1)
            ax.fill_between(pos, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("rounds per task (merge rounds included)")
    ax.set_ylabel("total test loss (Σ over tasks)")
    ax.set_title("test loss during training (--eval-every)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def build_figure(results: Mapping[str, Any]):
    """The summary figure of ``results`` (a matplotlib Figure; see the module docstring).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        KeyError: ``results`` is not an fmtl-edge ``results.json``.
    """
    plt = _plt()
    methods = results["methods"]
    names = list(methods)
    colours = method_colours(names)
    tasks = list(results["tasks"])
    panels = []  # each panel only when it has something to draw
    if scatter_points(results, "device_s"):
        panels.append("scatter-device")
    if any(methods[n].get("sample_passes") for n in names) and scatter_points(results, "sample_passes"):
        panels.append("scatter-passes")
    if any(methods[n].get("energy_j") is not None for n in names):
        panels.append("energy")
    heat = [n for n in names if methods[n].get("affinity") is not None][:MAX_HEATMAPS]
    panels += [f"affinity:{n}" for n in heat]
    if any(seed_curves(methods[n]) for n in names):
        panels.append("curves")
    if not panels:
        raise ValueError("the results hold no test loss, energy, affinity or curve to plot")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels):
        ax.set_label(panel)
        if panel == "scatter-device":
            _scatter(ax, results, names, "device_s", "device time (s, sum over client executions)", colours)
        elif panel == "scatter-passes":
            _scatter(ax, results, names, "sample_passes", "sample-passes (forward+backward per sample)", colours)
        elif panel == "energy":
            _energy(ax, results, names, colours)
        elif panel.startswith("affinity:"):
            n = panel.split(":", 1)[1]
            _heatmap(fig, ax, tasks, n, methods[n])
        elif panel == "curves":
            _curves(ax, results, names, colours)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)  # no empty panel
    fig.suptitle(f"fmtl-edge · {results['dataset']} · {len(tasks)} tasks · {results['clients']} clients")
    fig.tight_layout()
    return fig


def plot_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write the summary figure of ``results`` to ``path`` (PNG, PDF or SVG by extension).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError, OSError: an unknown extension or an unwritable place (from matplotlib).
    """
    plt = _plt()
    fig = build_figure(results)
    path = Path(path)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
