"""``tag-x``: Task Affinity Grouping (Fifty et al., "Efficiently Identifying Task Groupings for
Multi-Task Learning", NeurIPS 2021), federated.

1. *Affinity*: all tasks in one model, trained all-in-one for R0 rounds (``--r0``) while clients
   measure the lookahead affinity (the same measurement as MAS, Eq. 3; job ``merge``).
2. *Selection*: TAG's network selection (:func:`fmtl_edge.affinity.tag_groups`): at most x possibly
   overlapping groups of ≥ 2 tasks covering every task, maximising Σ_j max over the chosen groups
   G ∋ j of the affinity onto j in G.
3. Each chosen group is trained **from scratch** for R rounds (jobs ``group-<g>``); each task is
   served by the chosen group with the highest affinity onto it (TAG's inference-time choice), so
   a task in two groups takes its final model from one of them only. The merge phase's cost is
   counted (its job is among the finished ones).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fmtl_edge.affinity import TagSelection, self_affinity, tag_groups
from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, r0_of
from fmtl_edge.tasks import TaskSet

MERGE = "merge"


class TAG(Method):
    """Args:
        tasks: the task set.
        rounds: R, rounds of each chosen group's training.
        r0: rounds of the all-in-one affinity phase, >= 1.
        n_groups: x, the most groups TAG may choose, >= 1.

    Raises:
        ValueError: r0 < 1 or x < 1.
    """

    takes_groups = True
    name = "tag-<x>"
    summary = ("TAG (Fifty et al. 2021): affinities from R0 rounds of all-in-one training (lookahead), at most x "
               "overlapping groups chosen by TAG's selection, each trained from scratch for R rounds; each task "
               "is served by its best group")

    def __init__(self, tasks: TaskSet, rounds: int, r0: int, n_groups: int, **kw):
        super().__init__(tasks, rounds, **kw)
        if r0 < 1:
            raise ValueError(f"tag needs r0 >= 1 rounds of affinity measurement, got {r0}: raise --r0")
        if n_groups < 1:
            raise ValueError(f"tag-{n_groups}: the number of groups must be >= 1")
        self.r0 = r0
        self.n_groups = n_groups
        self.name = f"tag-{n_groups}"

    @classmethod
    def positional(cls, cfg: Any, name: str) -> tuple:
        return r0_of(cfg, name)

    def selection(self, done: Mapping[str, JobOutcome]) -> TagSelection:
        """TAG's choice of groups from the affinity phase's averaged affinities."""
        n = len(self.tasks)
        S = done[MERGE].affinity
        if n == 1:
            return TagSelection(groups=((0,),), assignment=(0,), score=0.0)
        if S is None:
            raise RuntimeError(
                "the affinity phase measured no task affinity (every client had fewer than one measured "
                "batch); lower --affinity-every or raise --local-epochs"
            )
        return tag_groups(S, self.n_groups)

    def group_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        names = self.tasks.names
        return [Job(f"group-{g}", tuple(names[i] for i in group), self.rounds)
                for g, group in enumerate(self.selection(done).groups)]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if MERGE not in done:
            return [Job(MERGE, tuple(self.tasks.names), self.r0, measure_affinity=len(self.tasks) > 1)]
        return [j for j in self.group_jobs(done) if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        sel = self.selection(done)
        return {t: f"group-{sel.assignment[i]}" for i, t in enumerate(self.tasks.names)}

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        S = done[MERGE].affinity if MERGE in done else None
        return None if S is None else self_affinity(S)

    def planned_rounds(self) -> int:
        """An upper bound: TAG may choose fewer than x groups."""
        return self.r0 + min(self.n_groups, max(len(self.tasks), 1)) * self.rounds
