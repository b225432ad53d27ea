"""``utkface``: UTKFace faces with demographic and Taskonomy-style 2D tasks.

The data: a folder of aligned, cropped face JPEGs named ``<age>_<gender>_<race>_<date>.jpg.chip.jpg``
(age in years, gender 0 male / 1 female, race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others).
Labels are parsed from the names; files whose names do not follow the pattern are skipped and
counted in ``info["skipped_files"]`` (the public archive has 5 such names), files that cannot be
decoded are dropped and counted in ``info["unreadable_files"]``.

Images are decoded with Pillow (JPEG draft mode, then a LANCZOS resize to ``image_size``², default
64) and stored with the 2D targets as one uncompressed ``.npz`` in the cache folder (``cache_dir``,
``$FMTL_EDGE_CACHE`` or ``~/.cache/fmtl-edge``), keyed by the folder path, a hash of the file list
and the size, written atomically. Decoding all 23,7xx files takes a while; it runs in a pool of
two processes with a progress bar, once.

Inputs: ``(N, 3, S, S)`` float32 RGB in [0, 1].

============== ============== ======= ======================================================
name           kind           out_dim target
============== ============== ======= ======================================================
``age``        regression     1       age in years (float32); ``target_mean``/``target_std``
                                      from the training data of all clients
``age_group``  binary         1       1.0 for a child (age < 13), 0.0 otherwise
``gender``     binary         1       1.0 female, 0.0 male (as in the file name)
``race``       classification 5       0 White, 1 Black, 2 Asian, 3 Indian, 4 Others
``autoencode`` dense          3       the input image itself (shares ``x``'s memory)
``edges``      dense          1       Sobel magnitude of the grayscale image, in [0, 1]
``keypoints``  dense          1       Harris corner response of the grayscale image, negative
                                      values set to 0, divided by the image's maximum
============== ============== ======= ======================================================

The two computed 2D targets are stored as **float16** ``(N, 1, S, S)`` to keep memory in bounds for
all images (≈0.4 GB instead of 0.8 GB at 64×64); :meth:`fmtl_edge.tasks.Task.prepare_target` casts
each batch to float32. Grayscale is ``skimage.color.rgb2gray`` of the resized image.

Default federation: 32 clients, ``Dirichlet(0.5)`` over race, each client split 80/20 into
train/test stratified by race.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fmtl_edge.data._common import (
    build_clients,
    client_sizes,
    label_partition,
    harris_keypoints,
    regression_stats,
    reject_option,
    resolve_cache_dir,
    resolve_data_path,
    seed_streams,
    sobel_edges,
)
from fmtl_edge.data.base import DataError, DataOptions, FederatedDataset
from fmtl_edge.data.partition import split_train_test, stratified_subsample
from fmtl_edge.tasks import Task, TaskSet

log = logging.getLogger(__name__)

DEFAULT_CLIENTS = 32
DEFAULT_ALPHA = 0.5
DEFAULT_SIZE = 64
CHILD_AGE = 13
RACES = ("white", "black", "asian", "indian", "others")
#: ``age_gender_race_date.jpg.chip.jpg`` (the aligned/cropped set) or ``...date.jpg`` (in the wild).
NAME_PATTERN = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg(?:\.chip\.jpg)?$", re.IGNORECASE)
NAME_HELP = "files named <age>_<gender 0|1>_<race 0-4>_<date>.jpg.chip.jpg (UTKFace layout)"
CACHE_VERSION = 1
_POOL_MIN_FILES = 1000  # below this, decode in-process (a pool costs more than it saves)
_CHUNK = 256


def make_tasks(age_mean: float = 0.0, age_std: float = 1.0) -> TaskSet:
    """The UTKFace tasks, with the age standardisation filled in."""
    return TaskSet(
        [
            Task("age", "regression", 1, target_mean=age_mean, target_std=age_std, units="years",
                 description="age in years"),
            Task("age_group", "binary", 1, description=f"child (age < {CHILD_AGE}) = 1 vs older = 0"),
            Task("gender", "binary", 1, description="gender from the file name: 0 male, 1 female"),
            Task("race", "classification", 5, description="race: " + ", ".join(RACES)),
            Task("autoencode", "dense", 3, description="reconstruct the RGB image"),
            Task("edges", "dense", 1, description="2D edges: Sobel magnitude of the grayscale image"),
            Task("keypoints", "dense", 1, description="2D keypoints: Harris corner response, per-image [0, 1]"),
        ]
    )


# -- scanning and decoding ------------------------------------------------------------------------


def scan_folder(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """File names with parseable labels (sorted), their labels ``(n, 3)`` int64 (age, gender,
    race), and the ``.jpg`` names that were skipped because the name does not parse."""
    names, labels, skipped = [], [], []
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.lower().endswith(".jpg") or not e.is_file():
                continue
            m = NAME_PATTERN.match(e.name)
            if m is None:
                skipped.append(e.name)
                continue
            names.append(e.name)
            labels.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    order = np.argsort(names, kind="stable")
    names = [names[i] for i in order]
    lab = np.asarray(labels, dtype=np.int64).reshape(-1, 3)[order]
    return names, lab, sorted(skipped)


def _decode_chunk(args: tuple[str, list[str], int]):
    """Decode, resize and derive the 2D targets of some files (runs in a worker process)."""
    from PIL import Image
    from skimage.color import rgb2gray

    folder, names, size = args
    n = len(names)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    edges = np.zeros((n, size, size), dtype=np.float16)
    keypoints = np.zeros((n, size, size), dtype=np.float16)
    ok = np.ones(n, dtype=bool)
    for i, name in enumerate(names):
        try:
            with Image.open(os.path.join(folder, name)) as im:
                im.draft("RGB", (size, size))  # JPEG DCT scaling: decode at >= size, much faster
                rgb = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
        except Exception:  # noqa: BLE001 - any undecodable file is dropped and counted
            ok[i] = False
            continue
        images[i] = rgb
        gray = rgb2gray(rgb)  # float64 in [0, 1]
        edges[i] = sobel_edges(gray)
        keypoints[i] = harris_keypoints(gray)
    return images, edges, keypoints, ok


def _decode(folder: Path, names: list[str], size: int, workers: int = 2):
    chunks = [(str(folder), names[i : i + _CHUNK], size) for i in range(0, len(names), _CHUNK)]
    if len(names) < _POOL_MIN_FILES or workers <= 1:
        results = [_decode_chunk(c) for c in chunks]
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        results = []
        progress = None
        try:
            if sys.stderr.isatty():
                from rich.progress import Progress

                progress = Progress(transient=True)
        except ImportError:  # pragma: no cover - rich is a dependency
            progress = None
        log.info("utkface: decoding %d images at %dx%d with %d processes", len(names), size, size, workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            if progress is not None:
                with progress:
                    bar = progress.add_task(f"decoding {len(names)} UTKFace images", total=len(names))
                    for c, r in zip(chunks, ex.map(_decode_chunk, chunks)):
                        results.append(r)
                        progress.advance(bar, len(c[1]))
            else:
                results = list(ex.map(_decode_chunk, chunks))
    if not results:
        z = np.zeros((0, size, size), dtype=np.float16)
        return np.zeros((0, size, size, 3), np.uint8), z, z.copy(), np.zeros(0, bool)
    return tuple(np.concatenate([r[k] for r in results]) for k in range(4))


# -- cache ----------------------------------------------------------------------------------------


def cache_path(cache_dir: Path, folder: Path, names: list[str], size: int) -> Path:
    """Cache file for these files of this folder at this size."""
    h = hashlib.sha256()
    h.update(f"utkface-v{CACHE_VERSION}|{folder.resolve()}|{size}|".encode())
    h.update("\n".join(names).encode())
    return cache_dir / f"utkface_{size}px_{len(names)}_{h.hexdigest()[:16]}.npz"


def _read_cache(path: Path, names: list[str], size: int) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in ("files", "images", "edges", "keypoints", "unreadable")}
        n_ok = len(d["files"])
        if d["images"].shape != (n_ok, size, size, 3) or d["edges"].shape != (n_ok, size, size):
            raise ValueError("shape mismatch")
        if n_ok + len(d["unreadable"]) != len(names):
            raise ValueError("file count mismatch")
        return d
    except Exception as e:  # noqa: BLE001 - a bad cache is rebuilt
        log.warning("utkface: ignoring unreadable cache %s (%s); decoding again", path, e)
        return None


def _write_cache(path: Path, d: dict[str, np.ndarray], meta: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=np.asarray(json.dumps(meta)), **d)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as e:
        log.warning("utkface: could not write the cache %s (%s); continuing without it", path, e)
        return False


def load_images(
    folder: Path, names: list[str], size: int, cache_dir: Path, full_names: list[str] | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Decoded images and 2D targets for ``names`` (a subset of ``full_names``), from the cache
    when possible. A cache of the whole folder serves any subset.

    Returns:
        ``({"files", "images", "edges", "keypoints", "unreadable"}, cache info)``.
    """
    candidates = []
    if full_names is not None and len(full_names) != len(names):
        candidates.append((full_names, cache_path(cache_dir, folder, full_names, size)))
    own = cache_path(cache_dir, folder, names, size)
    candidates.append((names, own))
    for cand_names, path in candidates:
        d = _read_cache(path, cand_names, size)
        if d is None:
            continue
        if cand_names is not names:
            pos = {n: i for i, n in enumerate(d["files"].tolist())}
            want = set(names)
            rows = np.array([pos[n] for n in names if n in pos], dtype=np.int64)
            d = {
                "files": d["files"][rows],
                "images": d["images"][rows],
                "edges": d["edges"][rows],
                "keypoints": d["keypoints"][rows],
                "unreadable": np.array([u for u in d["unreadable"].tolist() if u in want], dtype=str),
            }
        return d, {"cache": str(path), "cache_hit": True, "decode_s": 0.0}
    t0 = time.perf_counter()
    images, edges, keypoints, ok = _decode(folder, names, size)
    decode_s = time.perf_counter() - t0
    arr = np.asarray(names, dtype=str)
    d = {
        "files": arr[ok],
        "images": images[ok],
        "edges": edges[ok],
        "keypoints": keypoints[ok],
        "unreadable": arr[~ok],
    }
    written = _write_cache(
        own, d, {"version": CACHE_VERSION, "folder": str(folder.resolve()), "size": size, "n_files": len(names)}
    )
    return d, {"cache": str(own) if written else None, "cache_hit": False, "decode_s": round(decode_s, 3)}


