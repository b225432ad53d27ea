"""What a run's figures say: the best method per column, one line of verdict, chance-level warnings.

- :func:`best_methods` — the methods with the lowest value of a figure (loss, device s, energy...),
  non-FL references left out of the ranking (they are bounds, not competitors);
- :func:`verdict_line` — which method is best on loss (the normalised total where the run has the
  chance losses, :mod:`fmtl_edge.loss_weights`: the figure that compares methods across tasks;
  else the raw total) and on cost, and whether the spread separates it from the next one: with
  ``--seeds`` the paired per-seed differences and their 95 % t-interval
  (:func:`fmtl_edge.results.paired_differences`: the seeds pair the runs), separated when the
  interval excludes 0; with one seed it says that one seed cannot tell them apart;
- :func:`chance_accuracies` (from the data) and :func:`chance_warnings` (from the results): a
  classification or binary task whose accuracy is within :data:`CHANCE_MARGIN` of predicting the
  most frequent class (of the union test set for a global model; of each client's own test split
  for personalised models) learnt nothing a class prior would not give.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

#: accuracy at most this much above the majority-class rate is at chance level
CHANCE_MARGIN = 0.01

#: the losses the verdict ranks: (normalised key, raw key, how the verdict names it); the
#: normalised one when the run has it
LOSSES = (("normalised_total_test_loss", "total_test_loss", "loss"),
          ("personalised_normalised_total_test_loss", "personalised_total_test_loss", "personalised loss"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ranked(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The methods that compete: all but the non-FL references (all of them when every one is a reference)."""
    fl = {n: m for n, m in methods.items() if not m.get("reference")}
    return fl or dict(methods)


def best_methods(methods: Mapping[str, Mapping[str, Any]], key: str) -> set[str]:
    """Names of the competing methods (:func:`ranked`) with the lowest finite ``key`` (ties: all of
    them); empty when fewer than two methods have the figure (nothing to compare)."""
    have = {n: m[key] for n, m in ranked(methods).items() if _finite(m.get(key))}
    if len(have) < 2:
        return set()
    low = min(have.values())
    return {n for n, v in have.items() if v == low}


