"""The plan types: what a method plans and what a run of it leaves (the ground floor).

A method (:mod:`fmtl_edge.methods`) plans :class:`Job` s; the coordinator runs each job round by
round and records a :class:`RoundRecord` per round and a :class:`RoundCheckpoint` after it (what a
resumed run continues from); a finished job is a :class:`JobOutcome`; :class:`EnergyTally` sums the
cost of client executions; :class:`RoundFailed` is a round that could not be aggregated. This
module imports no driver (coordinator, pools, programs): methods, stores and programs all build on
it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from fmtl_edge.messages import poly_lr


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
    #: one record per client execution of the round (:meth:`fmtl_edge.selection.ClientRecord.to_dict`:
    #: device, power mode, samples, sample-passes, seconds, joules, train loss), refusals included
    per_client: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (checkpoints); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RoundRecord":
        """A record from :meth:`to_dict` (fields it lacks, from older state, take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
