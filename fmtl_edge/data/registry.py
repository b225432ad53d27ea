"""The data set registry: ``DATASETS`` (name → loader) and :func:`load_dataset`.

Every loader takes the same keyword arguments as :func:`load_dataset` (minus ``name``) and returns a
validated :class:`~fmtl_edge.data.base.FederatedDataset`. Loader modules are imported on first use
so that ``import fmtl_edge.data`` stays cheap.
"""

from __future__ import annotations

import importlib
import math
import numbers
from pathlib import Path
from typing import Callable

from fmtl_edge.data.base import DataError, FederatedDataset

Loader = Callable[..., FederatedDataset]


def _lazy(module: str, attr: str, doc: str) -> Loader:
    def loader(**kwargs) -> FederatedDataset:
        return getattr(importlib.import_module(module), attr)(**kwargs)

    loader.__name__ = attr
    loader.__qualname__ = attr
    loader.__doc__ = f"{doc} (see :func:`{module}.{attr}`)."
    return loader


#: Loader per data set name; the keys are what ``--data`` accepts.
DATASETS: dict[str, Loader] = {
    "digits": _lazy("fmtl_edge.data.digits", "load_digits", "scikit-learn's bundled 8x8 digits, 5 tasks"),
    "utkface": _lazy("fmtl_edge.data.utkface", "load_utkface", "UTKFace faces, 7 tasks"),
    "uci-har": _lazy("fmtl_edge.data.uci_har", "load_uci_har", "UCI HAR per subject, 3 tasks"),
    "npz": _lazy("fmtl_edge.data.npz", "load_npz", "bring your own data: client_<id>.npz + tasks.toml"),
}


#: the data sets whose partition is drawn over a label (so ``classes_per_client`` applies)
PATHOLOGICAL = frozenset({"digits", "utkface"})


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    n_clients: int | None = None,
    seed: int = 0,
    alpha: float | None = None,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    max_samples: int | None = None,
    cache_dir: str | Path | None = None,
    task_groups: int | None = None,
    classes_per_client: int | None = None,
) -> FederatedDataset:
    """Load a data set by name and split it over clients.

    Args:
        name: one of :data:`DATASETS` (``digits``, ``utkface``, ``uci-har``, ``npz``; ``uci_har``
            is accepted for ``uci-har``).
        data_dir: folder (or file) holding the data; ``None`` looks in ``$FMTL_EDGE_DATA_DIR`` and
            ``../shared/data`` (not used by ``digits``; required by ``npz``).
        n_clients: number of clients; ``None`` for the data set's default (digits 8, utkface 32,
            uci-har 30 = one per subject, npz = one per file).
        seed: fixes the subset, partition and splits.
        alpha: Dirichlet concentration of label-skewed partitions (default 0.5; digits/utkface).
        test_fraction: per-client test share in ``[0, 1)`` (uci-har and npz use their files' split).
        image_size: side of the resized images (utkface, default 64).
        max_samples: cap on the total number of samples (seeded stratified subset), for quick runs.
        cache_dir: where decoded images are cached (utkface); default ``$FMTL_EDGE_CACHE`` or
            ``~/.cache/fmtl-edge``.
        task_groups: give each client one of the first ``task_groups`` tasks and drop its other
            labels (seed 000's client groups; :func:`fmtl_edge.data.base.assign_task_groups`).
        classes_per_client: the pathological split instead of Dirichlet: every client holds exactly
            this many classes (digits: of the digit, utkface: of race;
            :func:`fmtl_edge.data.partition.pathological_partition`). Other data sets refuse it.

    Raises:
        DataError: unknown name, bad option, missing data or a file of the wrong layout; the message
            names the path/field and the fix.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if n_clients is not None and (isinstance(n_clients, bool) or int(n_clients) != n_clients or n_clients < 1):
        raise DataError(f"n_clients must be a positive integer, got {n_clients!r}")
    if alpha is not None and not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha (Dirichlet concentration) must be a number > 0, got {alpha!r}")
    if not (isinstance(test_fraction, numbers.Real) and 0.0 <= test_fraction < 1.0):
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if image_size is not None and (int(image_size) != image_size or not 4 <= image_size <= 1024):
        raise DataError(f"image_size must be an integer in [4, 1024], got {image_size!r}")
    if max_samples is not None and (int(max_samples) != max_samples or max_samples < 1):
        raise DataError(f"max_samples must be a positive integer, got {max_samples!r}")
    extra = {}
    if classes_per_client is not None:
        if key not in PATHOLOGICAL:
            raise DataError(f"{key}: classes_per_client (--classes-per-client) is for the label-partitioned data "
                            f"sets ({', '.join(sorted(PATHOLOGICAL))}); {key}'s clients are fixed: drop it")
        if isinstance(classes_per_client, bool) or int(classes_per_client) != classes_per_client or classes_per_client < 1:
            raise DataError(f"classes_per_client (--classes-per-client) must be a positive integer, got {classes_per_client!r}")
        extra["classes_per_client"] = int(classes_per_client)
    ds = DATASETS[key](
        data_dir=data_dir,
        n_clients=None if n_clients is None else int(n_clients),
        seed=int(seed),
        alpha=None if alpha is None else float(alpha),
        test_fraction=float(test_fraction),
        image_size=None if image_size is None else int(image_size),
        max_samples=None if max_samples is None else int(max_samples),
        cache_dir=cache_dir,
        **extra,
    )
    if task_groups is not None:
        from fmtl_edge.data.base import assign_task_groups

        ds = assign_task_groups(ds, int(task_groups), seed=int(seed))
    return ds
