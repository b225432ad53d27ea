"""``hoa-x``: higher-order approximation of task groupings (Standley et al., "Which Tasks Should Be
Learned Together in Multi-task Learning?", ICML 2020, §4), federated.

1. *Pair phase*: every task alone (``solo-<t>``) and every pair of tasks (``pair-<a>-<b>``) is trained
   from scratch for ``--hoa-pair-rounds`` rounds (0: R, as the paper trains them fully). Its device
   time and energy are part of the method's cost (its jobs are among the finished ones).
2. *Scores*: the loss of task i in a network is the **training** loss of i in that job's last round
   (the sample-weighted mean over the round's clients). The paper uses validation loss; a method sees
   no held-out data here, so its training loss stands in.
3. *Higher-order approximation* (Standley §4): the loss of task i in a group G with |G| ≥ 3 is the
   mean over j ∈ G \\ {i} of i's loss in the pair {i, j} (for |G| = 2 the pair's own loss, for
   G = {i} the solo loss); a group's cost is Σ_{i ∈ G} of these (:func:`group_loss`).
4. *Selection*: the exact minimum-cost partition of the tasks into x groups (enumeration of the set
   partitions, :func:`select_groups`; Standley's search over a budget of networks, restricted to
   disjoint groups as in MAS).
5. Each group is trained from scratch for R rounds (``group-<g>``); a task's final model is its
   group's.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

from fmtl_edge.affinity.search import set_partitions
from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option
from fmtl_edge.tasks import TaskSet


def pair_job_name(a: str, b: str) -> str:
    return f"pair-{a}-{b}"


def solo_job_name(t: str) -> str:
    return f"solo-{t}"


def group_loss(group: Sequence[int], solo: Mapping[int, float], pair: Mapping[tuple[int, int], Mapping[int, float]]) -> float:
    """Standley's approximation of a group's total loss from single-task and pair losses.

    Args:
        group: task indices.
        solo: task i → its loss trained alone.
        pair: ``(i, j)`` with i < j → {i: loss of i in the pair, j: loss of j in the pair}.

    Returns:
        Σ_{i∈G} L_i(G) with L_i({i}) = solo[i] and, for |G| ≥ 2, L_i(G) = mean over j ∈ G\\{i} of
        pair[(min(i,j), max(i,j))][i].
    """
    g = sorted(group)
    if len(g) == 1:
        return float(solo[g[0]])
    total = 0.0
    for i in g:
        others = [j for j in g if j != i]
        total += sum(float(pair[(min(i, j), max(i, j))][i]) for j in others) / len(others)
    return total


def select_groups(n: int, x: int, solo: Mapping[int, float],
                  pair: Mapping[tuple[int, int], Mapping[int, float]]) -> tuple[tuple[tuple[int, ...], ...], float]:
    """The exact minimum of Σ_G :func:`group_loss` over the partitions of ``range(n)`` into ``x``
    groups; the first minimum in :func:`~fmtl_edge.affinity.search.set_partitions` order on ties.

    Returns:
        (groups as sorted tuples ordered by first task, the approximated total loss).
    """
    best: tuple[float, list[list[int]]] | None = None
    cache: dict[tuple[int, ...], float] = {}
    for p in set_partitions(n, x):
        cost = 0.0
        for blk in p:
            key = tuple(blk)
            if key not in cache:
                cache[key] = group_loss(key, solo, pair)
            cost += cache[key]
        if best is None or cost < best[0]:
            best = (cost, p)
    if best is None:
        raise ValueError(f"cannot split {n} tasks into {x} groups")
    return tuple(tuple(b) for b in best[1]), float(best[0])


class HOA(Method):
    """Args:
        tasks: the task set.
        rounds: R, rounds of each chosen group's training.
        n_groups: x, the number of disjoint groups, 1 <= x <= n.
        pair_rounds: rounds of each solo/pair job (0 or None: R).

    Raises:
        ValueError: x outside 1..n or pair_rounds < 0.
    """

    takes_groups = True
    name = "hoa-<x>"
    summary = ("HOA (Standley et al. 2020): every task alone and every pair trained --hoa-pair-rounds rounds, "
               "group losses approximated from the pairs' training losses, the best split into x groups (exact), "
               "each trained from scratch for R rounds")
    OPTIONS = (Option("hoa_pair_rounds", int, 0, "hoa: rounds of each solo and pair job of HOA's pair phase "
                      "(0: R, as Standley et al. 2020 train them fully)"),)

    def __init__(self, tasks: TaskSet, rounds: int, n_groups: int, pair_rounds: int | None = None, **kw):
        super().__init__(tasks, rounds, **kw)
        if not 1 <= n_groups <= len(tasks):
            raise ValueError(f"hoa-{n_groups}: cannot split {len(tasks)} tasks into {n_groups} groups; "
                             f"use hoa-1..hoa-{len(tasks)}")
        if pair_rounds is not None and pair_rounds < 0:
            raise ValueError(f"--hoa-pair-rounds: must be >= 0 (0: R), got {pair_rounds}")
        self.n_groups = n_groups
        self.pair_rounds = int(pair_rounds) if pair_rounds else rounds
        self.name = f"hoa-{n_groups}"

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"pair_rounds": option(cfg, "hoa_pair_rounds")}

    def probe_jobs(self) -> list[Job]:
        """The pair phase: each task alone, then each pair (task-set order); none for x = 1 or x = n."""
        names = self.tasks.names
        if not 1 < self.n_groups < len(names):  # one group or all alone: nothing to choose
            return []
        return ([Job(solo_job_name(t), (t,), self.pair_rounds) for t in names]
                + [Job(pair_job_name(a, b), (a, b), self.pair_rounds) for a, b in itertools.combinations(names, 2)])

    def losses(self, done: Mapping[str, JobOutcome]) -> tuple[dict[int, float], dict[tuple[int, int], dict[int, float]]]:
        """Solo and pair losses (last-round training loss per task) from the finished pair phase."""
        names = self.tasks.names
        idx = {t: i for i, t in enumerate(names)}
        solo: dict[int, float] = {}
        pair: dict[tuple[int, int], dict[int, float]] = {}
        for j in self.probe_jobs():
            o = done[j.name]
            last = o.history[-1].train_loss if o.history else {}
            vals = {idx[t]: float(last.get(t, math.inf)) for t in j.tasks}
            if len(j.tasks) == 1:
                solo.update(vals)
            else:
                pair[tuple(sorted(vals))] = vals
        return solo, pair

    def partition(self, done: Mapping[str, JobOutcome]) -> tuple[tuple[int, ...], ...]:
        n = len(self.tasks)
        if self.n_groups == 1:
            return (tuple(range(n)),)
        if self.n_groups == n:
            return tuple((i,) for i in range(n))
        solo, pair = self.losses(done)
        return select_groups(n, self.n_groups, solo, pair)[0]

    def group_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        names = self.tasks.names
        return [Job(f"group-{g}", tuple(names[i] for i in grp), self.rounds)
                for g, grp in enumerate(self.partition(done))]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        probes = [j for j in self.probe_jobs() if j.name not in done]
        if probes:
            return probes
        return [j for j in self.group_jobs(done) if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: j.name for j in self.group_jobs(done) for t in j.tasks}

    def planned_rounds(self) -> int:
        return sum(j.rounds for j in self.probe_jobs()) + self.n_groups * self.rounds
