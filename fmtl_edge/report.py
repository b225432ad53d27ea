"""Outputs of a run: ``results.json``, per-task model files and the summary table.

Files are written into a hidden staging folder beside ``--out`` and moved into place only when all
of them are complete, so an interrupted or failed run never leaves anything that looks like a result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmtl_edge.config import ConfigError
from fmtl_edge.export import save_client_model, save_task_model
from fmtl_edge.models import ModelSpec
from fmtl_edge.tasks import TaskSet

RESULTS = "results.json"


def check_out_dir(out: str | Path, overwrite: bool = True) -> Path:
    """Refuse an ``--out`` that holds something other than an earlier fmtl-edge result, and (with
    ``overwrite=False``, as ``simulate`` without ``--overwrite``) an earlier result too.

    Raises:
        ConfigError: ``--out`` is a file, a non-empty folder without ``results.json``, or holds an
            earlier ``results.json`` and ``overwrite`` is False.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError("--out", f"{p} is a file; name a folder")
    if p.is_dir() and any(p.iterdir()) and not (p / RESULTS).is_file():
        raise ConfigError("--out", f"{p} is not empty and holds no {RESULTS}; name a new or empty folder")
    if not overwrite and (p / RESULTS).is_file():
        raise ConfigError("--out", f"{p} holds an earlier result ({RESULTS}); pass --overwrite to replace it, "
                          "or name a new folder (without --out every run gets its own runs/<UTC time>)")
    return p


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh run folder name ``<root>/<UTC time>`` (``20250101T120000Z``, ``-2``, ``-3``... when taken).
    Nothing is created."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root = Path(root)
    p, i = root / stamp, 1
    while p.exists():
        i += 1
        p = root / f"{stamp}-{i}"
    return p


