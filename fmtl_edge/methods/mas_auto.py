"""``mas-auto``: MAS with R0 and x chosen from the measured affinities (the "future work" of
Zhuang et al., "MAS: Towards Resource-Efficient Federated Multiple-Task Learning", ICCV 2023, §6:
choosing when to split and into how many groups).

The merge phase runs as consecutive one-round jobs ``merge-0``, ``merge-1``, ... each continuing
the previous one (``init_from``) and its learning-rate schedule (``Job.lr_schedule``: round k of the
merge phase uses the rate of round k of an R0max-round poly schedule, as one R0max-round merge job
would), with the clients measuring the lookahead affinity (MAS Eq. 3). After merge round m
(m = 1, 2, ...) the method computes, from the finished jobs only (so the plan stays a pure function
of them and ``simulate --resume`` is exact):

1. ``M_m``: the mean of the per-round affinity matrices of merge rounds 1..m that measured one
   (each round's matrix is the equal-weight mean over its clients; the mean over rounds is MAS's
   server average, Alg. 1 line 12, over the rounds run so far);
2. the score curve ``score(x)`` = score of :func:`~fmtl_edge.affinity.best_partition` (M_m, x) for
   x = 1..n (exact DP; self-affinity Eq. 4 on the diagonal; a partition's score is Σ over tasks of
   the affinity onto it within its group);
3. ``x_m`` (:func:`choose_x`): the smallest x in 1..n−1 with
   ``score(x+1) − score(x) <= ε · max(|score(x)|, |score(x+1)|)`` (one more group gains at most a
   fraction ε of the larger score; ε = ``--auto-epsilon``, default 0.05), or n when every extra group
   gains more; and ``P_m`` the best partition into ``x_m`` groups.

The merge phase stops after round m (R0 = m) when ``P_m`` is the same partition as after each of the
k − 1 rounds before (k = ``--auto-stable-rounds``, default 3: the partition stayed the same for k
consecutive merge rounds; so R0 >= k), or at the cap R0max = ``--r0`` (``capped`` in the record).
Then each group of the last partition trains R − R0 rounds from the merged weights (``split-<g>``,
fresh optimizer, restarted schedule), as in ``mas-x``; each task gets R rounds in total.

The results entry's ``decision`` (:meth:`MASAuto.decision`) records why: R0, R0max and its source,
``capped``, x, the groups, the final score per x and, per merge round, its x, partition and scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fmtl_edge.affinity import Partition, best_partition, self_affinity
from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option, r0_of
from fmtl_edge.tasks import TaskSet

MERGE_PREFIX = "merge-"


def merge_job_name(k: int) -> str:
    """Name of the merge phase's round ``k`` (0-based) job: ``merge-<k>``."""
    return f"{MERGE_PREFIX}{k}"


def partition_scores(S: Any) -> list[Partition]:
    """The best partition into x groups for every x = 1..n (index x − 1).

    Args:
        S: ``(n, n)`` affinity matrix, ``S[i, j]`` = effect of task i's lookahead step on task j's loss
            (diagonal ignored; Eq. 4's self-affinity is computed).

    Raises:
        ValueError: as :func:`~fmtl_edge.affinity.best_partition`.
    """
    a = np.asarray(S, dtype=np.float64)
    return [best_partition(a, x) for x in range(1, a.shape[0] + 1)]


def choose_x(scores: Sequence[float], epsilon: float) -> int:
    """The smallest x in 1..n−1 whose next group gains at most a fraction ε:
    ``scores[x] − scores[x−1] <= ε · max(|scores[x−1]|, |scores[x]|)`` (``scores[x−1]`` = score(x),
    a dimensionless sum of affinities); n = ``len(scores)`` when none does (1 for n = 1).

    Raises:
        ValueError: empty ``scores``, or ε < 0 or not finite (names ``--auto-epsilon``).
    """
    if not scores:
        raise ValueError("choose_x needs the score of at least x = 1")
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"--auto-epsilon: must be a finite number >= 0, got {epsilon!r}")
    for x in range(1, len(scores)):
        a, b = float(scores[x - 1]), float(scores[x])
        if b - a <= epsilon * max(abs(a), abs(b)):
            return x
    return len(scores)


