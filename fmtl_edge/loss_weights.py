"""Task losses on one scale: chance losses from label statistics, and the task weights of training.

A multi-task objective Σ_t w_t·L_t with w_t = 1 lets the tasks with the largest raw losses decide
every gradient (MAS, Zhuang et al. ICCV 2023, Eq. 2 is this weighted sum; its reference code uses
w = 1). fmtl-edge puts each task on the scale of its **chance loss**: the loss of the best constant
predictor of the task's training labels, so a task at chance level scores 1 whatever its units.

==============  ===================================  ======================================
kind            best constant predictor              chance loss (the task's loss of it)
==============  ===================================  ======================================
classification  the class frequencies p_c            entropy −Σ p_c·ln p_c (nats)
binary          the positive rate p                  −p·ln p − (1−p)·ln(1−p) (nats)
regression      the mean of the standardised target  its variance (squared standard units)
dense           the mean of every target value       their variance (squared pixel units)
==============  ===================================  ======================================

The statistics behind them (:func:`client_label_stats`) are sums each client computes over its own
training labels — class counts, positives, n / Σy / Σy² — and the server adds up
(:func:`combine_label_stats`): no sample leaves a client. ``--loss-weights`` (:func:`resolve_loss_weights`):
``uniform`` (w = 1), ``chance`` (w_t ∝ 1 / chance loss of t, rescaled to a mean weight of 1 so the
learning rate keeps its meaning: the objective is Σ_t L_t / chance_t up to one constant factor) or
``TASK=W,...`` (given; others 1).
The weights enter the clients' objective and the MAS lookahead's task step (Eq. 3); test losses stay
raw, and every result carries each task's ``chance_loss`` and the ``normalised_total_test_loss``
Σ_t L_t / chance_t (chance level = 1 per task) beside the raw total.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from fmtl_edge.config import ConfigError
from fmtl_edge.tasks import Task, TaskSet

#: the ``--loss-weights`` keywords
LOSS_WEIGHTS = ("uniform", "chance")


def client_label_stats(y_train: Mapping[str, np.ndarray], tasks: TaskSet) -> dict[str, dict[str, Any]]:
    """The label statistics of one client's training labels, per task it holds (JSON-ready).

    Args:
        y_train: task → targets (:class:`fmtl_edge.data.base.ClientData` ``y_train``).
        tasks: the task set (kinds, classes, regression standardisation).

    Returns:
        task → ``{"kind", "n", ...}``: ``counts`` (classification, one per class), ``positives``
        (binary), ``sum`` and ``sumsq`` of the loss-scale values (regression: standardised targets;
        dense: every target value; ``n`` then counts values, not samples).
    """
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        if t.name not in y_train:
            continue
        y = np.asarray(y_train[t.name])
        if t.kind == "classification":
            counts = np.bincount(y.astype(np.int64).reshape(-1), minlength=t.out_dim)[: t.out_dim]
            out[t.name] = {"kind": t.kind, "n": int(counts.sum()), "counts": [int(c) for c in counts]}
        elif t.kind == "binary":
            out[t.name] = {"kind": t.kind, "n": int(y.size), "positives": int(np.count_nonzero(y.reshape(-1) > 0.5))}
        else:
            v = y.astype(np.float64).reshape(-1)
            if t.kind == "regression":
                v = (v - t.target_mean) / t.target_std
            out[t.name] = {"kind": t.kind, "n": int(v.size), "sum": float(v.sum()), "sumsq": float(np.square(v).sum())}
    return out


def check_label_stats(stats: Any, tasks: TaskSet, n_train: int, shapes: Mapping[str, int] | None = None) -> None:
    """Check a device's claimed label statistics before they enter anyone's chance losses: known
    tasks of the right kind, whole non-negative counts with one per class, ``n`` within the
    training samples the device registered (dense: × its values per sample, ``shapes``), finite
    sums with ``sumsq ≥ 0`` and a variance ≥ 0.

    Raises:
        ValueError: the first problem, named (the coordinator refuses the registration).
    """
    if not isinstance(stats, Mapping):
        raise ValueError("label statistics must be a JSON object task -> statistics")
    for name, s in stats.items():
        if name not in tasks:
            raise ValueError(f"label statistics name an unknown task {name!r}")
        t = tasks[name]
        if not isinstance(s, Mapping) or s.get("kind") != t.kind:
            raise ValueError(f"label statistics of {name!r}: kind {s.get('kind') if isinstance(s, Mapping) else s!r} "
                             f"but the task is {t.kind}")
        n = s.get("n")
        per = int((shapes or {}).get(name, 1)) if t.kind == "dense" else 1
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= int(n_train) * per:
            raise ValueError(f"label statistics of {name!r}: n = {n!r} is not a whole number in 0..{int(n_train) * per}")
        if t.kind == "classification":
            c = s.get("counts")
            if (not isinstance(c, list) or len(c) != t.out_dim or any(isinstance(v, bool) or not isinstance(v, int)
                                                                      or v < 0 for v in c) or sum(c) != n):
                raise ValueError(f"label statistics of {name!r}: counts must be {t.out_dim} whole numbers >= 0 "
                                 f"summing to n = {n}")
        elif t.kind == "binary":
            p = s.get("positives")
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
                raise ValueError(f"label statistics of {name!r}: positives must be a whole number in 0..n")
        else:
            total, sq = s.get("sum"), s.get("sumsq")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (total, sq)) \
                    or sq < 0 or (n and sq / n - (total / n) ** 2 < -1e-6 * max(1.0, sq / n)):
                raise ValueError(f"label statistics of {name!r}: sum and sumsq must be finite with sumsq >= 0 "
                                 "and a variance >= 0")


def combine_label_stats(per_client: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The sums of several clients' :func:`client_label_stats` (the union of their training labels).

    Raises:
        ValueError: two clients disagree on a task's kind or number of classes.
    """
    total: dict[str, dict[str, Any]] = {}
    for stats in per_client:
        for name, s in stats.items():
            acc = total.get(name)
            if acc is None:
                total[name] = {k: (list(v) if isinstance(v, list) else v) for k, v in s.items()}
                continue
            if acc["kind"] != s["kind"] or len(acc.get("counts", ())) != len(s.get("counts", ())):
                raise ValueError(f"label statistics of task {name!r} disagree between clients ({acc['kind']} vs {s['kind']})")
            acc["n"] += int(s["n"])
            if "counts" in s:
                acc["counts"] = [a + int(b) for a, b in zip(acc["counts"], s["counts"])]
            for k in ("positives", "sum", "sumsq"):
                if k in s:
                    acc[k] += s[k]
    return total


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def chance_loss(task: Task, stats: Mapping[str, Any] | None) -> float | None:
    """The loss of the best constant predictor of ``task``'s training labels (see the module
    table), from combined label statistics; None without statistics (no client holds the task)."""
    if not stats or not stats.get("n"):
        return None
    n = float(stats["n"])
    if task.kind == "classification":
        return _entropy(np.asarray(stats["counts"], dtype=np.float64) / n)
    if task.kind == "binary":
        p = float(stats["positives"]) / n
        return _entropy(np.asarray([p, 1.0 - p]))
    mean = float(stats["sum"]) / n
    return max(0.0, float(stats["sumsq"]) / n - mean * mean)


