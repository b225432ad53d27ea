"""``gradnorm``: all-in-one with GradNorm's adaptive task-loss weights (Chen et al., "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

Clients run the ``gradnorm`` procedure (:mod:`fmtl_edge.procedures.gradnorm`): local SGD on
Σ_i w_i·L_i while the weights w_i are moved to balance the gradient norms on the last shared layer
(α, ``--gradnorm-alpha``). The weights and the initial losses are part of the model state
(``gradnorm.weights``, ``gradnorm.loss0``, scope ``common``), so the server FedAvg's them with the
backbone; :meth:`GradNorm.initial_state` adds them (weights 1, initial losses unset).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmtl_edge.plan import Job
from fmtl_edge.methods.all_in_one import AllInOne
from fmtl_edge.methods.base import Option, option
from fmtl_edge.procedures.gradnorm import initial_entries
from fmtl_edge.tasks import TaskSet


class GradNorm(AllInOne):
    """Args:
        alpha: α ≥ 0, GradNorm's restoring-force strength (0: equal gradient norms).

    Raises:
        ValueError: α < 0 (names ``--gradnorm-alpha``).
    """

    name = "gradnorm"
    summary = ("all-in-one with GradNorm's task-loss weights balancing the gradient norms on the last shared "
               "layer (Chen et al. 2018; --gradnorm-alpha), the weights FedAvg'd with the model")
    OPTIONS = (Option("gradnorm_alpha", float, 1.5, "α >= 0 of gradnorm (Chen et al. 2018, Eq. 2; default 1.5)"),)

    def __init__(self, tasks: TaskSet, rounds: int, alpha: float = 1.5, **kw):
        super().__init__(tasks, rounds, **kw)
        if not alpha >= 0:
            raise ValueError(f"--gradnorm-alpha: must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"alpha": option(cfg, "gradnorm_alpha")}

    def _job(self) -> Job:
        return Job("all", tuple(self.tasks.names), self.rounds, procedure="gradnorm",
                   method_config={"alpha": self.alpha})

    def initial_state(self, job: Job, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**state, **initial_entries(len(job.tasks))}
