"""``fmtl-edge simulate``'s engine: every method over the same simulated client pool and data.

:func:`run_methods` builds the in-process client pool (each execution leased and metered), runs each
method's plan with the :class:`~fmtl_edge.coordinator.Coordinator`, reconstructs every task's final
model (its group's θ_s plus its θ_i) and evaluates it on the union of the clients' test splits. It
returns the ``results.json`` content and the final per-task states; :mod:`fmtl_edge.report` writes
them. Nothing here writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from fmtl_edge import __version__
from fmtl_edge.config import SimulationConfig
from fmtl_edge.coordinator import Coordinator, EnergyTally, InProcessClientPool, JobOutcome, RoundRecord
from fmtl_edge.data.base import FederatedDataset
from fmtl_edge.messages import TrainConfig
from fmtl_edge.evaluation import evaluate_method
from fmtl_edge.methods import Method, make_method
from fmtl_edge.models import ModelSpec, validate_model
from fmtl_edge.partition import select_state

if TYPE_CHECKING:
    from fmtl_edge.run_state import RunState

log = logging.getLogger(__name__)


def train_config(cfg: SimulationConfig) -> TrainConfig:
    return TrainConfig(
        local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, affinity_every=cfg.affinity_every,
        affinity_divide_by_lr=cfg.affinity_divide_by_lr, device=cfg.device,
    )


def versions() -> dict[str, Any]:
    """``results.json``'s ``versions``: package versions, platform and ``kernels`` =
    ``native | python-reference`` (whether the compiled kernels ran; ``kernels_version``)."""
    import torch

    out: dict[str, Any] = {
        "fmtl_edge": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": np.__version__, "platform": platform.platform(),
    }
    from fmtl_edge import kernels

    k = kernels.native()
    out["kernels"] = kernels.mode()  # native | python-reference
    out["kernels_version"] = None if k is None else getattr(k, "__version__", "built")
    out["kernels_cuda_compiled"] = bool(getattr(k, "cuda_compiled", False))
    return out


def warm_up() -> None:
    """Import what the first optimizer and functional_call import lazily (~1 s), so that cost is not
    billed as device time to whichever method happens to run first."""
    import torch
    from torch.func import functional_call

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    lin = torch.nn.Linear(1, 1)
    functional_call(lin, dict(lin.named_parameters()), (torch.zeros(1, 1),))


def make_runtime(cfg: SimulationConfig):
    """The meter, the per-execution lease factory and the device profile of the simulated pool.

    The profile (``--profile``: a TOML file or a device class such as ``jetson-orin-nano``; default:
    the detected device class) gives the memory budget, the per-round time/energy budgets unless
    flags set them, and the meter unless ``--meter`` names one.
    """
    from fmtl_edge.runtime import DeviceLease, load_profile, make_meter

    profile = load_profile(cfg.profile)
    meter = profile.make_meter() if cfg.meter is None else make_meter(cfg.meter, **profile.meter_kwargs())

    def lease(_cid: int):
        # All simulated clients share this machine: one FL task at a time on it.
        # A wait over 2 s is logged with the holder's pid; after --lease-wait-s it fails (DeviceBusy).
        return DeviceLease("local", timeout_s=cfg.lease_wait_s, owner="fmtl-edge simulate")

    return meter, lease, profile


def final_states(method: Method, done: dict[str, JobOutcome]) -> dict[str, dict[str, np.ndarray]]:
    """task → state of its final global model (its job's backbone + that task's head)."""
    return {t: select_state(done[j].state, [t]) for t, j in method.final_jobs(done).items()}


def load_pretrained(path: str | None) -> dict[str, np.ndarray] | None:
    """The tensors of a ``--pretrained`` safetensors file (None: no file).

    Raises:
        ConfigError: the file is not a readable safetensors file (names ``--pretrained``).
    """
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from fmtl_edge.config import ConfigError

    try:
        return dict(load_file(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ConfigError("--pretrained", f"{path} is not a readable safetensors model file ({e})") from None


def build_methods(cfg: SimulationConfig, tasks, spec: ModelSpec) -> list[Method]:
    """The methods of ``cfg.methods``, validated against the model (the ``--model`` factory:
    :func:`fmtl_edge.models.validate_model`; layer patterns, pre-trained tensors) before anything trains.

    Raises:
        ConfigError, ValueError: a bad model, unknown names, bad settings (the message names the flag).
    """
    validate_model(spec, tasks)  # a bad --model: one ConfigError before anything trains
    pretrained = load_pretrained(cfg.pretrained)
    methods = [make_method(m, tasks, cfg, pretrained=pretrained) for m in cfg.methods]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {cfg.methods}")
    if pretrained is not None and not any(hasattr(m, "check") for m in methods):
        raise ValueError("--pretrained: no method of --methods uses pre-trained layers (use layered)")
    full = None
    for m in methods:
        check = getattr(m, "check", None)
        if check is not None:
            if full is None:
                from fmtl_edge.client import derive_seed
                from fmtl_edge.models import MultiTaskModel
                from fmtl_edge.partition import state_to_numpy

                full = state_to_numpy(MultiTaskModel(spec, tasks, seed=derive_seed(cfg.seed, "init")).state_dict())
            check(full)
    return methods


def method_entry(method: Method, done: dict[str, JobOutcome], evaluation: dict[str, Any],
                 rounds_per_task: int, wall_s: float, spec: ModelSpec | None = None,
                 batch_size: int = 32, curve: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One method's ``results.json`` entry (``methods.<name>``) from its finished jobs and the test
    evaluation of its final models; shared by ``simulate`` and ``fmtl-server``.

    Besides the figures, the entry holds ``final_jobs`` (task → job whose model is its final
    model), ``merge_phase`` (:func:`merge_phase`) when a job measured affinities, ``decision`` when
    the method explains a choice (``method.decision(done)``: mas-auto's R0 and x) and, with
    ``--eval-every``, ``curve`` and ``curve_total`` (:func:`fmtl_edge.report.method_curve`).

    Args:
        evaluation: :func:`fmtl_edge.evaluation.evaluate_method`'s result (global and/or
            personalised figures).
        rounds_per_task: R of the run.
        wall_s: the method's wall-clock seconds.
        spec, batch_size: the model and batch size, for ``flops_estimate`` (per job
            :func:`fmtl_edge.flops.training_flops_per_sample` × its ``sample_passes``: an estimate
            from one counted step; None without ``spec`` or when the count fails).
        curve: the ``--eval-every`` points (:class:`CurveRecorder`), or None.
    """
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
               "metric": g["metric"] if g else None, "test_samples": g["n"] if g else (p["n"] if p else 0)}
        if p is not None:
            row["personalised_test_loss"] = p["loss"]
            row["personalised_metric"] = p["metric"]
        per_task[t] = row
    entry_eval = {
        "total_test_loss": float(sum(v["loss"] for v in glob.values())) if glob else None,
        "personalised_total_test_loss": float(sum(v["loss"] for v in pers["per_task"].values())) if pers else None,
        "evaluation": [k for k in ("global", "personalised") if evaluation.get(k) is not None],
        "reference": bool(method.reference),
        "per_task": per_task,
    }
    if pers:
        entry_eval["per_client"] = {
            str(c): {t: {"test_loss": v["loss"], "metric": v["metric"], "n": v["n"]} for t, v in tasks.items()}
            for c, tasks in pers["per_client"].items()
        }
    out = {
        **entry_eval,
        "device_s": tally.device_s,
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
             "critical_path_s": o.energy.critical_path_s, "energy_j": o.energy.total_j,
             "sample_passes": o.energy.sample_passes, "lookahead_passes": o.energy.lookahead_passes,
             "flops_estimate": flops[o.job.name], "wall_s": o.wall_s,
             "train_loss_last_round": o.history[-1].train_loss if o.history else None}
            for o in done.values()
        ],
        "history": [
            {"job": r.job, "round": r.round, "clients": r.clients, "lr": r.lr, "train_loss": r.train_loss,
             "samples": r.samples, "device_s": r.device_s, "critical_path_s": r.critical_path_s,
             "energy_j": r.energy_j, "sample_passes": r.sample_passes, "lookahead_passes": r.lookahead_passes,
             "wall_s": r.wall_s, "refused": list(r.refused)}
            for o in done.values() for r in o.history
        ],
    }
    out["final_jobs"] = dict(method.final_jobs(done))
    phase = merge_phase(done)
    if phase is not None:
        out["merge_phase"] = phase
    decision = getattr(method, "decision", None)
    if callable(decision):
        out["decision"] = decision(done)
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


