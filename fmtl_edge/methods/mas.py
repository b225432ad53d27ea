"""``mas-x``: merge and split (Zhuang et al., "MAS: Towards Resource-Efficient Federated
Multiple-Task Learning", ICCV 2023, Alg. 1).

1. *Merge*: all tasks in one multi-task model, trained all-in-one for R0 rounds while clients
   measure task affinities by lookahead (Eq. 3, :func:`fmtl_edge.affinity.lookahead_affinity`); the
   server averages them over clients and rounds.
2. *Split*: the diagonal is filled with Eq. 4 (:func:`fmtl_edge.affinity.self_affinity`) and the tasks
   are split into exactly x groups maximising the total affinity onto each task within its group
   (:func:`fmtl_edge.affinity.best_partition`, exact DP in C++).
3. Each group continues for R − R0 rounds from the merged weights (θ_s and its tasks' θ_i), with a
   fresh optimizer and a restarted learning-rate schedule. Task α_i's final model is its group's θ_s
   plus θ_i.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fmtl_edge.affinity import Partition, best_partition, self_affinity
from fmtl_edge.coordinator import Job, JobOutcome
from fmtl_edge.methods.base import Method, base_settings
from fmtl_edge.tasks import TaskSet

MERGE = "merge"


class MAS(Method):
    """Args:
        tasks: the task set.
        rounds: R, total rounds per task (merge R0 + split R − R0).
        r0: R0, rounds of the all-in-one (merge) phase; 1 <= R0 < R.
        n_splits: x, the number of groups; 1 <= x <= n.

    Raises:
        ValueError: R0 outside 1..R−1 or x outside 1..n (message names the fix).
    """

    name = "mas-<x>"
    summary = ("merge all tasks into one multi-task model, train it all-in-one for R0 rounds while measuring "
               "task affinities (lookahead, MAS Eq. 3), split the tasks into x groups that maximise affinity "
               "(exact search), train each group R-R0 rounds from the merged weights")

    def __init__(self, tasks: TaskSet, rounds: int, r0: int, n_splits: int, **kw):
        super().__init__(tasks, rounds, **kw)
        if not 1 <= r0 < rounds:
            raise ValueError(f"r0 must satisfy 1 <= r0 < rounds; got r0={r0}, rounds={rounds}: lower --r0")
        if not 1 <= n_splits <= len(tasks):
            raise ValueError(
                f"mas-{n_splits}: cannot split {len(tasks)} tasks into {n_splits} groups; use mas-1..mas-{len(tasks)}"
            )
        self.r0 = r0
        self.n_splits = n_splits
        self.name = f"mas-{n_splits}"

    @classmethod
    def from_config(cls, arg: str | None, tasks: TaskSet, cfg: Any) -> "MAS":
        if arg is None or not arg.isdigit():
            raise ValueError("mas needs the number of groups x: mas-<x>, e.g. mas-2")
        if cfg.r0 is None:
            raise ValueError(f"mas-{arg} needs r0 (rounds of the merge phase): pass --r0")
        return cls(tasks, cfg.rounds, cfg.r0, int(arg), **base_settings(cfg))

    def merge_job(self) -> Job:
        return Job(MERGE, tuple(self.tasks.names), self.r0, measure_affinity=len(self.tasks) > 1)

    def partition(self, done: Mapping[str, JobOutcome]) -> Partition:
        """The split decided from the merge phase's averaged affinities."""
        S = done[MERGE].affinity
        n = len(self.tasks)
        if S is None:
            if n == 1 or self.n_splits == 1:
                return Partition(groups=(tuple(range(n)),), score=0.0)
            if self.n_splits == n:
                return Partition(groups=tuple((i,) for i in range(n)), score=0.0)
            raise RuntimeError(
                "the merge phase measured no task affinity (every client had fewer than one measured "
                "batch); lower --affinity-every or raise --local-epochs"
            )
        return best_partition(S, self.n_splits)

    def split_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        names = self.tasks.names
        return [
            Job(f"split-{g}", tuple(names[i] for i in group), self.rounds - self.r0, init_from=MERGE)
            for g, group in enumerate(self.partition(done).groups)
        ]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if MERGE not in done:
            return [self.merge_job()]
        return [j for j in self.split_jobs(done) if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: j.name for j in self.split_jobs(done) for t in j.tasks}

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        S = done[MERGE].affinity if MERGE in done else None
        return None if S is None else self_affinity(S)

    def planned_rounds(self) -> int:
        return self.r0 + self.n_splits * (self.rounds - self.r0)
