"""TAG (Fifty et al. 2021) and HOA (Standley et al. 2020) plans: TAG's overlapping selection and the
task → serving-group mapping; HOA's pair approximation and exact selection by hand, its pair phase
counted in the cost."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_edge.affinity import tag_groups
from fmtl_edge.config import SimulationConfig
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.pool import ClientPool
from fmtl_edge.messages import ClientUpdate, TrainConfig
from fmtl_edge.methods import HOA, TAG, make_method
from fmtl_edge.affinity.search import set_partitions
from fmtl_edge.methods.hoa import group_loss, select_groups
from fmtl_edge.models import ModelSpec
from fmtl_edge.results import method_entry
from fmtl_edge.tasks import Task, TaskSet

TASKS = TaskSet([Task(n, "binary") for n in ("a", "b", "c", "d")])
# b helps a but a hurts b; b and c help each other; c and d help each other: with 3 groups TAG picks
# the overlapping {a, b}, {b, c}, {c, d}
S_OVER = np.array([
    [0.0, -0.5, -0.5, -0.3],
    [0.8, 0.0, 0.6, 0.0],
    [-0.5, 0.6, 0.0, 0.7],
    [-0.3, 0.0, 0.5, 0.0],
])


class Pool(ClientPool):
    """Clients that report ``S`` (restricted to the job's tasks) when measuring, a per-job training loss
    ``loss(job_tasks, task)`` and 0.5 s / 2 J per execution; every round adds 1.0 to each weight."""

    def __init__(self, S=None, loss=None, n=4):
        self.S, self.loss, self.n = S, loss, n
        self.calls = []

    @property
    def client_ids(self):
        return list(range(self.n))

    def execute_many(self, work):
        for cid, a in work:
            self.calls.append((a.job, a.round))
            idx = [TASKS.index(t) for t in a.tasks]
            aff = self.S[np.ix_(idx, idx)] if (a.measure_affinity and self.S is not None) else None
            state = {k: (v + 1.0 if np.issubdtype(v.dtype, np.floating) else v) for k, v in a.state.items()}
            losses = {t: (self.loss(a.tasks, t) if self.loss else 1.0) for t in a.tasks}
            yield ClientUpdate(cid, a.job, a.round, a.tasks, state, 10, losses, aff, 1 if aff is not None else 0,
                               0.5, {"total_j": 2.0, "estimated": True, "source": "test", "total_scope": "none"})


def _coord(pool):
    return Coordinator(pool, ModelSpec((1, 8, 8), 4), TASKS, TrainConfig(), clients_per_round=2, seed=1)


def _onto(S, j, g):
    return np.mean([S[i, j] for i in g if i != j])


# ----------------------------------------------------------------------------------------- TAG ----

def test_tag_serves_each_task_by_its_best_chosen_group():
    pool = Pool(S=S_OVER)
    tag = TAG(TASKS, rounds=3, r0=2, n_groups=3)
    done = _coord(pool).run_method(tag)
    sel = tag_groups(S_OVER, 3)
    groups = {f"group-{g}": grp for g, grp in enumerate(sel.groups)}
    assert list(done) == ["merge", *groups]
    assert any(sum(t in g for g in sel.groups) > 1 for t in range(4))  # the selection overlaps
    final = tag.final_jobs(done)
    assert set(final) == set(TASKS.names)
    for j, t in enumerate(TASKS.names):
        holders = [n for n, g in groups.items() if j in g]
        assert final[t] in holders
        best = max(holders, key=lambda n: _onto(S_OVER, j, groups[n]))  # by hand, first on ties
        assert _onto(S_OVER, j, groups[final[t]]) == pytest.approx(_onto(S_OVER, j, groups[best]))
    # by hand: b is in {a, b} (onto b: -0.5) and {b, c} (0.6); c in {b, c} (0.6) and {c, d} (0.5)
    assert sel.groups == ((0, 1), (1, 2), (2, 3))
    assert final == {"a": "group-0", "b": "group-1", "c": "group-1", "d": "group-2"}
    assert tag.splits(done) == [["a"], ["b", "c"], ["d"]]
    # groups from scratch, R rounds each; the affinity phase ran R0 rounds and is in the cost
    k = "backbone.layers.0.0.weight"
    init = _coord(pool).initial_state(TASKS.names)
    for n in groups:
        assert done[n].job.init_from is None and done[n].job.rounds == 3
        np.testing.assert_allclose(done[n].state[k], init[k] + 3.0, rtol=1e-6)
    assert done["merge"].job.rounds == 2 and done["merge"].job.measure_affinity
    entry = method_entry(tag, done, {}, 3, 0.0)
    assert entry["device_s"] == pytest.approx(0.5 * 2 * (2 + 3 * len(groups)))


def test_tag_from_config_needs_a_group_count():
    cfg = SimulationConfig(rounds=4, r0=2)
    assert make_method("tag-2", TASKS, cfg).name == "tag-2"
    with pytest.raises(ValueError, match="tag-<x>"):
        make_method("tag", TASKS, cfg)


# ----------------------------------------------------------------------------------------- HOA ----

SOLO = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
# pair[(i, j)] = {i: loss of i in the pair, j: loss of j}
PAIR = {
    (0, 1): {0: 0.5, 1: 1.5}, (0, 2): {0: 1.2, 2: 3.5}, (0, 3): {0: 1.1, 3: 3.0},
    (1, 2): {1: 2.5, 2: 2.8}, (1, 3): {1: 1.0, 3: 3.9}, (2, 3): {2: 2.0, 3: 2.0},
}


def test_group_loss_is_the_mean_over_the_pairs_by_hand():
    assert group_loss((2,), SOLO, PAIR) == 3.0
    assert group_loss((0, 1), SOLO, PAIR) == pytest.approx(0.5 + 1.5)
    # {0, 1, 2}: L0 = (0.5 + 1.2)/2, L1 = (1.5 + 2.5)/2, L2 = (3.5 + 2.8)/2
    assert group_loss((0, 1, 2), SOLO, PAIR) == pytest.approx(0.85 + 2.0 + 3.15)
    # {0, 1, 2, 3}: L0 = (0.5+1.2+1.1)/3, L1 = (1.5+2.5+1.0)/3, L2 = (3.5+2.8+2.0)/3, L3 = (3.0+3.9+2.0)/3
    assert group_loss((3, 1, 0, 2), SOLO, PAIR) == pytest.approx((2.8 + 5.0 + 8.3 + 8.9) / 3)


def test_select_groups_is_the_exact_minimum_by_hand():
    assert sorted(map(tuple, map(lambda p: tuple(map(tuple, p)), set_partitions(4, 2)))) == sorted([
        ((0,), (1, 2, 3)), ((0, 1, 2), (3,)), ((0, 1, 3), (2,)), ((0, 2, 3), (1,)),
        ((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))])
    assert sum(1 for _ in set_partitions(5, 3)) == 25  # Stirling S(5, 3)
    # by hand, x = 2: {0,1}+{2,3} = 2.0 + 4.0 = 6.0 is the minimum
    hand = {((0, 1), (2, 3)): 2.0 + 4.0, ((0, 2), (1, 3)): 4.7 + 4.9, ((0, 3), (1, 2)): 4.1 + 5.3}
    groups, cost = select_groups(4, 2, SOLO, PAIR)
    assert groups == ((0, 1), (2, 3)) and cost == pytest.approx(6.0)
    assert cost < min(v for k, v in hand.items() if k != groups)
    for p in set_partitions(4, 2):
        assert sum(group_loss(g, SOLO, PAIR) for g in p) >= cost - 1e-12


def _loss_of(job_tasks, t):
    idx = sorted(TASKS.index(u) for u in job_tasks)
    i = TASKS.index(t)
    return SOLO[i] if len(idx) == 1 else PAIR[tuple(idx)][i] if len(idx) == 2 else 9.0


def test_hoa_plan_pairs_then_groups_from_scratch_and_counts_the_pair_phase():
    pool = Pool(loss=_loss_of)
    hoa = HOA(TASKS, rounds=3, n_groups=2, pair_rounds=1)
    done = _coord(pool).run_method(hoa)
    probes = [n for n in done if n.startswith(("solo-", "pair-"))]
    assert len(probes) == 4 + 6 and all(done[n].job.rounds == 1 for n in probes)
    assert "pair-a-b" in done and "solo-d" in done
    solo, pair = hoa.losses(done)
    assert solo == SOLO and pair == PAIR
    assert hoa.splits(done) == [["a", "b"], ["c", "d"]]
    assert hoa.final_jobs(done) == {"a": "group-0", "b": "group-0", "c": "group-1", "d": "group-1"}
    assert all(done[f"group-{g}"].job.init_from is None and done[f"group-{g}"].job.rounds == 3 for g in (0, 1))
    entry = method_entry(hoa, done, {}, 3, 0.0)
    # 10 one-round probe jobs + 2 groups × 3 rounds, 2 clients each at 0.5 s / 2 J
    assert entry["device_s"] == pytest.approx(0.5 * 2 * (10 + 6))
    assert entry["energy_j"] == pytest.approx(2.0 * 2 * (10 + 6))
    assert hoa.planned_rounds() == 10 + 6


def test_hoa_options_and_trivial_group_counts():
    cfg = SimulationConfig(rounds=4, r0=2, method_options={"hoa_pair_rounds": 2})
    cfg.validate()
    m = make_method("hoa-2", TASKS, cfg)
    assert m.pair_rounds == 2 and m.name == "hoa-2"
    assert make_method("hoa-2", TASKS, SimulationConfig(rounds=4, r0=2)).pair_rounds == 4  # 0: R
    assert HOA(TASKS, 3, 1).probe_jobs() == [] and HOA(TASKS, 3, 4).probe_jobs() == []
    with pytest.raises(ValueError, match="hoa-1..hoa-4"):
        HOA(TASKS, 3, 5)
