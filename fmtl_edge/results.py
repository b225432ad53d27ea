"""The ``results.json`` format: one document per run, the same keys in every program.

``simulate``, ``fmtl-server`` and the Flower ServerApp all write this layout (the runner,
:mod:`fmtl_edge.runner`, builds it; :mod:`fmtl_edge.report` writes it and prints it):

- :func:`results_document` — the top level: ``dataset``, ``dataset_info``, ``tasks``,
  ``task_kinds``, ``clients``, ``config``, ``versions`` (:func:`versions`), ``dropout``, ``device``,
  ``engine`` (which program ran it, and that program's own details), ``chance_loss`` and
  ``loss_weights`` (per task, :mod:`fmtl_edge.loss_weights`), ``chance_accuracy`` (the test
  labels' majority-class rates, where the program holds the data) and ``methods``;
- :func:`method_entry` — one method's entry (``methods.<name>``): test losses (global and
  personalised), cost (device s, CPU s, critical path, energy with its source, sample-passes,
  FLOPs), splits, affinity, jobs, per-round history, the evaluation's coverage, the merge phase and
  a method's decision;
- :func:`merge_phase` / :func:`compare_merge_phase` — the affinity (merge) phase's overhead;
- :func:`combine_seeds` — ``--seeds``: mean and std (ddof = 1) over seeds, per-seed entries.
"""

from __future__ import annotations

import platform
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from fmtl_edge import __version__
from fmtl_edge.partition import select_state
from fmtl_edge.plan import EnergyTally, JobOutcome

#: the per-method figures :func:`combine_seeds` gives ``mean`` and ``std`` of
SEED_FIGURES = ("total_test_loss", "normalised_total_test_loss", "personalised_total_test_loss",
                "personalised_normalised_total_test_loss", "device_s", "cpu_s", "energy_j", "sample_passes",
                "flops_estimate", "critical_path_s")


def versions() -> dict[str, Any]:
    """``results.json``'s ``versions``: package versions, platform and ``kernels`` =
    ``native | python-reference`` (whether the compiled kernels ran; ``kernels_version``)."""
    import torch

    from fmtl_edge import kernels

    out: dict[str, Any] = {
        "fmtl_edge": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
    }
    k = kernels.native()
    out["kernels"] = kernels.mode()  # native | python-reference
    out["kernels_version"] = None if k is None else getattr(k, "__version__", "built")
    out["kernels_cuda_compiled"] = bool(getattr(k, "cuda_compiled", False))
    return out


