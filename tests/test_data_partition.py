"""Federated partitioners: coverage, sizes, determinism, label skew, stratified splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtl_edge.data import DataError, dirichlet_partition, iid_partition, split_train_test, stratified_subsample
from fmtl_edge.data.partition import label_histograms


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, np.sort(p))


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(1, 12),
    n_clients=st.integers(1, 40),
    per_client=st.integers(2, 30),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 100.0]),
    min_size=st.integers(1, 10),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_covers_every_sample_once_and_respects_min_size(n_classes, n_clients, per_client, alpha, min_size, seed):
    rng = np.random.default_rng(seed)
    n = n_clients * per_client
    labels = rng.integers(0, n_classes, n)
    min_size = min(min_size, per_client)
    parts = dirichlet_partition(labels, n_clients, alpha, np.random.default_rng(seed), min_size=min_size)
    assert len(parts) == n_clients
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_deterministic_for_a_seed():
    labels = np.random.default_rng(0).integers(0, 5, 2000)
    a = dirichlet_partition(labels, 16, 0.5, 7)
    b = dirichlet_partition(labels, 16, 0.5, np.random.default_rng(7))
    c = dirichlet_partition(labels, 16, 0.5, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _skew(labels, parts, k):
    """Mean total-variation distance between each client's label mix and the global one."""
    h = label_histograms(labels, parts, k).astype(float)
    p = h / h.sum(axis=1, keepdims=True)
    g = np.bincount(labels, minlength=k) / len(labels)
    return float(0.5 * np.abs(p - g).sum(axis=1).mean())


def test_small_alpha_is_skewed_large_alpha_is_near_iid():
    labels = np.random.default_rng(1).integers(0, 10, 5000)
    skewed = _skew(labels, dirichlet_partition(labels, 20, 0.1, 0), 10)
    mid = _skew(labels, dirichlet_partition(labels, 20, 0.5, 0), 10)
    flat = _skew(labels, dirichlet_partition(labels, 20, 1000.0, 0), 10)
    iid = _skew(labels, iid_partition(len(labels), 20, 0), 10)
    assert skewed > 0.6 and skewed > mid > flat
    assert flat < 0.15 and iid < 0.15
    # small alpha: most clients hold few classes
    h = label_histograms(labels, dirichlet_partition(labels, 20, 0.1, 0), 10)
    assert np.median((h / h.sum(1, keepdims=True) > 0.05).sum(1)) <= 4


def test_dirichlet_fallback_terminates_on_tiny_data():
    # 64 samples, 32 clients, min 2 each, alpha tiny: draws almost never succeed; top-up must.
    labels = np.repeat(np.arange(4), 16)
    parts = dirichlet_partition(labels, 32, 0.01, 0, min_size=2, max_tries=5)
    _assert_exact_cover(parts, 64)
    assert all(len(p) == 2 for p in parts)


def test_dirichlet_errors():
    labels = np.zeros(10, dtype=int)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(labels, 2, 0.0, 0)
    with pytest.raises(DataError, match="n_clients"):
        dirichlet_partition(labels, 4, 0.5, 0, min_size=5)
    with pytest.raises(DataError, match="n_clients"):
        dirichlet_partition(labels, 0, 0.5, 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 30), seed=st.integers(0, 1000))
def test_iid_partition(n, k, seed):
    if n < k:
        with pytest.raises(DataError):
            iid_partition(n, k, seed)
        return
    parts = iid_partition(n, k, seed)
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), frac=st.floats(0.0, 0.95), strat=st.booleans(), seed=st.integers(0, 1000))
def test_split_train_test_partitions_the_indices(n, frac, strat, seed):
    idx = np.random.default_rng(seed).choice(10_000, n, replace=False)
    y = np.random.default_rng(seed + 1).integers(0, 4, n) if strat else None
    tr, te = split_train_test(idx, frac, seed, stratify=y)
    np.testing.assert_array_equal(np.sort(np.r_[tr, te]), np.sort(idx))
    assert len(np.intersect1d(tr, te)) == 0
    if n >= 2 and frac > 0:
        assert len(tr) >= 1 and len(te) >= 1
        assert abs(len(te) - frac * n) <= 1
    if frac == 0:
        assert len(te) == 0


