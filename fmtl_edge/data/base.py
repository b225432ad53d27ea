"""Federated data containers shared by every loader.

A loader takes a :class:`DataOptions` and returns a :class:`FederatedDataset`: the
:class:`~fmtl_edge.tasks.TaskSet`, the input shape and one :class:`ClientData` per client, each with
its own train/test split. Every task reads the same
input ``x``; ``y[task]`` holds that task's targets (see :mod:`fmtl_edge.tasks` for dtypes/shapes).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fmtl_edge.tasks import TaskSet


class DataError(ValueError):
    """Bad or missing data: the message names the path or field and what would fix it."""


#: the data sets whose partition is drawn over a label (so ``classes_per_client`` applies)
PATHOLOGICAL = frozenset({"digits", "utkface"})


@dataclass(frozen=True)
class DataOptions:
    """How to load a data set and split it over clients: what every loader reads
    (:func:`fmtl_edge.data.load_dataset`; CLI flags in brackets). An option a data set cannot use is
    refused by its loader (:class:`DataError`), never silently ignored, unless its loader says so.

    Attributes:
        data_dir: folder (or file) holding the data [``--data-dir``]; ``None`` looks in
            ``$FMTL_EDGE_DATA_DIR`` and ``../shared/data`` (not used by ``digits``; required by ``npz``).
        n_clients: number of clients [``--clients``]; ``None`` for the data set's default (digits 8,
            utkface 32, uci-har 30 = one per subject, npz = one per file).
        seed: the partition seed: fixes the subset, partition and splits (default 0).
        alpha: Dirichlet concentration of label-skewed partitions [``--alpha``] (> 0; ``None``: 0.5;
            digits/utkface).
        test_fraction: per-client test share in ``[0, 1)`` (default 0.2; uci-har and npz keep their
            files' split).
        image_size: side of the resized images in pixels [``--image-size``] (4..1024; utkface,
            default 64).
        max_samples: cap on the total number of samples (seeded stratified subset) [``--max-samples``],
            for quick runs; ``None``: every sample.
        cache_dir: where decoded images are cached (utkface); ``None``: ``$FMTL_EDGE_CACHE`` or
            ``~/.cache/fmtl-edge``.
        task_groups: give each client one of the first ``task_groups`` tasks and drop its other
            labels [``--task-groups``] (seed 000's client groups; :func:`assign_task_groups`).
        classes_per_client: the pathological split instead of Dirichlet [``--classes-per-client``]:
            every client holds exactly this many classes (digits: of the digit, utkface: of race;
            :func:`fmtl_edge.data.partition.pathological_partition`); other data sets refuse it.
    """

    data_dir: str | Path | None = None
    n_clients: int | None = None
    seed: int = 0
    alpha: float | None = None
    test_fraction: float = 0.2
    image_size: int | None = None
    max_samples: int | None = None
    cache_dir: str | Path | None = None
    task_groups: int | None = None
    classes_per_client: int | None = None

    def validate(self, dataset: str | None = None) -> "DataOptions":
        """Check the options and return them with their numbers as ``int``/``float`` (what the
        loaders read).

        Args:
            dataset: the registry name (``uci-har``, not ``uci_har``); when given, a
                ``classes_per_client`` for a data set outside :data:`PATHOLOGICAL` is refused.

        Raises:
            DataError: ``n_clients``, ``max_samples`` or ``classes_per_client`` not a positive
                integer, ``alpha`` not a finite number > 0, ``test_fraction`` outside ``[0, 1)``,
                ``image_size`` outside 4..1024, or ``classes_per_client`` for a data set without a
                label partition; the message names the field.
        """
        n_clients, alpha, image_size = self.n_clients, self.alpha, self.image_size
        max_samples, cpc = self.max_samples, self.classes_per_client
        if n_clients is not None and (isinstance(n_clients, bool) or int(n_clients) != n_clients or n_clients < 1):
            raise DataError(f"n_clients must be a positive integer, got {n_clients!r}")
        if alpha is not None and not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
            raise DataError(f"alpha (Dirichlet concentration) must be a number > 0, got {alpha!r}")
        if not (isinstance(self.test_fraction, numbers.Real) and 0.0 <= self.test_fraction < 1.0):
            raise DataError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        if image_size is not None and (int(image_size) != image_size or not 4 <= image_size <= 1024):
            raise DataError(f"image_size must be an integer in [4, 1024], got {image_size!r}")
        if max_samples is not None and (int(max_samples) != max_samples or max_samples < 1):
            raise DataError(f"max_samples must be a positive integer, got {max_samples!r}")
        if cpc is not None:
            if dataset is not None and dataset not in PATHOLOGICAL:
                raise DataError(f"{dataset}: classes_per_client (--classes-per-client) is for the "
                                f"label-partitioned data sets ({', '.join(sorted(PATHOLOGICAL))}); "
                                f"{dataset}'s clients are fixed: drop it")
            if isinstance(cpc, bool) or int(cpc) != cpc or cpc < 1:
                raise DataError(f"classes_per_client (--classes-per-client) must be a positive integer, got {cpc!r}")
        as_int = lambda v: None if v is None else int(v)  # noqa: E731
        return replace(self, n_clients=as_int(n_clients), seed=int(self.seed),
                       alpha=None if alpha is None else float(alpha), test_fraction=float(self.test_fraction),
                       image_size=as_int(image_size), max_samples=as_int(max_samples),
                       classes_per_client=as_int(cpc))


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
