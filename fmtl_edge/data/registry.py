"""The data set registry: ``DATASETS`` (name → loader) and :func:`load_dataset`.

Every loader takes one :class:`~fmtl_edge.data.base.DataOptions` (checked by :func:`load_dataset`)
and returns a validated :class:`~fmtl_edge.data.base.FederatedDataset`. Loader modules are imported
on first use so that ``import fmtl_edge.data`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from fmtl_edge.data.base import PATHOLOGICAL, DataError, DataOptions, FederatedDataset

__all__ = ["DATASETS", "PATHOLOGICAL", "Loader", "load_dataset"]

Loader = Callable[[DataOptions], FederatedDataset]


def _lazy(module: str, attr: str, doc: str) -> Loader:
    def loader(opts: DataOptions) -> FederatedDataset:
        return getattr(importlib.import_module(module), attr)(opts)

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


def load_dataset(name: str, opts: DataOptions | None = None, /, **fields) -> FederatedDataset:
    """Load a data set by name and split it over clients.

    Args:
        name: one of :data:`DATASETS` (``digits``, ``utkface``, ``uci-har``, ``npz``; ``uci_har``
            is accepted for ``uci-har``).
        opts: the options (:class:`~fmtl_edge.data.base.DataOptions`, where each is documented);
            ``None``: built from ``fields``.
        **fields: :class:`~fmtl_edge.data.base.DataOptions` fields by name
            (``load_dataset("digits", seed=0, max_samples=400)``); with ``opts``, they replace its values.

    Raises:
        DataError: unknown name, bad option, missing data or a file of the wrong layout; the message
            names the path/field and the fix.
        TypeError: a field ``DataOptions`` does not have.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    opts = DataOptions(**fields) if opts is None else dataclasses.replace(opts, **fields)
    opts = opts.validate(key)
    ds = DATASETS[key](opts)
    if opts.task_groups is not None:
        from fmtl_edge.data.base import assign_task_groups

        ds = assign_task_groups(ds, int(opts.task_groups), seed=opts.seed)
    return ds
