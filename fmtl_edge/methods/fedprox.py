"""``fedprox``: all-in-one where each client's local objective adds the proximal term
μ/2·‖w − w_global‖² (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
Eq. 2); μ travels to the clients in ``method_config`` (procedure ``fedprox``)."""

from __future__ import annotations

from typing import Any

from fmtl_edge.plan import Job
from fmtl_edge.methods.all_in_one import AllInOne
from fmtl_edge.methods.base import Option, option
from fmtl_edge.tasks import TaskSet


class FedProx(AllInOne):
    """Args:
        mu: μ > 0, the proximal weight.

    Raises:
        ValueError: μ ≤ 0 (names ``--fedprox-mu``).
    """

    name = "fedprox"
    summary = "all-in-one with FedProx's proximal term μ/2·‖w − w_global‖² (--fedprox-mu)"
    OPTIONS = (Option("fedprox_mu", float, 0.01, "μ > 0 of fedprox's proximal term μ/2·‖w − w_global‖² (default 0.01)"),)

    def __init__(self, tasks: TaskSet, rounds: int, mu: float = 0.01, **kw):
        super().__init__(tasks, rounds, **kw)
        if not mu > 0:
            raise ValueError(f"--fedprox-mu: fedprox needs mu > 0 (the proximal weight), got {mu}")
        self.mu = mu

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"mu": option(cfg, "fedprox_mu")}

    def _job(self) -> Job:
        return Job("all", tuple(self.tasks.names), self.rounds, procedure="fedprox", method_config={"mu": self.mu})
