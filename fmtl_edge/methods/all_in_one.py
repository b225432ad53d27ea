"""``all-in-one`` and ``fedprox``: one multi-task model φ = {θ_s} ∪ {θ_i}, FedAvg for R rounds with
loss Σ_i L_i (MAS baseline); ``fedprox`` adds the proximal term μ/2·‖w − w_global‖² to each client's
loss (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Eq. 2)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fmtl_edge.coordinator import Job, JobOutcome
from fmtl_edge.methods.base import Method
from fmtl_edge.tasks import TaskSet


class AllInOne(Method):
    """Args:
        measure_affinity: also measure task affinities (costs device time; off by default so the
            baseline's cost is not inflated).
    """

    name = "all-in-one"

    def __init__(self, tasks: TaskSet, rounds: int, measure_affinity: bool = False):
        super().__init__(tasks, rounds)
        self.measure_affinity = measure_affinity

    def _job(self) -> Job:
        return Job("all", tuple(self.tasks.names), self.rounds, measure_affinity=self.measure_affinity)

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [] if "all" in done else [self._job()]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "all" for t in self.tasks.names}

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        return done["all"].affinity if "all" in done else None


class FedProx(AllInOne):
    name = "fedprox"

    def __init__(self, tasks: TaskSet, rounds: int, mu: float = 0.01):
        super().__init__(tasks, rounds)
        if not mu > 0:
            raise ValueError(f"fedprox needs mu > 0 (the proximal weight), got {mu}")
        self.mu = mu

    def _job(self) -> Job:
        return Job("all", tuple(self.tasks.names), self.rounds, fedprox_mu=self.mu)