def results_document(*, dataset: str, dataset_info: Mapping[str, Any], tasks, clients: int, config: Mapping[str, Any],
                     device: Mapping[str, Any], engine: Mapping[str, Any], dropout: float | None,
                     chance_accuracy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The top level of ``results.json`` before any method ran (``methods`` empty).

    Args:
        dataset, dataset_info: the data set's name and description.
        tasks: the :class:`~fmtl_edge.tasks.TaskSet`.
        clients: the number of clients of the partition.
        config: the run config (``SimulationConfig.to_dict()``).
        device: the device profile, meter and thread policy the clients ran under.
        engine: ``{"name": "simulate" | "fmtl-server" | "flower", ...}`` and that program's own
            details (the server's job, devices and counters; Flower's nodes and messages).
        dropout: the simulated ``--dropout`` probability (None where devices fail for real).
        chance_accuracy: the test labels' majority-class rates per classification/binary task
            (:func:`fmtl_edge.verdict.chance_accuracies`; a program that holds the data passes them, the
            report warns about accuracies at that level); None (``null``: the server and Flower
            do not hold the data).
    """
    return {"dataset": dataset, "dataset_info": dict(dataset_info), "tasks": list(tasks.names),
            "task_kinds": {t.name: t.kind for t in tasks}, "clients": int(clients), "config": dict(config),
            "versions": versions(), "dropout": dropout, "device": dict(device), "engine": dict(engine),
            "chance_loss": {}, "loss_weights": {},
            "chance_accuracy": None if chance_accuracy is None else {k: dict(v) for k, v in chance_accuracy.items()},
            "methods": {}}


def final_states(method, done: Mapping[str, JobOutcome]) -> dict[str, dict[str, np.ndarray]]:
    """task → state of its final global model (its job's backbone + that task's head)."""
    return {t: select_state(done[j].state, [t]) for t, j in method.final_jobs(done).items()}


def evaluation_coverage(evaluation: Mapping[str, Any], asked: Sequence[int]) -> dict[str, Any]:
    """Which clients an evaluation reached: ``{"kinds", "complete", "clients", "missing",
    "test_samples"}`` — ``complete`` is False when a client that was asked did not answer (a lost
    device, a Flower node gone): the test losses then cover only ``clients`` and are not comparable
    with a complete run's; ``test_samples`` counts the samples behind the global (else the
    personalised) figures."""
    answered = sorted(int(c) for c in evaluation.get("clients", ()))
    missing = sorted(set(int(c) for c in asked) - set(answered))
    glob = evaluation.get("global") or {}
    pers = (evaluation.get("personalised") or {}).get("per_task") or {}
    samples = sum(int(v.get("n", 0)) for v in (glob or pers).values())
    return {"kinds": [k for k in ("global", "personalised") if evaluation.get(k) is not None],
            "complete": not missing, "clients": answered, "missing": missing, "test_samples": samples}


def method_entry(method, done: dict[str, JobOutcome], evaluation: dict[str, Any], rounds_per_task: int, wall_s: float,
                 spec=None, batch_size: int = 32, curve: list[dict[str, Any]] | None = None,
                 asked: Sequence[int] = (), chance: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """One method's ``results.json`` entry (``methods.<name>``) from its finished jobs and the test
    evaluation of its final models.

    Besides the figures, the entry holds ``final_jobs`` (task → job whose model is its final
    model), ``merge_phase`` (:func:`merge_phase`) when a job measured affinities, ``decision`` (the
    method's :meth:`~fmtl_edge.methods.Method.decision`, e.g. mas-auto's R0 and x, or None),
    ``evaluation`` (:func:`evaluation_coverage`) and, with ``--eval-every``, ``curve`` and
    ``curve_total`` (:func:`fmtl_edge.report.method_curve`).

    Args:
        evaluation: :func:`fmtl_edge.evaluation.evaluate_method`'s result (global and/or
            personalised figures, the clients that answered).
        rounds_per_task: R of the run.
        wall_s: the method's wall-clock seconds.
        spec, batch_size: the model and batch size, for ``flops_estimate`` (per job
            :func:`fmtl_edge.flops.training_flops_per_sample` × its ``sample_passes``: an estimate
            from one counted step; None without ``spec`` or when the count fails).
        curve: the ``--eval-every`` points (:class:`fmtl_edge.curves.CurveRecorder`), or None.
        asked: the clients the evaluation was sent to (for ``evaluation.complete``).
        chance: task → chance loss (:mod:`fmtl_edge.loss_weights`): each ``per_task`` row's
            ``chance_loss`` and the ``normalised_total_test_loss`` = Σ_t L_t / chance_t (and its
            personalised twin); None where unknown.
    """
    from fmtl_edge.loss_weights import normalised_total

    chance = dict(chance or {})
    tally = EnergyTally()
    for o in done.values():
        tally.merge(o.energy)
    aff = method.affinity(done)
    flops = {o.job.name: _job_flops(o, method, spec, batch_size) for o in done.values()}
    glob = evaluation.get("global")
    pers = evaluation.get("personalised")
    per_task: dict[str, dict[str, Any]] = {}
    for t in method.tasks.names:
        g = (glob or {}).get(t)
        p = (pers or {}).get("per_task", {}).get(t) if pers else None
        ref = g or p
        row = {"test_loss": g["loss"] if g else None, "metric_name": ref["metric_name"] if ref else None,
               "metric": g["metric"] if g else None, "test_samples": g["n"] if g else (p["n"] if p else 0),
               "chance_loss": chance.get(t)}
        if p is not None:
            row["personalised_test_loss"] = p["loss"]
            row["personalised_metric"] = p["metric"]
        per_task[t] = row
    out: dict[str, Any] = {
        "total_test_loss": float(sum(v["loss"] for v in glob.values())) if glob else None,
        "personalised_total_test_loss": float(sum(v["loss"] for v in pers["per_task"].values())) if pers else None,
        "normalised_total_test_loss": normalised_total({t: v["loss"] for t, v in glob.items()}, chance) if glob else None,
        "personalised_normalised_total_test_loss": (
            normalised_total({t: v["loss"] for t, v in pers["per_task"].items()}, chance) if pers else None),
        "evaluation": evaluation_coverage(evaluation, asked),
        "reference": bool(method.reference),
        "per_task": per_task,
    }
    if pers:
        out["per_client"] = {
            str(c): {t: {"test_loss": v["loss"], "metric": v["metric"], "n": v["n"]} for t, v in tasks.items()}
            for c, tasks in pers["per_client"].items()
        }
    out.update({
        "device_s": tally.device_s,
        "cpu_s": tally.cpu_s,
        "critical_path_s": tally.critical_path_s,
        "energy_j": tally.total_j,
        "energy_source": tally.source,
        "energy_scope": tally.scope,
        "energy_estimated": tally.estimated,
        "client_executions": tally.executions,
        "sample_passes": tally.sample_passes,
        "lookahead_passes": tally.lookahead_passes,
        "flops_estimate": None if any(v is None for v in flops.values()) else float(sum(flops.values())),
        "rounds": sum(o.job.rounds for o in done.values()),
        "rounds_per_task": rounds_per_task,
        "splits": method.splits(done),
        "affinity": None if aff is None else np.asarray(aff).tolist(),
        "wall_s": wall_s,
        "jobs": [
            {"name": o.job.name, "tasks": list(o.job.tasks), "rounds": o.job.rounds,
             "init_from": o.job.init_from, "procedure": o.job.procedure, "device_s": o.energy.device_s,
             "cpu_s": o.energy.cpu_s, "critical_path_s": o.energy.critical_path_s, "energy_j": o.energy.total_j,
             "sample_passes": o.energy.sample_passes, "lookahead_passes": o.energy.lookahead_passes,
             "flops_estimate": flops[o.job.name], "wall_s": o.wall_s,
             "train_loss_last_round": o.history[-1].train_loss if o.history else None}
            for o in done.values()
        ],
        "history": [
            {"job": r.job, "round": r.round, "clients": r.clients, "executed_by": list(r.executed), "lr": r.lr,
             "train_loss": r.train_loss, "samples": r.samples, "device_s": r.device_s, "cpu_s": r.cpu_s,
             "critical_path_s": r.critical_path_s, "energy_j": r.energy_j, "sample_passes": r.sample_passes,
             "lookahead_passes": r.lookahead_passes, "wall_s": r.wall_s, "refused": list(r.refused),
             "per_client": list(r.per_client)}
            for o in done.values() for r in o.history
        ],
        "final_jobs": dict(method.final_jobs(done)),
        "merge_phase": merge_phase(done),
        "decision": method.decision(done),
        "oracle": None,
        "energy": None,
    })
    if curve is not None:
        from fmtl_edge.report import method_curve

        out["curve"] = list(curve)
        out["curve_total"] = method_curve(out)
    return out


def merge_phase(done: Mapping[str, JobOutcome]) -> dict[str, Any] | None:
    """The affinity-measuring (merge) jobs' cost: ``jobs``, ``rounds``, ``device_s``, ``energy_j``,
    ``sample_passes``, ``lookahead_passes`` and ``lookahead_share`` = lookahead_passes / sample_passes
    (the measurement's share of the phase's training passes, MAS Eq. 3 at n_tasks × B per
    measurement); None when no job measured. :func:`compare_merge_phase` adds the comparison with
    all-in-one's first R0 rounds."""
    jobs = [o for o in done.values() if o.job.measure_affinity]
    if not jobs:
        return None
    t = EnergyTally()
    for o in jobs:
        t.merge(o.energy)
    return {"jobs": [o.job.name for o in jobs], "rounds": sum(len(o.history) for o in jobs), "device_s": t.device_s,
            "energy_j": t.total_j, "sample_passes": t.sample_passes, "lookahead_passes": t.lookahead_passes,
            "lookahead_share": t.lookahead_passes / t.sample_passes if t.sample_passes else None}


