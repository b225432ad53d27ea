"""The built-in ``digits`` data set: tasks, shapes, dtypes, ranges, determinism, non-IID split."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_edge.data import DATASETS, DataError, DataOptions, load_dataset
from fmtl_edge.tasks import Task


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_registry_and_unknown_name():
    assert set(DATASETS) == {"digits", "utkface", "uci-har", "npz"}
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    assert "mnist" in msg and all(k in msg for k in DATASETS)


def test_options_object_is_the_keywords():
    """``load_dataset(name, opts)`` loads what the keyword form loads; keywords beside ``opts`` replace
    its fields; the config's options carry the partition seed; ``validate`` names the field."""
    opts = DataOptions(n_clients=4, seed=3, max_samples=400)
    a, b = load_dataset("digits", opts), load_dataset("digits", n_clients=4, seed=3, max_samples=400)
    c = load_dataset("digits", opts, seed=4)
    assert a.info == b.info and (a.info["seed"], c.info["seed"]) == (3, 4)
    assert all(np.array_equal(x.x_train, y.x_train) for x, y in zip(a.clients, b.clients))
    assert not all(np.array_equal(x.x_train, y.x_train) for x, y in zip(a.clients, c.clients))
    from fmtl_edge.config import SimulationConfig

    assert SimulationConfig(seed=1, partition_seed=5, clients=4).data_options() == DataOptions(n_clients=4, seed=5)
    with pytest.raises(DataError, match="n_clients must be a positive integer"):
        DataOptions(n_clients=0).validate()
    with pytest.raises(DataError, match="uci-har's clients are fixed"):
        DataOptions(classes_per_client=2).validate("uci-har")
    v = DataOptions(n_clients=4.0, alpha=1, seed=np.int64(2)).validate()
    assert (type(v.n_clients), type(v.alpha), type(v.seed)) == (int, float, int)


def test_tasks(digits):
    t = digits.tasks
    assert t.names == ("digit", "parity", "ge5", "reconstruct", "edges")
    assert (t["digit"].kind, t["digit"].out_dim) == ("classification", 10)
    assert t["parity"].kind == t["ge5"].kind == "binary"
    assert t["reconstruct"].kind == t["edges"].kind == "dense"
    assert all(isinstance(x, Task) for x in t)


def test_shapes_dtypes_ranges(digits):
    assert digits.n_clients == 8
    assert digits.input_shape == (1, 8, 8)
    assert sum(c.n_train + c.n_test for c in digits.clients) == 1797
    for c in digits.clients:
        assert c.n_train > 0 and c.n_test > 0
        for x, y in ((c.x_train, c.y_train), (c.x_test, c.y_test)):
            assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert y["digit"].dtype == np.int64 and set(np.unique(y["digit"])) <= set(range(10))
            for b in ("parity", "ge5"):
                assert y[b].dtype == np.float32 and y[b].shape == (len(x),)
                assert set(np.unique(y[b])) <= {0.0, 1.0}
            np.testing.assert_array_equal(y["parity"], y["digit"] % 2)
            np.testing.assert_array_equal(y["ge5"], y["digit"] >= 5)
            assert y["reconstruct"] is x  # autoencoding target shares x's memory
            e = y["edges"]
            assert e.dtype == np.float32 and e.shape == x.shape
            assert 0.0 <= e.min() and e.max() <= 1.0
    info = digits.info
    assert info["partition"] == "dirichlet(alpha=0.5) over class"
    assert info["n_samples"] == 1797 and info["n_clients"] == 8 and info["seed"] == 0


def test_edges_are_sobel_of_the_image(digits):
    from skimage import filters

    c = digits.clients[0]
    for i in range(3):
        img = c.x_train[i, 0]
        np.testing.assert_allclose(c.y_train["edges"][i, 0], filters.sobel(img), atol=1e-6)
    # a digit has strokes: edges are not all zero
    assert c.y_train["edges"].max() > 0.2


def test_deterministic_and_seed_dependent(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    for a, b in zip(digits.clients, again.clients):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test["digit"], b.y_test["digit"])
    sizes = [c.n_train for c in digits.clients]
    assert sizes != [c.n_train for c in other.clients]


def test_dirichlet_skew_vs_large_alpha(digits):
    def skew(ds):
        h = np.stack([np.bincount(np.r_[c.y_train["digit"], c.y_test["digit"]], minlength=10) for c in ds.clients])
        p = h / h.sum(axis=1, keepdims=True)
        return float(p.max(axis=1).mean())  # mean share of each client's dominant class

    iidish = load_dataset("digits", seed=0, alpha=1000.0)
    assert skew(digits) > 0.3  # alpha=0.5: clients dominated by few classes
    assert skew(iidish) < 0.2  # alpha=1000: close to uniform 0.1
    assert skew(digits) > skew(iidish) + 0.1


def test_options(digits):
    small = load_dataset("digits", n_clients=3, max_samples=200, test_fraction=0.25, seed=2)
    assert small.n_clients == 3
    assert sum(c.n_train + c.n_test for c in small.clients) == 200
    n_test = sum(c.n_test for c in small.clients)
    assert 40 <= n_test <= 60
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("digits", data_dir="/nonexistent")
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", image_size=32)
    with pytest.raises(DataError, match="n_clients"):
        load_dataset("digits", n_clients=0)
    with pytest.raises(DataError, match="clients"):
        load_dataset("digits", n_clients=500, max_samples=300)
