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