def separation(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> tuple[str, dict[str, Any] | None]:
    """Whether the per-seed figures ``key`` of entries ``a`` and ``b`` (``--seeds``: their ``seeds``)
    are separated: ``(verdict, paired)`` with ``paired`` = :func:`fmtl_edge.results.paired_differences`
    of ``a − b`` over their common seeds and ``verdict`` = :func:`fmtl_edge.results.paired_verdict`
    (``lower`` / ``higher`` when the 95 % interval excludes 0, ``not separated``, ``equal``);
    ``("one seed", None)`` without two common seeds."""
    from fmtl_edge.results import paired_differences, paired_verdict

    sa, sb = a.get("seeds") or {}, b.get("seeds") or {}
    common = [s for s in sa if s in sb]
    if len(common) < 2:
        return "one seed", None
    p = paired_differences([sa[s].get(key) for s in common], [sb[s].get(key) for s in common])
    if p is None:
        return "one seed", None
    return paired_verdict(p), p


def _value(m: Mapping[str, Any], key: str, digits: int, seeds: bool) -> str:
    v = f"{m[key]:.{digits}f}"
    std = (m.get("std") or {}).get(key)
    return f"{v} ± {std:.{digits}f}" if seeds and _finite(std) else v


def _compare(methods, key: str, label: str, digits: int, seeds: bool, unit: str = "") -> str | None:
    have = {n: m for n, m in ranked(methods).items() if _finite(m.get(key))}
    if not have:
        return None
    order = sorted(have, key=lambda n: have[n][key])
    best = order[0]
    text = f"{label} {best} {_value(have[best], key, digits, seeds)}{unit}"
    if len(order) < 2:
        return text
    nxt = order[1]
    text += f" (next {nxt} {_value(have[nxt], key, digits, seeds)}{unit}"
    if seeds:
        how, p = separation(have[best], have[nxt], key)
        if p is not None and p.get("ci95") is not None:
            lo, hi = p["ci95"]
            diff = f"paired difference {p['mean']:+.{digits}f} ± {(hi - lo) / 2:.{digits}f}{unit}"
            text += (f", {diff}: separated" if how in ("lower", "higher") else f", {diff}: not separated by these seeds")
        elif how == "equal":
            text += ", equal on every seed"
        elif p is not None:
            text += f", paired difference {p['mean']:+.{digits}f}{unit} on every seed"
    return text + ")"


def verdict_line(results: Mapping[str, Any]) -> str | None:
    """One line: the lowest loss (normalised total where the run has it, else raw; personalised too
    where a method has it) and the least device time and energy among the competing methods,
    each with the next method and, with ``--seeds``, whether the paired per-seed differences
    separate them; with one seed, that it cannot. None when fewer than two methods ran."""
    methods = results["methods"]
    comp = ranked(methods)
    if len(comp) < 2:
        return None
    seeds = len(results.get("seeds") or ()) > 1
    parts = []
    for norm, raw, label in LOSSES:
        if any(_finite(m.get(norm)) for m in comp.values()):
            p = _compare(methods, norm, f"lowest normalised {label}:", 3, seeds)
        else:
            p = _compare(methods, raw, f"lowest total {label}:" if label == "loss" else f"lowest {label}:", 3, seeds)
        if p:
            parts.append(p)
    cheap = _compare(methods, "device_s", "least device time:", 1, seeds, " s")
    if cheap:
        parts.append(cheap)
    dev, en = best_methods(methods, "device_s"), best_methods(methods, "energy_j")
    if en and en != dev:
        parts.append(_compare(methods, "energy_j", "least energy:", 1, seeds, " J"))
    if not parts:
        return None
    tail = "" if seeds else "; one seed cannot tell them apart (--seeds 0,1,2: mean ± std, paired differences)"
    return "verdict: " + "; ".join(parts) + tail


def chance_accuracies(tasks: Iterable, clients: Iterable) -> dict[str, dict[str, Any]]:
    """The majority-class rates of the test labels of each classification or binary task.

    Args:
        tasks: :class:`~fmtl_edge.tasks.Task` s.
        clients: :class:`~fmtl_edge.data.base.ClientData` s (their ``y_test``).

    Returns:
        task → ``{"majority_class", "majority_rate"`` (its share of the union of the clients' test
        splits: a global model predicting it scores this), ``"client_majority_rate"`` (Σ over
        clients of their own majority class's count / Σ n: each client's own model predicting
        its client's most frequent class scores this), ``"test_samples"}``; tasks without test
        labels are left out.
    """
    clients = list(clients)
    out = {}
    for t in tasks:
        if t.kind not in ("classification", "binary"):
            continue
        total: dict[int, int] = {}
        own, n = 0, 0
        for c in clients:
            y = c.y_test.get(t.name)
            if y is None or len(y) == 0:
                continue
            vals, cnt = np.unique(np.rint(np.asarray(y, dtype=np.float64).reshape(-1)).astype(np.int64), return_counts=True)
            for v, k in zip(vals.tolist(), cnt.tolist()):
                total[v] = total.get(v, 0) + k
            own += int(cnt.max())
            n += int(cnt.sum())
        if n:
            top = max(total, key=lambda v: (total[v], -v))
            out[t.name] = {"majority_class": int(top), "majority_rate": total[top] / n, "client_majority_rate": own / n,
                           "test_samples": n}
    return out


def chance_warnings(results: Mapping[str, Any]) -> list[str]:
    """One line per (method, task, global | personalised) accuracy within :data:`CHANCE_MARGIN` of
    its majority-class rate (``results["chance_accuracy"]``, written by ``simulate``; none without it)."""
    chance = results.get("chance_accuracy") or {}
    lines = []
    for name, m in results["methods"].items():
        for t, c in chance.items():
            row = (m.get("per_task") or {}).get(t) or {}
            for key, rate_key, what, of in (
                    ("metric", "majority_rate", "accuracy", "the union test set"),
                    ("personalised_metric", "client_majority_rate", "personalised accuracy", "each client's own test split")):
                acc, rate = row.get(key), c.get(rate_key)
                if _finite(acc) and _finite(rate) and acc <= rate + CHANCE_MARGIN:
                    lines.append(f"warning: {name}: {t} {what} {acc:.3f} is at chance level: predicting the most "
                                 f"frequent class of {of} scores {rate:.3f}")
    return lines
