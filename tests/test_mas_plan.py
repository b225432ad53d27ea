"""MAS plan over the coordinator: affinity averaging, split decision, split jobs starting from the
merged weights, and reconstruction of each task's final model (group θ_s + its θ_i)."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_edge.affinity import best_partition, self_affinity
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.pool import ClientPool
from fmtl_edge.messages import ClientUpdate, TrainConfig
from fmtl_edge.methods import MAS, AllInOne, OneByOne, make_method
from fmtl_edge.models import ModelSpec
from fmtl_edge.evaluation import evaluate_method
from fmtl_edge.results import final_states
from fmtl_edge.tasks import Task, TaskSet

from conftest import make_toy_dataset

TASKS = TaskSet([Task(n, "binary") for n in ("a", "b", "c", "d")])
# a and b help each other, c and d help each other, the cross pairs hurt
S_TRUE = np.array([
    [0.0, 0.5, -0.2, -0.1],
    [0.4, 0.0, -0.3, -0.2],
    [-0.2, -0.1, 0.0, 0.6],
    [-0.3, -0.2, 0.5, 0.0],
])


class ScriptedPool(ClientPool):
    """Clients that add a job-specific constant to every weight and report S_TRUE (+ noise that
    averages out across the round's clients)."""

    def __init__(self, n=6, tasks=TASKS, S=S_TRUE):
        self.n = n
        self.tasks = tasks
        self.S = S
        self.calls = []

    @property
    def client_ids(self):
        return list(range(self.n))

    def execute_many(self, work):
        for cid, a in work:
            self.calls.append((cid, a.job, a.round, a.tasks))
            idx = [self.tasks.index(t) for t in a.tasks]
            sign = 1 if cid % 2 else -1
            aff = self.S[np.ix_(idx, idx)] + sign * 0.05 if a.measure_affinity else None
            state = {k: (v + 1.0 if np.issubdtype(v.dtype, np.floating) else v) for k, v in a.state.items()}
            yield ClientUpdate(cid, a.job, a.round, a.tasks, state, 10, {t: 1.0 for t in a.tasks},
                               aff, 1 if aff is not None else 0, 0.5,
                               {"total_j": 2.0, "estimated": True, "source": "test", "total_scope": "none"})


def _coord(pool, k=2):
    return Coordinator(pool, ModelSpec((1, 8, 8), 4), TASKS, TrainConfig(), clients_per_round=k, seed=1)


def test_mas_split_follows_measured_affinity_and_reconstructs_models():
    pool = ScriptedPool()
    coord = _coord(pool)
    mas = MAS(TASKS, rounds=5, r0=2, n_splits=2)
    done = coord.run_method(mas)
    assert list(done) == ["merge", "split-0", "split-1"]
    S = done["merge"].affinity
    assert S.shape == (4, 4)
    part = best_partition(S, 2)
    assert part.groups == ((0, 1), (2, 3)) == best_partition(S_TRUE, 2).groups
    assert mas.splits(done) == [["a", "b"], ["c", "d"]]
    # a partition of the tasks: disjoint, covering
    flat = sorted(t for g in mas.splits(done) for t in g)
    assert flat == sorted(TASKS.names)
    assert mas.final_jobs(done) == {"a": "split-0", "b": "split-0", "c": "split-1", "d": "split-1"}
    np.testing.assert_allclose(mas.affinity(done), self_affinity(S))
    # each split ran R - R0 rounds from the merged weights: every scripted round adds 1.0
    init = coord.initial_state(TASKS.names)
    k = "backbone.layers.0.0.weight"
    np.testing.assert_allclose(done["merge"].state[k], init[k] + 2.0, rtol=1e-6)
    np.testing.assert_allclose(done["split-0"].state[k], init[k] + 5.0, rtol=1e-6)
    # split-0's model only has its tasks' heads; the merged head of "a" continued training
    assert not any(n.startswith("heads.c.") for n in done["split-0"].state)
    ha = "heads.a.fc.weight"
    np.testing.assert_allclose(done["split-0"].state[ha], init[ha] + 5.0, rtol=1e-6)
    # device time and energy add up over every client execution (2 per round, 2 + 3 + 3 rounds)
    total_s = sum(o.energy.device_s for o in done.values())
    assert total_s == pytest.approx(0.5 * 2 * 8)
    assert sum(o.energy.total_j for o in done.values()) == pytest.approx(2.0 * 2 * 8)


def test_reconstructed_task_model_is_group_backbone_plus_own_head():
    ds = make_toy_dataset(n_clients=4)
    pool = ScriptedPool(4, tasks=ds.tasks)
    spec = ModelSpec((1, 8, 8), 4)
    coord = Coordinator(pool, spec, ds.tasks, TrainConfig(), clients_per_round=2, seed=0)
    mas = MAS(ds.tasks, rounds=3, r0=1, n_splits=2)
    done = coord.run_method(mas)
    assert len(mas.splits(done)) == 2
    from fmtl_edge.simulated_pool import InProcessClientPool

    real = Coordinator(InProcessClientPool(ds, spec), spec, ds.tasks, TrainConfig(), clients_per_round=2, seed=0)
    per_task = evaluate_method(mas, done, real)["global"]
    states = final_states(mas, done)
    assert set(per_task) == set(ds.tasks.names)
    for t in ds.tasks.names:
        job = mas.final_jobs(done)[t]
        src = done[job].state
        assert set(states[t]) == {k for k in src if not k.startswith("heads.") or k.startswith(f"heads.{t}.")}
        for k, v in states[t].items():
            np.testing.assert_array_equal(v, src[k])
        assert np.isfinite(per_task[t]["loss"])


def test_baseline_plans():
    one = OneByOne(TASKS, 3)
    assert [j.name for j in one.next_jobs({})] == ["task-a", "task-b", "task-c", "task-d"]
    assert one.planned_rounds() == 12
    allin = AllInOne(TASKS, 3)
    assert allin.next_jobs({})[0].tasks == ("a", "b", "c", "d")
    from types import SimpleNamespace

    def cfg(rounds, r0):
        return SimpleNamespace(rounds=rounds, r0=r0, aggregator="fedavg", trim_fraction=0.1)

    assert make_method("mas-3", TASKS, cfg(10, 3)).planned_rounds() == 3 + 3 * 7
    with pytest.raises(ValueError, match="unknown method"):
        make_method("masx-2", TASKS, cfg(10, 3))
    with pytest.raises(ValueError, match=r"mas-<x>"):
        make_method("mas", TASKS, cfg(10, 3))
    with pytest.raises(ValueError, match="mas-1..mas-4"):
        make_method("mas-5", TASKS, cfg(10, 3))
    with pytest.raises(ValueError, match="r0"):
        make_method("mas-2", TASKS, cfg(10, 10))
    with pytest.raises(ValueError, match="takes no parameter"):
        make_method("all-in-one-2", TASKS, cfg(10, 3))


def test_too_few_clients_for_k_is_a_clear_error():
    coord = _coord(ScriptedPool(n=2), k=3)
    with pytest.raises(ValueError, match="clients-per-round"):
        coord.run_method(AllInOne(TASKS, 1))
