"""``npz`` bring-your-own-data: round trip and every layout error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmtl_edge.data import DataError, load_dataset
from fmtl_edge.data.npz import write_npz_dataset

TOML = """
description = "toy"

[tasks.label]
kind = "classification"
classes = 3
description = "a class"

[tasks.flag]
kind = "binary"

[tasks.size]
kind = "regression"
units = "cm"

[tasks.mask]
kind = "dense"
channels = 1
"""


def _client(n: int, seed: int, n_test: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2, 4, 4), dtype=np.float32)
    return {
        "x": x,
        "split": np.r_[np.zeros(n - n_test, np.int64), np.ones(n_test, np.int64)],
        "y_label": rng.integers(0, 3, n),
        "y_flag": rng.integers(0, 2, n).astype(bool),
        "y_size": rng.normal(170, 10, n),
        "y_mask": (x[:, :1] > 0.5).astype(np.float32),
    }


def _folder(tmp_path: Path, clients=None, toml: str = TOML) -> Path:
    d = tmp_path / "byod"
    d.mkdir(exist_ok=True)
    (d / "tasks.toml").write_text(toml)
    clients = clients if clients is not None else {"0": _client(10, 0), "1": _client(7, 1), "10": _client(5, 2), "2": _client(6, 3)}
    for cid, arrays in clients.items():
        np.savez(d / f"client_{cid}.npz", **arrays)
    return d


def test_load_valid_folder(tmp_path):
    d = _folder(tmp_path)
    (d / "README.txt").write_text("other files are ignored")
    ds = load_dataset("npz", data_dir=d)
    assert ds.info["client_files"] == ["client_0.npz", "client_1.npz", "client_2.npz", "client_10.npz"]
    assert ds.n_clients == 4 and ds.input_shape == (2, 4, 4)
    assert ds.tasks.names == ("label", "flag", "size", "mask")
    assert [(t.kind, t.out_dim) for t in ds.tasks] == [("classification", 3), ("binary", 1), ("regression", 1), ("dense", 1)]
    assert ds.tasks["size"].units == "cm" and ds.info["description"] == "toy"
    c = ds.clients[3]  # client_10
    ref = np.load(d / "client_10.npz")
    np.testing.assert_array_equal(c.x_train, ref["x"][:3])
    np.testing.assert_array_equal(c.y_test["label"], ref["y_label"][3:])
    assert c.y_train["label"].dtype == np.int64 and c.y_train["flag"].dtype == np.float32
    assert c.y_train["size"].dtype == np.float32 and c.y_train["mask"].dtype == np.float32
    sizes = np.concatenate([x.y_train["size"] for x in ds.clients]).astype(np.float64)
    assert ds.tasks["size"].target_mean == pytest.approx(sizes.mean(), rel=1e-5)
    assert ds.tasks["size"].target_std == pytest.approx(sizes.std(), rel=1e-4)
    # max_samples keeps every client's train and test part, seeded
    sub = load_dataset("npz", data_dir=d, max_samples=12, seed=1)
    assert sub.info["n_samples"] == 12 and all(x.n_train >= 1 and x.n_test >= 1 for x in sub.clients)
    with pytest.raises(DataError, match="one client per file"):
        load_dataset("npz", data_dir=d, n_clients=3)


def test_round_trip_of_a_builtin_dataset(tmp_path):
    src = load_dataset("digits", n_clients=3, max_samples=150, seed=5)
    write_npz_dataset(src, tmp_path / "rt", description="digits subset")
    back = load_dataset("npz", data_dir=tmp_path / "rt")
    assert back.tasks.names == src.tasks.names
    assert [(t.kind, t.out_dim) for t in back.tasks] == [(t.kind, t.out_dim) for t in src.tasks]
    for a, b in zip(src.clients, back.clients):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.x_test, b.x_test)
        for t in src.tasks.names:
            np.testing.assert_array_equal(a.y_train[t], b.y_train[t])
            assert a.y_test[t].dtype == b.y_test[t].dtype


def _expect(tmp_path, match, clients=None, toml=TOML, **kw):
    d = _folder(tmp_path, clients, toml)
    with pytest.raises(DataError, match=match):
        load_dataset("npz", data_dir=d, **kw)


def test_folder_level_errors(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("npz")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", data_dir=tmp_path / "missing")
    d = tmp_path / "only_toml"
    d.mkdir()
    (d / "tasks.toml").write_text(TOML)
    with pytest.raises(DataError, match=r"no client_<id>\.npz"):
        load_dataset("npz", data_dir=d)
    d2 = tmp_path / "no_toml"
    d2.mkdir()
    np.savez(d2 / "client_0.npz", **_client(5, 0))
    with pytest.raises(DataError, match=r"tasks\.toml is missing"):
        load_dataset("npz", data_dir=d2)


@pytest.mark.parametrize(
    "toml, match",
    [
        ("[tasks.label\nkind=", "not valid TOML"),
        ("title = 'x'\n[tasks.label]\nkind = 'binary'", "unknown top-level"),
        ("description = 'no tasks'", "defines no tasks"),
        ("[tasks.label]\nkind = 'segmentation'", r"kind = 'segmentation'.*classification"),
        ("[tasks.label]\nkind = 'classification'", "classes"),
        ("[tasks.label]\nkind = 'classification'\nclasses = 1", "classes"),
        ("[tasks.label]\nkind = 'binary'\nclases = 3", r"unknown key\(s\) \['clases'\]"),
        ("[tasks.flag]\nkind = 'binary'\nclasses = 2", "only applies"),
        ("[tasks.label]\nkind = 'classification'\nclasses = 3\n[tasks.typo]\nkind = 'binary'",
         r"no client file holds labels for task.*typo.*add y_<task> arrays or remove"),
    ],
)
def test_toml_errors(tmp_path, toml, match):
    client = {k: v for k, v in _client(6, 0).items() if k in ("x", "split", "y_label")}
    _expect(tmp_path, match, clients={"0": client}, toml=toml)


def _bad(change):
    c = {"0": _client(8, 0), "1": _client(8, 1)}
    change(c["1"])
    return c


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.pop("x"), r"client_1\.npz: missing key 'x'"),
        (lambda c: c.pop("split"), r"client_1\.npz: missing key 'split'"),
        (lambda c: [c.pop(k) for k in [k for k in c if k.startswith("y_")]], r"client_1\.npz: no y_<task> array at all"),
        (lambda c: c.update(y_extra=np.zeros(8)), r"client_1\.npz: \['y_extra'\] have no \[tasks"),
        (lambda c: c.update(y_label=np.zeros(7, int)), r"client_1\.npz: 'y_label' has shape \(7,\)"),
        (lambda c: c.update(split=np.zeros(5, int)), r"'split' has shape \(5,\) but x has 8 rows"),
        (lambda c: c.update(split=np.r_[np.zeros(6), [1, 2]]), r"'split' must be 0 \(train\) or 1 \(test\), found \[2"),
        (lambda c: c.update(split=np.ones(8, int)), r"client_1\.npz: no training sample"),
        (lambda c: c.update(y_label=np.full(8, 3)), r"'y_label' has class indices in \[3, 3\] but classes = 3"),
        (lambda c: c.update(y_label=np.full(8, 0.5)), "store class indices as integers"),
        (lambda c: c.update(y_flag=np.full(8, 2)), r"'y_flag' must hold 0/1"),
        (lambda c: c.update(y_size=np.r_[np.zeros(7), np.nan]), r"'y_size' holds NaN"),
        (lambda c: c.update(y_mask=np.zeros((8, 1, 3, 3), np.float32)), r"'y_mask' has spatial size"),
        (lambda c: c.update(y_mask=np.zeros((8, 2, 4, 4), np.float32)), "channels = 1"),
        (lambda c: c.update(x=np.zeros((8, 4, 4), np.float32)), r"'x' has shape \(8, 4, 4\)"),
        (lambda c: c.update(x=np.zeros((8, 3, 4, 4), np.float32)), "same input shape"),
        (lambda c: c.update(x=np.array([object()] * 8)), "cannot read|dtype"),
    ],
)
def test_client_file_errors(tmp_path, change, match):
    _expect(tmp_path, match, clients=_bad(change))


def test_not_an_npz_file(tmp_path):
    d = _folder(tmp_path)
    (d / "client_5.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(DataError, match=r"client_5\.npz: cannot read"):
        load_dataset("npz", data_dir=d)


def test_options_that_do_not_apply(tmp_path):
    d = _folder(tmp_path)
    with pytest.raises(DataError, match="alpha"):
        load_dataset("npz", data_dir=d, alpha=0.5)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("npz", data_dir=d, image_size=32)
    with pytest.warns(UserWarning, match="test_fraction"):
        load_dataset("npz", data_dir=d, test_fraction=0.3)


def test_client_without_some_tasks_holds_only_the_others(tmp_path):
    """Seed 000's client groups: a client file without y_size holds the other tasks only."""
    clients = _bad(lambda c: c.pop("y_size"))
    d = _folder(tmp_path, clients=clients)
    ds = load_dataset("npz", data_dir=d)
    by_id = {c.client_id: c for c in ds.clients}
    assert "size" in by_id[0].y_train and "size" not in by_id[1].y_train
    assert set(by_id[1].y_train) == set(by_id[1].y_test) == set(ds.tasks.names) - {"size"}
    assert ds.clients_of("size") == [0]
