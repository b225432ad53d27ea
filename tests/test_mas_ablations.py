"""MAS Table 1 ablations: ``--split worst`` (the minimum-score partition) and ``--split-init scratch``
(groups from a fresh initialisation), as options through the config and in the plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fmtl_edge.affinity import best_partition, group_score, self_affinity
from fmtl_edge.config import SimulationConfig
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.messages import TrainConfig
from fmtl_edge.methods import MAS, make_method
from fmtl_edge.methods.mas import worst_partition
from fmtl_edge.models import ModelSpec

from test_mas_plan import S_TRUE, TASKS, ScriptedPool


def _all_partitions(n, k):
    """Every partition of range(n) into k groups, by brute force over labelings."""
    seen = set()
    for lab in itertools.product(range(k), repeat=n):
        if len(set(lab)) != k:
            continue
        groups = tuple(sorted(tuple(i for i in range(n) if lab[i] == g) for g in range(k)))
        seen.add(groups)
    return sorted(seen)


# S_TRUE with a and c hurting each other most: a unique worst split {a, c}, {b, d}
S_KNOWN = S_TRUE.copy()
S_KNOWN[0, 2] = S_KNOWN[2, 0] = -0.5


def test_worst_split_is_the_minimum_score_partition_of_a_known_matrix():
    sd = self_affinity(S_KNOWN)
    scores = {p: sum(group_score(sd, g) for g in p) for p in _all_partitions(4, 2)}
    want = min(scores, key=scores.get)
    assert want == ((0, 2), (1, 3)) and sorted(scores.values())[1] > scores[want]  # unique minimum
    got = worst_partition(S_KNOWN, 2)
    assert tuple(sorted(got.groups)) == want
    assert got.score == pytest.approx(scores[want])
    # the worst split mixes the helpful pairs (a,b) and (c,d); the best keeps them together
    assert best_partition(S_KNOWN, 2).groups == ((0, 1), (2, 3))
    assert got.score < best_partition(S_KNOWN, 2).score


def _coord(pool):
    return Coordinator(pool, ModelSpec((1, 8, 8), 4), TASKS, TrainConfig(), clients_per_round=2, seed=1)


def test_worst_split_and_scratch_init_in_the_plan():
    pool = ScriptedPool()
    coord = _coord(pool)
    mas = MAS(TASKS, rounds=5, r0=2, n_splits=2, split="worst", split_init="scratch")
    assert mas.name == "mas-2-worst-scratch"
    done = coord.run_method(mas)
    want = worst_partition(done["merge"].affinity, 2).groups
    assert [list(j.tasks) for j in mas.split_jobs(done)] == [[TASKS.names[i] for i in g] for g in want]
    splits = [o for n, o in done.items() if n.startswith("split-")]
    assert splits and all(o.job.init_from is None for o in splits)
    # from scratch: the split starts from the fresh weights (every scripted round adds 1.0), not the merged ones
    k = "backbone.layers.0.0.weight"
    init = coord.initial_state(TASKS.names)
    np.testing.assert_allclose(done["split-0"].state[k], init[k] + 3.0, rtol=1e-6)
    # the default: merged weights
    merged = MAS(TASKS, rounds=5, r0=2, n_splits=2)
    assert merged.name == "mas-2"
    assert all(j.init_from == "merge" for j in merged.split_jobs(done))


def test_ablation_options_come_from_the_config_and_are_checked():
    cfg = SimulationConfig(rounds=5, r0=2, method_options={"split": "worst", "split_init": "scratch"})
    cfg.validate()
    m = make_method("mas-2", TASKS, cfg)
    assert (m.split_rule, m.split_init) == ("worst", "scratch")
    m = make_method("mas-2", TASKS, SimulationConfig(rounds=5, r0=2))
    assert (m.split_rule, m.split_init) == ("affinity", "merged")
    with pytest.raises(ValueError, match="--split"):
        MAS(TASKS, rounds=5, r0=2, n_splits=2, split="random")
    with pytest.raises(ValueError, match="--split-init"):
        MAS(TASKS, rounds=5, r0=2, n_splits=2, split_init="warm")


def test_affinity_rounds_parse():
    from fmtl_edge.methods.mas import parse_affinity_rounds

    assert parse_affinity_rounds("0-2", 10) == (0, 1, 2)
    assert parse_affinity_rounds("last:3", 10) == (7, 8, 9)
    assert parse_affinity_rounds("1,4-5", 10) == (1, 4, 5)
    assert parse_affinity_rounds("", 10) is None
    for bad in ("last:0", "3-1", "x", "9-10", "last:11"):
        with pytest.raises(ValueError, match="--affinity-rounds"):
            parse_affinity_rounds(bad, 10)


def test_only_the_chosen_merge_rounds_measure_affinity():
    from conftest import make_toy_dataset
    from fmtl_edge.simulated_pool import InProcessClientPool

    ds = make_toy_dataset(n_clients=2, n_per_client=16)
    tasks = ds.tasks.subset(["cls", "bin", "reg"])
    ds.tasks = tasks
    spec = ModelSpec((1, 8, 8), 4)
    calls = []

    class Spy(InProcessClientPool):
        def execute_many(self, work):
            for upd in super().execute_many(work):
                calls.append((upd.round, upd.affinity is not None))
                yield upd

    coord = Coordinator(Spy(ds, spec), spec, tasks, TrainConfig(batch_size=8), clients_per_round=2, seed=0)
    mas = MAS(tasks, rounds=4, r0=3, n_splits=2, affinity_rounds="last:1")
    done = coord.run_method(mas)
    merge = done["merge"]
    assert sorted(merge.affinity_per_round) == [2]
    np.testing.assert_allclose(merge.affinity, merge.affinity_per_round[2])
    assert calls[:6] == [(0, False), (0, False), (1, False), (1, False), (2, True), (2, True)]
    # the default measures every merge round
    done = coord.run_method(MAS(tasks, rounds=4, r0=3, n_splits=2))
    assert sorted(done["merge"].affinity_per_round) == [0, 1, 2]
