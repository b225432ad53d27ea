"""``utkface``: name parsing, decoding, cache, tasks and the 2D targets (real data with a small
``max_samples``; a synthetic folder of tiny JPEGs for the error and cache paths)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmtl_edge.data import DataError, load_dataset

SHARED = Path(os.environ.get("FMTL_EDGE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
IMAGES = SHARED / "utkface" / "images"
needs_utk = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"shared UTKFace images not found at {IMAGES} (set FMTL_EDGE_SHARED_DATA)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("utk-cache")


@pytest.fixture(scope="module")
def utk(cache):
    if not IMAGES.is_dir():
        pytest.skip(f"shared UTKFace images not found at {IMAGES}")
    return load_dataset("utkface", data_dir=IMAGES, max_samples=320, seed=0, cache_dir=cache)


@pytest.mark.data
@needs_utk
def test_tasks_shapes_dtypes_ranges(utk):
    t = utk.tasks
    assert t.names == ("age", "age_group", "gender", "race", "autoencode", "edges", "keypoints")
    kinds = {x.name: (x.kind, x.out_dim) for x in t}
    assert kinds == {
        "age": ("regression", 1), "age_group": ("binary", 1), "gender": ("binary", 1),
        "race": ("classification", 5), "autoencode": ("dense", 3), "edges": ("dense", 1),
        "keypoints": ("dense", 1),
    }
    assert t["age"].units == "years"
    assert utk.n_clients == 32 and utk.input_shape == (3, 64, 64)
    assert utk.info["n_samples"] == 320 == sum(c.n_train + c.n_test for c in utk.clients)
    assert utk.info["skipped_files"] == 5  # the archive's 5 malformed names
    assert utk.info["partition"] == "dirichlet(alpha=0.5) over race"
    ages = []
    for c in utk.clients:
        assert c.n_train >= 1 and c.n_test >= 1
        for x, y in ((c.x_train, c.y_train), (c.x_test, c.y_test)):
            assert x.dtype == np.float32 and x.shape[1:] == (3, 64, 64) and x.flags.c_contiguous
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert y["age"].dtype == np.float32 and 1 <= y["age"].min() and y["age"].max() <= 116
            np.testing.assert_array_equal(y["age_group"], (y["age"] < 13).astype(np.float32))
            assert set(np.unique(y["gender"])) <= {0.0, 1.0} and y["gender"].dtype == np.float32
            assert y["race"].dtype == np.int64 and set(np.unique(y["race"])) <= set(range(5))
            assert y["autoencode"] is x
            for k in ("edges", "keypoints"):
                assert y[k].shape == (len(x), 1, 64, 64) and y[k].dtype in (np.float16, np.float32)
                assert 0.0 <= y[k].min() and y[k].max() <= 1.0
        ages.append(c.y_train["age"])
    a = np.concatenate(ages)
    assert t["age"].target_mean == pytest.approx(a.mean(), rel=1e-6)
    assert t["age"].target_std == pytest.approx(a.std(), rel=1e-6)


@pytest.mark.data
@needs_utk
def test_labels_match_file_names_and_2d_targets_match_skimage(utk):
    import csv

    from skimage import color, feature, filters

    # every (age, gender, race) triple served exists in the shared labels.csv
    with open(SHARED / "utkface" / "labels.csv") as f:
        triples = {(int(r["age"]), int(r["gender"]), int(r["race"])) for r in csv.DictReader(f)}
    for c in utk.clients[:4]:
        for i in range(c.n_train):
            assert (int(c.y_train["age"][i]), int(c.y_train["gender"][i]), int(c.y_train["race"][i])) in triples
    c = utk.clients[0]
    for i in range(2):
        gray = color.rgb2gray(c.x_train[i].transpose(1, 2, 0))
        np.testing.assert_allclose(c.y_train["edges"][i, 0].astype(np.float32), filters.sobel(gray), atol=2e-3)
        h = np.maximum(feature.corner_harris(gray), 0)
        np.testing.assert_allclose(c.y_train["keypoints"][i, 0].astype(np.float32), h / h.max(), atol=5e-3)
        assert c.y_train["keypoints"][i].max() == pytest.approx(1.0, abs=1e-3)  # per-image normalised


@pytest.mark.data
@needs_utk
def test_deterministic_cached_and_non_iid(utk, cache):
    again = load_dataset("utkface", data_dir=IMAGES, max_samples=320, seed=0, cache_dir=cache)
    assert again.info["cache_hit"] is True and utk.info["cache_hit"] is False
    for a, b in zip(utk.clients, again.clients):
        np.testing.assert_array_equal(a.x_test, b.x_test)
        np.testing.assert_array_equal(a.y_train["age"], b.y_train["age"])
    # Dirichlet(0.5) over race: clients' race mixes are far from the global one
    h = np.stack([np.bincount(np.r_[c.y_train["race"], c.y_test["race"]], minlength=5) for c in utk.clients])
    p = h / h.sum(1, keepdims=True)
    g = h.sum(0) / h.sum()
    assert 0.5 * np.abs(p - g).sum(1).mean() > 0.25
    # other options
    small = load_dataset("utkface", data_dir=IMAGES.parent, max_samples=60, n_clients=4, image_size=32,
                         seed=1, alpha=100.0, cache_dir=cache)
    assert small.input_shape == (3, 32, 32) and small.n_clients == 4
    assert small.clients[0].y_train["edges"].shape[2:] == (32, 32)


def _fake_folder(folder: Path, n: int = 24) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"{5 + 3 * i}_{i % 2}_{i % 5}_2017011{i:04d}.jpg.chip.jpg"
        arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, quality=90)
        names.append(name)
    return names


def test_synthetic_folder_skips_bad_names_and_unreadable_files(tmp_path, caplog):
    folder = tmp_path / "utk"
    _fake_folder(folder)
    (folder / "12_0_1_2017.jpg.chip.jpg.bak").write_bytes(b"x")  # not a .jpg: ignored
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "39_1_20170116174525125.jpg.chip.jpg")  # no race
    (folder / "30_1_2_20170101000000000.jpg.chip.jpg").write_bytes(b"not a jpeg")
    (folder / "labels.csv").write_text("file,age\n")
    ds = load_dataset("utkface", data_dir=folder, n_clients=3, image_size=16, cache_dir=tmp_path / "c")
    assert ds.info["skipped_files"] == 1 and ds.info["unreadable_files"] == 1
    # the user is told on the terminal (a logging warning), not only in results.json
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "could not be decoded" in r.getMessage()]
    assert len(warned) == 1 and "30_1_2_20170101000000000.jpg.chip.jpg" in warned[0].getMessage()
    assert ds.info["n_samples"] == 24 and ds.input_shape == (3, 16, 16)
    assert Path(ds.info["cache"]).is_file()
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic write left nothing behind
    ages = np.sort(np.concatenate([np.r_[c.y_train["age"], c.y_test["age"]] for c in ds.clients]))
    np.testing.assert_array_equal(ages, 5 + 3 * np.arange(24))
    # a corrupt cache file is rebuilt, not trusted
    Path(ds.info["cache"]).write_bytes(b"garbage")
    again = load_dataset("utkface", data_dir=folder, n_clients=3, image_size=16, cache_dir=tmp_path / "c")
    assert again.info["cache_hit"] is False
    np.testing.assert_array_equal(again.clients[0].x_train, ds.clients[0].x_train)


def test_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "photo.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_dataset("utkface", data_dir=empty, cache_dir=tmp_path)
    assert str(empty) in str(e.value) and "<age>_<gender" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("utkface", data_dir=tmp_path / "missing", cache_dir=tmp_path)
    monkeypatch.delenv("FMTL_EDGE_DATA_DIR", raising=False)
    monkeypatch.chdir(empty)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("utkface", cache_dir=tmp_path)
    _fake_folder(tmp_path / "small", n=6)
    with pytest.raises(DataError, match="clients"):
        load_dataset("utkface", data_dir=tmp_path / "small", cache_dir=tmp_path)  # 32 clients > 6 images