def dropout_faults(seed: int, p: float):
    """The ``--dropout`` fault injector of the simulated pool: a client execution fails (as a device
    lost mid-round: its work of the round is lost, no update arrives) with probability ``p``, drawn
    from ``(seed, "dropout", <method>/<job>, round, client)``; None when ``p`` is 0."""
    if not p:
        return None
    from fmtl_edge.client import derive_seed

    def faults(cid: int, a) -> str | None:
        u = np.random.default_rng(derive_seed(seed, "dropout", a.state_key or a.job, a.round, int(cid))).random()
        return f"simulated dropout (p={p:g}): device lost mid-round" if u < p else None

    return faults


def _job_flops(o: JobOutcome, method: Method, spec: ModelSpec | None, batch_size: int) -> float | None:
    """A job's training FLOPs: FLOPs of one sample-pass (counted on one step) × its sample-passes."""
    if spec is None:
        return None
    if not o.energy.sample_passes:
        return 0.0
    from fmtl_edge.flops import training_flops_per_sample

    per = training_flops_per_sample(spec, method.tasks.subset(o.job.tasks), batch_size)
    return None if per is None else per * o.energy.sample_passes


def run_methods(
    cfg: SimulationConfig,
    dataset: FederatedDataset,
    *,
    on_method_start: Callable[[Method], None] | None = None,
    on_round: Callable[[Method, RoundRecord], None] | None = None,
    on_method_end: Callable[[Method, dict], None] | None = None,
    run_state: "RunState | None" = None,
    on_method_resume: Callable[[Method, int, dict | None], None] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Run every method of ``cfg.methods`` on ``dataset``.

    Args:
        run_state: a :class:`fmtl_edge.run_state.RunState` (``--resume``): every round is committed
            to it, and methods it holds as finished are not run again (their entry and models are
            taken from it); the method that was running continues from its finished jobs and the
            running job's last completed round, with the clients' own state restored.
        on_method_resume: ``(method, rounds already done, entry or None)`` instead of
            ``on_method_start``/``on_method_end`` for a method finished before (entry given), and
            after ``on_method_start`` for the method that continues (entry None).

    Returns:
        (results, models): ``results`` in the ``results.json`` layout (see README), ``models[method][task]``
        the final state of that task's model (backbone + its head).

    Raises:
        ConfigError, ValueError: invalid method names or settings (before any training).
    """
    cfg.validate_against(len(dataset.tasks), dataset.n_clients)
    spec = cfg.model_spec(dataset.input_shape)
    methods = build_methods(cfg, dataset.tasks, spec)
    if not any(len(c.x_test) for c in dataset.clients):
        log.warning("%s: no client has test samples: every test loss will be empty (null in results.json) "
                    "and the methods cannot be compared", dataset.name)
    meter, lease, profile = make_runtime(cfg)
    warm_up()
    pool = InProcessClientPool(dataset, spec, meter, lease, profile.memory_budget_bytes,
                               faults=dropout_faults(cfg.seed, cfg.dropout))
    pooled_pool = None
    train = train_config(cfg)
    results: dict[str, Any] = {
        "dataset": dataset.name, "dataset_info": dataset.info, "tasks": list(dataset.tasks.names),
        "task_kinds": {t.name: t.kind for t in dataset.tasks},
        "clients": dataset.n_clients, "config": cfg.to_dict(), "versions": versions(), "dropout": cfg.dropout,
        "device": {"profile": profile.name, "profile_source": profile.source, "device_class": profile.device_class,
                   "meter": type(meter).__name__, "memory_budget_bytes": profile.memory_budget_bytes},
        "methods": {},
    }
    models: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for method in methods:
        finished = run_state.finished(method.name) if run_state is not None else None
        if finished is not None:  # finished before the interruption: its entry and models as they were
            entry, final = finished
            results["methods"][method.name] = entry
            if final is not None:
                models[method.name] = final
            if on_method_resume:
                on_method_resume(method, int(entry.get("rounds", 0)), entry)
            continue
        if on_method_start:
            on_method_start(method)
        if method.pooled_data and pooled_pool is None:
            pooled_pool = InProcessClientPool(dataset.pooled(), spec, meter, lease, profile.memory_budget_bytes)
        method_pool = pooled_pool if method.pooled_data else pool
        done, resume, prior_wall = _restore_method(run_state, method, method_pool, on_method_resume)
        coord = Coordinator(
            method_pool, spec, dataset.tasks, train,
            min(cfg.clients_per_round, len(method_pool.client_ids)), cfg.seed,
            on_round=(lambda rec, m=method: on_round(m, rec)) if on_round else None,
            time_budget_s=cfg.time_budget_s if cfg.time_budget_s is not None else profile.round_time_s,
            energy_budget_j=cfg.energy_budget_j if cfg.energy_budget_j is not None else profile.round_energy_j,
        )
        curve = None
        if cfg.eval_every and method.global_model:
            known = [ck.job for ck in done.values()] + ([resume.job] if resume is not None else [])
            curve = CurveRecorder(cfg.eval_every, run_state.curve(method.name) if run_state is not None else None,
                                  known)
        coord.on_round_end = _round_end_hook(coord, method.name, method_pool, run_state, curve)
        done = {name: coord.outcome_from_checkpoint(ck) for name, ck in done.items()}
        t0 = time.perf_counter()
        done = coord.run_method(method, done=done, resume=resume)
        wall = time.perf_counter() - t0 + prior_wall
        evaluation = evaluate_method(method, done, coord)
        entry = method_entry(method, done, evaluation, cfg.rounds, wall, spec, train.batch_size,
                             curve=None if curve is None else curve.points)
        results["methods"][method.name] = entry
        if method.global_model:
            models[method.name] = final_states(method, done)
        if run_state is not None:
            run_state.save_method(method.name, entry, models.get(method.name))
        if on_method_end:
            on_method_end(method, entry)
    compare_merge_phase(results)
    return results, models


class CurveRecorder:
    """``--eval-every N``: test-loss points of every job's current global model during training.

    After a round of a job whose *position* — the rounds the job's tasks have trained, counting the
    jobs it continues from (``init_from``; a split job of mas-2 after R0 merge rounds starts at R0)
    — is a multiple of N, and after a job's last round, the job's global model is evaluated on the
    union of the clients' test splits through the pool (the evaluation assignments of
    :mod:`fmtl_edge.evaluation`, global model; :func:`fmtl_edge.client.add_sums` /
    :func:`~fmtl_edge.client.finish_sums`). Evaluations are not client executions: they are not
    metered and do not count in ``device_s``, energy or sample-passes (they do count in ``wall_s``),
    and they draw no randomness, so training is the same with or without them.

    Attributes:
        points: ``[{"job", "round" (0-based in the job), "position", "total_test_loss" (Σ over the
            job's tasks of the mean loss per test sample), "per_task": task → loss}]`` in order.

    Args:
        every: N >= 1.
        points: points already recorded (a resumed run).
        jobs: jobs of the method already seen (a resumed run), for the positions.
    """

    def __init__(self, every: int, points: list[dict[str, Any]] | None = None, jobs=()):
        if every < 1:
            raise ValueError(f"--eval-every: must be >= 1 here, got {every}")
        self.every = int(every)
        self.points: list[dict[str, Any]] = list(points or [])
        self.jobs = {j.name: j for j in jobs}

    def offset(self, job) -> int:
        """Rounds the jobs ``job`` continues from ran (0 for a fresh job)."""
        total, seen, j = 0, set(), job
        while j.init_from is not None and j.init_from in self.jobs and j.init_from not in seen:
            seen.add(j.init_from)
            j = self.jobs[j.init_from]
            total += j.rounds
        return total

    def due(self, job, round_idx: int) -> bool:
        return (self.offset(job) + round_idx + 1) % self.every == 0 or round_idx + 1 >= job.rounds

    def record(self, coord: Coordinator, ckpt) -> dict[str, Any] | None:
        """Evaluate ``ckpt``'s global model if its round is due; returns the point (or None)."""
        from fmtl_edge.client import add_sums, finish_sums
        from fmtl_edge.messages import Assignment
        from fmtl_edge.partition import PERSONAL

        job, r = ckpt.job, int(ckpt.round)
        self.jobs.setdefault(job.name, job)
        if not self.due(job, r):
            return None
        layout = coord.layout(job, ckpt.state)
        a = Assignment(job=job.name, round=r + 1, tasks=tuple(job.tasks), state=ckpt.state, lr=0.0, config=coord.train,
                       seed=coord.seed, procedure=job.procedure, method_config=dict(job.method_config),
                       state_key=coord.state_key(job), personal=layout.names_in(PERSONAL), personalised=False)
        res = coord.pool.evaluate([(c, a) for c in coord.pool.eligible(job.tasks)])
        total: dict[str, dict] = {}
        for c in sorted(res):
            add_sums(total, res[c].get(job.name, {}))
        per = finish_sums(coord.tasks, total)
        losses = {t: float(per[t]["loss"]) for t in job.tasks if t in per}
        point = {"job": job.name, "round": r, "position": self.offset(job) + r + 1,
                 "total_test_loss": float(sum(losses.values())) if len(losses) == len(job.tasks) else None,
                 "per_task": losses}
        self.points.append(point)
        return point


def _round_end_hook(coord: Coordinator, method: str, pool, run_state, curve: CurveRecorder | None):
    """The coordinator's ``on_round_end``: the ``--eval-every`` point, then the resume commit (the
    point is committed with its round, so a resumed curve is the uninterrupted one)."""
    if run_state is None and curve is None:
        return None

    def hook(ck) -> None:
        if curve is not None:
            curve.record(coord, ck)
        if run_state is not None:
            run_state.save_round(method, ck, pool, curve=None if curve is None else curve.points)

    return hook


#: the per-method figures ``run_seeds`` gives ``mean`` and ``std`` of
SEED_FIGURES = ("total_test_loss", "personalised_total_test_loss", "device_s", "energy_j", "sample_passes",
                "flops_estimate", "critical_path_s")


def seed_stats(values: list[float | None]) -> tuple[float | None, float | None]:
    """``(mean, std)`` over seeds; ``std`` is the sample standard deviation (``np.std(ddof=1)``;
    0.0 for one seed); both None when a seed lacks the figure."""
    if not values or any(v is None for v in values):
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def run_seeds(cfg: SimulationConfig, dataset: FederatedDataset, **hooks):
    """``cfg.seeds``: :func:`run_methods` once per seed on the same ``dataset`` (the partition of
    ``cfg.seed``), each run with ``seed = s`` (model init, client sampling, batch order, dropout).

    Returns:
        ``(results, models)``: ``results["methods"][m]`` is the first seed's entry with the
        :data:`SEED_FIGURES` replaced by their mean over seeds, plus ``seeds`` (seed → that seed's
        full entry), ``mean`` and ``std`` (``ddof=1``) of the :data:`SEED_FIGURES`; ``per_task``,
        ``history``, ``splits`` and the rest at the top are the first seed's. ``models`` are the
        first seed's. Not resumable (no run state).
    """
    seeds = tuple(cfg.seeds or (cfg.seed,))
    runs = []
    for s in seeds:
        log.info("seed %d (%d of %d)", s, len(runs) + 1, len(seeds))
        runs.append(run_methods(dataclasses.replace(cfg, seed=int(s), seeds=None), dataset, **hooks))
    results, models = runs[0]
    results = dict(results)
    results["seeds"] = list(seeds)
    results["partition_seed"] = cfg.seed
    results["config"] = cfg.to_dict()
    methods = {}
    for name, first in results["methods"].items():
        per = {str(s): r["methods"][name] for s, (r, _) in zip(seeds, runs)}
        entry = dict(first)
        entry["seeds"] = per
        entry["mean"], entry["std"] = {}, {}
        for k in SEED_FIGURES:
            mean, std = seed_stats([e.get(k) for e in per.values()])
            entry["mean"][k], entry["std"][k] = mean, std
            if k in entry:
                entry[k] = mean
        methods[name] = entry
    results["methods"] = methods
    return results, models


def _restore_method(run_state, method: Method, pool: InProcessClientPool, on_method_resume=None):
    """What ``run_state`` kept of ``method`` when it was the running one: ``(finished jobs' last
    checkpoints by name, the running job's checkpoint or None, wall seconds already spent)``; the
    clients' own state is restored into ``pool``."""
    if run_state is None:
        return {}, None, 0.0
    ckpts, snapshot = run_state.running(method.name)
    if snapshot is not None:
        pool.restore_state(snapshot)
    done = {ck.job.name: ck for ck in ckpts if ck.job_done}
    resume = next((ck for ck in ckpts if not ck.job_done), None)
    if ckpts:
        rounds = sum(ck.round + 1 for ck in ckpts)
        where = f"job {resume.job.name!r} after round {resume.round + 1}" if resume else "its next job"
        log.info("%s: resuming with %d finished job(s), at %s", method.name, len(done), where)
        if on_method_resume:
            on_method_resume(method, rounds, None)
    return done, resume, sum(ck.wall_s for ck in ckpts)


def check_sampling(cfg: SimulationConfig, dataset: FederatedDataset, methods: list[Method]) -> None:
    """Configure the first round of every method's first jobs on ``dataset`` so a sampling the pool
    cannot serve (a task group with fewer clients than K) is refused before anything trains.

    Raises:
        ValueError: the message names the group and the fix.
    """
    from fmtl_edge.strategy import RoundContext

    def eligible(tasks):
        return [c.client_id for c in dataset.clients if any(t in c.y_train for t in tasks)]

    for m in methods:
        if m.pooled_data:
            continue
        for job in m.next_jobs({}):
            m.strategy(job).configure_train(RoundContext(job, 0, cfg.seed, cfg.clients_per_round, eligible))
