"""The coordinator: runs a method's plan of FL jobs over a client pool, round by round.

It knows nothing of transport, files or meters (DESIGN.md §3): a :class:`ClientPool` executes
assignments — :class:`InProcessClientPool` in simulation, a gRPC pool in deployment — and the same
coordinator code aggregates the updates. Per round of a job it samples K eligible clients, sends each
the global state and the round's learning rate, and FedAvg-aggregates the returned states slice by slice
(``common`` over all K, ``task:<t>`` over the clients that trained t, weighted by samples used) with the
streaming :class:`fmtl_edge.aggregation.Accumulator`, so the server holds O(P) memory.

Deployment hooks (used by ``fmtl-server``; the in-process behaviour is unchanged when they are unset):

- ``on_round_end(RoundCheckpoint)`` after every round: everything needed to resume the job at the
  next round boundary (global state, affinity per round, energy tally, history). Client sampling and
  client batch order are derived from ``(seed, job, round[, client])``, so no RNG state is carried.
- ``run_job(..., resume=checkpoint)`` / ``run_method(..., done=..., resume=...)`` continue a plan from
  its finished jobs and the last completed round of the running job.
- ``min_updates``: a round with fewer usable updates raises :class:`RoundFailed` (the pool's deadline
  and retry policy decides how many arrive; the in-process pool always returns all of them).
- An update whose ``state`` has an ``as_flat(layout)`` method (a memory-mapped upload) is aggregated
  from that flat float32 vector without a copy, which keeps the server at about three model sizes
  (global vector, accumulator, one mapped update) whatever K is.
- A pool with a ``global_vector_buffer(n)`` method supplies the global vector's storage (the gRPC
  pool: a file-backed mapping it pages out of RAM while the round's updates arrive and are added).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.affinity.measure import AffinityAverager
from fmtl_edge.aggregation import Accumulator
from fmtl_edge.client import derive_seed, execute
from fmtl_edge.data.base import FederatedDataset
from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig, poly_lr
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import ParameterLayout, select_state, state_to_numpy
from fmtl_edge.tasks import TaskSet


@dataclass(frozen=True)
class Job:
    """One FL training job of a plan.

    Attributes:
        name: unique within the method's plan (``all``, ``merge``, ``split-0``, ``task-age``).
        tasks: the tasks trained together (the model has these heads), in task-set order.
        rounds: R of this job (its learning-rate schedule restarts at round 0).
        init_from: name of a finished job whose final weights (backbone + these tasks' heads)
            initialise this job; None = fresh initialisation from the run seed.
        measure_affinity: clients run the lookahead measurement (MAS's all-in-one phase).
        fedprox_mu: FedProx μ for this job (0 = FedAvg).
    """

    name: str
    tasks: tuple[str, ...]
    rounds: int
    init_from: str | None = None
    measure_affinity: bool = False
    fedprox_mu: float = 0.0


class EnergyTally:
    """Sums device seconds and joules of client executions; keeps the meter's provenance.

    ``total_j`` is None as soon as one execution's energy is unknown (never reported as 0).
    """

    def __init__(self) -> None:
        self.device_s = 0.0
        self.total_j: float | None = 0.0
        self.executions = 0
        self.sources: set[str] = set()
        self.scopes: set[str] = set()
        self.estimated = False

    def add(self, device_s: float, energy: Mapping[str, Any]) -> None:
        self.device_s += float(device_s)
        self.executions += 1
        j = energy.get("total_j")
        self.total_j = None if (j is None or self.total_j is None) else self.total_j + float(j)
        self.sources.add(str(energy.get("source", "none")))
        self.scopes.add(str(energy.get("total_scope", "none")))
        self.estimated = self.estimated or bool(energy.get("estimated", False))

    def copy(self) -> "EnergyTally":
        return EnergyTally.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (checkpoints); :meth:`from_dict` reads it back."""
        return {"device_s": self.device_s, "total_j": self.total_j, "executions": self.executions,
                "sources": sorted(self.sources), "scopes": sorted(self.scopes), "estimated": self.estimated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EnergyTally":
        t = cls()
        t.device_s = float(d["device_s"])
        t.total_j = None if d.get("total_j") is None else float(d["total_j"])
        t.executions = int(d["executions"])
        t.sources = set(d.get("sources", ()))
        t.scopes = set(d.get("scopes", ()))
        t.estimated = bool(d.get("estimated", False))
        return t

    def merge(self, other: "EnergyTally") -> None:
        self.device_s += other.device_s
        self.executions += other.executions
        self.total_j = None if (other.total_j is None or self.total_j is None) else self.total_j + other.total_j
        self.sources |= other.sources
        self.scopes |= other.scopes
        self.estimated = self.estimated or other.estimated

    @property
    def source(self) -> str:
        return ", ".join(sorted(self.sources)) or "none"

    @property
    def scope(self) -> str:
        return ", ".join(sorted(self.scopes)) or "none"


@dataclass
class RoundRecord:
    """What one round of a job did (for progress, logs and results)."""

    job: str
    round: int
    clients: list[int]
    lr: float
    train_loss: dict[str, float]
    samples: int
    device_s: float
    energy_j: float | None
    wall_s: float
    stopped_early: int = 0
    #: client ids whose updates were aggregated, in arrival order (differs from ``clients`` when a
    #: remote pool replaced a sampled device that failed; the same in simulation)
    executed: list[int] = field(default_factory=list)
    #: structured refusals (``BudgetExceeded``/``DeviceBusy`` as dicts) of clients that did not train
    refused: list[dict] = field(default_factory=list)


@dataclass
class JobOutcome:
    """A finished job: final global state, averaged affinity, cost and history."""

    job: Job
    state: dict[str, np.ndarray]
    affinity: np.ndarray | None
    affinity_per_round: dict[int, np.ndarray]
    energy: EnergyTally
    history: list[RoundRecord] = field(default_factory=list)
    wall_s: float = 0.0


class RoundFailed(RuntimeError):
    """A round ended with fewer usable updates than ``min_updates`` (no aggregate was applied)."""

    def __init__(self, job: str, round_idx: int, got: int, needed: int, detail: str = ""):
        self.job, self.round, self.got, self.needed = job, round_idx, got, needed
        if got == 0:
            msg = f"job {job!r} round {round_idx}: no client returned a usable update"
        else:
            msg = f"job {job!r} round {round_idx}: {got} usable updates, at least {needed} needed"
        super().__init__(msg + (f" ({detail})" if detail else ""))


@dataclass
class RoundCheckpoint:
    """Everything needed to resume job ``job`` after its completed round ``round`` (0-based).

    ``state`` is the global model after that round (every entry of the model state, in the model's
    order). When handed to ``on_round_end`` its float entries are views into the coordinator's
    working vector: write or copy them before returning.
    """

    job: Job
    round: int
    state: dict[str, np.ndarray]
    affinity_per_round: dict[int, np.ndarray]
    energy: EnergyTally
    history: list[RoundRecord]
    wall_s: float

    @property
    def job_done(self) -> bool:
        return self.round + 1 >= self.job.rounds


class ClientPool(ABC):
    """Where client executions run. Implementations: :class:`InProcessClientPool`, the gRPC pool."""

    @property
    @abstractmethod
    def client_ids(self) -> list[int]:
        """All client ids of the pool."""

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        """Clients that hold data for every task of ``tasks`` (default: all)."""
        return list(self.client_ids)

    @abstractmethod
    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        """Run the assignments (one per client), yielding updates as they complete."""


def refusal(client_id: int, a: Assignment, error: dict[str, Any]) -> ClientUpdate:
    """The update of a client that refused or could not run an assignment (not aggregated)."""
    return ClientUpdate(client_id, a.job, a.round, tuple(a.tasks), {}, 0, {}, None, 0, 0.0,
                        {"total_j": 0.0, "source": "none", "total_scope": "none", "estimated": False},
                        error=error)


class InProcessClientPool(ClientPool):
    """Simulated clients in this process, run one after another (a device runs one task at a time).

    Args:
        dataset: the federated dataset (one :class:`ClientData` per client).
        spec: model architecture.
        meter: a :class:`fmtl_edge.runtime.Meter` wrapping every execution (None: time only).
        lease_factory: ``client_id -> context manager`` holding the device during an execution
            (e.g. ``lambda cid: DeviceLease("local")``); None runs without a lease.
    """

    def __init__(self, dataset: FederatedDataset, spec: ModelSpec, meter=None,
                 lease_factory: Callable[[int], Any] | None = None,
                 memory_budget_bytes: int | None = None):
        self.dataset = dataset
        self.spec = spec
        self.meter = meter
        self.lease_factory = lease_factory
        self.memory_budget_bytes = memory_budget_bytes
        self._by_id = {c.client_id: c for c in dataset.clients}

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._by_id)

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        from fmtl_edge.runtime import BudgetExceeded, DeviceBusy

        for cid, a in work:
            lease = self.lease_factory(cid) if self.lease_factory else None
            try:
                yield execute(self._by_id[cid], self.spec, self.dataset.tasks, a, self.meter, lease,
                              self.memory_budget_bytes)
            except (BudgetExceeded, DeviceBusy) as e:
                # A refusal is a structured answer, not a crash: the round goes on without this client.
                yield refusal(cid, a, e.to_dict())


class Coordinator:
    """Runs jobs and whole methods over a :class:`ClientPool`.

    Args:
        pool: where clients execute.
        spec: model architecture.
        tasks: the dataset's task set.
        train: local-training hyper-parameters.
        clients_per_round: K, clients sampled (without replacement) per round.
        seed: run seed; client sampling of job ``j`` round ``r`` uses ``derive_seed(seed, j, r)``.
        on_round: optional callback ``(RoundRecord) -> None`` (progress bars, logs).
        affinity_rounds: which rounds of an affinity-measuring job are averaged (None: all).
        time_budget_s, energy_budget_j: per-round budgets sent with every assignment.
        on_round_end: optional ``(RoundCheckpoint) -> None`` called after every round (persistence).
        min_updates: fewest usable updates a round may aggregate; fewer raise :class:`RoundFailed`.

    Raises:
        ValueError: K < 1, min_updates outside 1..K, or a job whose tasks have fewer eligible
            clients than K.
    """

    def __init__(self, pool: ClientPool, spec: ModelSpec, tasks: TaskSet, train: TrainConfig,
                 clients_per_round: int, seed: int = 0,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 affinity_rounds: Sequence[int] | None = None,
                 time_budget_s: float | None = None, energy_budget_j: float | None = None,
                 on_round_end: Callable[[RoundCheckpoint], None] | None = None, min_updates: int = 1):
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not 1 <= min_updates <= clients_per_round:
            raise ValueError(f"min_updates must be in 1..{clients_per_round} (K), got {min_updates}")
        self.pool = pool
        self.spec = spec
        self.tasks = tasks
        self.train = train
        self.k = clients_per_round
        self.seed = seed
        self.on_round = on_round
        self.affinity_rounds = affinity_rounds
        self.time_budget_s = time_budget_s
        self.energy_budget_j = energy_budget_j
        self.on_round_end = on_round_end
        self.min_updates = min_updates

    # -- one job ---------------------------------------------------------------------------------
    def initial_state(self, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """Fresh weights for a model with ``tasks``' heads; the backbone init is the same for every
        job and method of a run (seeded by the run seed), so methods start from the same θ_s."""
        model = MultiTaskModel(self.spec, self.tasks.subset(tasks), seed=derive_seed(self.seed, "init"))
        return state_to_numpy(model.state_dict())

    def sample_clients(self, job: Job, round_idx: int) -> list[int]:
        eligible = self.pool.eligible(job.tasks)
        if len(eligible) < self.k:
            raise ValueError(
                f"job {job.name!r}: {len(eligible)} clients hold tasks {list(job.tasks)} but "
                f"clients_per_round is {self.k}; lower --clients-per-round"
            )
        rng = np.random.default_rng(derive_seed(self.seed, job.name, round_idx))
        return sorted(int(c) for c in rng.choice(eligible, size=self.k, replace=False))

    def run_job(self, job: Job, init_state: Mapping[str, np.ndarray] | None = None,
                resume: RoundCheckpoint | None = None) -> JobOutcome:
        """Train ``job`` for ``job.rounds`` rounds from ``init_state`` (fresh init if None), or
        continue it after the completed round of ``resume`` (``init_state`` is then ignored)."""
        t_job = time.perf_counter()
        start = 0
        if resume is not None:
            if resume.job.name != job.name:
                raise ValueError(f"checkpoint of job {resume.job.name!r} cannot resume job {job.name!r}")
            state = dict(resume.state)
            start = resume.round + 1
            t_job -= resume.wall_s
        else:
            state = dict(init_state) if init_state is not None else self.initial_state(job.tasks)
        layout = ParameterLayout.from_state(state)
        # A pool may supply the global vector's buffer (the gRPC pool: a file-backed mapping whose pages
        # it drops from RAM once the round's model file is written); the in-process pool does not.
        buffer = getattr(self.pool, "global_vector_buffer", None)
        global_vec = layout.flatten(state, out=None if buffer is None else buffer(layout.n_params))
        # From here the float entries of ``state`` are views into ``global_vec`` (one copy of the model).
        state = {**state, **layout.unflatten(global_vec)}
        train = self.train if job.fedprox_mu == self.train.fedprox_mu else _replace(self.train, fedprox_mu=job.fedprox_mu)
        averager = AffinityAverager(len(job.tasks), self.affinity_rounds)
        tally = EnergyTally()
        history: list[RoundRecord] = []
        if resume is not None:
            averager.per_round.update({int(r): np.asarray(m, dtype=np.float64) for r, m in resume.affinity_per_round.items()})
            tally = resume.energy.copy()
            history = list(resume.history)
        for r in range(start, job.rounds):
            t_round = time.perf_counter()
            clients = self.sample_clients(job, r)
            lr = poly_lr(train.lr, r, job.rounds)
            round_state = state
            work = [
                (cid, Assignment(job=job.name, round=r, tasks=tuple(job.tasks), state=round_state, lr=lr,
                                 config=train, measure_affinity=job.measure_affinity, seed=self.seed,
                                 time_budget_s=self.time_budget_s, energy_budget_j=self.energy_budget_j))
                for cid in clients
            ]
            acc = Accumulator(layout.n_params, layout.table)
            round_tally = EnergyTally()
            loss_num = {t: 0.0 for t in job.tasks}
            samples = 0
            matrices = []
            stopped = 0
            executed: list[int] = []
            scratch: list[np.ndarray] = []
            refused: list[dict] = []
            for upd in self.pool.execute_many(work):
                if upd.error is not None:
                    refused.append({"client_id": int(upd.client_id), **upd.error})
                    continue
                executed.append(int(upd.client_id))
                if upd.n_samples <= 0:
                    round_tally.add(upd.device_s, upd.energy)
                    continue
                acc.add(_update_vector(layout, upd.state, scratch), float(upd.n_samples), layout.contributes(upd.tasks))
                round_tally.add(upd.device_s, upd.energy)
                for t, v in upd.train_loss.items():
                    loss_num[t] += v * upd.n_samples
                samples += upd.n_samples
                matrices.append(upd.affinity)
                stopped += upd.stopped_by is not None
            upd = None  # release the last update (a mapped upload) before the result is formed
            scratch.clear()
            if acc.n_added < self.min_updates:
                raise RoundFailed(job.name, r, acc.n_added, self.min_updates,
                                  "; ".join(sorted({e.get("message", "") for e in refused} - {""})))
            # In place: the round's updates are all in, and the slices nobody contributed to keep their
            # values, so the server holds the global vector, the accumulator and one update (3·P).
            global_vec = acc.result(global_vec)
            acc = None
            state = {**state, **layout.unflatten(global_vec)}
            if job.measure_affinity:
                averager.add_round(r, matrices)
            tally.merge(round_tally)
            rec = RoundRecord(job.name, r, clients, lr, {t: v / max(samples, 1) for t, v in loss_num.items()},
                              samples, round_tally.device_s, round_tally.total_j, time.perf_counter() - t_round,
                              stopped, executed, refused)
            history.append(rec)
            if self.on_round:
                self.on_round(rec)
            if self.on_round_end:
                self.on_round_end(RoundCheckpoint(job, r, state, dict(averager.per_round), tally.copy(),
                                                  list(history), time.perf_counter() - t_job))
        final = {**state, **{k: v.copy() for k, v in layout.unflatten(global_vec).items()}}
        return JobOutcome(job, final, averager.result(), dict(averager.per_round), tally, history,
                          time.perf_counter() - t_job)

    def outcome_from_checkpoint(self, ckpt: RoundCheckpoint) -> JobOutcome:
        """The :class:`JobOutcome` of a job whose last round is ``ckpt`` (a finished job restored
        from persistence): the same affinity average as :meth:`run_job` would have returned."""
        if not ckpt.job_done:
            raise ValueError(f"job {ckpt.job.name!r} checkpoint is at round {ckpt.round}, not its last")
        averager = AffinityAverager(len(ckpt.job.tasks), self.affinity_rounds)
        averager.per_round.update({int(r): np.asarray(m, dtype=np.float64) for r, m in ckpt.affinity_per_round.items()})
        return JobOutcome(ckpt.job, dict(ckpt.state), averager.result(), dict(averager.per_round), ckpt.energy.copy(),
                          list(ckpt.history), ckpt.wall_s)

    # -- a whole method --------------------------------------------------------------------------
    def run_method(self, method, done: Mapping[str, JobOutcome] | None = None,
                   resume: RoundCheckpoint | None = None) -> dict[str, JobOutcome]:
        """Run ``method``'s plan to the end: ask it for the next jobs until it has none.

        Args:
            done: jobs already finished (a resumed plan); the method decides what follows from them.
            resume: checkpoint of the job that was running; it must be the plan's next job.

        Returns:
            job name → :class:`JobOutcome`, in execution order.
        """
        done = dict(done or {})
        while True:
            pending = [j for j in method.next_jobs(done) if j.name not in done]
            if not pending:
                return done
            job = pending[0]
            if resume is not None:
                if resume.job.name != job.name:
                    raise RuntimeError(
                        f"the plan's next job is {job.name!r} but the checkpoint is of job {resume.job.name!r}"
                    )
                done[job.name] = self.run_job(job, resume=resume)
                resume = None
                continue
            init = None
            if job.init_from is not None:
                if job.init_from not in done:
                    raise RuntimeError(f"job {job.name!r} starts from {job.init_from!r}, which has not run")
                init = select_state(done[job.init_from].state, job.tasks)
            done[job.name] = self.run_job(job, init)


def _update_vector(layout: ParameterLayout, state: Mapping[str, Any], scratch: list[np.ndarray]) -> np.ndarray:
    """The update as a flat float32 vector in ``layout`` order: the state's own flat view when it
    offers one (``as_flat``), else a copy into a scratch vector allocated once per round."""
    as_flat = getattr(state, "as_flat", None)
    if as_flat is not None:
        vec = as_flat(layout)
        if vec is not None:
            return vec
    if not scratch:
        scratch.append(np.empty(layout.n_params, dtype=np.float32))
    return layout.flatten(state, out=scratch[0])


def _replace(cfg: TrainConfig, **kw) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **kw)
