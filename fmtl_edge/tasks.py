"""Tasks and task sets: what each FL task predicts, how it is scored, and its head.

A :class:`Task` is one federated learning task trained over the client pool (a car's "lanes",
"depth", "objects"; here e.g. UTKFace's age, gender, race and image-to-image tasks). All tasks of a
:class:`TaskSet` read the same input ``x`` and differ in their target ``y[task.name]`` and head.

Target conventions (per sample; a batch adds a leading ``B`` axis):

============== ============================ ============================== =============
kind           target dtype / shape          loss                           metric
============== ============================ ============================== =============
classification int64 ``()`` in ``[0, C)``    cross-entropy (nats)           accuracy
binary         float32 ``()`` in ``{0, 1}``  BCE with logits (nats)         accuracy
regression     float32 ``()`` (``units``)    MSE of standardised target     MAE (``units``)
dense          float32 ``(C, H, W)``         per-pixel MSE                  RMSE
============== ============================ ============================== =============

Regression targets are standardised inside the loss, ``(y - target_mean) / target_std``, so that a
task measured in years does not dominate the MAS total test loss Σ_i L_i; the metric is reported in
the target's own units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

TaskKind = Literal["classification", "binary", "regression", "dense"]
TASK_KINDS: tuple[str, ...] = ("classification", "binary", "regression", "dense")

_METRIC_NAMES = {
    "classification": "accuracy",
    "binary": "accuracy",
    "regression": "mae",
    "dense": "rmse",
}
#: Metrics where larger is better (used when reporting and comparing).
HIGHER_IS_BETTER = {"accuracy": True, "mae": False, "rmse": False}


@dataclass(frozen=True)
class Task:
    """One FL task.

    Attributes:
        name: identifier used in configs, results and parameter scopes (``task:<name>``);
            letters, digits, ``_`` and ``-`` only.
        kind: ``classification | binary | regression | dense``.
        out_dim: classes for ``classification``; 1 for ``binary`` and ``regression``; output
            channels for ``dense``.
        target_mean, target_std: standardisation of ``regression`` targets (units of the target).
        units: units of a regression target (e.g. ``"years"``), for reports.
        description: one line for reports and ``--help``.

    Raises:
        ValueError: bad name, unknown kind, ``out_dim < 1``, ``classification`` with fewer than two
            classes, or ``target_std <= 0``.
    """

    name: str
    kind: TaskKind
    out_dim: int = 1
    target_mean: float = 0.0
    target_std: float = 1.0
    units: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(
                f"task name {self.name!r}: use letters, digits, '_' and '-' only (it becomes a "
                "parameter scope 'task:<name>' and a results key)"
            )
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {TASK_KINDS}")
        if self.out_dim < 1:
            raise ValueError(f"task {self.name!r}: out_dim must be >= 1, got {self.out_dim}")
        if self.kind == "classification" and self.out_dim < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs out_dim >= 2 classes")
        if self.kind in ("binary", "regression") and self.out_dim != 1:
            raise ValueError(f"task {self.name!r}: a {self.kind} task has out_dim 1")
        if not self.target_std > 0:
            raise ValueError(f"task {self.name!r}: target_std must be > 0, got {self.target_std}")

    # -- scoring -----------------------------------------------------------------------------
    @property
    def metric_name(self) -> str:
        """``accuracy`` (classification, binary), ``mae`` (regression, in ``units``), ``rmse`` (dense)."""
        return _METRIC_NAMES[self.kind]

    def prepare_target(self, y: torch.Tensor) -> torch.Tensor:
        """Cast a batch of raw targets to the dtype the loss expects (see module table)."""
        if self.kind == "classification":
            return y.long()
        return y.float()

    def loss(self, pred: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Task loss of a batch.

        Args:
            pred: head output, ``(B, out_dim)`` float32 (``(B, C, H, W)`` for dense).
            y: raw targets, as in the module table, batch first.
            reduction: ``"mean"`` (scalar) or ``"sum"`` (scalar; sum over samples of the per-sample
                mean loss, for exact dataset averages).

        Returns:
            Scalar float tensor, nats for classification/binary, squared standard units for
            regression, squared pixel units for dense.
        """
        y = self.prepare_target(y)
        if self.kind == "classification":
            per = F.cross_entropy(pred, y, reduction="none")
        elif self.kind == "binary":
            per = F.binary_cross_entropy_with_logits(pred.reshape(-1), y.reshape(-1), reduction="none")
        elif self.kind == "regression":
            z = (y.reshape(-1) - self.target_mean) / self.target_std
            per = (pred.reshape(-1) - z) ** 2
        else:
            per = ((pred - y) ** 2).flatten(1).mean(dim=1)
        if reduction == "mean":
            return per.mean()
        if reduction == "sum":
            return per.sum()
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def metric_sum(self, pred: torch.Tensor, y: torch.Tensor) -> float:
        """Sum over the batch of the per-sample metric term (accuracy hits, absolute error in
        ``units``, or per-sample squared error for dense); divide by the sample count (and take the
        square root for ``rmse``) with :meth:`finish_metric`."""
        y = self.prepare_target(y)
        with torch.no_grad():
            if self.kind == "classification":
                return float((pred.argmax(dim=1) == y).sum())
            if self.kind == "binary":
                return float(((pred.reshape(-1) > 0).float() == y.reshape(-1)).sum())
            if self.kind == "regression":
                years = pred.reshape(-1) * self.target_std + self.target_mean
                return float((years - y.reshape(-1)).abs().sum())
            return float(((pred - y) ** 2).flatten(1).mean(dim=1).sum())

    def finish_metric(self, total: float, count: int) -> float:
        """Turn :meth:`metric_sum` totals over ``count`` samples into the reported metric."""
        if count <= 0:
            return float("nan")
        value = total / count
        return value**0.5 if self.kind == "dense" else value

    def predict(self, pred: torch.Tensor) -> torch.Tensor:
        """Head output → prediction in target units (class index, probability, years, pixels)."""
        if self.kind == "classification":
            return pred.argmax(dim=1)
        if self.kind == "binary":
            return torch.sigmoid(pred.reshape(-1))
        if self.kind == "regression":
            return pred.reshape(-1) * self.target_std + self.target_mean
        return pred


@dataclass(frozen=True)
class TaskSet:
    """An ordered set of tasks; the order fixes the rows and columns of affinity matrices.

    Raises:
        ValueError: empty or duplicate task names, or an unknown name in :meth:`subset`.
    """

    tasks: tuple[Task, ...]
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __init__(self, tasks: Sequence[Task]):
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a TaskSet needs at least one task")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task names {dup}: every task needs its own name")
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "_index", {t.name: i for i, t in enumerate(tasks)})

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, key: int | str) -> Task:
        if isinstance(key, str):
            return self.tasks[self.index(key)]
        return self.tasks[key]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(
                f"unknown task {name!r}; this task set has {list(self._index)}"
            ) from None

    def subset(self, names: Sequence[str]) -> "TaskSet":
        """The tasks named, in this set's order."""
        for n in names:
            self.index(n)
        keep = set(names)
        return TaskSet([t for t in self.tasks if t.name in keep])