def compare_merge_phase(results: Mapping[str, Any], baseline: str = "all-in-one") -> None:
    """Add ``merge_phase.vs_all_in_one`` to every method entry with a merge phase, in place, when
    ``baseline`` ran in the same run: its first R0 rounds (R0 = the merge phase's rounds) as an equal
    all-in-one without the lookahead — ``rounds``, ``device_s``, ``sample_passes`` and the ratios
    ``device_ratio`` = merge device_s / those rounds' device_s and ``passes_ratio`` likewise (the
    latter is independent of the machine's load; both > 1 by the lookahead's cost)."""
    base = results.get("methods", {}).get(baseline)
    if not base or not base.get("history"):
        return
    for name, m in results["methods"].items():
        phase = m.get("merge_phase")
        if name == baseline or not phase:
            continue
        rows = [h for h in base["history"] if h["round"] < phase["rounds"]]
        if len(rows) < phase["rounds"]:
            continue
        dev = float(sum(h["device_s"] for h in rows))
        passes = int(sum(h.get("sample_passes", 0) for h in rows))
        phase["vs_all_in_one"] = {
            "method": baseline, "rounds": len(rows), "device_s": dev, "sample_passes": passes,
            "device_ratio": phase["device_s"] / dev if dev > 0 else None,
            "passes_ratio": phase["sample_passes"] / passes if passes > 0 else None,
        }


