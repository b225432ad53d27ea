"""``uci-har`` on the shared per-subject file: one client per subject, the file's split, 3 tasks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmtl_edge.data import DataError, load_dataset

SHARED = Path(os.environ.get("FMTL_EDGE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
HAR = SHARED / "uci_har" / "har265_per_subject.npz"

_skip = pytest.mark.skipif(not HAR.is_file(), reason=f"shared UCI HAR file not found at {HAR} (set FMTL_EDGE_SHARED_DATA)")


def needs_har(f):
    """Real-data test: marked ``data`` and skipped where the shared file is absent."""
    return pytest.mark.data(_skip(f))


@pytest.fixture(scope="module")
def har():
    if not HAR.is_file():
        pytest.skip(f"shared UCI HAR file not found at {HAR}")
    return load_dataset("uci-har", data_dir=HAR.parent)


@needs_har
def test_clients_are_subjects_with_the_files_split(har):
    with np.load(HAR) as z:
        X, y, subject, split = z["X"], z["y"], z["subject"], z["split"]
    assert har.n_clients == 30 and har.input_shape == (265,)
    assert har.info["client_subjects"] == list(range(1, 31))
    assert har.info["n_samples"] == len(X) == sum(c.n_train + c.n_test for c in har.clients)
    for c, s in zip(har.clients, range(1, 31)):
        tr = (subject == s) & (split == 0)
        te = (subject == s) & (split == 1)
        np.testing.assert_array_equal(c.x_train, X[tr])
        np.testing.assert_array_equal(c.x_test, X[te])
        np.testing.assert_array_equal(c.y_train["activity"], y[tr] - 1)


@needs_har
def test_tasks_dtypes_and_derivations(har):
    t = har.tasks
    assert t.names == ("activity", "moving", "stairs")
    assert (t["activity"].kind, t["activity"].out_dim) == ("classification", 6)
    assert t["moving"].kind == t["stairs"].kind == "binary"
    for c in har.clients:
        assert c.x_train.dtype == np.float32 and -1.0 <= c.x_train.min() and c.x_train.max() <= 1.0
        a = c.y_train["activity"]
        assert a.dtype == np.int64 and a.min() >= 0 and a.max() <= 5
        assert c.y_train["moving"].dtype == np.float32
        np.testing.assert_array_equal(c.y_train["moving"], np.isin(a, [0, 1, 2]))
        np.testing.assert_array_equal(c.y_test["stairs"], np.isin(c.y_test["activity"], [1, 2]))
    # both classes of each binary task occur
    allm = np.concatenate([c.y_train["moving"] for c in har.clients])
    assert 0.3 < allm.mean() < 0.7


@needs_har
def test_max_samples_subset_is_seeded_and_keeps_every_subject():
    a = load_dataset("uci-har", data_dir=HAR, max_samples=300, seed=3)
    b = load_dataset("uci-har", data_dir=HAR, max_samples=300, seed=3)
    c = load_dataset("uci-har", data_dir=HAR, max_samples=300, seed=4)
    assert a.info["n_samples"] == 300
    assert all(x.n_train >= 1 and x.n_test >= 1 for x in a.clients)
    assert all(np.array_equal(x.x_train, y.x_train) for x, y in zip(a.clients, b.clients))
    assert not all(np.array_equal(x.x_train, y.x_train) for x, y in zip(a.clients, c.clients))
    with pytest.raises(DataError, match="max_samples"):
        load_dataset("uci-har", data_dir=HAR, max_samples=40)


@needs_har
def test_bad_options():
    with pytest.raises(DataError, match="one client per subject"):
        load_dataset("uci-har", data_dir=HAR, n_clients=8)
    with pytest.raises(DataError, match="alpha"):
        load_dataset("uci-har", data_dir=HAR, alpha=0.5)
    with pytest.warns(UserWarning, match="test_fraction"):
        load_dataset("uci-har", data_dir=HAR, test_fraction=0.5, max_samples=120)


def test_missing_folder_and_wrong_layout(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("uci-har", data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("uci-har", data_dir=tmp_path)  # exists, holds nothing
    bad = tmp_path / "har265_per_subject.npz"
    np.savez(bad, X=np.zeros((4, 3), np.float32), y=np.ones(4, np.int8))
    with pytest.raises(DataError, match=r"subject.*split|lacks"):
        load_dataset("uci-har", data_dir=tmp_path)
    np.savez(bad, X=np.zeros((4, 3), np.float32), y=np.full(4, 9), subject=np.ones(4), split=np.zeros(4))
    with pytest.raises(DataError, match="'y'"):
        load_dataset("uci-har", data_dir=bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("uci-har", data_dir=bad)
    # no data_dir: $FMTL_EDGE_DATA_DIR then ../shared/data relative to the CWD, else ask for --data-dir
    monkeypatch.setenv("FMTL_EDGE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("uci-har")


def test_default_location_from_env(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "uci_har").mkdir(parents=True)
    n = 24
    rng = np.random.default_rng(0)
    np.savez(
        root / "uci_har" / "har265_per_subject.npz",
        X=rng.uniform(-1, 1, (n, 5)).astype(np.float32),
        y=np.tile(np.arange(1, 7), 4),
        subject=np.repeat([1, 2], 12),
        split=np.tile([0, 0, 1], 8),
    )
    monkeypatch.setenv("FMTL_EDGE_DATA_DIR", str(root))
    ds = load_dataset("uci-har")
    assert ds.n_clients == 2 and ds.input_shape == (5,)
    assert [c.n_train for c in ds.clients] == [8, 8] and [c.n_test for c in ds.clients] == [4, 4]
