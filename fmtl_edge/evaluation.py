"""Evaluation of a method's final models, the same in simulation and deployment.

Two kinds (docs/design.md §3), both reported:

- **global**: each task's final global model (its job's state) on the union of the clients' test
  splits, each sample counted once (MAS, all-in-one, one-by-one, ditto's w, centralized);
- **personalised**: each client's own model — the global slices plus its state (personal layers,
  Ditto's p_k) as its procedure defines it — on its own test split; per task the
  test-sample-weighted mean over clients (layered, ditto, local).

Clients compute per-task *sums* (:func:`fmtl_edge.client.evaluate_sums`) wherever they run; this
module sends the evaluation assignments through the pool and finishes the sums.
"""

from __future__ import annotations

from typing import Any, Mapping


from fmtl_edge.client import add_sums, finish_sums
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import JobOutcome
from fmtl_edge.messages import Assignment
from fmtl_edge.partition import PERSONAL, select_state


def _requests(method, done: Mapping[str, JobOutcome], coord: Coordinator, clients: list[int] | None,
              personalised: bool, finals: Mapping[str, str]) -> list[tuple[int, Assignment]]:
    coord.namespace = method.name
    reqs = []
    jobs = sorted(set(finals.values()), key=list(done).index)
    for j in jobs:
        o = done[j]
        layout = coord.layout(o.job, o.state)
        a = Assignment(job=j, round=o.job.rounds, tasks=tuple(o.job.tasks), state=o.state, lr=0.0, config=coord.train,
                       seed=coord.seed, procedure=o.job.procedure, method_config=dict(o.job.method_config),
                       state_key=coord.state_key(o.job), personal=layout.names_in(PERSONAL), personalised=personalised)
        for c in (coord.pool.eligible(o.job.tasks) if clients is None else clients):
            reqs.append((c, a))
    return reqs


def evaluate_method(method, done: Mapping[str, JobOutcome], coord: Coordinator,
                    clients: list[int] | None = None, evaluate=None) -> dict[str, Any]:
    """Evaluate ``method``'s final models through ``coord.pool``.

    Args:
        clients: the clients asked (default: every client holding a task of the job).
        evaluate: ``requests -> {client: {job: sums}}`` (default: ``coord.pool.evaluate``); the gRPC
            pool passes its own with a timeout.

    Returns:
        ``{"global": task → {"loss", "metric", "metric_name", "n"} or None,
        "personalised": {"per_task": task → ..., "per_client": client → task → ...} or None,
        "clients": the clients that answered, "asked": the clients asked}``.
    """
    evaluate = evaluate or coord.pool.evaluate
    finals = method.final_jobs(done)
    own = method.personalised_jobs(done)
    tasks = coord.tasks
    answered: set[int] = set()
    asked: set[int] = set()
    out: dict[str, Any] = {"global": None, "personalised": None}
    if method.global_model:
        reqs = _requests(method, done, coord, clients, personalised=False, finals=finals)
        asked |= {int(c) for c, _ in reqs}
        res = evaluate(reqs) if reqs else {}
        answered |= set(res)
        total: dict[str, dict] = {}
        for c in sorted(res):
            add_sums(total, {t: s for t, s in _final(res[c], finals).items()})
        out["global"] = _complete(tasks, finish_sums(tasks, total), finals)
    if method.personalised:
        reqs = _requests(method, done, coord, clients, personalised=True, finals=own)
        asked |= {int(c) for c, _ in reqs}
        res = evaluate(reqs) if reqs else {}
        answered |= set(res)
        total = {}
        per_client = {}
        for c in sorted(res):
            mine = _final(res[c], own)
            add_sums(total, mine)
            per_client[int(c)] = finish_sums(tasks, mine)
        out["personalised"] = {"per_task": _complete(tasks, finish_sums(tasks, total), own), "per_client": per_client}
    out["clients"] = sorted(answered)
    out["asked"] = sorted(asked)
    return out


def _final(by_job: Mapping[str, Mapping[str, dict]], finals: Mapping[str, str]) -> dict[str, dict]:
    """A client's sums for each task from that task's final job."""
    return {t: by_job[j][t] for t, j in finals.items() if j in by_job and t in by_job[j]}


def _complete(tasks, per_task: dict[str, dict], finals: Mapping[str, str]) -> dict[str, dict]:
    """Every task of the method, in task-set order (NaN loss where no client had test labels)."""
    out = {}
    for t in tasks.names:
        if t not in finals:
            continue
        out[t] = per_task.get(t) or {"loss": float("nan"), "metric": float("nan"), "metric_name": tasks[t].metric_name, "n": 0}
    return out


def evaluate_finals(method, done: Mapping[str, JobOutcome], coord: Coordinator, finals: Mapping[str, str],
                    clients: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """The global test figures of one set of final models (task → job) through the pool: task →
    ``{"loss", "metric", "metric_name", "n"}`` (an oracle's candidate split)."""
    reqs = _requests(method, done, coord, clients, personalised=False, finals=finals)
    res = coord.pool.evaluate(reqs) if reqs else {}
    total: dict[str, dict] = {}
    for c in sorted(res):
        add_sums(total, _final(res[c], finals))
    return _complete(coord.tasks, finish_sums(coord.tasks, total), finals)


def client_models(method, done: Mapping[str, JobOutcome], coord: Coordinator) -> dict[str, tuple[str, dict, list[str]]]:
    """The personalised ``method``'s client models, as the pool holds them (:meth:`ClientPool.client_models`;
    ``{}`` where the clients keep their own): ``name → (job, state, tasks)`` with ``name`` the
    client id, or ``<id>-<job>`` when the method's tasks take their own models from several jobs.
    The models are the ones its personalised evaluation ran (the same requests)."""
    if not method.personalised:
        return {}
    own = method.personalised_jobs(done)
    res = coord.pool.client_models(_requests(method, done, coord, None, personalised=True, finals=own))
    several = len(set(own.values())) > 1
    out = {}
    for c in sorted(res):
        for job, (state, tasks) in res[c].items():
            tasks = [t for t in tasks if own.get(t) == job]
            if tasks:
                out[f"{c}-{job}" if several else str(c)] = (job, select_state(state, tasks), tasks)
    return out