def link_latest(run: str | Path) -> Path | None:
    """Point ``<run's parent>/latest`` at ``run`` (a relative symlink, replaced atomically).

    Returns the link, or None when ``latest`` exists and is not a symlink (a folder from an earlier
    version: it is left alone, with a logging warning).
    """
    import logging

    run = Path(run)
    latest = run.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        logging.getLogger(__name__).warning("%s is a folder, not a link (an earlier fmtl-edge's run); left as is: "
                                            "this run is in %s", latest, run)
        return None
    tmp = run.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(run.name, tmp)
    os.replace(tmp, latest)
    return latest


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN/Inf → None so results.json is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_outputs(out: str | Path, results: Mapping[str, Any],
                  models: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                  tasks: TaskSet, spec: ModelSpec, overwrite: bool = True) -> Path:
    """Write ``results.json``, ``models/<method>/<task>.safetensors`` and, for the personalised
    methods whose client models the run holds (``models.clients``, :class:`fmtl_edge.runner.RunModels`),
    ``models/<method>/clients/<id>.safetensors`` (:func:`fmtl_edge.export.save_client_model`)
    atomically into ``out``.

    An earlier result in ``out`` is replaced only once the new one is complete (``overwrite=False``
    refuses it instead, see :func:`check_out_dir`).
    """
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for method, per_task in models.items():
            for task, state in per_task.items():
                save_task_model(stage / "models" / method / f"{task}.safetensors", state, tasks[task], spec, method)
        for method, own in (getattr(models, "clients", None) or {}).items():
            for name, (job, state, names) in own.items():
                save_client_model(stage / "models" / method / "clients" / f"{name}.safetensors", state,
                                  [tasks[t] for t in names], spec, method, name, job)
        text = json.dumps(_clean(dict(results)), indent=2, default=_json_default)
        (stage / RESULTS).write_text(text + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def _pm(m: Mapping[str, Any], key: str, digits: int = 3, fmt=None) -> str:
    """``m[key]``, as ``mean ± std`` when the entry is over several seeds (``--seeds``)."""
    fmt = fmt or (lambda v: _fmt(v, digits))
    std = (m.get("std") or {}).get(key)
    if len(m.get("seeds") or ()) > 1 and std is not None:
        return f"{fmt(m['mean'][key])} ± {fmt(std)}"
    return fmt(m.get(key))


def _count(v: int | float | None) -> str:
    """A count in k/M/G (``12.3k``), or — when absent."""
    if v is None:
        return "—"
    v = float(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _cpu_ratio(m: Mapping[str, Any]) -> str:
    """``cpu_s / device_s`` of a method entry, or — when either is unknown."""
    cpu, dev = m.get("cpu_s"), m.get("device_s")
    return "—" if cpu is None or not dev else f"{cpu / dev:.2f}"


def loss_summary(entry: Mapping[str, Any], digits: int = 4) -> str:
    """``total test loss X, personalised total test loss Y`` of a method's results entry (the ones it has)."""
    parts = [f"{k.replace('_', ' ')} {entry[k]:.{digits}f}" for k in ("total_test_loss", "personalised_total_test_loss")
             if entry.get(k) is not None]
    return ", ".join(parts) or "no test loss"


def splits_text(results: Mapping[str, Any]) -> str:
    """The methods' task groups, numbered, one group per line (fits 80 columns for short names)."""
    methods = results["methods"]
    w = max((len(n) for n in methods), default=6) + 2
    lines = ["groups (the tasks trained together, numbered):"]
    for name, m in methods.items():
        groups = m["splits"]
        if len(groups) > 1 and all(len(g) == 1 for g in groups):
            lines.append(f"  {name:<{w}}each task alone ({len(groups)} groups)")
            continue
        for i, g in enumerate(groups, start=1):
            lines.append(f"  {name if i == 1 else '':<{w}}{i}: {', '.join(g)}")
    return "\n".join(lines)


#: the mark of the lowest value of a column among the FL methods (:func:`fmtl_edge.verdict.best_methods`)
BEST = "✓"


def _mark(text: str, best: bool):
    """A cell: ``text``, with :data:`BEST` and bold when it is the column's best."""
    from rich.text import Text

    return Text(f"{text} {BEST}", style="bold green") if best else text


def summary_tables(results: Mapping[str, Any]):
    """What ``simulate`` and ``report`` print, in order: the main table per method (normalised
    total where the run has chance losses, total test loss, personalised total where a method has
    one, device s, critical-path s, energy J, rounds) with the best (lowest) value of each figure
    column marked :data:`BEST`, the verdict line and chance-level warnings (:mod:`fmtl_edge.verdict`),
    the load-independent cost table, the paired comparison (``--paired-with``), the merge-phase
    table and mas-auto's decisions where they apply, per task the global
    and (personalised methods) personalised test loss / metric, and the groups as text
    (:func:`splits_text`). Tables are :class:`fmtl_edge.tables.FitTable` s: at any console width
    (80 columns in a pipe or a log file) their columns split into parts, nothing is cut."""
    from fmtl_edge.tables import Col, FitTable
    from fmtl_edge.verdict import best_methods, chance_warnings, verdict_line

    tasks = results["tasks"]
    methods = results["methods"]
    personal = any(m.get("personalised_total_test_loss") is not None for m in methods.values())
    normalised = any(m.get("normalised_total_test_loss") is not None for m in methods.values())
    cols = [Col("method", "left", "bold")]
    keys = []
    if normalised:
        cols.append(Col("norm."))
        keys.append("normalised_total_test_loss")
    cols.append(Col("total test loss"))
    keys.append("total_test_loss")
    if personal:
        cols.append(Col("pers. loss"))
        keys.append("personalised_total_test_loss")
    cols += [Col("device s"), Col("crit. s"), Col("energy J"), Col("R")]
    keys += ["device_s", "critical_path_s", "energy_j"]
    best = {k: best_methods(methods, k) for k in keys}
    digits = {"device_s": 1, "critical_path_s": 1, "energy_j": 1}
    sources = sorted({m["energy_source"] for m in methods.values()})
    caption = "energy source: " + "; ".join(sources)
    if any(m["energy_j"] is not None and m["energy_estimated"] for m in methods.values()):
        caption += " (* estimated)"
    seeds = results.get("seeds") or []
    if len(seeds) > 1:
        caption += (f"\nmean ± std over seeds {', '.join(map(str, seeds))} (std: ddof=1; partition of seed "
                    f"{results.get('partition_seed')}); per task and groups: seed {seeds[0]}")
    caption += (f"\n{BEST} lowest of its column" + (" (references † not ranked)" if any(
        m.get("reference") for m in methods.values()) else "") +
                "\ncrit. s: critical path (parallel round: slowest client; ring: the sum)"
                "\nR: rounds summed over all jobs (merge, each group, each task alone)")
    if normalised:
        caption += "\nnorm.: Σ task loss / its chance loss (chance level = 1 per task)"
    if any(m.get("reference") for m in methods.values()):
        caption += "\n† non-FL reference (each client alone, or pooled data)"
    if personal:
        caption += "\npers. loss: each client's own model on its own test split (test-sample-weighted mean)"
    partial = {n: m["evaluation"] for n, m in methods.items()
               if isinstance(m.get("evaluation"), Mapping) and m["evaluation"].get("complete") is False}
    for n, ev in partial.items():
        caption += (f"\n‡ {n}: evaluated on {len(ev['clients'])} of {len(ev['clients']) + len(ev['missing'])} clients "
                    f"(missing {', '.join(map(str, ev['missing']))}): its test losses are not comparable")
    main = FitTable(f"fmtl-edge · {results['dataset']} · {len(tasks)} tasks · {results['clients']} clients", cols,
                    caption=caption)
    for name, m in methods.items():
        cells = []
        for k in keys:
            text = _pm(m, k, digits.get(k, 3))
            if k == "energy_j" and m["energy_j"] is not None and m["energy_estimated"]:
                text += "*"
            cells.append(_mark(text, name in best[k]))
        main.add_row(name + ("†" if m.get("reference") else "") + ("‡" if name in partial else ""), *cells,
                     str(m["rounds"]))
    cost_keys = ("sample_passes", "flops_estimate", "cpu_s")
    cbest = {k: best_methods(methods, k) for k in cost_keys}
    cost = FitTable("cost: load-independent counts and CPU time",
                    [Col("method", "left", "bold"), Col("sample-passes"), Col("lookahead"), Col("FLOPs (est.)"),
                     Col("CPU s"), Col("CPU/dev")],
                    caption=("sample-passes: forward+backward per sample (lookahead: n_tasks x B each)\n"
                             "FLOPs: one counted training step's FLOPs per sample x sample-passes\n"
                             "CPU s: the client executions' process CPU seconds; CPU/dev: CPU s /\n"
                             "device s, far below the threads used = cores shared with other work"))
    for name, m in methods.items():
        cost.add_row(name, _mark(_pm(m, "sample_passes", fmt=_count), name in cbest["sample_passes"]),
                     _count(m.get("lookahead_passes")),
                     _mark(_pm(m, "flops_estimate", fmt=_count), name in cbest["flops_estimate"]),
                     _mark(_pm(m, "cpu_s", 1), name in cbest["cpu_s"]), _cpu_ratio(m))
    threads = (results.get("device") or {}).get("threads") or {}
    if threads:
        cost.caption += (f"\nthreads: {threads.get('intra_op')} (usable cores {threads.get('usable_cores')}), "
                         f"OMP_WAIT_POLICY {threads.get('omp_wait_policy')}")
    said = "\n".join(x for x in [verdict_line(results), *chance_warnings(results)] if x)
    per = _per_task_table("per task: test loss / metric", tasks, methods, "")
    extra = [t for t in (paired_table(results), merge_phase_table(results), decisions_text(results)) if t is not None]
    pers = {n: m for n, m in methods.items() if m.get("personalised_total_test_loss") is not None}
    head = (main, said) if said else (main,)
    if not pers:
        return (*head, cost, *extra, per, splits_text(results))
    ptab = _per_task_table("per task, personalised (each client's own model): test loss / metric", tasks, pers,
                           "personalised_")
    return (*head, cost, *extra, per, ptab, splits_text(results))


def _diff(p: Mapping[str, Any] | None) -> str:
    """``mean [lo, hi]`` of a paired difference (:func:`fmtl_edge.results.paired_differences`)."""
    if not p:
        return "—"
    if p.get("ci95") is None:
        return f"{p['mean']:+.3f}"
    lo, hi = p["ci95"]
    return f"{p['mean']:+.3f} ± {(hi - lo) / 2:.3f}"


def paired_table(results: Mapping[str, Any]):
    """``--paired-with``: each method's paired per-seed difference against the named method
    (normalised and raw total test loss; mean and 95 % t-interval) and the verdict, or None."""
    from fmtl_edge.results import paired_verdict
    from fmtl_edge.tables import Col, FitTable

    rows = {n: m["paired"] for n, m in results["methods"].items() if m.get("paired")}
    if not rows:
        return None
    base = next(iter(rows.values()))["with"]
    n = next((p[k]["n"] for p in rows.values() for k in ("normalised_total_test_loss", "total_test_loss") if p.get(k)), 0)
    tab = FitTable(f"paired vs {base}, {n} seeds: mean difference ± 95% t-interval",
                   [Col("method", "left", "bold"), Col("Δ norm. loss"), Col("Δ total loss"), Col("verdict", "left")],
                   caption=(f"negative: lower test loss than {base}\nverdict (normalised figure): lower or higher when "
                            "its interval\nexcludes 0, else not separated by these seeds"))
    for name, p in rows.items():
        key = "normalised_total_test_loss" if p.get("normalised_total_test_loss") else "total_test_loss"
        tab.add_row(name, _diff(p.get("normalised_total_test_loss")), _diff(p.get("total_test_loss")),
                    f"{paired_verdict(p.get(key))} than {base}" if paired_verdict(p.get(key)) in ("lower", "higher")
                    else paired_verdict(p.get(key)))
    return tab


def merge_phase_table(results: Mapping[str, Any]):
    """The merge (affinity) phase's overhead per method that has one (``merge_phase`` of its entry:
    mas-x, mas-auto, tag-x), or None: R0, the lookahead's share of the phase's sample-passes, the
    phase's device seconds and, when all-in-one ran, its first R0 rounds' device seconds and the
    ratios (device time and sample-passes) — what measuring the affinity cost over an equal
    all-in-one."""
    from fmtl_edge.tables import Col, FitTable

    rows = {n: m["merge_phase"] for n, m in results["methods"].items() if m.get("merge_phase")}
    if not rows:
        return None
    tab = FitTable("merge phase: affinity (lookahead) overhead",
                   [Col("method", "left", "bold"), Col("R0"), Col("lookahead"), Col("merge s"), Col("a-i-o s"),
                    Col("x time"), Col("x passes")],
                   caption=("lookahead: its share of the merge rounds' sample-passes\n"
                            "a-i-o s: all-in-one's first R0 rounds in this run\n"
                            "x time, x passes: merge phase / those all-in-one rounds"))
    for name, ph in rows.items():
        vs = ph.get("vs_all_in_one") or {}
        share = ph.get("lookahead_share")
        tab.add_row(name, str(ph["rounds"]), "—" if share is None else f"{100 * share:.1f}%", _fmt(ph["device_s"], 1),
                    _fmt(vs.get("device_s"), 1), _fmt(vs.get("device_ratio"), 2), _fmt(vs.get("passes_ratio"), 2))
    return tab


def decisions_text(results: Mapping[str, Any]) -> str | None:
    """One line per method that chose its own R0 and x (``decision``: mas-auto), or None."""
    lines = []
    for name, m in results["methods"].items():
        d = m.get("decision")
        if not d or d.get("r0") is None:
            continue
        how = (f"cap --r0 = {d['r0_max']}, partition not stable" if d.get("capped")
               else f"partition stable {d['stable_rounds']} rounds, cap {d['r0_max']}")
        scores = ", ".join(f"{x}:{v:.3f}" for x, v in (d.get("scores") or {}).items())
        lines.append(f"  {name}: R0 = {d['r0']} ({how}); x = {d['x']} (eps = {d['epsilon']:g})")
        lines.append(f"    partition score per x: {scores}")
    if not lines:
        return None
    return "chosen by the method (results: methods.<m>.decision):\n" + "\n".join(lines)


def method_curve(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A method's total test loss over training from its ``--eval-every`` points (``curve``).

    At each position p (rounds each task has trained so far) the total is Σ over tasks of the
    task's loss in the job that holds its final model (``final_jobs``) or a job that job continues
    from (``init_from``: mas-x's merge job before the split), evaluated at p; positions where a task
    has no point are left out. So mas-2's curve is the merge job's total up to R0, then the sum of
    its groups'.

    Returns:
        ``[{"position": int, "total_test_loss": float}]`` by position (empty without a curve).
    """
    points = entry.get("curve") or []
    finals = entry.get("final_jobs") or {}
    jobs = {j["name"]: j for j in entry.get("jobs") or []}
    at = {(p["job"], int(p["position"])): p for p in points}
    lineage = {}
    for t, j in finals.items():
        chain = []
        while j is not None and j not in chain:
            chain.append(j)
            j = (jobs.get(j) or {}).get("init_from")
        lineage[t] = chain
    out = []
    for pos in sorted({int(p["position"]) for p in points}):
        total = 0.0
        for t in finals:
            v = next((at[(j, pos)]["per_task"].get(t) for j in lineage[t] if (j, pos) in at), None)
            if v is None or not math.isfinite(v):
                break
            total += v
        else:
            if finals:
                out.append({"position": pos, "total_test_loss": total})
    return out


def _per_task_table(title: str, tasks, methods: Mapping[str, Any], prefix: str):
    """A task × method table of ``loss / metric`` (global: ``prefix=""``; ``personalised_``); the
    method columns split into parts at the console's width (task and metric repeated)."""
    from fmtl_edge.tables import Col, FitTable

    tab = FitTable(title, [Col("task", "left", "bold"), Col("metric", "left"), *[Col(n) for n in methods]], keep=2)
    for t in tasks:
        first = next(iter(methods.values()))["per_task"][t]
        tab.add_row(t, first["metric_name"] or "", *[_task_cell(m["per_task"][t], prefix) for m in methods.values()])
    return tab


def _task_cell(row: Mapping[str, Any], prefix: str) -> str:
    """``loss / metric`` of the global (``prefix=""``) or personalised figures, ``—`` when absent."""
    if row.get(prefix + "test_loss") is None:
        return "—"
    return f"{_fmt(row[prefix + 'test_loss'])} / {_fmt(row.get(prefix + 'metric'))}"
