"""``centralized``: a non-FL upper reference trained on the clients' pooled data (seed 000's
"centralized separate" / "centralized joint"): ``--centralized separate`` trains one model per task,
``joint`` one multi-task model, R rounds of E epochs each.

The simulation pools the clients by the tasks they hold labels for
(:meth:`~fmtl_edge.data.base.FederatedDataset.pooled`): one pooled client when every client holds
every task, one per task group otherwise. A joint model then visits the groups' pooled data one
after another each round (the model is carried, never averaged). Evaluated on the union of the
clients' test splits.
"""

from __future__ import annotations

from typing import Any, Mapping

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option
from fmtl_edge.strategy import SequentialStrategy, Strategy
from fmtl_edge.tasks import TaskSet

MODES = ("joint", "separate")


class Centralized(Method):
    """Args:
        mode: ``joint`` (one multi-task model) or ``separate`` (one model per task).

    Raises:
        ValueError: another mode (names ``--centralized``).
    """

    name = "centralized"
    summary = "non-FL reference on pooled data: --centralized joint (one multi-task model) | separate (one per task)"
    OPTIONS = (Option("centralized", str, "joint", "centralized's model(s): joint (one multi-task model) or separate "
                      "(one per task) (default joint)", choices=MODES),)
    pooled_data = True
    reference = True

    def __init__(self, tasks: TaskSet, rounds: int, mode: str = "joint", **kw):
        super().__init__(tasks, rounds, **kw)
        if mode not in MODES:
            raise ValueError(f"--centralized: {mode!r} is not joint or separate")
        self.mode = mode

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"mode": option(cfg, "centralized")}

    def _jobs(self) -> list[Job]:
        if self.mode == "joint":
            return [Job("joint", tuple(self.tasks.names), self.rounds, sampling="all")]
        return [Job(f"task-{t}", (t,), self.rounds, sampling="all") for t in self.tasks.names]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [j for j in self._jobs() if j.name not in done]

    def strategy(self, job: Job) -> Strategy:
        return SequentialStrategy(job.procedure, job.method_config)

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        if self.mode == "joint":
            return {t: "joint" for t in self.tasks.names}
        return {t: f"task-{t}" for t in self.tasks.names}

    def planned_rounds(self) -> int:
        return self.rounds * (1 if self.mode == "joint" else len(self.tasks))
