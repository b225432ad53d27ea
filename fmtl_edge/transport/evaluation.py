"""Evaluation work of the remote pool: final models evaluated on the devices' test splits."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

from fmtl_edge.messages import Assignment
from fmtl_edge.transport.model_files import WriteFailed
from fmtl_edge.transport.scheduler import Scheduler, Slot


def evaluate_on_devices(scheduler: Scheduler, requests: Sequence[tuple[int, Assignment]],
                        timeout_s: float | None = None) -> dict[int, dict]:
    """Run evaluation work (one per ``(client id, assignment)``: the assignment's state is the model
    and its tasks are evaluated on that client's test split). Returns client → ``{job: {task: {loss_sum,
    metric_sum, n}}}`` for the clients that answered (offline ones are skipped after
    ``dispatch_wait_s``); ``timeout_s`` (default: the policy's ``eval_timeout_s``) bounds it.

    Raises:
        PoolClosed: the server is stopping.
        WriteFailed: a model file cannot be written (a full disk).
    """
    if not requests:
        return {}
    policy = scheduler.policy
    if timeout_s is None:
        timeout_s = policy.eval_timeout_s
    slots = [Slot(i, int(c), a, kind="evaluate", replaceable=False, waiting_since=time.monotonic())
             for i, (c, a) in enumerate(requests)]
    try:
        files = scheduler.write_models(slots, lambda s: f"eval-{s.assignment.job}")
    except OSError as e:
        raise WriteFailed("evaluate", 0, "the model to evaluate", e, scheduler.files.models_dir) from None
    out: dict[int, dict] = {}
    pol = replace(policy, deadline_s=timeout_s, min_updates=0) if timeout_s is not None else None
    for res in scheduler.run_slots(slots, files, "evaluate", 0, policy=pol):
        cid = res["client_id"]
        out.setdefault(cid, {}).setdefault(res["job"], {}).update(res["sums"])
    return out
