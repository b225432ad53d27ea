"""``mas-oracle-<x>`` (``--oracle-splits``): does the affinity choose a good split? (MAS Table 1's check)

A diagnostic, not a method to deploy: it runs ``mas-x`` exactly (the same merge job, affinity,
chosen split and split jobs, so its chosen figures equal ``mas-x``'s bit for bit) and then trains
*every other* partition of the tasks into x groups from the same merged weights (groups named
``oracle-<mask>``, each R − R0 rounds; a group shared by several partitions is trained once). After
the evaluation, its entry's ``oracle`` lists every partition with its affinity score (the split
search's objective) and its test losses, the rank of the affinity-chosen partition among them by
normalised (else raw) total test loss, and the Spearman correlation between the affinity score and
the test loss over the partitions (negative = a higher score goes with a lower loss: the affinity
signal is there). Its device time and energy are the whole check's, not a method's.

Only for small n: Stirling(n, x) partitions (n = 4, x = 2: 7; n = 7, x = 2: 63) are refused above
:data:`MAX_PARTITIONS`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fmtl_edge.affinity import group_score, self_affinity, set_partitions
from fmtl_edge.methods.mas import MAS, MERGE
from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.tasks import TaskSet

#: the most partitions the oracle trains
MAX_PARTITIONS = 64


def _mask(group) -> int:
    return sum(1 << int(i) for i in group)


class MASOracle(MAS):
    """Args: as :class:`~fmtl_edge.methods.mas.MAS`.

    Raises:
        ValueError: more than :data:`MAX_PARTITIONS` partitions of the tasks into x groups.
    """

    name = "mas-oracle-<x>"
    summary = ("diagnostic (--oracle-splits): mas-x, then every other x-split trained from the same merged "
               "weights; reports the rank of the affinity-chosen split by test loss (small n only)")
    OPTIONS = ()

    def __init__(self, tasks: TaskSet, rounds: int, r0: int, n_splits: int, **kw):
        super().__init__(tasks, rounds, r0, n_splits, **kw)
        self.partitions = [tuple(tuple(b) for b in p) for p in set_partitions(len(tasks), n_splits)]
        if len(self.partitions) > MAX_PARTITIONS:
            raise ValueError(f"--oracle-splits: {len(tasks)} tasks have {len(self.partitions)} partitions into "
                             f"{n_splits} groups (more than {MAX_PARTITIONS}); use fewer tasks or another x")
        self.name = f"mas-oracle-{n_splits}"

    def _group_job(self, group, done: Mapping[str, JobOutcome]) -> str:
        """The job that trains ``group``: the chosen split's ``split-g`` when it is one of its
        groups, else ``oracle-<mask>``."""
        chosen = {tuple(g): f"split-{i}" for i, g in enumerate(self.partition(done).groups)}
        return chosen.get(tuple(group), f"oracle-{_mask(group)}")

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if MERGE not in done:
            return [self.merge_job()]
        jobs = self.split_jobs(done)
        names = {j.name for j in jobs}
        for part in self.partitions:
            for group in part:
                name = self._group_job(group, done)
                if name not in names:
                    names.add(name)
                    jobs.append(Job(name, tuple(self.tasks.names[i] for i in group), self.rounds - self.r0,
                                    init_from=MERGE))
        return [j for j in jobs if j.name not in done]

    def candidate_models(self, done: Mapping[str, JobOutcome]) -> dict[str, dict[str, str]]:
        names = self.tasks.names
        return {self.label(part): {names[i]: self._group_job(g, done) for g in part for i in g}
                for part in self.partitions}

    def label(self, part) -> str:
        """``age,gender | race,edges``: a partition by task names."""
        return " | ".join(",".join(self.tasks.names[i] for i in g) for g in part)

    def oracle(self, done: Mapping[str, JobOutcome], losses: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        from scipy import stats

        S = done[MERGE].affinity
        sd = None if S is None else self_affinity(S)
        chosen = self.label(self.partition(done).groups)
        rows = []
        for part in self.partitions:
            lab = self.label(part)
            score = None if sd is None else float(sum(group_score(sd, g) for g in part))
            rows.append({"partition": lab, "groups": [[self.tasks.names[i] for i in g] for g in part],
                         "affinity_score": score, **losses[lab]})
        key = "normalised_total_test_loss" if all(r.get("normalised_total_test_loss") is not None for r in rows) \
            else "total_test_loss"
        order = sorted(rows, key=lambda r: (np.inf if r.get(key) is None else r[key]))
        rank = 1 + [r["partition"] for r in order].index(chosen)
        rho = None
        if sd is not None and len(rows) > 2 and all(r.get(key) is not None for r in rows):
            rho = float(stats.spearmanr([r["affinity_score"] for r in rows], [r[key] for r in rows]).statistic)
        return {"chosen": chosen, "rank": rank, "partitions": len(rows), "by": key, "best": order[0]["partition"],
                "spearman_score_vs_loss": rho, "rows": order}

    def planned_rounds(self) -> int:
        groups = {g for p in self.partitions for g in p}
        return self.r0 + len(groups) * (self.rounds - self.r0)