@dataclass(frozen=True)
class RoundDecision:
    """What the rule decides after merge round ``round`` (1-based count of merge rounds run).

    Attributes:
        round: merge rounds run so far (m).
        measured: whether any of rounds 1..m measured an affinity (else nothing is decided).
        x: the chosen number of groups x_m, or None.
        groups: the best partition into x_m groups (task indices), or None.
        scores: score(x) for x = 1..n on M_m, or None.
    """

    round: int
    measured: bool
    x: int | None
    groups: tuple[tuple[int, ...], ...] | None
    scores: tuple[float, ...] | None


def round_decisions(per_round: Sequence[np.ndarray | None], epsilon: float, n: int) -> list[RoundDecision]:
    """The decision after each merge round from the per-round ``(n, n)`` affinity matrices (None:
    that round measured nothing): on the running mean of the measured ones so far.

    With n = 1 every round decides the single group (nothing is measured).
    """
    out: list[RoundDecision] = []
    seen: list[np.ndarray] = []
    for m, S in enumerate(per_round, start=1):
        if n == 1:
            out.append(RoundDecision(m, False, 1, ((0,),), (0.0,)))
            continue
        if S is not None:
            seen.append(np.asarray(S, dtype=np.float64))
        if not seen:
            out.append(RoundDecision(m, False, None, None, None))
            continue
        parts = partition_scores(np.mean(seen, axis=0))
        scores = tuple(float(p.score) for p in parts)
        x = choose_x(scores, epsilon)
        out.append(RoundDecision(m, True, x, parts[x - 1].groups, scores))
    return out


def stop_round(decisions: Sequence[RoundDecision], stable_rounds: int) -> int | None:
    """R0: the first m whose partition equals the partitions after each of the ``stable_rounds`` − 1
    rounds before it (all decided); None while no such m is among ``decisions``."""
    k = stable_rounds
    for m in range(k, len(decisions) + 1):
        window = [d.groups for d in decisions[m - k:m]]
        if window[0] is not None and all(g == window[0] for g in window):
            return m
    return None


