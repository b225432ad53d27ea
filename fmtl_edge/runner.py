"""The method runner: every method of a run over any client pool, to a ``results.json`` document.

``fmtl-edge simulate``, ``fmtl-server`` and the Flower ServerApp each keep only their own part —
the CLI and the data and the in-process pool; the job store and the devices; the grid and its
records — and call :func:`run_methods`, which for each method

1. takes a method finished before an interruption from the checkpoint store as it was;
2. otherwise restores the running method's finished jobs, its running job's last completed round
   and the clients' own state from the store, and runs the method's plan with the
   :class:`~fmtl_edge.coordinator.Coordinator` over the pool (strategies, aggregation, budgets),
   committing every round to the store (and an ``--eval-every`` point, :mod:`fmtl_edge.curves`);
   a failed round is retried from the last checkpoint when a :class:`RetryPolicy` says so;
3. evaluates the final models through the same pool (:func:`fmtl_edge.evaluation.evaluate_method`)
   and writes the method's entry (:func:`fmtl_edge.results.method_entry`) and final models.

:func:`prepare_methods` builds and checks the methods before anything trains, the same way for
every program (unknown names, settings the method cannot use, a sampling the pool cannot serve,
pooled-data references where the pool has no pooled data).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from fmtl_edge.config import ConfigError
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.curves import CurveRecorder
from fmtl_edge.evaluation import client_models, evaluate_method
from fmtl_edge.methods import Method, make_method
from fmtl_edge.plan import JobOutcome, RoundCheckpoint, RoundFailed, RoundRecord
from fmtl_edge.pool import ClientPool
from fmtl_edge.results import compare_merge_phase, final_states, method_entry

log = logging.getLogger(__name__)

Models = dict[str, dict[str, np.ndarray]]
#: ``name → (job, state, tasks)``: each client's own model (:func:`fmtl_edge.evaluation.client_models`)
ClientModels = dict[str, tuple[str, dict[str, np.ndarray], list[str]]]


class RunModels(dict):
    """What :func:`run_methods` returns beside the results: ``models[method][task]`` is the final
    global state of that task's model (backbone + its head), for every method with global models;
    ``models.clients[method][name]`` is ``(job, state, tasks)`` of each client's own model, for the
    personalised methods whose pool holds the clients' state (``simulate``; devices keep theirs)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.clients: dict[str, ClientModels] = {}


class CheckpointStore(Protocol):
    """Where a run keeps what it needs to resume (``simulate``/Flower: :class:`fmtl_edge.run_state.RunState`;
    ``fmtl-server``: its SQLite store)."""

    def finished(self, method: str) -> tuple[dict[str, Any], Models | None] | None:
        """A method finished before: its entry and final per-task models (None: rebuild them from
        :meth:`running`'s checkpoints), or None when it has not finished."""

    def running(self, method: str) -> tuple[list[RoundCheckpoint], Mapping[int, Any] | None]:
        """The method's job checkpoints (finished jobs' last rounds, the running job's last
        completed round) and the clients' own state (None: the clients keep it)."""

    def curve(self, method: str) -> list[dict[str, Any]] | None:
        """The method's ``--eval-every`` points so far."""

    def save_round(self, method: str, ckpt: RoundCheckpoint, pool: ClientPool,
                   curve: list[dict[str, Any]] | None = None) -> None:
        """Commit a completed round (and the clients' state, :meth:`ClientPool.state_snapshot`)."""

    def save_method(self, method: str, entry: Mapping[str, Any], models: Models | None) -> None:
        """Commit a finished method's entry and final models. A store that keeps client models
        (:class:`fmtl_edge.run_state.RunState`) also takes ``clients=`` (:data:`ClientModels`) and
        gives them back with ``finished_clients(method)``; the runner passes them only when the
        pool made some."""


@dataclass
class RunHooks:
    """What a program hears while :func:`run_methods` runs (each optional).

    Attributes:
        on_method_start: ``(method)`` before a method trains (also a resumed one).
        on_round: ``(method, RoundRecord)`` after every round (progress bars, logs).
        on_round_end: ``(method, RoundCheckpoint)`` after the round is committed to the store.
        on_evaluate: ``(method)`` before its final models are evaluated.
        on_method_end: ``(method, entry)`` when its entry is complete.
        on_method_resume: ``(method, rounds already done, entry or None)``: for a method finished
            before (entry given) instead of start/end; after ``on_method_start`` for the method
            that continues (entry None).
    """

    on_method_start: Callable[[Method], None] | None = None
    on_round: Callable[[Method, RoundRecord], None] | None = None
    on_round_end: Callable[[Method, RoundCheckpoint], None] | None = None
    on_evaluate: Callable[[Method], None] | None = None
    on_method_end: Callable[[Method, dict], None] | None = None
    on_method_resume: Callable[[Method, int, dict | None], None] | None = None


