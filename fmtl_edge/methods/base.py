"""The method interface: a method plans FL jobs, owns their rounds through a strategy, and says how
its models are evaluated.

A method is a pure function of the jobs already finished (Flower's Strategy idea, extended to
multi-task planning), so a coordinator can resume a plan from its finished jobs:

- :meth:`Method.next_jobs` — the jobs still to run given the finished ones (``[]`` = done);
- :meth:`Method.strategy` — for each job, the :class:`~fmtl_edge.strategy.Strategy` that runs its
  rounds (who trains, what each client runs, how updates combine); default: FedAvg over K sampled
  clients running the job's procedure, with ``--aggregator``;
- :meth:`Method.initial_state` — a job's initial weights from the fresh (or ``init_from``) ones
  (pre-trained layers loaded here);
- :meth:`Method.final_jobs` — for each task, the job whose model is its final model;
- :meth:`Method.splits` / :meth:`Method.affinity` / :meth:`Method.decision` — for results;
- :meth:`Method.check` — validate settings against the model before training;
- :attr:`Method.global_model` / :attr:`Method.personalised` — which evaluations apply: the global
  model of each task on the union of the clients' test splits, and/or each client's own model
  (global slices + its state) on its own test split;
- :attr:`Method.pooled_data` / :attr:`Method.reference` — a non-FL reference trained on pooled data.

A method never touches transport, files or meters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.strategy import FedAvgStrategy, Strategy
from fmtl_edge.tasks import TaskSet


@dataclass(frozen=True)
class Option:
    """A setting a method declares: the CLI gets ``--<name with dashes>``, the TOML file (and the
    server's ``[job]`` table) the key ``<name>``; values land in ``SimulationConfig.method_options``.

    Attributes:
        name: config key (``ditto_lambda``).
        kind: ``float``, ``int`` or ``str``.
        default: used when the run does not set it.
        help: one line for ``--help`` (units, range, source).
        choices: the allowed values of a ``str`` option (empty: any).
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class Method(ABC):
    """Base class of the training methods.

    Args:
        tasks: the task set (order fixes affinity rows/columns).
        rounds: R, rounds each task's training gets in total.
        aggregator: ``fedavg`` | ``median`` | ``trimmed-mean`` for the default strategy.
        trim_fraction: β of the trimmed mean.

    Raises:
        ValueError: rounds < 1.
    """

    #: the name used by ``--methods`` and in results (e.g. ``mas-2``)
    name: str = ""
    #: one line for ``--help``
    summary: str = ""
    #: the final models include a global model per task (evaluated on the union test set)
    global_model: bool = True
    #: each client has its own model (evaluated on its own test split)
    personalised: bool = False
    #: trained on the clients' pooled data (a non-FL reference), not over the client pool
    pooled_data: bool = False
    #: a non-FL reference (labelled as such in results)
    reference: bool = False
    #: the method loads pre-trained (frozen) layers from ``--pretrained``
    uses_pretrained: bool = False
    #: the method's own settings (flags and config keys generated from these)
    OPTIONS: tuple[Option, ...] = ()

    def __init__(self, tasks: TaskSet, rounds: int, aggregator: str = "fedavg", trim_fraction: float = 0.1):
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.tasks = tasks
        self.rounds = rounds
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction

    #: the ``--methods`` name takes the number of groups x (``mas-<x>``)
    takes_groups: bool = False

    @classmethod
    def from_config(cls, arg: str | None, tasks: TaskSet, cfg: Any, **extra: Any) -> "Method":
        """Build from a ``--methods`` entry (``arg``: the part after ``<name>-``, e.g. ``2`` of
        ``mas-2``) and the run config (:class:`~fmtl_edge.config.SimulationConfig`): the
        constructor gets ``(tasks, R, [x,]`` :meth:`settings` ``, aggregator settings, extra)``.

        Raises:
            ValueError: a missing or unexpected ``-<x>``, or settings the method cannot use (the
                message names the flag).
        """
        base = cls.name.split("-<")[0]
        if cls.takes_groups:
            if arg is None or not arg.isdigit():
                raise ValueError(f"{base} needs the number of groups x: {base}-<x>, e.g. {base}-2")
            return cls(tasks, cfg.rounds, *cls.positional(cfg, f"{base}-{arg}"), int(arg),
                       **cls.settings(cfg), **base_settings(cfg), **extra)
        if arg is not None:
            hint = f"; set its options with {', '.join(o.flag for o in cls.OPTIONS)}" if cls.OPTIONS else ""
            raise ValueError(f"{base} takes no parameter (got {base}-{arg}){hint}")
        return cls(tasks, cfg.rounds, **cls.settings(cfg), **base_settings(cfg), **extra)

    @classmethod
    def positional(cls, cfg: Any, name: str) -> tuple:
        """Constructor arguments between R and x (MAS and TAG: R0)."""
        return ()

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        """The constructor's keyword arguments from the run config (default: none)."""
        return {}

    @abstractmethod
    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        """Jobs left to run after ``done`` (in order); ``[]`` when the plan is complete."""

    @abstractmethod
    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        """task name → name of the job whose final weights are that task's final model."""

    def personalised_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        """task name → the job whose client state gives each client's own model of that task
        (personalised evaluation); default: :meth:`final_jobs`."""
        return self.final_jobs(done)

    def strategy(self, job: Job) -> Strategy:
        """The strategy that runs ``job``'s rounds."""
        return FedAvgStrategy(job.procedure, job.method_config, job.sampling, self.aggregator, self.trim_fraction)

    def initial_state(self, job: Job, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``job``'s initial weights from the fresh (or ``init_from``) ``state``; default: as they are."""
        return state

    def splits(self, done: Mapping[str, JobOutcome]) -> list[list[str]]:
        """Task groups trained by the method's final jobs, each in task-set order."""
        groups: dict[str, list[str]] = {}
        for task, job in self.final_jobs(done).items():
            groups.setdefault(job, []).append(task)
        order = {n: i for i, n in enumerate(self.tasks.names)}
        return sorted((sorted(g, key=order.get) for g in groups.values()), key=lambda g: order[g[0]])

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        """The ``(n, n)`` affinity matrix the method measured (task-set order), or None."""
        return None

    def check(self, state: Mapping[str, np.ndarray]) -> None:
        """Validate the method's settings against the full model's initial ``state`` (every task's
        head) before anything trains (layer patterns, pre-trained tensors); default: nothing.

        Raises:
            ValueError: a setting the model cannot serve (the message names the flag).
        """

    def decision(self, done: Mapping[str, JobOutcome]) -> dict[str, Any] | None:
        """A JSON record of what the method chose and why (its results entry's ``decision``:
        mas-auto's R0 and x), or None (default) for a method that chooses nothing."""
        return None

    def candidate_models(self, done: Mapping[str, JobOutcome]) -> dict[str, dict[str, str]]:
        """Named alternative sets of final models (label → task → job), evaluated beside the final
        ones for :meth:`oracle` (mas-oracle's every split); default: none."""
        return {}

    def oracle(self, done: Mapping[str, JobOutcome], losses: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
        """What the candidates' test losses (label → ``{"total_test_loss",
        "normalised_total_test_loss", "per_task"}``) say of the method's choice (its entry's
        ``oracle``); default None."""
        return None

    def planned_rounds(self) -> int:
        """Total rounds of the plan (for progress bars); exact for every method here."""
        return self.rounds


def option(cfg: Any, name: str) -> Any:
    """Method option ``name`` of the run config: ``cfg.option(name)`` (its value or the declared
    default); a config without options (a plain namespace in tests) gets the declared default."""
    getter = getattr(cfg, "option", None)
    if getter is not None:
        return getter(name)
    from fmtl_edge.methods import method_options

    return method_options()[name].default


def r0_of(cfg: Any, name: str) -> tuple[int]:
    """``(R0,)`` of the run config for a method with a merge/affinity phase.

    Raises:
        ValueError: no R0 (names ``--r0``).
    """
    if getattr(cfg, "r0", None) is None:
        raise ValueError(f"{name} needs r0 (rounds of the merge phase): pass --r0")
    return (int(cfg.r0),)


def base_settings(cfg: Any) -> dict[str, Any]:
    """The :class:`Method` keyword arguments every method takes from the run config."""
    return {"aggregator": getattr(cfg, "aggregator", "fedavg"), "trim_fraction": getattr(cfg, "trim_fraction", 0.1)}
