"""``uci-har``: UCI Human Activity Recognition, one client per subject.

Reads ``har265_per_subject.npz`` (from ``--data-dir``, ``$FMTL_EDGE_DATA_DIR/uci_har`` or
``../shared/data/uci_har``): ``X`` (N, 265) float32 in [-1, 1] (the 265 time-domain features),
``y`` activity 1..6, ``subject`` 1..30 and ``split`` (0 train, 1 test; per subject, 70/30 stratified
by activity). The subjects are natural non-IID clients, so there is no Dirichlet partition: client
``k`` is the ``k``-th subject in increasing id, and its train/test split is the file's.

Tasks (all read the same feature vector):

============ ============== ======= =======================================================
name         kind           out_dim target
============ ============== ======= =======================================================
``activity`` classification 6       0 walking, 1 upstairs, 2 downstairs, 3 sitting,
                                    4 standing, 5 laying (the file's label − 1)
``moving``   binary         1       1.0 for the dynamic activities (walking, upstairs,
                                    downstairs), 0.0 for the static postures
``stairs``   binary         1       1.0 for walking upstairs or downstairs (elevation
                                    change), else 0.0
============ ============== ======= =======================================================

``moving`` is the classic first split of HAR hierarchies (dynamic vs static); ``stairs`` asks for
elevation change, a distinction energy-expenditure and fall-risk monitors care about. Both are
coarser views of the activity, so the tasks are related but not identical: the kind of task set
MAS groups.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fmtl_edge.data._common import (
    build_clients,
    client_sizes,
    reject_option,
    resolve_data_path,
    seed_streams,
)
from fmtl_edge.data.base import DataError, DataOptions, FederatedDataset
from fmtl_edge.data.partition import stratified_subsample
from fmtl_edge.tasks import Task, TaskSet

FILE_NAME = "har265_per_subject.npz"
ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
REQUIRED_KEYS = ("X", "y", "subject", "split")

TASKS = TaskSet(
    [
        Task("activity", "classification", 6, description="activity: " + ", ".join(ACTIVITIES)),
        Task("moving", "binary", 1, description="dynamic activity (walking, up/downstairs) vs static"),
        Task("stairs", "binary", 1, description="walking upstairs or downstairs vs anything else"),
    ]
)


def _accept(p: Path) -> Path | None:
    if p.is_file() and p.suffix == ".npz":
        return p
    if p.is_dir() and (p / FILE_NAME).is_file():
        return p / FILE_NAME
    return None


def read_har_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and check the per-subject HAR file.

    Raises:
        DataError: unreadable file, missing keys, length mismatch or out-of-range values.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"uci-har: {path} lacks the array(s) {missing} (has {sorted(z.files)}); expected "
                    f"{list(REQUIRED_KEYS)} as in {FILE_NAME} (see ../shared/data/README.md)"
                )
            d = {k: np.asarray(z[k]) for k in REQUIRED_KEYS}
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError
        raise DataError(f"uci-har: cannot read {path} as an .npz file ({e}); pass the {FILE_NAME} file") from e
    x = d["X"]
    if x.ndim != 2:
        raise DataError(f"uci-har: {path}: 'X' must be (N, D) features, got shape {x.shape}")
    n = len(x)
    for k in ("y", "subject", "split"):
        if d[k].shape != (n,):
            raise DataError(f"uci-har: {path}: {k!r} has shape {d[k].shape}, expected ({n},) to match 'X'")
    if not np.isin(d["y"], np.arange(1, 7)).all():
        raise DataError(f"uci-har: {path}: 'y' must hold activities 1..6, found {np.unique(d['y']).tolist()}")
    if not np.isin(d["split"], (0, 1)).all():
        raise DataError(f"uci-har: {path}: 'split' must be 0 (train) or 1 (test), found {np.unique(d['split']).tolist()}")
    if not np.isfinite(x).all():
        raise DataError(f"uci-har: {path}: 'X' holds NaN or inf values")
    return d


def load_uci_har(opts: DataOptions) -> FederatedDataset:
    """Load UCI HAR with one client per subject and the file's train/test split.

    ``test_fraction`` does not change the split (the file's per-subject 70/30 split is kept so that
    results stay comparable; a warning says so when a value other than the default is given).
    ``max_samples`` keeps a seeded subset stratified by (subject, split, activity). ``cache_dir`` is
    unused (the file is read directly).

    Raises:
        DataError: no data found, wrong layout, ``n_clients`` other than the number of subjects,
            ``alpha`` or ``image_size`` given, or ``max_samples`` too small to give every subject a
            train and a test sample.
    """
    if opts.alpha is not None:
        reject_option("uci-har", "alpha", opts.alpha, "there is one client per subject (natural non-IID); drop --alpha")
    if opts.image_size is not None:
        reject_option("uci-har", "image_size", opts.image_size, "the inputs are 265-feature vectors; drop --image-size")
    if opts.test_fraction != 0.2:
        warnings.warn(
            f"uci-har: test_fraction={opts.test_fraction} ignored; the file's per-subject 70/30 split is used",
            stacklevel=2,
        )
    path = resolve_data_path("uci-har", opts.data_dir, f"uci_har/{FILE_NAME}", _accept)
    d = read_har_npz(path)
    subjects = np.unique(d["subject"])
    if opts.n_clients is not None and opts.n_clients != len(subjects):
        raise DataError(
            f"uci-har: n_clients={opts.n_clients} but the data has {len(subjects)} subjects and uci-har uses "
            f"one client per subject; drop --clients (or pass {len(subjects)})"
        )
    (rng_sub,) = seed_streams(opts.seed, 1)

    x_all = np.asarray(d["X"], dtype=np.float32)
    act = d["y"].astype(np.int64) - 1
    subj = d["subject"].astype(np.int64)
    split = d["split"].astype(np.int64)
    strata = (subj * 2 + split) * 6 + act
    keep = stratified_subsample(strata, opts.max_samples, rng_sub, cover=subj * 2 + split)

    splits = []
    for s in subjects:
        mine = keep[subj[keep] == s]
        tr, te = mine[split[mine] == 0], mine[split[mine] == 1]
        if len(tr) == 0 or len(te) == 0:
            raise DataError(
                f"uci-har: subject {int(s)} has {len(tr)} train and {len(te)} test samples"
                + (f" after max_samples={opts.max_samples}; raise max_samples (at least {2 * len(subjects)})"
                   if opts.max_samples is not None else f" in {path}; every subject needs both")
            )
        splits.append((tr, te))

    def get_x(idx: np.ndarray) -> np.ndarray:
        return x_all[idx]

    def get_y(idx: np.ndarray, _x: np.ndarray) -> dict[str, np.ndarray]:
        a = act[idx]
        return {
            "activity": a,
            "moving": (a <= 2).astype(np.float32),
            "stairs": ((a == 1) | (a == 2)).astype(np.float32),
        }

    clients = build_clients(splits, get_x, get_y)
    ds = FederatedDataset(
        name="uci-har",
        tasks=TASKS,
        clients=clients,
        input_shape=(int(x_all.shape[1]),),
        info={
            "source": str(path.resolve()),
            "n_samples": int(len(keep)),
            "n_clients": len(clients),
            "partition": "one client per subject",
            "client_subjects": [int(s) for s in subjects],
            "split": "from file (per subject, 70/30 stratified by activity)",
            "image_size": None,
            "seed": int(opts.seed),
            "max_samples": None if opts.max_samples is None else int(opts.max_samples),
            "skipped_files": 0,
            "client_sizes": client_sizes(clients),
        },
    )
    ds.validate()
    return ds
