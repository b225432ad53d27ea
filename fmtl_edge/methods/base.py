"""The method interface: a method turns a config into a plan of FL jobs and decides splits.

A method is a pure function of the jobs already finished (Flower's Strategy idea, reduced to what
multi-task planning needs), so a coordinator can resume a plan from its finished jobs:

- :meth:`Method.next_jobs` — the jobs still to run given the finished ones (``[]`` = done);
- :meth:`Method.final_jobs` — for each task, the job whose model is its final model;
- :meth:`Method.splits` — the task groups the method trained (for results);
- :meth:`Method.affinity` — the averaged affinity matrix it measured, if any.

A method never touches transport, files or meters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from fmtl_edge.coordinator import Job, JobOutcome
from fmtl_edge.tasks import TaskSet


class Method(ABC):
    """Base class of the training methods.

    Args:
        tasks: the task set (order fixes affinity rows/columns).
        rounds: R, rounds each task's training gets in total.
    """

    #: the name used by ``--methods`` and in results (e.g. ``mas-2``)
    name: str = ""

    def __init__(self, tasks: TaskSet, rounds: int):
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.tasks = tasks
        self.rounds = rounds

    @abstractmethod
    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        """Jobs left to run after ``done`` (in order); ``[]`` when the plan is complete."""

    @abstractmethod
    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        """task name → name of the job whose final weights are that task's final model."""

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

    def planned_rounds(self) -> int:
        """Total rounds of the plan (for progress bars); exact for every method here."""
        return self.rounds
