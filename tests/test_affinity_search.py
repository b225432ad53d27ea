"""Affinity split search: C++ kernels against the Python references (MAS seed 003 §2, TAG).

Tolerances: scores within 1e-9 (absolute + relative; the two sides sum in different orders).
Groups: the C++ DP is compared exactly with its Python mirror fed the same subset scores (same
tie-breaking), and with the exhaustive reference whenever the reference's best is unique by > 1e-7.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_edge.affinity import search
from fmtl_edge.affinity.search import (
    MAX_TASKS,
    Partition,
    TagSelection,
    best_partition,
    best_partition_at_most,
    best_partition_reference,
    group_score,
    self_affinity,
    self_affinity_reference,
    subset_scores,
    subset_scores_reference,
    tag_groups,
    tag_groups_reference,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def matrices(draw, lo: int = 1, hi: int = 7):
    n = draw(st.integers(lo, hi))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "scaled"]))
    if kind == "normal":
        S = rng.normal(size=(n, n))
    elif kind == "ties":  # small integers: many exactly equal scores
        S = rng.integers(-2, 3, size=(n, n)).astype(float)
    else:
        S = rng.normal(size=(n, n)) * 1e-3
    S[np.diag_indices(n)] = rng.normal(size=n) * 100  # the diagonal must be ignored
    return S


def check_partition(S: np.ndarray, p: Partition, k: int | None) -> None:
    n = S.shape[0]
    flat = sorted(i for g in p.groups for i in g)
    assert flat == list(range(n)), p
    assert all(list(g) == sorted(g) and g for g in p.groups)
    assert [g[0] for g in p.groups] == sorted(g[0] for g in p.groups)
    if k is not None:
        assert len(p.groups) == k
    sd = self_affinity(S)
    assert close(sum(group_score(sd, g) for g in p.groups), p.score)


def test_self_affinity_eq4_by_hand():
    S = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [5.0, 6.0, 9.0]])
    out = self_affinity(S)
    # S[0,0] = (S01 + S10 + S02 + S20) / (2*3 - 2)
    assert out[0, 0] == pytest.approx((1 + 3 + 2 + 5) / 4)
    assert out[1, 1] == pytest.approx((3 + 1 + 4 + 6) / 4)
    assert out[2, 2] == pytest.approx((5 + 2 + 6 + 4) / 4)
    assert out[0, 1] == 1.0 and S[0, 0] == 9.0  # copy, input untouched
    assert out.dtype == np.float64
    assert self_affinity([[7.0]]).tolist() == [[0.0]]


def test_group_score_orientation():
    # onto j in G = mean_{i in G\{j}} S[i, j]: column j, rows i
    S = np.array([[0.0, 1.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sd = self_affinity(S)
    assert group_score(sd, (0, 1)) == pytest.approx(10.0 + 1.0)
    assert group_score(sd, (0, 1, 2)) == pytest.approx((10 + 0) / 2 + (1 + 0) / 2 + 0)
    assert group_score(sd, [2]) == sd[2, 2]
    with pytest.raises(ValueError, match="distinct"):
        group_score(sd, (0, 0))
    with pytest.raises(ValueError, match="empty"):
        group_score(sd, ())


@FAST
@given(matrices())
def test_self_affinity_and_subset_scores_match_reference(S):
    np.testing.assert_allclose(self_affinity(S), self_affinity_reference(S), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(subset_scores(S), subset_scores_reference(S), rtol=1e-9, atol=1e-9)
    assert subset_scores(S)[0] == 0.0


@FAST
@given(matrices(), st.data())
def test_best_partition_matches_reference(S, data):
    n = S.shape[0]
    k = data.draw(st.integers(1, n))
    got = best_partition(S, k)
    ref = best_partition_reference(S, k)
    check_partition(S, got, k)
    assert close(got.score, ref.score), (got, ref)
    # same tie-breaking as the documented DP rule (Python mirror on the same subset scores)
    assert got == search._dp_python(subset_scores(S), n, k, at_most=False)
    # unique optimum -> same groups as the exhaustive reference
    sd = self_affinity(S)
    scores = sorted((sum(group_score(sd, tuple(b)) for b in part) for part in search.set_partitions(n, k)),
                    reverse=True)
    if len(scores) == 1 or scores[0] - scores[1] > 1e-7:
        assert got.groups == ref.groups


@FAST
@given(matrices(), st.data())
def test_best_partition_at_most_is_best_over_k(S, data):
    n = S.shape[0]
    x = data.draw(st.integers(1, n + 2))
    got = best_partition_at_most(S, x)
    check_partition(S, got, None)
    assert len(got.groups) <= min(x, n)
    best = max(best_partition_reference(S, k).score for k in range(1, min(x, n) + 1))
    assert close(got.score, best)
    assert got == search._dp_python(subset_scores(S), n, min(x, n), at_most=True)


@FAST
@given(matrices(hi=5), st.integers(1, 3))
def test_tag_groups_match_reference(S, x):
    n = S.shape[0]
    got = tag_groups(S, x)
    ref = tag_groups_reference(S, x)
    assert isinstance(got, TagSelection)
    assert close(got.score, ref.score), (got, ref)
    assert len(got.groups) <= x
    assert set().union(*map(set, got.groups)) == set(range(n))
    if n > 1:
        assert all(len(g) >= 2 for g in got.groups)
    sd = self_affinity(S)
    total = 0.0
    for j, gi in enumerate(got.assignment):
        g = got.groups[gi]
        assert j in g
        vals = [search._onto(sd, j, h) if len(h) > 1 else sd[j, j] for h in got.groups if j in h]
        mine = search._onto(sd, j, g) if len(g) > 1 else sd[j, j]
        assert close(mine, max(vals))
        total += mine
    assert close(total, got.score)


def test_tag_one_task_and_full_group():
    assert tag_groups([[0.0]], 3) == TagSelection(((0,),), (0,), 0.0)
    S = np.random.default_rng(0).normal(size=(4, 4))
    assert tag_groups(S, 1).groups == ((0, 1, 2, 3),)


def test_two_clear_clusters():
    # tasks {0,1,2} help each other, {3,4} help each other, cross effects hurt
    n = 5
    S = np.full((n, n), -1.0)
    for g in [(0, 1, 2), (3, 4)]:
        for i, j in itertools.permutations(g, 2):
            S[i, j] = 1.0
    p = best_partition(S, 2)
    assert p.groups == ((0, 1, 2), (3, 4))
    assert p.score == pytest.approx(3 * 1.0 + 2 * 1.0)
    assert best_partition_at_most(S, 4).groups == ((0, 1, 2), (3, 4))
    assert tag_groups(S, 2).groups == ((0, 1, 2), (3, 4))


def test_accepts_torch_and_lists():
    S = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert best_partition(S, 1).groups == ((0, 1),)
    assert best_partition(S.tolist(), 2).groups == ((0,), (1,))


def test_n20_supported_and_n21_refused():
    S = np.random.default_rng(3).normal(size=(MAX_TASKS, MAX_TASKS))
    assert MAX_TASKS >= 20
    f = subset_scores(S)
    assert f.shape == (1 << MAX_TASKS,)
    p = best_partition(S, 2)
    check_partition(S, p, 2)
    big = np.zeros((MAX_TASKS + 1, MAX_TASKS + 1))
    for fn in (lambda: best_partition(big, 2), lambda: best_partition_at_most(big, 2), lambda: subset_scores(big),
               lambda: tag_groups(big, 2)):
        with pytest.raises(ValueError, match="at most %d" % MAX_TASKS):
            fn()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3)), "square"),
    (np.zeros((2, 2, 2)), "2-D"),
    (np.zeros(3), "2-D"),
    (np.zeros((0, 0)), "empty"),
    (np.array([[0.0, np.nan], [0.0, 0.0]]), r"S\[0, 1\] is not finite"),
    (np.array([[0.0, 1.0], [np.inf, 0.0]]), r"S\[1, 0\] is not finite"),
    ([["a", "b"], ["c", "d"]], "real numbers"),
])
def test_bad_matrices(bad, match):
    with pytest.raises(ValueError, match=match):
        best_partition(bad, 1)


def test_nan_on_diagonal_is_ignored():
    S = np.array([[np.nan, 1.0], [2.0, np.nan]])
    assert best_partition(S, 1).score == pytest.approx(3.0)


@pytest.mark.parametrize("k", [0, 4, -1, 1.5, True])
def test_bad_n_splits(k):
    with pytest.raises(ValueError, match="n_splits"):
        best_partition(np.zeros((3, 3)), k)


def test_bad_max_splits_and_groups():
    with pytest.raises(ValueError, match="max_splits"):
        best_partition_at_most(np.zeros((3, 3)), 0)
    with pytest.raises(ValueError, match="max_groups"):
        tag_groups(np.zeros((3, 3)), 0)


@pytest.mark.slow
def test_n12_against_exhaustive():
    S = np.random.default_rng(5).normal(size=(12, 12))
    for k in (2, 3):
        assert close(best_partition(S, k).score, best_partition_reference(S, k).score)