@dataclass
class RetryPolicy:
    """Retry a failed round from the last checkpoint (``fmtl-server``: devices come back).

    Attributes:
        retries: failed rounds tolerated per method before :class:`RoundFailed` propagates.
        wait: ``(attempt, RoundFailed) -> None`` called before each retry: log, record the event
            and wait; it raises to stop (the server's stop signal).
    """

    retries: int
    wait: Callable[[int, RoundFailed], None]


@dataclass
class RunSettings:
    """How a run drives its methods (what differs between programs, beside the pool).

    Attributes:
        time_budget_s, energy_budget_j: per-round budgets sent with every assignment (None: none).
        min_updates: fewest usable updates a round may aggregate.
        evaluate: evaluate the final models (False: test losses are null).
        retry: retry failed rounds (None: a failed round ends the run).
        fleet: the simulated :class:`~fmtl_edge.fleet.Fleet` the pool prices executions with
            (``--fleet``), for the energy policy's predictions and budgets; None: the devices' own.
    """

    time_budget_s: float | None = None
    energy_budget_j: float | None = None
    min_updates: int = 1
    evaluate: bool = True
    retry: RetryPolicy | None = None
    fleet: Any = None


def load_pretrained(path: str | None) -> dict[str, np.ndarray] | None:
    """The tensors of a ``--pretrained`` safetensors file (None: no file).

    Raises:
        ConfigError: the file is not a readable safetensors file (names ``--pretrained``).
    """
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ConfigError("--pretrained", f"{path} is not a readable safetensors model file ({e})") from None


def prepare_methods(cfg, tasks, spec, eligible: Callable[[Sequence[str]], list[int]] | None = None,
                    pooled: bool = True) -> list[Method]:
    """The methods of ``cfg.methods``, built and checked before anything trains: the ``--model``
    factory (:func:`fmtl_edge.models.validate_model`), names and settings, layer patterns and
    pre-trained tensors against the model, the first round of every method's first jobs against
    the pool's clients (a task group with fewer clients than K), and pooled-data references where
    the program has no pooled data.

    Args:
        eligible: the pool's ``tasks -> clients holding them`` (None: skip the sampling check).
        pooled: whether the program can run non-FL references on pooled data (``simulate`` only).

    Raises:
        ConfigError, ValueError: the message names the flag (or key) and the fix.
    """
    from fmtl_edge.model_factory import ModelError
    from fmtl_edge.models import MultiTaskModel, validate_model
    from fmtl_edge.partition import state_to_numpy
    from fmtl_edge.seeding import derive_seed
    from fmtl_edge.strategy import RoundContext

    try:
        validate_model(spec, tasks)
    except ModelError as e:  # a bad --model: one error naming the flag before anything trains
        raise ConfigError("--model", str(e)) from None
    pretrained = load_pretrained(cfg.pretrained)
    names = list(cfg.methods)
    if cfg.oracle_splits:  # every mas-x gets its oracle check beside it
        names += [f"mas-oracle-{m[4:]}" for m in cfg.methods if re.fullmatch(r"mas-\d+", m)]
    methods = [make_method(m, tasks, cfg, pretrained=pretrained) for m in names]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {cfg.methods}")
    if pretrained is not None and not any(m.uses_pretrained for m in methods):
        raise ValueError("--pretrained: no method of --methods uses pre-trained layers (use layered)")
    full = state_to_numpy(MultiTaskModel(spec, tasks, seed=derive_seed(cfg.seed, "init")).state_dict())
    for m in methods:
        m.check(full)
        if m.pooled_data:
            if not pooled:
                raise ConfigError("--methods", f"{m.name} trains on pooled data (a non-FL reference) and runs in "
                                  "`fmtl-edge simulate` only; remove it from the methods")
            continue
        if eligible is not None:
            for job in m.next_jobs({}):
                if job.measure_affinity:
                    check_affinity_clients(m.name, job.tasks, eligible)
                m.strategy(job).configure_train(RoundContext(job, 0, cfg.seed, cfg.clients_per_round, eligible))
    return methods


