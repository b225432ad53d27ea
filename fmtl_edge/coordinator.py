"""The coordinator: runs a method's plan of FL jobs over a client pool, round by round.

It knows nothing of transport, files or meters (DESIGN.md §3): a :class:`ClientPool` executes
assignments — :class:`InProcessClientPool` in simulation, a gRPC pool in deployment — and the same
coordinator code aggregates the updates. Per round of a job it samples K eligible clients, sends each
the global state and the round's learning rate, and FedAvg-aggregates the returned states slice by slice
(``common`` over all K, ``task:<t>`` over the clients that trained t, weighted by samples used) with the
streaming :class:`fmtl_edge.aggregation.Accumulator`, so the server holds O(P) memory.
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
                 lease_factory: Callable[[int], Any] | None = None):
        self.dataset = dataset
        self.spec = spec
        self.meter = meter
        self.lease_factory = lease_factory
        self._by_id = {c.client_id: c for c in dataset.clients}

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._by_id)

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        for cid, a in work:
            lease = self.lease_factory(cid) if self.lease_factory else None
            yield execute(self._by_id[cid], self.spec, self.dataset.tasks, a, self.meter, lease)


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

    Raises:
        ValueError: K < 1, or a job whose tasks have fewer eligible clients than K.
    """

    def __init__(self, pool: ClientPool, spec: ModelSpec, tasks: TaskSet, train: TrainConfig,
                 clients_per_round: int, seed: int = 0,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 affinity_rounds: Sequence[int] | None = None,
                 time_budget_s: float | None = None, energy_budget_j: float | None = None):
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
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

    def run_job(self, job: Job, init_state: Mapping[str, np.ndarray] | None = None) -> JobOutcome:
        """Train ``job`` for ``job.rounds`` rounds from ``init_state`` (fresh init if None)."""
        t_job = time.perf_counter()
        state = dict(init_state) if init_state is not None else self.initial_state(job.tasks)
        layout = ParameterLayout.from_state(state)
        global_vec = layout.flatten(state)
        train = self.train if job.fedprox_mu == self.train.fedprox_mu else _replace(self.train, fedprox_mu=job.fedprox_mu)
        averager = AffinityAverager(len(job.tasks), self.affinity_rounds)
        tally = EnergyTally()
        history: list[RoundRecord] = []
        for r in range(job.rounds):
            t_round = time.perf_counter()
            clients = self.sample_clients(job, r)
            lr = poly_lr(train.lr, r, job.rounds)
            round_state = {**state, **layout.unflatten(global_vec)}
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
            scratch = np.empty(layout.n_params, dtype=np.float32)
            for upd in self.pool.execute_many(work):
                if upd.n_samples <= 0:
                    round_tally.add(upd.device_s, upd.energy)
                    continue
                acc.add(layout.flatten(upd.state, out=scratch), float(upd.n_samples), layout.contributes(upd.tasks))
                round_tally.add(upd.device_s, upd.energy)
                for t, v in upd.train_loss.items():
                    loss_num[t] += v * upd.n_samples
                samples += upd.n_samples
                matrices.append(upd.affinity)
                stopped += upd.stopped_by is not None
            if acc.n_added == 0:
                raise RuntimeError(f"job {job.name!r} round {r}: no client returned a usable update")
            global_vec = acc.result(global_vec.copy())
            if job.measure_affinity:
                averager.add_round(r, matrices)
            tally.merge(round_tally)
            rec = RoundRecord(job.name, r, clients, lr, {t: v / max(samples, 1) for t, v in loss_num.items()},
                              samples, round_tally.device_s, round_tally.total_j, time.perf_counter() - t_round,
                              stopped)
            history.append(rec)
            if self.on_round:
                self.on_round(rec)
        final = {**state, **{k: v.copy() for k, v in layout.unflatten(global_vec).items()}}
        return JobOutcome(job, final, averager.result(), dict(averager.per_round), tally, history,
                          time.perf_counter() - t_job)

    # -- a whole method --------------------------------------------------------------------------
    def run_method(self, method) -> dict[str, JobOutcome]:
        """Run ``method``'s plan to the end: ask it for the next jobs until it has none.

        Returns:
            job name → :class:`JobOutcome`, in execution order.
        """
        done: dict[str, JobOutcome] = {}
        while True:
            pending = [j for j in method.next_jobs(done) if j.name not in done]
            if not pending:
                return done
            job = pending[0]
            init = None
            if job.init_from is not None:
                if job.init_from not in done:
                    raise RuntimeError(f"job {job.name!r} starts from {job.init_from!r}, which has not run")
                init = select_state(done[job.init_from].state, job.tasks)
            done[job.name] = self.run_job(job, init)


def _replace(cfg: TrainConfig, **kw) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **kw)
