"""The procedure interface and its registry (see :mod:`fmtl_edge.procedures`)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fmtl_edge.data.base import ClientData
from fmtl_edge.messages import Assignment
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.tasks import TaskSet


@dataclass
class LocalContext:
    """What a procedure gets for one client execution.

    Attributes:
        data: the client's data.
        spec: model architecture.
        tasks: the tasks this client trains in this job (the job's tasks it holds labels for).
        assignment: the assignment (round, learning rate, ``method_config``, budgets...).
        model: the model to train, already loaded from the global state with the client's personal
            layers overlaid and the frozen layers frozen; the framework uploads its non-personal,
            non-frozen tensors afterwards.
        stored: the procedure's own client state from earlier rounds (``name → array``, without the
            framework's personal layers), or None at the client's first round of this job.
        rng: the client's seeded generator for this round (batch order).
        energy_probe: callable returning joules used so far in this execution, or None.
        freeze: callable that freezes the assignment's frozen tensors in a model (no gradient; their
            BatchNorm modules in eval mode, so running statistics do not move); called after every
            ``model.train()``, also on any other model a procedure trains.
        job_state: ``job name -> dict | None``: this client's own stored state of another job of the
            same method (newest version; the ``layer:`` entries included), e.g. Loop Improvement's
            gather reading the head a node kept in the ring job. It reads the client's own store
            only: nothing leaves the client unless the procedure puts it into the model.
    """

    data: ClientData
    spec: ModelSpec
    tasks: TaskSet
    assignment: Assignment
    model: MultiTaskModel
    stored: dict[str, np.ndarray] | None
    rng: np.random.Generator
    energy_probe: Callable[[], float | None] | None = None
    freeze: Callable[[torch.nn.Module], None] = lambda m: None
    t0: float = field(default_factory=time.perf_counter)
    job_state: Callable[[str], dict[str, np.ndarray] | None] = lambda job: None

    def setting(self, key: str, default: Any = None, kind: type | None = None) -> Any:
        """``method_config[key]`` coerced to ``kind`` (or ``default`` when absent).

        Raises:
            ValueError: the value cannot be read as ``kind`` (names the key).
        """
        v = self.assignment.method_config.get(key, default)
        if kind is None or v is None:
            return v
        try:
            return kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"method_config[{key!r}] = {v!r} is not a {kind.__name__}") from None


@dataclass
class LocalResult:
    """What a procedure returns; the framework turns it into a :class:`~fmtl_edge.messages.ClientUpdate`.

    Attributes:
        n_samples: training samples actually used (the FedAvg weight).
        train_loss: task → mean training loss of the round.
        affinity, affinity_steps: mean lookahead affinity ``(n, n)`` float64 and its step count.
        stopped_by: ``"time"``/``"energy"`` when a budget ended training early.
        stored: the procedure's client state to keep for the next round (None: keep nothing).
        tasks: the tasks the update reports as trained, when a procedure trained fewer than the
            client holds (Loop Improvement's tasks ring trains one task per visit); None: all of them.
        sample_passes: machine-load-independent training cost: Σ over the optimizer steps of the
            batch size (one forward + backward of each sample), **plus** ``lookahead_passes``.
        lookahead_passes: the lookahead's share of ``sample_passes``: per measurement, ``n_tasks × B``
            (for each task i one backward of the batch to the shared layers and one forward of the
            stepped backbone and every head, counted as one sample-pass per sample).
    """

    n_samples: int
    train_loss: dict[str, float]
    affinity: np.ndarray | None = None
    affinity_steps: int = 0
    stopped_by: str | None = None
    stored: dict[str, np.ndarray] | None = None
    tasks: tuple[str, ...] | None = None
    sample_passes: int = 0
    lookahead_passes: int = 0


class Procedure(ABC):
    """A client-side local-training procedure (registered under :attr:`name`)."""

    name: str = ""

    @abstractmethod
    def train(self, ctx: LocalContext) -> LocalResult:
        """Train ``ctx.model`` in place for one round; return the round's figures."""

    def model(self, spec: ModelSpec, tasks: TaskSet, method_config: Mapping[str, Any]) -> MultiTaskModel:
        """The (untrained) model this procedure trains and evaluates, before the state is loaded;
        default: :class:`~fmtl_edge.models.MultiTaskModel` of ``tasks``. Raises ValueError on bad
        ``method_config`` values."""
        return MultiTaskModel(spec, tasks)

    def personal_state(self, global_state: Mapping[str, np.ndarray],
                       stored: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
        """The state of the client's own model for personalised evaluation, from the global state
        (personal layers already overlaid) and the procedure's stored state. Default: the former."""
        return global_state


_REGISTRY: dict[str, Procedure] = {}


def register(cls: type[Procedure]) -> type[Procedure]:
    """Class decorator: register a procedure under ``cls.name``.

    Raises:
        ValueError: no name, or the name is taken.
    """
    if not cls.name:
        raise ValueError(f"procedure {cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"procedure {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_procedure(name: str) -> Procedure:
    """The registered procedure ``name``.

    Raises:
        ValueError: unknown name (lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown client procedure {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def procedure_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
