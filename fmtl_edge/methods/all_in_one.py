"""``all-in-one``: one multi-task model φ = {θ_s} ∪ {θ_i}, FedAvg for R rounds with loss Σ_i L_i
(the MAS paper's baseline, Zhuang et al., ICCV 2023, §4.1)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method
from fmtl_edge.tasks import TaskSet


class AllInOne(Method):
    """Args:
        measure_affinity: also measure task affinities (costs device time; off by default so the
            baseline's cost is not inflated).
    """

    name = "all-in-one"
    summary = "one multi-task model (shared backbone + one head per task), FedAvg for R rounds"

    def __init__(self, tasks: TaskSet, rounds: int, measure_affinity: bool = False, **kw):
        super().__init__(tasks, rounds, **kw)
        self.measure_affinity = measure_affinity

    def _job(self) -> Job:
        return Job("all", tuple(self.tasks.names), self.rounds, measure_affinity=self.measure_affinity)

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [] if "all" in done else [self._job()]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "all" for t in self.tasks.names}

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        return done["all"].affinity if "all" in done else None