class MASAuto(Method):
    """Args:
        tasks: the task set.
        rounds: R, total rounds per task (merge R0 + split R − R0).
        r0_max: the cap on R0 (``--r0``), 1 <= R0max < R.
        stable_rounds: k >= 1, consecutive merge rounds with the same partition that end the merge.
        epsilon: ε >= 0 of the x rule (:func:`choose_x`), relative.

    Raises:
        ValueError: R0max outside 1..R−1 (names ``--r0``), k < 1 (``--auto-stable-rounds``), ε < 0
            (``--auto-epsilon``).
    """

    name = "mas-auto"
    summary = ("MAS choosing R0 and x itself: one-round merge jobs until the best partition of the running "
               "mean affinity is the same for --auto-stable-rounds rounds (cap --r0), x the smallest whose "
               "next group gains <= --auto-epsilon of the score; then the split as mas-x")
    OPTIONS = (
        Option("auto_stable_rounds", int, 3, "mas-auto: stop merging once the chosen partition is the same "
               "after this many consecutive merge rounds (>= 1; R0 <= --r0)"),
        Option("auto_epsilon", float, 0.05, "mas-auto: x = the smallest x with score(x+1) - score(x) <= "
               "eps * max(|score(x)|, |score(x+1)|) (relative gain of one more group; >= 0)"),
    )

    def __init__(self, tasks: TaskSet, rounds: int, r0_max: int, stable_rounds: int = 3, epsilon: float = 0.05,
                 **kw):
        super().__init__(tasks, rounds, **kw)
        if not 1 <= r0_max < rounds:
            raise ValueError(f"--r0: mas-auto caps R0 at --r0, which must satisfy 1 <= r0 < rounds; got "
                             f"r0={r0_max}, rounds={rounds}")
        if isinstance(stable_rounds, bool) or int(stable_rounds) != stable_rounds or stable_rounds < 1:
            raise ValueError(f"--auto-stable-rounds: must be a whole number >= 1, got {stable_rounds!r}")
        if not (np.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"--auto-epsilon: must be a finite number >= 0, got {epsilon!r}")
        self.r0_max = int(r0_max)
        self.stable_rounds = int(stable_rounds)
        self.epsilon = float(epsilon)

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"r0_max": r0_of(cfg, cls.name)[0], "stable_rounds": option(cfg, "auto_stable_rounds"),
                "epsilon": option(cfg, "auto_epsilon")}

    # -- the merge phase -------------------------------------------------------------------------
    def merge_job(self, k: int) -> Job:
        """Merge round k (0-based): one round, continuing merge round k − 1 and the R0max schedule."""
        return Job(merge_job_name(k), tuple(self.tasks.names), 1, init_from=merge_job_name(k - 1) if k else None,
                   measure_affinity=len(self.tasks) > 1, lr_schedule=(k, self.r0_max))

    def merge_rounds(self, done: Mapping[str, JobOutcome]) -> list[JobOutcome]:
        """The finished merge jobs, in order (merge-0, merge-1, ... up to the first missing one)."""
        out = []
        while merge_job_name(len(out)) in done:
            out.append(done[merge_job_name(len(out))])
        return out

    def decisions(self, done: Mapping[str, JobOutcome]) -> list[RoundDecision]:
        """The decision after each finished merge round (:func:`round_decisions`)."""
        per_round = [o.affinity_per_round.get(0) for o in self.merge_rounds(done)]
        return round_decisions(per_round, self.epsilon, len(self.tasks))

    def chosen_r0(self, done: Mapping[str, JobOutcome]) -> int | None:
        """R0 once the merge phase has ended (stable partition, or the cap R0max), else None.

        Raises:
            RuntimeError: the cap was reached and no merge round measured an affinity.
        """
        dec = self.decisions(done)
        m = stop_round(dec, self.stable_rounds)
        if m is not None:
            return m
        if len(dec) < self.r0_max:
            return None
        if dec[-1].groups is None:
            raise RuntimeError("the merge phase measured no task affinity (every client had fewer than one "
                               "measured batch); lower --affinity-every or raise --local-epochs")
        return self.r0_max

    def final_decision(self, done: Mapping[str, JobOutcome]) -> RoundDecision:
        """The decision after round R0 (the partition the split uses).

        Raises:
            RuntimeError: the merge phase has not ended.
        """
        r0 = self.chosen_r0(done)
        if r0 is None:
            raise RuntimeError("mas-auto: the merge phase has not ended yet")
        return self.decisions(done)[r0 - 1]

    # -- the plan --------------------------------------------------------------------------------
    def split_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        r0 = self.chosen_r0(done)
        names = self.tasks.names
        return [Job(f"split-{g}", tuple(names[i] for i in group), self.rounds - r0, init_from=merge_job_name(r0 - 1))
                for g, group in enumerate(self.final_decision(done).groups)]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        ran = len(self.merge_rounds(done))
        if self.chosen_r0(done) is None:
            return [self.merge_job(ran)]
        return [j for j in self.split_jobs(done) if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: j.name for j in self.split_jobs(done) for t in j.tasks}

    def merged_affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        """The mean of the measured per-round matrices of the merge rounds run (M_R0), or None."""
        mats = [o.affinity_per_round[0] for o in self.merge_rounds(done) if 0 in o.affinity_per_round]
        return np.mean(mats, axis=0) if mats else None

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        S = self.merged_affinity(done)
        return None if S is None else self_affinity(S)

    def decision(self, done: Mapping[str, JobOutcome]) -> dict[str, Any]:
        """The results entry's ``decision``: why this R0 and this x (JSON-ready)."""
        names = self.tasks.names
        r0 = self.chosen_r0(done)
        dec = self.decisions(done)
        final = dec[r0 - 1] if r0 is not None else None

        def groups(g):
            return None if g is None else [[names[i] for i in grp] for grp in g]

        return {
            "rule": (f"R0: first merge round whose partition equals the previous {self.stable_rounds - 1} rounds' "
                     f"(cap R0max = --r0 = {self.r0_max}); x: smallest x with score(x+1) - score(x) <= "
                     f"{self.epsilon:g} * max(|score(x)|, |score(x+1)|)"),
            "r0": r0, "r0_max": self.r0_max, "r0_max_source": "--r0",
            "capped": bool(r0 is not None and stop_round(dec, self.stable_rounds) is None),
            "stable_rounds": self.stable_rounds, "epsilon": self.epsilon,
            "x": None if final is None else final.x,
            "groups": None if final is None else groups(final.groups),
            "scores": None if final is None or final.scores is None
            else {str(x): s for x, s in enumerate(final.scores, start=1)},
            "per_round": [{"round": d.round, "measured": d.measured, "x": d.x, "groups": groups(d.groups),
                           "scores": None if d.scores is None else list(d.scores)} for d in dec],
        }

    def planned_rounds(self) -> int:
        """An upper bound (R0 and x are chosen while it runs): R0max merge rounds + n groups of R − k rounds."""
        k = min(self.stable_rounds, self.r0_max)
        return self.r0_max + max(len(self.tasks), 1) * (self.rounds - k)
