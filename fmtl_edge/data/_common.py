"""Helpers shared by the loaders: locating data and caches, checking options, building clients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fmtl_edge.data.base import ClientData, DataError

#: Root of the data sets (holds ``utkface/images``, ``uci_har/...``); tried before ``../shared/data``.
DATA_DIR_ENV = "FMTL_EDGE_DATA_DIR"
#: Cache folder for decoded images; default ``~/.cache/fmtl-edge``.
CACHE_ENV = "FMTL_EDGE_CACHE"


def seed_streams(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators from one seed (subset, partition, split, ...)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def default_data_candidates(rel: str) -> list[tuple[str, Path]]:
    """Where a data set lives when ``data_dir`` is not given: ``$FMTL_EDGE_DATA_DIR/<rel>``, then
    ``../shared/data/<rel>`` relative to the current directory."""
    out: list[tuple[str, Path]] = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        out.append((f"${DATA_DIR_ENV}/{rel}", Path(env).expanduser() / rel))
    out.append((f"../shared/data/{rel}", Path.cwd().parent / "shared" / "data" / rel))
    return out


def resolve_data_path(
    dataset: str,
    data_dir: str | Path | None,
    rel: str,
    accept: Callable[[Path], Path | None],
    expect: str = "",
) -> Path:
    """Find a data set's folder or file.

    Args:
        dataset: loader name, for messages.
        data_dir: the user's ``--data-dir`` (or ``None`` for the defaults).
        rel: path below a data root (e.g. ``utkface/images``).
        accept: maps a candidate path to the usable path, or ``None`` when it does not hold the data.
        expect: what the data looks like (e.g. the file name pattern), added to error messages.

    Raises:
        DataError: nothing usable; the message lists what was tried and says to pass ``--data-dir``.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.exists():
            raise DataError(
                f"{dataset}: data path {str(p)!r} does not exist; pass --data-dir pointing at the "
                f"{dataset} data (e.g. .../shared/data/{rel})"
            )
        got = accept(p)
        if got is None:
            # Allow the data root or a parent folder: <data_dir>/<rel> and its last component.
            for q in (p / rel, p / Path(rel).name):
                if q.exists() and (got := accept(q)) is not None:
                    return got
            raise DataError(
                f"{dataset}: {str(p)!r} does not hold the {dataset} data (looked for "
                f"{rel!r} inside it too){'; expected ' + expect if expect else ''}; pass --data-dir "
                f"pointing at the {dataset} data"
            )
        return got
    tried = []
    for label, p in default_data_candidates(rel):
        tried.append(f"{label} ({p})")
        if p.exists() and (got := accept(p)) is not None:
            return got
    raise DataError(
        f"{dataset}: no data folder given and none found (tried {'; '.join(tried)}); pass "
        f"--data-dir (data_dir=...) or set ${DATA_DIR_ENV} to the folder holding {rel!r}"
        + (f"; expected {expect}" if expect else "")
    )


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$FMTL_EDGE_CACHE``, else ``~/.cache/fmtl-edge``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fmtl-edge"


def reject_option(dataset: str, option: str, value, why: str) -> None:
    """Raise a :class:`DataError` for an option that means nothing to this data set."""
    raise DataError(f"{dataset}: option {option}={value!r} does not apply: {why}")


def regression_stats(values: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean and (population) standard deviation over the given training targets; std 1.0 if zero."""
    v = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in values])
    if v.size == 0:
        return 0.0, 1.0
    mean, std = float(v.mean()), float(v.std())
    if not np.isfinite(std) or std <= 0:
        std = 1.0
    return mean, std


def build_clients(
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    get_x: Callable[[np.ndarray], np.ndarray],
    get_y: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
) -> list[ClientData]:
    """One :class:`ClientData` per ``(train_idx, test_idx)``.

    ``get_x(idx)`` returns the float32 inputs of those samples; ``get_y(idx, x)`` their targets
    (``x`` is passed so that an autoencoding target can be ``x`` itself, without a copy).
    """
    clients = []
    for cid, (tr, te) in enumerate(splits):
        x_tr, x_te = get_x(tr), get_x(te)
        clients.append(
            ClientData(
                client_id=cid,
                x_train=x_tr,
                y_train=get_y(tr, x_tr),
                x_test=x_te,
                y_test=get_y(te, x_te),
            )
        )
    return clients


def client_sizes(clients: Sequence[ClientData]) -> list[list[int]]:
    """``[[n_train, n_test], ...]`` for ``info``."""
    return [[c.n_train, c.n_test] for c in clients]


def default_min_size(n_samples: int, n_clients: int) -> int:
    """Smallest client size for Dirichlet partitions: 10 where the data allow it, never below 2
    (one train and one test sample)."""
    return max(2, min(10, n_samples // max(1, 4 * n_clients)))


def label_partition(labels: np.ndarray, n_clients: int, alpha: float, classes_per_client: int | None,
                    rng: np.random.Generator, label: str) -> tuple[list[np.ndarray], str]:
    """A label-skewed federation: ``Dirichlet(alpha)`` over ``labels``, or, with
    ``classes_per_client`` = C, the pathological split (every client exactly C of the labels).

    Returns:
        ``(parts, description)``: one int64 index array per client, and the ``partition`` string
        of the data set's info (e.g. ``dirichlet(alpha=0.5) over race``).

    Raises:
        DataError: from :func:`~fmtl_edge.data.partition.dirichlet_partition` or
            :func:`~fmtl_edge.data.partition.pathological_partition`.
    """
    from fmtl_edge.data.partition import dirichlet_partition, pathological_partition

    if classes_per_client is None:
        parts = dirichlet_partition(labels, n_clients, alpha, rng, min_size=default_min_size(len(labels), n_clients))
        return parts, f"dirichlet(alpha={alpha:g}) over {label}"
    parts = pathological_partition(labels, n_clients, classes_per_client, rng)
    return parts, f"pathological({int(classes_per_client)} per client) over {label}"


# -- Taskonomy-style 2D targets computed from the image ------------------------------------------


def sobel_edges(gray: np.ndarray) -> np.ndarray:
    """2D edges: Sobel gradient magnitude of one grayscale image in [0, 1] (``skimage.filters.sobel``).

    scikit-image normalises the Sobel kernels (smoothing ``[1, 2, 1] / 4``) and returns
    ``sqrt((g_h² + g_v²) / 2)``, so for an image in [0, 1] the magnitude already lies in [0, 1]: no
    per-image rescaling, edge strength stays comparable across images and clients. Clipped to [0, 1]
    against rounding.
    """
    from skimage import filters

    return np.clip(filters.sobel(np.asarray(gray, dtype=np.float32)), 0.0, 1.0)


def harris_keypoints(gray: np.ndarray, sigma: float = 1.0, k: float = 0.05) -> np.ndarray:
    """2D keypoints: Harris corner response (``skimage.feature.corner_harris``, method ``k``),
    negative values (edge-like) set to 0, divided by the image's own maximum so that every image
    spans [0, 1] (all zeros for a flat image)."""
    from skimage import feature

    r = feature.corner_harris(np.asarray(gray, dtype=np.float64), method="k", k=k, sigma=sigma)
    r = np.maximum(r, 0.0)
    m = float(r.max())
    return (r / m if m > 0 else r).astype(np.float32)
