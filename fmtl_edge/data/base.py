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
        y_train, y_test: task name → targets, first axis ``N`` (see :mod:`fmtl_edge.tasks`); a
            client of a task group (seed 000) holds only its tasks' targets.
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

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks this client holds labels for."""
        return tuple(self.y_train)

    def validate(self, tasks: TaskSet) -> None:
        """Check shapes against the task set.

        Raises:
            DataError: no task's targets at all, targets of an unknown task, train and test holding
                different tasks, or a length that differs from ``x``.
        """
        if not self.y_train:
            raise DataError(f"client {self.client_id}: holds labels for no task; give it at least one task's targets")
        if set(self.y_train) != set(self.y_test):
            raise DataError(f"client {self.client_id}: train targets of {sorted(self.y_train)} but test targets of "
                            f"{sorted(self.y_test)}; give both splits the same tasks")
        for split, x, ys in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            for name in ys:
                if name not in tasks:
                    raise DataError(f"client {self.client_id}: {split} targets of unknown task {name!r}")
            for t in tasks:
                if t.name not in ys:
                    continue
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

    def clients_of(self, task: str) -> list[int]:
        """Ids of the clients holding labels for ``task`` (its client group)."""
        return [c.client_id for c in self.clients if task in c.y_train]

    def pooled(self) -> "FederatedDataset":
        """The clients' data pooled (a centralized reference): one client per distinct set of tasks
        the clients hold (one client when every client holds every task), each the concatenation of
        those clients' train and test splits, ids 0, 1, ... in order of first appearance."""
        groups: dict[tuple[str, ...], list[ClientData]] = {}
        for c in self.clients:
            groups.setdefault(tuple(t for t in self.tasks.names if t in c.y_train), []).append(c)
        pooled = []
        for g, (names, members) in enumerate(groups.items()):
            cat = lambda arrs: np.concatenate(arrs) if arrs else arrs  # noqa: E731
            pooled.append(ClientData(
                g, cat([m.x_train for m in members]), {t: cat([m.y_train[t] for m in members]) for t in names},
                cat([m.x_test for m in members]), {t: cat([m.y_test[t] for m in members]) for t in names}))
        return FederatedDataset(self.name, self.tasks, pooled, self.input_shape,
                                {**self.info, "pooled": {"from_clients": self.n_clients, "groups": len(pooled)}})

    def with_tasks(self, names) -> "FederatedDataset":
        """The same clients with only the tasks ``names`` (in the data set's order; ``--tasks``).

        Raises:
            DataError: a name the data set does not have (lists its tasks).
        """
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise DataError(f"--tasks: {self.name} has no task {unknown[0]!r} (its tasks: {', '.join(self.tasks.names)})")
        keep = [t for t in self.tasks.names if t in set(names)]
        clients = [ClientData(c.client_id, c.x_train, {t: c.y_train[t] for t in keep if t in c.y_train},
                              c.x_test, {t: c.y_test[t] for t in keep if t in c.y_test}) for c in self.clients]
        return FederatedDataset(self.name, self.tasks.subset(keep), clients, self.input_shape,
                                {**self.info, "tasks": keep})

    def validate(self) -> None:
        if not self.clients:
            raise DataError(f"dataset {self.name!r} has no clients")
        for t in self.tasks:
            if not self.clients_of(t.name):
                raise DataError(f"dataset {self.name!r}: no client holds labels for task {t.name!r}")
        for c in self.clients:
            c.validate(self.tasks)
            if tuple(c.x_train.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"client {c.client_id}: input shape {c.x_train.shape[1:]} differs from the "
                    f"dataset's {self.input_shape}"
                )


def assign_task_groups(ds: FederatedDataset, n_groups: int, seed: int = 0) -> FederatedDataset:
    """Seed 000's client groups: keep the first ``n_groups`` tasks and give each client one of them
    (its other labels dropped), in a seeded round robin over a shuffled client order, so the groups
    differ in size by at most one.

    Raises:
        DataError: ``n_groups`` < 1, more groups than tasks, or fewer clients than groups.
    """
    if not 1 <= n_groups <= len(ds.tasks):
        raise DataError(f"--task-groups: {n_groups} groups but the dataset has {len(ds.tasks)} tasks; "
                        f"use 1..{len(ds.tasks)}")
    if ds.n_clients < n_groups:
        raise DataError(f"--task-groups: {n_groups} groups but only {ds.n_clients} clients; raise --clients")
    names = ds.tasks.names[:n_groups]
    order = np.random.default_rng(seed).permutation(ds.n_clients)
    task_of = {int(ds.clients[int(k)].client_id): names[i % n_groups] for i, k in enumerate(order)}
    clients = []
    for c in ds.clients:
        t = task_of[c.client_id]
        clients.append(ClientData(c.client_id, c.x_train, {t: c.y_train[t]}, c.x_test, {t: c.y_test[t]}))
    out = FederatedDataset(ds.name, ds.tasks.subset(names), clients, ds.input_shape,
                           {**ds.info, "task_groups": {t: [c for c, tt in sorted(task_of.items()) if tt == t] for t in names}})
    out.validate()
    return out