def _job_flops(o: JobOutcome, method, spec, batch_size: int) -> float | None:
    """A job's training FLOPs: FLOPs of one sample-pass (counted on one step) × its sample-passes."""
    if spec is None:
        return None
    if not o.energy.sample_passes:
        return 0.0
    from fmtl_edge.flops import training_flops_per_sample

    per = training_flops_per_sample(spec, method.tasks.subset(o.job.tasks), batch_size)
    return None if per is None else per * o.energy.sample_passes


def seed_stats(values: list[float | None]) -> tuple[float | None, float | None]:
    """``(mean, std)`` over seeds; ``std`` is the sample standard deviation (``np.std(ddof=1)``;
    0.0 for one seed); both None when a seed lacks the figure."""
    if not values or any(v is None for v in values):
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


#: the figures :func:`paired_differences` compares (normalised first: the one that compares methods)
PAIRED_FIGURES = ("normalised_total_test_loss", "total_test_loss")


def paired_differences(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any] | None:
    """Paired per-seed differences ``a_s − b_s`` with their mean and 95 % t-interval.

    The seeds pair the runs (same partition, same initial weights, same client draws per seed), so
    the interval is Student's t over the n differences with n − 1 degrees of freedom:
    mean ± t_{0.975, n−1} · sd / √n (``scipy.stats.t``).

    Returns:
        ``{"diffs", "n", "mean", "sd", "ci95": [lo, hi], "t", "p"}`` (``p`` two-sided, of mean = 0;
        ``ci95``, ``t`` and ``p`` None for n < 2 or zero spread), or None when a figure is missing.
    """
    if not a or len(a) != len(b) or any(v is None for v in (*a, *b)):
        return None
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    out: dict[str, Any] = {"diffs": d.tolist(), "n": n, "mean": float(d.mean()), "sd": None, "ci95": None,
                           "t": None, "p": None}
    if n < 2:
        return out
    from scipy import stats

    sd = float(d.std(ddof=1))
    out["sd"] = sd
    if sd == 0.0:
        return out
    half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
    t = float(d.mean() / (sd / np.sqrt(n)))
    out.update(ci95=[float(d.mean() - half), float(d.mean() + half)], t=t, p=float(2 * stats.t.sf(abs(t), n - 1)))
    return out


def paired_verdict(p: Mapping[str, Any] | None) -> str:
    """``lower`` / ``higher`` when the 95 % interval of a paired difference excludes 0, else
    ``not separated`` (``—`` without one)."""
    if not p or p.get("ci95") is None:
        return "—" if not p or p.get("sd") != 0.0 else ("equal" if p["mean"] == 0 else ("lower" if p["mean"] < 0 else "higher"))
    lo, hi = p["ci95"]
    return "lower" if hi < 0 else "higher" if lo > 0 else "not separated"


