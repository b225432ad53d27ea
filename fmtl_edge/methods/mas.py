"""``mas-x``: merge and split (Zhuang et al., "MAS: Towards Resource-Efficient Federated
Multiple-Task Learning", ICCV 2023, Alg. 1).

1. *Merge*: all tasks in one multi-task model, trained all-in-one for R0 rounds while clients
   measure task affinities by lookahead (Eq. 3, :func:`fmtl_edge.affinity.lookahead_affinity`); the
   server averages them over clients and rounds.
2. *Split*: the diagonal is filled with Eq. 4 (:func:`fmtl_edge.affinity.self_affinity`) and the tasks
   are split into exactly x groups maximising the total affinity onto each task within its group
   (:func:`fmtl_edge.affinity.best_partition`, exact DP in C++).
3. Each group continues for R − R0 rounds from the merged weights (θ_s and its tasks' θ_i), with a
   fresh optimizer and a restarted learning-rate schedule. Task α_i's final model is its group's θ_s
   plus θ_i.

Ablations (MAS Table 1): ``--split-init scratch`` trains the groups from a fresh initialisation
instead of the merged weights; ``--split worst`` takes the minimum-score partition into x groups
(:func:`worst_partition`) instead of the best. A non-default setting is appended to the name
(``mas-2-worst-scratch``) so the variants are told apart in results.

``--affinity-rounds`` (``0-9``, ``1,4-5``, ``last:5``) chooses the merge rounds whose clients measure
the affinity; only those are averaged, the others run as plain all-in-one rounds (no lookahead).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fmtl_edge.affinity import Partition, best_partition, self_affinity
from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option, r0_of
from fmtl_edge.tasks import TaskSet

MERGE = "merge"
SPLIT_INITS = ("merged", "scratch")
SPLIT_RULES = ("affinity", "worst")


def worst_partition(S: np.ndarray, n_splits: int) -> Partition:
    """The partition into exactly ``n_splits`` groups of *minimal* score (MAS Table 1's "worst"
    split). The score is linear in S (self-affinity, Eq. 4, included), so this is the best partition
    of −S with its score negated."""
    p = best_partition(-np.asarray(S, dtype=np.float64), n_splits)
    return Partition(groups=p.groups, score=-p.score)


def parse_affinity_rounds(spec: str | None, r0: int) -> tuple[int, ...] | None:
    """The merge rounds of ``--affinity-rounds`` (0-based, sorted): ``a-b`` (inclusive), ``a,b,c``
    (items may be ranges), ``last:k`` (the last k of R0 rounds); None/empty: every round.

    Raises:
        ValueError: malformed, or a round outside 0..R0−1 (names ``--affinity-rounds``).
    """
    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    try:
        if spec.startswith("last:"):
            k = int(spec[5:])
            if not 1 <= k <= r0:
                raise ValueError
            return tuple(range(r0 - k, r0))
        out: set[int] = set()
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            if lo > hi:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"--affinity-rounds: {spec!r} is not a-b, a,b,... or last:k with k in 1..R0={r0}") from None
    if not out or min(out) < 0 or max(out) >= r0:
        raise ValueError(f"--affinity-rounds: {spec!r} names rounds outside the merge phase 0..{r0 - 1}")
    return tuple(sorted(out))


class MAS(Method):
    """Args:
        tasks: the task set.
        rounds: R, total rounds per task (merge R0 + split R − R0).
        r0: R0, rounds of the all-in-one (merge) phase; 1 <= R0 < R.
        n_splits: x, the number of groups; 1 <= x <= n.

    Raises:
        ValueError: R0 outside 1..R−1 or x outside 1..n (message names the fix).
    """

    takes_groups = True
    name = "mas-<x>"
    summary = ("merge all tasks into one multi-task model, train it all-in-one for R0 rounds while measuring "
               "task affinities (lookahead, MAS Eq. 3), split the tasks into x groups that maximise affinity "
               "(exact search), train each group R-R0 rounds from the merged weights "
               "(ablations: --split-init, --split)")
    OPTIONS = (
        Option("split_init", str, "merged", "mas: the groups start from the merged weights (merged, the paper) "
               "or a fresh initialisation (scratch; MAS Table 1 ablation)", SPLIT_INITS),
        Option("affinity_rounds", str, "", "mas: merge rounds that measure (and are averaged): a-b, a,b,... "
               "or last:k (default: every merge round); the others run as plain all-in-one rounds"),
        Option("split", str, "affinity", "mas: split by maximal affinity (affinity, the paper) or take the "
               "minimum-score partition (worst; MAS Table 1 ablation)", SPLIT_RULES),
    )

    def __init__(self, tasks: TaskSet, rounds: int, r0: int, n_splits: int, split_init: str = "merged",
                 split: str = "affinity", affinity_rounds: str | None = None, **kw):
        super().__init__(tasks, rounds, **kw)
        if not 1 <= r0 < rounds:
            raise ValueError(f"r0 must satisfy 1 <= r0 < rounds; got r0={r0}, rounds={rounds}: lower --r0")
        if not 1 <= n_splits <= len(tasks):
            raise ValueError(
                f"mas-{n_splits}: cannot split {len(tasks)} tasks into {n_splits} groups; use mas-1..mas-{len(tasks)}"
            )
        if split_init not in SPLIT_INITS:
            raise ValueError(f"--split-init: {split_init!r} is not one of {', '.join(SPLIT_INITS)}")
        if split not in SPLIT_RULES:
            raise ValueError(f"--split: {split!r} is not one of {', '.join(SPLIT_RULES)}")
        self.r0 = r0
        self.n_splits = n_splits
        self.split_init = split_init
        self.split_rule = split
        self.affinity_rounds = parse_affinity_rounds(affinity_rounds, r0)
        self.name = f"mas-{n_splits}" + ("-worst" if split == "worst" else "") + (
            "-scratch" if split_init == "scratch" else "")

    @classmethod
    def positional(cls, cfg: Any, name: str) -> tuple:
        return r0_of(cfg, name)

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"split_init": option(cfg, "split_init"), "split": option(cfg, "split"),
                "affinity_rounds": option(cfg, "affinity_rounds") or None}

    def merge_job(self) -> Job:
        cfg = {} if self.affinity_rounds is None else {"affinity_rounds": list(self.affinity_rounds)}
        return Job(MERGE, tuple(self.tasks.names), self.r0, measure_affinity=len(self.tasks) > 1, method_config=cfg)

    def partition(self, done: Mapping[str, JobOutcome]) -> Partition:
        """The split decided from the merge phase's averaged affinities."""
        S = done[MERGE].affinity
        n = len(self.tasks)
        if S is None:
            if n == 1 or self.n_splits == 1:
                return Partition(groups=(tuple(range(n)),), score=0.0)
            if self.n_splits == n:
                return Partition(groups=tuple((i,) for i in range(n)), score=0.0)
            raise RuntimeError(
                "the merge phase measured no task affinity (every client had fewer than one measured "
                "batch); lower --affinity-every or raise --local-epochs"
            )
        if self.split_rule == "worst":
            return worst_partition(S, self.n_splits)
        return best_partition(S, self.n_splits)

    def split_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        names = self.tasks.names
        return [
            Job(f"split-{g}", tuple(names[i] for i in group), self.rounds - self.r0,
                init_from=MERGE if self.split_init == "merged" else None)
            for g, group in enumerate(self.partition(done).groups)
        ]

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if MERGE not in done:
            return [self.merge_job()]
        return [j for j in self.split_jobs(done) if j.name not in done]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: j.name for j in self.split_jobs(done) for t in j.tasks}

    def affinity(self, done: Mapping[str, JobOutcome]) -> np.ndarray | None:
        S = done[MERGE].affinity if MERGE in done else None
        return None if S is None else self_affinity(S)

    def planned_rounds(self) -> int:
        return self.r0 + self.n_splits * (self.rounds - self.r0)
