"""``ditto``: soft sharing (Li et al., "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021). The global model w is trained by plain local SGD and FedAvg'd; each
client also keeps a personal model p_k, trained with the L2 pull λ/2·‖p_k − w*‖² towards the
global model (client procedure ``ditto``); p_k never leaves the client. Both are evaluated: the
global model on the union test set, each p_k on its client's test split."""

from __future__ import annotations

from typing import Any, Mapping

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option
from fmtl_edge.tasks import TaskSet


class Ditto(Method):
    """Args:
        lam: λ ≥ 0 (0: each personal model fine-tunes alone from the global one).
        personal_epochs: epochs of the personal update per round (None: the job's E).

    Raises:
        ValueError: λ < 0 (names ``--ditto-lambda``).
    """

    name = "ditto"
    summary = "soft sharing: FedAvg'd global model + a personal model per client pulled by λ/2·‖p − w‖² (--ditto-lambda)"
    OPTIONS = (Option("ditto_lambda", float, 0.1, "λ >= 0 of ditto's L2 pull λ/2·‖p_k − w*‖² towards the global "
                      "model (Li et al. 2021, Eq. 2; default 0.1)"),)
    personalised = True

    def __init__(self, tasks: TaskSet, rounds: int, lam: float = 0.1, personal_epochs: int | None = None, **kw):
        super().__init__(tasks, rounds, **kw)
        if not lam >= 0:
            raise ValueError(f"--ditto-lambda: must be >= 0, got {lam}")
        self.lam = float(lam)
        self.personal_epochs = personal_epochs

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"lam": option(cfg, "ditto_lambda")}

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if "all" in done:
            return []
        cfg: dict[str, Any] = {"lambda": self.lam}
        if self.personal_epochs is not None:
            cfg["personal_epochs"] = int(self.personal_epochs)
        return [Job("all", tuple(self.tasks.names), self.rounds, procedure="ditto", method_config=cfg)]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "all" for t in self.tasks.names}
