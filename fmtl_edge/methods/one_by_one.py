"""``one-by-one``: n single-task FL jobs trained one after another, each from scratch for R rounds
(the MAS paper's baseline after Bonawitz et al.'s multi-tenant FL)."""

from __future__ import annotations

from typing import Mapping

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method


class OneByOne(Method):
    name = "one-by-one"
    summary = "one single-task FL job per task, one after another, R rounds each"

    def _jobs(self) -> list[Job]:
        return [Job(f"task-{t}", (t,), self.rounds) for t in self.tasks.names]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [j for j in self._jobs() if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: f"task-{t}" for t in self.tasks.names}

    def planned_rounds(self) -> int:
        return self.rounds * len(self.tasks)