def combine_seeds(runs: Sequence[Mapping[str, Any]], seeds: Sequence[int], partition_seed: int,
                  config: Mapping[str, Any], paired_with: str | None = None) -> dict[str, Any]:
    """One results document from the documents of the same run under several training seeds.

    Returns:
        The first seed's document with, per method, the :data:`SEED_FIGURES` replaced by their
        mean over seeds, plus ``seeds`` (seed → that seed's full entry), ``mean`` and ``std``
        (``ddof=1``); ``per_task``, ``history``, ``splits`` and the rest are the first seed's. At
        the top: ``seeds``, ``partition_seed`` and ``config`` (the run's, with its seed list).
        With ``paired_with`` (``--paired-with METHOD``), every other method's entry gets ``paired``:
        ``{"with": METHOD, <figure>: paired_differences(method, METHOD)}`` for each of
        :data:`PAIRED_FIGURES` (negative = lower loss than METHOD).
    """
    results = dict(runs[0])
    results["seeds"] = list(seeds)
    results["partition_seed"] = partition_seed
    results["config"] = dict(config)
    methods = {}
    for name, first in results["methods"].items():
        per = {str(s): r["methods"][name] for s, r in zip(seeds, runs)}
        entry = dict(first)
        entry["seeds"] = per
        entry["mean"], entry["std"] = {}, {}
        for k in SEED_FIGURES:
            mean, std = seed_stats([e.get(k) for e in per.values()])
            entry["mean"][k], entry["std"][k] = mean, std
            if k in entry:
                entry[k] = mean
        methods[name] = entry
    if paired_with is not None:
        if paired_with not in methods:
            raise ValueError(f"--paired-with {paired_with}: not one of the methods run ({', '.join(methods)})")
        base = methods[paired_with]["seeds"]
        for name, entry in methods.items():
            if name == paired_with:
                continue
            entry["paired"] = {"with": paired_with, **{
                k: paired_differences([entry["seeds"][str(s)].get(k) for s in seeds], [base[str(s)].get(k) for s in seeds])
                for k in PAIRED_FIGURES}}
    results["paired_with"] = paired_with
    results["methods"] = methods
    return results


#: config keys that may differ between the runs :func:`combine_runs` puts together
_PER_SEED_KEYS = ("seed", "seeds", "out", "paired_with", "partition_seed")


def combine_runs(docs: Sequence[Mapping[str, Any]], paired_with: str | None = None) -> dict[str, Any]:
    """One ``--seeds`` document from single-seed runs of one study (each its own resumable run:
    ``simulate --seed S --partition-seed P``), as :func:`combine_seeds` makes it.

    Raises:
        ValueError: a document is already a multi-seed one, two runs share a seed, their data
            partitions differ, or their settings differ beyond the seed (the key is named).
    """
    if len(docs) < 2:
        raise ValueError("give at least two runs to combine")
    first = docs[0]["config"]
    part = lambda c: c["seed"] if c.get("partition_seed") is None else c["partition_seed"]  # noqa: E731
    for d in docs:
        c = d["config"]
        if d.get("seeds") and len(d["seeds"]) > 1:
            raise ValueError("a run of several seeds cannot be combined again; give single-seed runs")
        diff = sorted(k for k in set(c) | set(first) if k not in _PER_SEED_KEYS and c.get(k) != first.get(k))
        if diff:
            raise ValueError(f"the runs differ in {diff[0]!r} ({first.get(diff[0])!r} vs {c.get(diff[0])!r}): "
                             "only the seed may differ")
        if part(c) != part(first):
            raise ValueError(f"the runs' data partitions differ (partition seeds {part(first)} and {part(c)}): "
                             "run each seed with the same --partition-seed")
    seeds = [int(d["config"]["seed"]) for d in docs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two runs share a seed ({seeds}); give each seed once")
    config = {**first, "seeds": seeds, "paired_with": paired_with}
    return combine_seeds(docs, seeds, int(part(first)), config, paired_with)