def check_affinity_clients(method: str, tasks: Sequence[str], eligible: Callable[[Sequence[str]], list[int]]) -> None:
    """Refuse a job that measures task affinity when no client holds labels for two or more of its
    ``tasks``: the lookahead (MAS Eq. 3) measures how one task's step changes *another* task's loss
    on the same client's batch, so a client with one task measures nothing, the merge phase ends
    with no affinity and no split can be chosen.

    Args:
        eligible: ``tasks -> clients holding labels for any of them`` (asked one task at a time).

    Raises:
        ConfigError: names ``--methods``, why, and what runs instead (nothing is raised when the
            pool knows no client yet).
    """
    if len(tasks) < 2:
        return
    held: dict[int, int] = {}
    for t in tasks:
        for c in eligible([t]):
            held[int(c)] = held.get(int(c), 0) + 1
    if held and max(held.values()) < 2:
        raise ConfigError(
            "--methods",
            f"{method} measures task affinity by lookahead (MAS Eq. 3) on clients that hold labels for two or more "
            f"of the merged tasks ({', '.join(tasks)}), but every client here holds one task only (--task-groups, "
            "or npz client files with one y_<task> each): it would train its merge phase and find no affinity to "
            "split by. Run layered (clients sampled per task group) or one-by-one instead, or give clients the "
            "labels of several tasks")


def run_methods(cfg, methods: Sequence[Method], pool: ClientPool, spec, results: dict[str, Any], *,
                pooled_pool: Callable[[], ClientPool] | None = None, store: CheckpointStore | None = None,
                hooks: RunHooks | None = None, settings: RunSettings | None = None) -> tuple[dict[str, Any], RunModels]:
    """Run ``methods`` over ``pool`` and fill ``results["methods"]`` (see the module docstring).

    Args:
        cfg: the run's :class:`~fmtl_edge.config.SimulationConfig` (R, K, seed, training settings,
            ``--eval-every``).
        methods: from :func:`prepare_methods`.
        pool: where the clients run.
        spec: the model architecture.
        results: the document from :func:`fmtl_edge.results.results_document`; filled in place.
        pooled_pool: builds the pool of pooled data for non-FL references (``simulate``).
        store: resume state: finished methods are taken from it, the running one continues from
            its last completed round, every round is committed to it (None: not resumable).
        hooks: progress and logging callbacks.
        settings: budgets, ``min_updates``, evaluation, retries.

    Returns:
        ``(results, models)``: :class:`RunModels` — ``models[method][task]`` is the final state of
        that task's model (backbone + its head) for every method with global models, and
        ``models.clients[method]`` each client's own model of a personalised method (when the
        pool holds the clients' state).

    Raises:
        RoundFailed: a round failed (and the retry policy gave up).
    """
    hooks = hooks or RunHooks()
    settings = settings or RunSettings()
    train = cfg.train_config()
    tasks = methods[0].tasks if methods else None
    chance, weights = task_scales(cfg, pool, tasks)
    results["chance_loss"], results["loss_weights"] = chance, weights
    policy = energy_policy(cfg, pool, settings.fleet, spec)
    results["energy_policy"] = policy.describe()
    models = RunModels()
    pooled = None
    for method in methods:
        finished = store.finished(method.name) if store is not None else None
        if finished is not None:  # finished before an interruption: its entry and models as they were
            entry, final = finished
            results["methods"][method.name] = entry
            if final is None and method.global_model:
                final = final_states(method, _finished_jobs(store.running(method.name)[0], cfg, pool, spec, tasks, train))
            if final is not None:
                models[method.name] = final
            kept = getattr(store, "finished_clients", None)
            own = kept(method.name) if kept is not None else None
            if own:
                models.clients[method.name] = own
            if hooks.on_method_resume:
                hooks.on_method_resume(method, int(entry.get("rounds", 0)), entry)
            continue
        if hooks.on_method_start:
            hooks.on_method_start(method)
        if method.pooled_data:
            if pooled_pool is None:
                raise ConfigError("--methods", f"{method.name} needs pooled data, which this program has not")
            pooled = pooled or pooled_pool()
        method_pool = pooled if method.pooled_data else pool
        coord = Coordinator(
            method_pool, spec, tasks, train, min(cfg.clients_per_round, len(method_pool.client_ids)), cfg.seed,
            on_round=(lambda rec, m=method: hooks.on_round(m, rec)) if hooks.on_round else None,
            time_budget_s=settings.time_budget_s, energy_budget_j=settings.energy_budget_j,
            min_updates=min(settings.min_updates, cfg.clients_per_round), loss_weights=weights,
            energy_policy=policy)
        curve = None
        if cfg.eval_every and method.global_model:
            curve = CurveRecorder(cfg.eval_every, store.curve(method.name) if store is not None else None)
        coord.on_round_end = _round_end(coord, method, method_pool, store, curve, hooks)
        t0 = time.perf_counter()
        done, prior_wall = _run_with_retries(coord, method, method_pool, store, curve, hooks, settings.retry)
        wall = time.perf_counter() - t0 + prior_wall
        if hooks.on_evaluate:
            hooks.on_evaluate(method)
        asked = None if settings.evaluate else []
        evaluation = evaluate_method(method, done, coord, clients=asked)
        entry = method_entry(method, done, evaluation, cfg.rounds, wall, spec, train.batch_size,
                             curve=None if curve is None else curve.points, asked=evaluation["asked"], chance=chance)
        from fmtl_edge.selection import ClientRecord

        entry["energy"] = policy.audit([ClientRecord.from_dict(d) for o in done.values() for rec in o.history
                                        for d in rec.per_client])
        candidates = method.candidate_models(done) if settings.evaluate else {}
        if candidates:
            entry["oracle"] = method.oracle(done, _candidate_losses(method, done, coord, candidates, chance))
        if not entry["evaluation"]["complete"]:
            log.warning("%s: the evaluation reached %d of %d clients (missing %s): its test losses cover only those",
                        method.name, len(entry["evaluation"]["clients"]), len(evaluation["asked"]),
                        entry["evaluation"]["missing"])
        results["methods"][method.name] = entry
        if method.global_model:
            models[method.name] = final_states(method, done)
        own = client_models(method, done, coord)
        if own:
            models.clients[method.name] = own
        if store is not None:
            store.save_method(method.name, entry, models.get(method.name), **({"clients": own} if own else {}))
        if hooks.on_method_end:
            hooks.on_method_end(method, entry)
    compare_merge_phase(results)
    return results, models


