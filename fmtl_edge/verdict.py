"""What a run's figures say: the best method per column, one line of verdict, chance-level warnings.

- :func:`best_methods` — the methods with the lowest value of a figure (loss, device s, energy...),
  non-FL references left out of the ranking (they are bounds, not competitors);
- :func:`verdict_line` — which method is best on loss and which on cost, and whether the spread
  separates it from the next one: with ``--seeds`` a Welch t-test over the per-seed figures
  (``scipy.stats.ttest_ind(equal_var=False)``, separated when p < :data:`ALPHA`); with one seed
  it says that one seed cannot tell them apart;
- :func:`chance_levels` (from the data) and :func:`chance_warnings` (from the results): a
  classification or binary task whose accuracy is within :data:`CHANCE_MARGIN` of predicting the
  most frequent class (of the union test set for a global model; of each client's own test split
  for personalised models) learnt nothing a class prior would not give.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

#: a t-test p-value below this separates two methods
ALPHA = 0.05
#: accuracy at most this much above the majority-class rate is at chance level
CHANCE_MARGIN = 0.01

#: the figures ranked (all lower-is-better) and how the verdict names them
LOSSES = (("total_test_loss", "total test loss"), ("personalised_total_test_loss", "personalised loss"))
COSTS = (("device_s", "device s"), ("energy_j", "J"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


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


def _per_seed(m: Mapping[str, Any], key: str) -> list[float]:
    return [float(e[key]) for e in (m.get("seeds") or {}).values() if _finite(e.get(key))]


def separation(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> tuple[str, float | None]:
    """Whether the per-seed figures ``key`` of entries ``a`` and ``b`` are separated by their spread:
    ``("separated" | "not separated" | "no spread", p)`` by Welch's t-test over the seeds
    (``("one seed", None)`` without several seeds)."""
    xa, xb = _per_seed(a, key), _per_seed(b, key)
    if len(xa) < 2 or len(xb) < 2:
        return "one seed", None
    if np.std(xa) == 0 and np.std(xb) == 0:
        return ("no spread", None) if np.mean(xa) != np.mean(xb) else ("not separated", 1.0)
    from scipy.stats import ttest_ind

    p = float(ttest_ind(xa, xb, equal_var=False).pvalue)
    return ("separated" if p < ALPHA else "not separated"), p


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
        text += {"separated": f", separated by the spread: Welch p = {p:.2g}",
                 "not separated": f", not separated by the spread: Welch p = {p:.2g}" if p is not None else "",
                 "no spread": ", no spread over seeds"}.get(how, "")
    return text + ")"


def verdict_line(results: Mapping[str, Any]) -> str | None:
    """One line: the lowest loss (global, and personalised where a method has it) and the least
    device time and energy among the competing methods, each with the next method and whether the
    spread over ``--seeds`` separates them; with one seed, that it cannot. None when fewer than two
    methods ran."""
    methods = results["methods"]
    if len(ranked(methods)) < 2:
        return None
    seeds = len(results.get("seeds") or ()) > 1
    parts = [p for key, label in LOSSES if (p := _compare(methods, key, f"lowest {label}:", 3, seeds))]
    cheap = _compare(methods, "device_s", "least device time:", 1, seeds, " s")
    if cheap:
        parts.append(cheap)
    dev, en = best_methods(methods, "device_s"), best_methods(methods, "energy_j")
    if en and en != dev:
        parts.append(_compare(methods, "energy_j", "least energy:", 1, seeds, " J"))
    if not parts:
        return None
    tail = "" if seeds else "; one seed cannot tell them apart (--seeds 0,1,2: mean ± std and a t-test)"
    return "verdict: " + "; ".join(parts) + tail


def chance_levels(tasks: Iterable, clients: Iterable) -> dict[str, dict[str, Any]]:
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
    its majority-class rate (``results["chance"]``, written by ``simulate``; none without it)."""
    chance = results.get("chance") or {}
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
