"""``--eval-every N``: test-loss curves of every job's global model during training."""

from __future__ import annotations

from typing import Any


class CurveRecorder:
    """``--eval-every N``: test-loss points of every job's current global model during training.

    After a round of a job whose *position* — the rounds the job's tasks have trained, counting the
    jobs it continues from (``init_from``; a split job of mas-2 after R0 merge rounds starts at R0)
    — is a multiple of N, and after a job's last round, the job's global model is evaluated on the
    union of the clients' test splits through the pool (the evaluation assignments of
    :mod:`fmtl_edge.evaluation`, global model; :func:`fmtl_edge.client.add_sums` /
    :func:`~fmtl_edge.client.finish_sums`). Evaluations are not client executions: they are not
    metered and do not count in ``device_s``, energy or sample-passes (they do count in ``wall_s``),
    and they draw no randomness, so training is the same with or without them.

    Attributes:
        points: ``[{"job", "round" (0-based in the job), "position", "total_test_loss" (Σ over the
            job's tasks of the mean loss per test sample), "per_task": task → loss}]`` in order.

    Args:
        every: N >= 1.
        points: points already recorded (a resumed run).
        jobs: jobs of the method already seen (a resumed run), for the positions.
    """

    def __init__(self, every: int, points: list[dict[str, Any]] | None = None, jobs=()):
        if every < 1:
            raise ValueError(f"--eval-every: must be >= 1 here, got {every}")
        self.every = int(every)
        self.points: list[dict[str, Any]] = list(points or [])
        self.jobs = {j.name: j for j in jobs}

    def offset(self, job) -> int:
        """Rounds the jobs ``job`` continues from ran (0 for a fresh job)."""
        total, seen, j = 0, set(), job
        while j.init_from is not None and j.init_from in self.jobs and j.init_from not in seen:
            seen.add(j.init_from)
            j = self.jobs[j.init_from]
            total += j.rounds
        return total

    def due(self, job, round_idx: int) -> bool:
        return (self.offset(job) + round_idx + 1) % self.every == 0 or round_idx + 1 >= job.rounds

    def record(self, coord, ckpt) -> dict[str, Any] | None:
        """Evaluate ``ckpt``'s global model if its round is due; returns the point (or None)."""
        from fmtl_edge.client import add_sums, finish_sums
        from fmtl_edge.messages import Assignment
        from fmtl_edge.partition import PERSONAL

        job, r = ckpt.job, int(ckpt.round)
        self.jobs.setdefault(job.name, job)
        if not self.due(job, r):
            return None
        layout = coord.layout(job, ckpt.state)
        a = Assignment(job=job.name, round=r + 1, tasks=tuple(job.tasks), state=ckpt.state, lr=0.0, config=coord.train,
                       seed=coord.seed, procedure=job.procedure, method_config=dict(job.method_config),
                       state_key=coord.state_key(job), personal=layout.names_in(PERSONAL), personalised=False)
        res = coord.pool.evaluate([(c, a) for c in coord.pool.eligible(job.tasks)])
        total: dict[str, dict] = {}
        for c in sorted(res):
            add_sums(total, res[c].get(job.name, {}))
        per = finish_sums(coord.tasks, total)
        losses = {t: float(per[t]["loss"]) for t in job.tasks if t in per}
        point = {"job": job.name, "round": r, "position": self.offset(job) + r + 1,
                 "total_test_loss": float(sum(losses.values())) if len(losses) == len(job.tasks) else None,
                 "per_task": losses}
        self.points.append(point)
        return point