def _candidate_losses(method: Method, done, coord: Coordinator, candidates: Mapping[str, Mapping[str, str]],
                      chance: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each candidate set of final models evaluated: label → ``{"total_test_loss",
    "normalised_total_test_loss", "per_task"}``."""
    from fmtl_edge.evaluation import evaluate_finals
    from fmtl_edge.loss_weights import normalised_total

    out = {}
    for label, finals in candidates.items():
        per = {t: float(v["loss"]) for t, v in evaluate_finals(method, done, coord, finals).items()}
        out[label] = {"total_test_loss": float(sum(per.values())), "normalised_total_test_loss": normalised_total(per, chance),
                      "per_task": per}
    return out


def energy_policy(cfg, pool: ClientPool, fleet, spec):
    """The run's :class:`~fmtl_edge.energy_policy.EnergyPolicy` from ``--selection``,
    ``--power-mode`` and the fleet (or the pool's devices).

    Raises:
        ConfigError: a power-mode policy where no device's modes are known.
    """
    from fmtl_edge.energy_policy import EnergyPolicy

    try:
        return EnergyPolicy(cfg.selection, cfg.power_mode, fleet, device_of=pool.device_name,
                            modes_of=pool.device_modes if fleet is None else None, train_sizes=pool.train_sizes(),
                            local_epochs=cfg.local_epochs, model=model_key(spec), candidates=cfg.energy_candidates)
    except ValueError as e:
        flag = "--power-mode" if "power-mode" in str(e) else "--selection"
        raise ConfigError(flag, str(e).split(": ", 1)[-1]) from None


def model_key(spec) -> str:
    """The energy profiles' key of a model architecture (J per sample-pass depend on it)."""
    return "/".join(str(v) for v in (spec.model, "x".join(map(str, spec.input_shape)), f"w{spec.width}",
                                     f"d{spec.depth}", f"h{spec.head_hidden}"))


def task_scales(cfg, pool: ClientPool, tasks) -> tuple[dict[str, float | None], dict[str, float]]:
    """``(chance loss per task, the objective's task weights)`` of a run: the chance losses from the
    clients' combined label statistics (:mod:`fmtl_edge.loss_weights`; None each where the pool
    cannot provide them), the weights from ``--loss-weights``.

    Raises:
        ConfigError: ``--loss-weights`` that cannot be served (names the task and the fix).
    """
    from fmtl_edge.loss_weights import chance_losses, combine_label_stats, resolve_loss_weights

    if tasks is None:
        return {}, {}
    stats = pool.label_statistics(tasks)
    chance = chance_losses(tasks, combine_label_stats(stats.values()) if stats else None)
    if stats is None and cfg.loss_weights == "chance":
        raise ConfigError("--loss-weights", f"chance needs the clients' label statistics, which "
                          f"{type(pool).__name__} does not provide; give the weights with TASK=W,...")
    return chance, resolve_loss_weights(cfg.loss_weights, tasks, chance)


def _finished_jobs(ckpts: Sequence[RoundCheckpoint], cfg, pool, spec, tasks, train) -> dict[str, JobOutcome]:
    coord = Coordinator(pool, spec, tasks, train, max(1, min(cfg.clients_per_round, len(pool.client_ids) or 1)), cfg.seed)
    return {ck.job.name: coord.outcome_from_checkpoint(ck) for ck in ckpts if ck.job_done}


def _restore(store: CheckpointStore | None, coord: Coordinator, method: Method, pool: ClientPool,
             curve: CurveRecorder | None, hooks: RunHooks):
    """What ``store`` kept of ``method`` when it was the running one: ``(finished jobs by name,
    the running job's checkpoint or None, wall seconds already spent)``; the clients' own state is
    restored into ``pool``."""
    if store is None:
        return {}, None, 0.0
    ckpts, snapshot = store.running(method.name)
    if snapshot is not None:
        pool.restore_state(snapshot)
    done = {ck.job.name: coord.outcome_from_checkpoint(ck) for ck in ckpts if ck.job_done}
    resume = next((ck for ck in ckpts if not ck.job_done), None)
    if curve is not None:
        curve.jobs.update({ck.job.name: ck.job for ck in ckpts})
    if ckpts:
        where = f"job {resume.job.name!r} after round {resume.round + 1}" if resume else "its next job"
        log.info("%s: resuming with %d finished job(s), at %s", method.name, len(done), where)
        if hooks.on_method_resume:
            hooks.on_method_resume(method, sum(ck.round + 1 for ck in ckpts), None)
    return done, resume, sum(ck.wall_s for ck in ckpts)


def _run_with_retries(coord: Coordinator, method: Method, pool: ClientPool, store, curve, hooks: RunHooks,
                      retry: RetryPolicy | None) -> tuple[dict[str, JobOutcome], float]:
    """``coord.run_method`` from what the store holds; on a failed round, with a retry policy, again
    from the last committed checkpoint."""
    failures = 0
    while True:
        done, resume, prior_wall = _restore(store, coord, method, pool, curve, hooks)
        try:
            try:
                return coord.run_method(method, done=done, resume=resume), prior_wall
            except (ValueError, ArithmeticError) as e:
                if retry is None:
                    raise
                # an aggregation error (e.g. a float32 overflow) fails the round, never the server
                log.exception("aggregation error in %s", method.name)
                raise RoundFailed(method.name, -1, 0, coord.min_updates, f"aggregation error: {e}") from e
        except RoundFailed as e:
            failures += 1
            if retry is None or store is None or failures > retry.retries:
                raise
            retry.wait(failures, e)


def _round_end(coord: Coordinator, method: Method, pool: ClientPool, store, curve: CurveRecorder | None,
               hooks: RunHooks):
    """The coordinator's ``on_round_end``: the ``--eval-every`` point, then the store's commit (the
    point is committed with its round, so a resumed curve is the uninterrupted one), then the hook."""
    if store is None and curve is None and hooks.on_round_end is None:
        return None

    def hook(ck: RoundCheckpoint) -> None:
        if curve is not None:
            curve.record(coord, ck)
        if store is not None:
            store.save_round(method.name, ck, pool, curve=None if curve is None else curve.points)
        if hooks.on_round_end is not None:
            hooks.on_round_end(method, ck)

    return hook