def chance_losses(tasks: TaskSet, stats: Mapping[str, Mapping[str, Any]] | None) -> dict[str, float | None]:
    """task → :func:`chance_loss` (None where unknown) for every task of ``tasks``."""
    return {t.name: chance_loss(t, (stats or {}).get(t.name)) for t in tasks}


def parse_loss_weights(value: str | None) -> str:
    """The normalised ``--loss-weights`` value (``uniform``, ``chance`` or ``TASK=W,...``).

    Raises:
        ConfigError: a malformed value (names ``--loss-weights`` and the forms it takes).
    """
    v = (value or "uniform").strip()
    if v.lower() in LOSS_WEIGHTS:
        return v.lower()
    pairs = []
    for item in v.split(","):
        name, eq, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not eq or not name.strip() or not math.isfinite(weight) or weight < 0:
            raise ConfigError("--loss-weights", f"{value!r}: give uniform, chance or TASK=W,... with each W a "
                              "number >= 0 (e.g. age=1,gender=0.5)")
        pairs.append(f"{name.strip()}={weight:g}")
    return ",".join(pairs)


def resolve_loss_weights(value: str, tasks: TaskSet, chance: Mapping[str, float | None]) -> dict[str, float]:
    """task → w_t of the objective Σ_t w_t·L_t for a ``--loss-weights`` value.

    Raises:
        ConfigError: a named task the data set does not have; ``chance`` where a task's chance loss
            is unknown or 0 (its training labels are constant), naming the task and the fix.
    """
    v = parse_loss_weights(value)
    if v == "uniform":
        return {t: 1.0 for t in tasks.names}
    if v == "chance":
        inv = {}
        for t in tasks.names:
            c = chance.get(t)
            if c is None or not c > 1e-12:
                raise ConfigError("--loss-weights", f"chance: task {t!r} has no usable chance loss ({c}); its training "
                                  "labels are constant or absent; give the weights with TASK=W,...")
            inv[t] = 1.0 / c
        scale = len(inv) / sum(inv.values())
        return {t: w * scale for t, w in inv.items()}
    given = {k: float(w) for k, w in (p.split("=") for p in v.split(","))}
    unknown = sorted(set(given) - set(tasks.names))
    if unknown:
        raise ConfigError("--loss-weights", f"no task {unknown[0]!r} in this data set (tasks: {', '.join(tasks.names)})")
    return {t: given.get(t, 1.0) for t in tasks.names}


def normalised_total(per_task_loss: Mapping[str, float | None], chance: Mapping[str, float | None]) -> float | None:
    """Σ_t L_t / chance_t over the tasks of ``per_task_loss`` (chance level = 1 per task), or None
    when a loss or a chance loss is unknown (or a chance loss is 0)."""
    total = 0.0
    for t, loss in per_task_loss.items():
        c = chance.get(t)
        if loss is None or c is None or not c > 1e-12 or not math.isfinite(loss):
            return None
        total += float(loss) / c
    return total