def test_stratified_split_keeps_label_proportions():
    y = np.r_[np.zeros(800, int), np.ones(200, int)]
    tr, te = split_train_test(np.arange(1000), 0.25, 0, stratify=y)
    assert len(te) == 250
    assert np.sum(y[te] == 1) in (49, 50, 51)
    with pytest.raises(DataError, match="stratify"):
        split_train_test(np.arange(10), 0.2, 0, stratify=np.zeros(9))
    with pytest.raises(DataError, match="test_fraction"):
        split_train_test(np.arange(10), 1.0, 0)


def test_stratified_subsample_and_cover():
    y = np.r_[np.zeros(900, int), np.ones(100, int)]
    keep = stratified_subsample(y, 100, 0)
    assert len(keep) == 100 and len(np.unique(keep)) == 100
    assert np.sum(y[keep] == 1) in (9, 10, 11)
    np.testing.assert_array_equal(keep, stratified_subsample(y, 100, 0))
    np.testing.assert_array_equal(stratified_subsample(y, None, 0), np.arange(1000))
    groups = np.arange(1000) % 50  # 50 groups of 20: each must appear in a subset of 50
    keep = stratified_subsample(y, 50, 3, cover=groups)
    assert len(np.unique(groups[keep])) == 50
    with pytest.raises(DataError, match="max_samples"):
        stratified_subsample(y, 0, 0)


@settings(max_examples=40, deadline=None)
@given(n_classes=st.integers(2, 8), n_clients=st.integers(1, 12), seed=st.integers(0, 2**16), data=st.data())
def test_pathological_gives_every_client_exactly_c_classes(n_classes, n_clients, seed, data):
    from fmtl_edge.data.partition import pathological_partition

    c = data.draw(st.integers(1, n_classes))
    labels = np.repeat(np.arange(n_classes), 30)
    parts = pathological_partition(labels, n_clients, c, seed)
    assert len(parts) == n_clients
    held = np.concatenate(parts)
    assert len(held) == len(np.unique(held))  # no sample on two clients
    for p in parts:
        assert len(np.unique(labels[p])) == c
    if n_clients * c >= n_classes:  # every class dealt: every sample placed
        assert len(held) == len(labels)


def test_pathological_digits_ten_clients_two_digits_each():
    from fmtl_edge.data import load_dataset

    ds = load_dataset("digits", n_clients=10, classes_per_client=2, seed=3)
    owners: dict[int, int] = {}
    for c in ds.clients:
        digits = set(np.unique(np.concatenate([c.y_train["digit"], c.y_test["digit"]])).tolist())
        assert len(digits) == 2
        for d in digits:
            owners[d] = owners.get(d, 0) + 1
    assert owners == {d: 2 for d in range(10)}  # each digit on exactly two clients
    assert "pathological(2" in ds.info["partition"]


def test_pathological_errors():
    from fmtl_edge.data import load_dataset
    from fmtl_edge.data.partition import pathological_partition

    with pytest.raises(DataError, match="--classes-per-client"):
        pathological_partition(np.repeat(np.arange(3), 5), 2, 4, 0)
    with pytest.raises(DataError, match="lower --clients"):
        pathological_partition(np.array([0, 1, 1, 1]), 4, 1, 0)
    with pytest.raises(DataError, match="drop --alpha"):
        load_dataset("digits", n_clients=10, classes_per_client=2, alpha=0.5)
    with pytest.raises(DataError, match="classes_per_client"):
        load_dataset("npz", data_dir="/nonexistent", classes_per_client=2)
