"""The coordinator: runs a method's plan of FL jobs over a client pool, round by round.

It knows nothing of transport, files or meters (DESIGN.md §3): a :class:`ClientPool` executes
assignments — :class:`InProcessClientPool` in simulation, a gRPC pool in deployment — and the same
coordinator code aggregates the updates. Per round of a job the method's strategy
(:mod:`fmtl_edge.strategy`) chooses the clients and what each runs; the coordinator sends each the
global state (the personal and frozen tensor names, the client-state key, the round's learning rate)
and combines the returned states slice by slice with the strategy's aggregation — by default FedAvg
(``common`` over all, ``task:<t>`` over the clients that trained t, weighted by samples used) with the
streaming :class:`fmtl_edge.aggregation.Accumulator`, so the server holds O(P) memory. Personal and
frozen slices are never uploaded nor aggregated.

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
from fmtl_edge.client import evaluate_assignment, execute
from fmtl_edge.client_state import MemoryStateStore
from fmtl_edge.data.base import FederatedDataset
from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig, poly_lr
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import FROZEN, PERSONAL, ParameterLayout, select_state, state_to_numpy
from fmtl_edge.strategy import ClientTask, FedAvgStrategy, RoundContext, Strategy
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
        procedure: the client procedure every client runs (:mod:`fmtl_edge.procedures`).
        method_config: that procedure's settings (JSON-ready values).
        sampling: ``uniform`` | ``per-group`` | ``all`` (see :class:`~fmtl_edge.strategy.FedAvgStrategy`).
        personal, frozen, common: ``fnmatch`` patterns over state names that override the default
            scopes (:meth:`~fmtl_edge.partition.ParameterLayout.from_state`): personal layers stay
            on the clients, frozen (pre-trained) layers are never trained nor sent back, common
            layers are averaged over every client.
        lr_schedule: ``(offset, total)``: round r of this job uses the learning rate of round
            ``offset + r`` of a ``total``-round poly schedule, so a job continuing another
            (``init_from``) can continue its schedule (mas-auto's one-round merge jobs); None:
            ``(0, rounds)``, the schedule restarts with the job.

    Raises:
        ValueError: ``lr_schedule`` with offset < 0 or offset + rounds > total.
    """

    name: str
    tasks: tuple[str, ...]
    rounds: int
    init_from: str | None = None
    measure_affinity: bool = False
    procedure: str = "sgd"
    method_config: Mapping[str, Any] = field(default_factory=dict)
    sampling: str = "uniform"
    personal: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    common: tuple[str, ...] = ()
    lr_schedule: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule is not None:
            off, total = (int(v) for v in self.lr_schedule)
            if off < 0 or off + self.rounds > total:
                raise ValueError(f"job {self.name!r}: lr_schedule {self.lr_schedule} must satisfy 0 <= offset and "
                                 f"offset + rounds ({self.rounds}) <= total")
            object.__setattr__(self, "lr_schedule", (off, total))

    def lr(self, base_lr: float, round_idx: int) -> float:
        """The learning rate of round ``round_idx`` of this job (:func:`~fmtl_edge.messages.poly_lr`)."""
        off, total = self.lr_schedule or (0, self.rounds)
        return poly_lr(base_lr, off + round_idx, total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (checkpoints); :meth:`from_dict` reads it back."""
        return {"name": self.name, "tasks": list(self.tasks), "rounds": self.rounds, "init_from": self.init_from,
                "measure_affinity": self.measure_affinity, "procedure": self.procedure,
                "method_config": dict(self.method_config), "sampling": self.sampling, "personal": list(self.personal),
                "frozen": list(self.frozen), "common": list(self.common),
                "lr_schedule": None if self.lr_schedule is None else list(self.lr_schedule)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Job":
        sched = d.get("lr_schedule")
        return cls(d["name"], tuple(d["tasks"]), int(d["rounds"]), d.get("init_from"), bool(d.get("measure_affinity")),
                   str(d.get("procedure", "sgd")), dict(d.get("method_config") or {}), str(d.get("sampling", "uniform")),
                   tuple(d.get("personal", ())), tuple(d.get("frozen", ())), tuple(d.get("common", ())),
                   None if sched is None else (int(sched[0]), int(sched[1])))


class EnergyTally:
    """Sums device seconds and joules of client executions; keeps the meter's provenance.

    ``total_j`` is None as soon as one execution's energy is unknown (never reported as 0).
    ``critical_path_s`` is the wall-clock lower bound of the rounds tallied: a parallel round adds
    its slowest client's device seconds, a sequential round (a ring) every visit's (set per round
    by the coordinator; :meth:`add` does not touch it). ``sample_passes`` (lookahead included) and
    ``lookahead_passes`` sum the updates' machine-load-independent training cost. ``cpu_s`` sums
    the executions' process CPU seconds (None as soon as one did not report it).
    """

    def __init__(self) -> None:
        self.device_s = 0.0
        self.cpu_s: float | None = 0.0
        self.critical_path_s = 0.0
        self.total_j: float | None = 0.0
        self.executions = 0
        self.sources: set[str] = set()
        self.scopes: set[str] = set()
        self.estimated = False
        self.sample_passes = 0
        self.lookahead_passes = 0

    def add(self, device_s: float, energy: Mapping[str, Any], sample_passes: int = 0,
            lookahead_passes: int = 0, cpu_s: float | None = None) -> None:
        self.device_s += float(device_s)
        self.cpu_s = None if (cpu_s is None or self.cpu_s is None) else self.cpu_s + float(cpu_s)
        self.executions += 1
        self.sample_passes += int(sample_passes)
        self.lookahead_passes += int(lookahead_passes)
        j = energy.get("total_j")
        self.total_j = None if (j is None or self.total_j is None) else self.total_j + float(j)
        self.sources.add(str(energy.get("source", "none")))
        self.scopes.add(str(energy.get("total_scope", "none")))
        self.estimated = self.estimated or bool(energy.get("estimated", False))

    def copy(self) -> "EnergyTally":
        return EnergyTally.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (checkpoints); :meth:`from_dict` reads it back."""
        return {"device_s": self.device_s, "cpu_s": self.cpu_s, "critical_path_s": self.critical_path_s,
                "total_j": self.total_j,
                "executions": self.executions,
                "sources": sorted(self.sources), "scopes": sorted(self.scopes), "estimated": self.estimated,
                "sample_passes": self.sample_passes, "lookahead_passes": self.lookahead_passes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EnergyTally":
        t = cls()
        t.device_s = float(d["device_s"])
        t.cpu_s = None if d.get("cpu_s") is None else float(d["cpu_s"])
        t.critical_path_s = float(d.get("critical_path_s", 0.0))
        t.total_j = None if d.get("total_j") is None else float(d["total_j"])
        t.executions = int(d["executions"])
        t.sources = set(d.get("sources", ()))
        t.scopes = set(d.get("scopes", ()))
        t.estimated = bool(d.get("estimated", False))
        t.sample_passes = int(d.get("sample_passes", 0))
        t.lookahead_passes = int(d.get("lookahead_passes", 0))
        return t

    def merge(self, other: "EnergyTally") -> None:
        self.device_s += other.device_s
        self.cpu_s = None if (other.cpu_s is None or self.cpu_s is None) else self.cpu_s + other.cpu_s
        self.critical_path_s += other.critical_path_s
        self.executions += other.executions
        self.sample_passes += other.sample_passes
        self.lookahead_passes += other.lookahead_passes
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
    #: the round's critical path: its slowest client's device seconds (parallel), or the sum of
    #: every visit's (sequential: a ring)
    critical_path_s: float = 0.0
    #: the round's training sample-passes (lookahead included) and the lookahead's share
    sample_passes: int = 0
    lookahead_passes: int = 0
    #: the round's process CPU seconds of its executions (None: a client did not report them)
    cpu_s: float | None = None


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
        """Clients that hold labels for at least one task of ``tasks``, sorted (default: all)."""
        return list(self.client_ids)

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        """Run evaluation assignments; ``client → job → task → {"loss_sum", "metric_sum", "n"}``
        over that client's test split (clients that did not answer are absent)."""
        raise NotImplementedError

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

    Each client keeps its own state (:class:`~fmtl_edge.client_state.MemoryStateStore`: personal
    layers, Ditto's personal model...) across rounds; :meth:`state_snapshot` and
    :meth:`restore_state` carry it through a resumable run.

    Args:
        dataset: the federated dataset (one :class:`ClientData` per client).
        spec: model architecture.
        meter: a :class:`fmtl_edge.runtime.Meter` wrapping every execution (None: time only).
        lease_factory: ``client_id -> context manager`` holding the device during an execution
            (e.g. ``lambda cid: DeviceLease("local")``); None runs without a lease.
        memory_budget_bytes: refuse an execution whose estimated memory need is over this.
        faults: optional ``(client_id, Assignment) -> str | None``: a fault injector; a returned
            reason makes that execution fail (a refusal) as a lost device would.
        threads: the executions' :class:`~fmtl_edge.runtime.threads.ThreadPolicy` (None: torch's
            threads as they are).
    """

    def __init__(self, dataset: FederatedDataset, spec: ModelSpec, meter=None,
                 lease_factory: Callable[[int], Any] | None = None,
                 memory_budget_bytes: int | None = None, faults: Callable[[int, Assignment], str | None] | None = None,
                 threads=None):
        self.dataset = dataset
        self.spec = spec
        self.meter = meter
        self.lease_factory = lease_factory
        self.memory_budget_bytes = memory_budget_bytes
        self.faults = faults
        self.threads = threads
        self._by_id = {c.client_id: c for c in dataset.clients}
        self._states: dict[int, MemoryStateStore] = {}

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._by_id)

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        return [c for c in self.client_ids if any(t in self._by_id[c].y_train for t in tasks)]

    def state_store(self, client_id: int) -> MemoryStateStore:
        """Client ``client_id``'s own state (created empty on first use)."""
        return self._states.setdefault(int(client_id), MemoryStateStore())

    def state_snapshot(self) -> dict[int, Any]:
        """Every client's state (copies), for a resumable run."""
        return {c: s.snapshot() for c, s in self._states.items()}

    def restore_state(self, snap: Mapping[int, Any]) -> None:
        """Replace every client's state by a :meth:`state_snapshot`."""
        self._states = {int(c): MemoryStateStore.restore(v) for c, v in snap.items()}

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        from fmtl_edge.runtime import BudgetExceeded, DeviceBusy

        for cid, a in work:
            reason = self.faults(cid, a) if self.faults is not None else None
            if reason:
                yield refusal(cid, a, {"kind": "fault", "message": reason})
                continue
            lease = self.lease_factory(cid) if self.lease_factory else None
            try:
                yield execute(self._by_id[cid], self.spec, self.dataset.tasks, a, self.meter, lease,
                              self.memory_budget_bytes, self.state_store(cid), self.threads)
            except (BudgetExceeded, DeviceBusy) as e:
                # A refusal is a structured answer, not a crash: the round goes on without this client.
                yield refusal(cid, a, e.to_dict())

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        out: dict[int, dict[str, dict]] = {}
        for cid, a in requests:
            sums = evaluate_assignment(self._by_id[cid], self.spec, self.dataset.tasks, a, self.state_store(cid))
            out.setdefault(int(cid), {})[a.job] = sums
        return out


class _RoundTotals:
    """What the coordinator tallies of one round's updates (losses, samples, cost, affinity, refusals)."""

    def __init__(self, tasks: Sequence[str]):
        self.tally = EnergyTally()
        self.loss_num = {t: 0.0 for t in tasks}
        self.loss_den = {t: 0 for t in tasks}
        self.samples = 0
        self.matrices: list[np.ndarray | None] = []
        self.stopped = 0
        self.executed: list[int] = []
        self.refused: list[dict] = []
        self.device_times: list[float] = []

    def refuse(self, upd: ClientUpdate) -> None:
        self.refused.append({"client_id": int(upd.client_id), **upd.error})

    def count(self, upd: ClientUpdate) -> bool:
        """Tally an update that trained; False when it used no sample (nothing to aggregate)."""
        self.executed.append(int(upd.client_id))
        self.device_times.append(float(upd.device_s))
        self.tally.add(upd.device_s, upd.energy, upd.sample_passes, upd.lookahead_passes, upd.cpu_s)
        if upd.n_samples <= 0:
            return False
        for t, v in upd.train_loss.items():
            if t in self.loss_num:
                self.loss_num[t] += v * upd.n_samples
                self.loss_den[t] += upd.n_samples
        self.samples += upd.n_samples
        self.matrices.append(upd.affinity)
        self.stopped += upd.stopped_by is not None
        return True

    def train_loss(self) -> dict[str, float]:
        return {t: v / max(self.loss_den[t], 1) for t, v in self.loss_num.items() if self.loss_den[t] or not self.samples}

    def critical_path(self, sequential: bool) -> float:
        """Sequential: every execution's seconds one after another; parallel: the slowest one's."""
        return float(sum(self.device_times)) if sequential else max(self.device_times, default=0.0)

    def detail(self) -> str:
        return "; ".join(sorted({e.get("message", "") for e in self.refused} - {""}))


class Coordinator:
    """Runs jobs and whole methods over a :class:`ClientPool`; a method's :class:`~fmtl_edge.strategy.Strategy`
    decides who trains in a round and how the replies combine, the coordinator does the rest.

    Args:
        pool: where clients execute.
        spec: model architecture.
        tasks: the dataset's task set.
        train: local-training hyper-parameters.
        clients_per_round: K, clients sampled (without replacement) per round (per task group
            with ``per-group`` sampling).
        seed: run seed; client sampling of job ``j`` round ``r`` uses ``derive_seed(seed, j, r)``.
        on_round: optional callback ``(RoundRecord) -> None`` (progress bars, logs).
        affinity_rounds: which rounds of an affinity-measuring job are averaged (None: all).
        time_budget_s, energy_budget_j: per-round budgets sent with every assignment.
        on_round_end: optional ``(RoundCheckpoint) -> None`` called after every round (persistence).
        min_updates: fewest usable updates a round may aggregate; fewer raise :class:`RoundFailed`.

    Raises:
        ValueError: K < 1 or min_updates outside 1..K.
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
        #: prefix of the client-state keys (the method's name while :meth:`run_method` runs)
        self.namespace = ""

    # -- one job ---------------------------------------------------------------------------------
    def initial_state(self, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """Fresh weights for a model with ``tasks``' heads; the backbone init is the same for every
        job and method of a run (seeded by the run seed), so methods start from the same θ_s."""
        from fmtl_edge.client import derive_seed

        model = MultiTaskModel(self.spec, self.tasks.subset(tasks), seed=derive_seed(self.seed, "init"))
        return state_to_numpy(model.state_dict())

    def state_key(self, job: Job) -> str:
        """The client-state key of ``job``: ``<method>/<job>``."""
        return f"{self.namespace}/{job.name}" if self.namespace else job.name

    def layout(self, job: Job, state: Mapping[str, np.ndarray]) -> ParameterLayout:
        """The slice layout of ``job``'s model with the job's scope overrides.

        Raises:
            ValueError: a tensor matches two kinds of pattern.
        """
        return ParameterLayout.from_state(state, frozen=job.frozen, personal=job.personal, common=job.common)

    def assignment(self, job: Job, r: int, task: ClientTask, state: Mapping[str, np.ndarray], lr: float,
                   layout: ParameterLayout) -> Assignment:
        """The assignment of one client in round ``r`` (what the strategy chose + the job's settings)."""
        return Assignment(job=job.name, round=r, tasks=tuple(job.tasks), state=state, lr=lr, config=self.train,
                          measure_affinity=job.measure_affinity, seed=self.seed, time_budget_s=self.time_budget_s,
                          energy_budget_j=self.energy_budget_j, procedure=task.procedure,
                          method_config=dict(task.method_config), state_key=self.state_key(job),
                          personal=layout.names_in(PERSONAL), frozen=layout.names_in(FROZEN))

    def run_job(self, job: Job, init_state: Mapping[str, np.ndarray] | None = None,
                resume: RoundCheckpoint | None = None, strategy: Strategy | None = None) -> JobOutcome:
        """Train ``job`` for ``job.rounds`` rounds from ``init_state`` (fresh init if None), or
        continue it after the completed round of ``resume`` (``init_state`` is then ignored).

        Args:
            strategy: who trains and how updates combine (default: FedAvg over K uniformly sampled
                clients running ``job.procedure``).

        Raises:
            RoundFailed: a round ended with fewer than ``min_updates`` usable updates, or its
                aggregate was not finite (nothing of that round is applied).
            ValueError: the pool cannot serve the job's sampling.
        """
        strategy = strategy or FedAvgStrategy(job.procedure, job.method_config, job.sampling)
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
        layout = self.layout(job, state)
        # A pool may supply the global vector's buffer (the gRPC pool: a file-backed mapping whose pages
        # it drops from RAM once the round's model file is written); the in-process pool does not.
        buffer = getattr(self.pool, "global_vector_buffer", None)
        global_vec = layout.flatten(state, out=None if buffer is None else buffer(layout.n_params))
        # From here the float entries of ``state`` are views into ``global_vec`` (one copy of the model).
        state = {**state, **layout.unflatten(global_vec)}
        averager = AffinityAverager(len(job.tasks), self.affinity_rounds)
        tally = EnergyTally()
        history: list[RoundRecord] = []
        if resume is not None:
            averager.per_round.update({int(r): np.asarray(m, dtype=np.float64) for r, m in resume.affinity_per_round.items()})
            tally = resume.energy.copy()
            history = list(resume.history)
        for r in range(start, job.rounds):
            t_round = time.perf_counter()
            plan = strategy.configure_train(RoundContext(job, r, self.seed, self.k, self.pool.eligible))
            lr = job.lr(self.train.lr, r)
            totals = _RoundTotals(job.tasks)
            sequential = strategy.is_sequential_round(r)
            if sequential:
                global_vec = self._sequential_round(job, r, plan, lr, layout, state, global_vec, strategy, totals)
            else:
                global_vec = self._parallel_round(job, r, plan, lr, layout, state, global_vec, strategy, totals)
            state = {**state, **layout.unflatten(global_vec)}
            if job.measure_affinity:
                averager.add_round(r, totals.matrices)
            totals.tally.critical_path_s = totals.critical_path(sequential)
            tally.merge(totals.tally)
            rec = RoundRecord(job.name, r, [c for c, _ in plan], lr, totals.train_loss(), totals.samples,
                              totals.tally.device_s, totals.tally.total_j, time.perf_counter() - t_round,
                              totals.stopped, totals.executed, totals.refused, totals.tally.critical_path_s,
                              totals.tally.sample_passes, totals.tally.lookahead_passes, totals.tally.cpu_s)
            history.append(rec)
            if self.on_round:
                self.on_round(rec)
            if self.on_round_end:
                self.on_round_end(RoundCheckpoint(job, r, state, dict(averager.per_round), tally.copy(),
                                                  list(history), time.perf_counter() - t_job))
        final = {**state, **{k: v.copy() for k, v in layout.unflatten(global_vec).items()}}
        return JobOutcome(job, final, averager.result(), dict(averager.per_round), tally, history,
                          time.perf_counter() - t_job)

    def _parallel_round(self, job, r, plan, lr, layout, state, global_vec, strategy, totals) -> np.ndarray:
        """Every client of ``plan`` starts from the round's global model; the strategy's aggregation
        combines the updates in place (the server holds the global vector, the accumulator and one
        update: 3·P for FedAvg)."""
        work = [(cid, self.assignment(job, r, task, state, lr, layout)) for cid, task in plan]
        agg = strategy.round_aggregation(r, layout.n_params, layout.table)
        scratch: list[np.ndarray] = []
        for upd in self.pool.execute_many(work):
            if upd.error is not None:
                totals.refuse(upd)
                continue
            if not totals.count(upd):
                continue
            agg.add(_update_vector(layout, upd.state, scratch), float(upd.n_samples), layout.contributes(upd.tasks))
        upd = None  # release the last update (a mapped upload) before the result is formed
        scratch.clear()
        if agg.n_added < self.min_updates:
            raise RoundFailed(job.name, r, agg.n_added, self.min_updates, totals.detail())
        try:
            return agg.result(global_vec)
        except ValueError as e:  # not finite: nothing is applied, the round fails (never the server)
            raise RoundFailed(job.name, r, 0, self.min_updates, f"aggregation failed: {e}") from None

    def _sequential_round(self, job, r, plan, lr, layout, state, global_vec, strategy, totals) -> np.ndarray:
        """The clients of ``plan`` one after another (a ring): each starts from the model the last
        successful one left; a client that fails or refuses is skipped with the last good model."""
        stepped = 0
        scratch: list[np.ndarray] = []
        # a pool that can hand a failed slot to another device (the gRPC pool) must not here: the
        # node is the client, and the ring skips it instead
        in_turn = getattr(self.pool, "execute_in_turn", None)
        for cid, task in plan:
            a = self.assignment(job, r, task, {**state, **layout.unflatten(global_vec)}, lr, layout)
            for upd in (in_turn(cid, a) if in_turn is not None else self.pool.execute_many([(cid, a)])):
                if upd.error is not None:
                    totals.refuse(upd)
                    continue
                if not totals.count(upd):
                    continue
                agg = strategy.round_aggregation(r, layout.n_params, layout.table)
                agg.add(_update_vector(layout, upd.state, scratch), float(upd.n_samples), layout.contributes(upd.tasks))
                try:
                    global_vec = agg.result(global_vec)
                except ValueError as e:
                    raise RoundFailed(job.name, r, stepped, self.min_updates, f"step of client {cid} failed: {e}") from None
                stepped += 1
        if stepped < min(self.min_updates, max(len(plan), 1)):
            raise RoundFailed(job.name, r, stepped, self.min_updates, totals.detail())
        return global_vec

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
        """Run ``method``'s plan to the end: ask it for the next jobs until it has none; each job runs
        with the method's strategy for it (:meth:`~fmtl_edge.methods.Method.strategy`).

        Args:
            done: jobs already finished (a resumed plan); the method decides what follows from them.
            resume: checkpoint of the job that was running; it must be the plan's next job.

        Returns:
            job name → :class:`JobOutcome`, in execution order.
        """
        done = dict(done or {})
        self.namespace = method.name
        while True:
            pending = [j for j in method.next_jobs(done) if j.name not in done]
            if not pending:
                return done
            job = pending[0]
            strategy = method.strategy(job)
            if resume is not None:
                if resume.job.name != job.name:
                    raise RuntimeError(
                        f"the plan's next job is {job.name!r} but the checkpoint is of job {resume.job.name!r}"
                    )
                done[job.name] = self.run_job(job, resume=resume, strategy=strategy)
                resume = None
                continue
            if job.init_from is not None:
                if job.init_from not in done:
                    raise RuntimeError(f"job {job.name!r} starts from {job.init_from!r}, which has not run")
                init = select_state(done[job.init_from].state, job.tasks)
            else:
                init = self.initial_state(job.tasks)
            done[job.name] = self.run_job(job, method.initial_state(job, init), strategy=strategy)


def _update_vector(layout: ParameterLayout, state: Mapping[str, Any], scratch: list[np.ndarray]) -> np.ndarray:
    """The update as a flat float32 vector in ``layout`` order: the state's own flat view when it
    offers one (``as_flat``), else a copy into a scratch vector allocated once per round. Slices the
    update does not carry (personal, frozen) are left as they are: they are never contributed."""
    as_flat = getattr(state, "as_flat", None)
    if as_flat is not None:
        vec = as_flat(layout)
        if vec is not None:
            return vec
    if not scratch:
        scratch.append(np.zeros(layout.n_params, dtype=np.float32))
    return layout.flatten(state, out=scratch[0], only_present=True)
