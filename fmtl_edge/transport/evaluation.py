"""Evaluation work of the remote pool: final models evaluated on the devices' test splits."""

from __future__ import annotations

import time
from typing import Sequence

from fmtl_edge.messages import Assignment
from fmtl_edge.transport.model_files import ModelFile
from fmtl_edge.transport.scheduler import RoundPolicy, Slot


class EvaluationMixin:
    """Evaluation rounds (part of :class:`~fmtl_edge.transport.pool.RemoteClientPool`)."""

    def evaluate(self, requests: Sequence[tuple[int, Assignment]], timeout_s: float | None = None) -> dict[int, dict]:
        """Run evaluation work (one per ``(client id, assignment)``: the assignment's state is the model
        and its tasks are evaluated on that client's test split). Returns client → ``{task: {loss_sum,
        metric_sum, n}}`` for the clients that answered (offline ones are skipped after
        ``dispatch_wait_s``); ``timeout_s`` (default: the policy's ``eval_timeout_s``) bounds it."""
        if not requests:
            return {}
        if timeout_s is None:
            timeout_s = self.policy.eval_timeout_s
        slots = [Slot(i, int(c), a, kind="evaluate", replaceable=False, waiting_since=time.monotonic())
                 for i, (c, a) in enumerate(requests)]
        files: dict[int, ModelFile] = {}
        by_state: dict[int, ModelFile] = {}
        for s in slots:
            key = id(s.assignment.state)
            if key not in by_state:
                by_state[key] = self.write_model(s.assignment.state, f"eval-{s.assignment.job}")
            files[s.index] = by_state[key]
        out: dict[int, dict] = {}
        saved = self.policy
        if timeout_s is not None:
            self.policy = RoundPolicy(**{**saved.__dict__, "deadline_s": timeout_s, "min_updates": 0})
        try:
            for i, res in enumerate(self._run_slots(slots, files, "evaluate", 0)):
                cid = res["client_id"]
                out.setdefault(cid, {}).setdefault(res["job"], {}).update(res["sums"])
        finally:
            self.policy = saved
        return out

