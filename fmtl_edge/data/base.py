"""Federated data containers shared by every loader.

A loader returns a :class:`FederatedDataset`: the :class:`~fmtl_edge.tasks.TaskSet`, the input shape
and one :class:`ClientData` per client, each with its own train/test split. Every task reads the same
input ``x``; ``y[task]`` holds that task's targets (see :mod:`fmtl_edge.tasks` for dtypes/shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmtl_edge.tasks import TaskSet


class DataError(ValueError):
    """Bad or missing data: the message names the path or field and what would fix it."""


@dataclass
class ClientData:
    """One client's local data.

    Attributes:
        client_id: 0-based index of the client in its dataset.
        x_train, x_test: inputs, float32 ``(N, C, H, W)`` images in [0, 1] or ``(N, D)`` vectors.
        y_train, y_test: task name → targets, first axis ``N`` (see :mod:`fmtl_edge.tasks`).
    """

    client_id: int
    x_train: np.ndarray
    y_train: dict[str, np.ndarray]
    x_test: np.ndarray
    y_test: dict[str, np.ndarray]

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def validate(self, tasks: TaskSet) -> None:
        """Check shapes against the task set.

        Raises:
            DataError: a task's targets are missing or their length differs from ``x``.
        """
        for split, x, ys in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            for t in tasks:
                if t.name not in ys:
                    raise DataError(f"client {self.client_id}: no {split} targets for task {t.name!r}")
                if len(ys[t.name]) != len(x):
                    raise DataError(
                        f"client {self.client_id}: {split} targets of task {t.name!r} have "
                        f"{len(ys[t.name])} rows but x has {len(x)}"
                    )


@dataclass
class FederatedDataset:
    """A dataset split over clients.

    Attributes:
        name: loader name (``digits``, ``utkface``, ``uci-har``, ``npz``).
        tasks: the tasks, in the order used by affinity matrices and results.
        clients: one entry per client.
        input_shape: per-sample input shape, ``(C, H, W)`` or ``(D,)``.
        info: provenance for ``results.json`` (source path, partition, sizes, seed).
    """

    name: str
    tasks: TaskSet
    clients: list[ClientData]
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clients(self) -> int:
        return len(self.clients)

    def validate(self) -> None:
        if not self.clients:
            raise DataError(f"dataset {self.name!r} has no clients")
        for c in self.clients:
            c.validate(self.tasks)
            if tuple(c.x_train.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"client {c.client_id}: input shape {c.x_train.shape[1:]} differs from the "
                    f"dataset's {self.input_shape}"
                )