# -- loader ---------------------------------------------------------------------------------------


def _accept(p: Path) -> Path | None:
    if not p.is_dir():
        return None
    with os.scandir(p) as it:
        for e in it:
            if NAME_PATTERN.match(e.name):
                return p
    return None


def load_utkface(opts: DataOptions) -> FederatedDataset:
    """Load UTKFace, federated over ``n_clients`` (32) with ``Dirichlet(alpha)`` (0.5) over race.

    ``data_dir`` is the image folder (or a folder holding ``images/`` or ``utkface/images``);
    ``None`` tries ``$FMTL_EDGE_DATA_DIR/utkface/images`` then ``../shared/data/utkface/images``.
    ``max_samples`` picks a seeded race-stratified subset *before* decoding, so quick runs decode
    only those files (a cache of the whole folder serves any subset).

    Raises:
        DataError: no folder found, a folder without UTKFace-named ``.jpg`` files, no readable
            image, or a federation the data cannot fill.
    """
    size = DEFAULT_SIZE if opts.image_size is None else int(opts.image_size)
    n_clients = DEFAULT_CLIENTS if opts.n_clients is None else int(opts.n_clients)
    if opts.classes_per_client is not None and opts.alpha is not None:
        reject_option("utkface", "alpha", opts.alpha, "--classes-per-client gives the pathological split; drop --alpha")
    alpha = DEFAULT_ALPHA if opts.alpha is None else float(opts.alpha)
    folder = resolve_data_path("utkface", opts.data_dir, "utkface/images", _accept, expect=NAME_HELP)
    names, labels, skipped = scan_folder(folder)
    if not names:  # pragma: no cover - _accept saw at least one
        raise DataError(f"utkface: no {NAME_HELP} in {folder}")
    rng_sub, rng_part, rng_split = seed_streams(opts.seed, 3)

    keep = stratified_subsample(labels[:, 2], opts.max_samples, rng_sub)
    sub_names = [names[i] for i in keep]
    d, cache_info = load_images(folder, sub_names, size, resolve_cache_dir(opts.cache_dir), full_names=names)
    label_of = dict(zip(names, labels.tolist()))
    lab = np.asarray([label_of[f] for f in d["files"].tolist()], dtype=np.int64).reshape(-1, 3)
    n = len(lab)
    if n == 0:
        raise DataError(f"utkface: none of the {len(sub_names)} images in {folder} could be decoded")
    age, gender, race = lab[:, 0], lab[:, 1], lab[:, 2]
    images, edges, keypoints = d["images"], d["edges"], d["keypoints"]
    unreadable = d["unreadable"].tolist()
    del d
    if unreadable:
        log.warning("utkface: %d image(s) in %s could not be decoded and are left out (e.g. %s)",
                    len(unreadable), folder, ", ".join(unreadable[:3]))

    parts, partition = label_partition(race, n_clients, alpha, opts.classes_per_client, rng_part, "race")
    splits = [split_train_test(p, opts.test_fraction, rng_split, stratify=race[p]) for p in parts]
    age_mean, age_std = regression_stats([age[tr] for tr, _ in splits])

    def get_x(idx: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2), dtype=np.float32)
        x *= np.float32(1.0 / 255.0)
        return x

    def get_y(idx: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
        a = age[idx]
        return {
            "age": a.astype(np.float32),
            "age_group": (a < CHILD_AGE).astype(np.float32),
            "gender": gender[idx].astype(np.float32),
            "race": race[idx].astype(np.int64),
            "autoencode": x,
            "edges": edges[idx][:, None],
            "keypoints": keypoints[idx][:, None],
        }

    clients = build_clients(splits, get_x, get_y)
    ds = FederatedDataset(
        name="utkface",
        tasks=make_tasks(age_mean, age_std),
        clients=clients,
        input_shape=(3, size, size),
        info={
            "source": str(folder.resolve()),
            "n_samples": int(n),
            "n_files": len(names) + len(skipped),
            "n_clients": int(n_clients),
            "partition": partition,
            "image_size": size,
            "test_fraction": float(opts.test_fraction),
            "split": "per client, stratified by race",
            "seed": int(opts.seed),
            "max_samples": None if opts.max_samples is None else int(opts.max_samples),
            "skipped_files": len(skipped),
            "skipped_examples": skipped[:10],
            "unreadable_files": len(unreadable),
            "unreadable_examples": unreadable[:10],
            "dense_dtype": "float16 (edges, keypoints); cast per batch",
            "client_sizes": client_sizes(clients),
            **cache_info,
        },
    )
    ds.validate()
    return ds
