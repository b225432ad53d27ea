"""``local``: every client trains its own model on its own data only, R rounds of E local epochs,
nothing shared (seed 000's "distributed separate"). A non-FL reference: every tensor is personal,
so nothing is uploaded; evaluated per client on its own test split."""

from __future__ import annotations

from typing import Mapping

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method


class Local(Method):
    name = "local"
    summary = "non-FL reference: each client trains alone on its own data (every layer personal)"
    global_model = False
    personalised = True
    reference = True

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [] if "local" in done else [Job("local", tuple(self.tasks.names), self.rounds, sampling="all",
                                                personal=("*",))]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "local" for t in self.tasks.names}
