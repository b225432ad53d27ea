"""Data sets for federated multi-task learning and the federated partitioners.

>>> from fmtl_edge.data import load_dataset
>>> ds = load_dataset("digits", seed=0)          # 8 clients, Dirichlet(0.5) over the digit
>>> ds.tasks.names
('digit', 'parity', 'ge5', 'reconstruct', 'edges')

See ``docs/data.md`` for the data sets, their tasks and the ``npz`` bring-your-own-data layout.
"""

from fmtl_edge.data.base import ClientData, DataError, DataOptions, FederatedDataset
from fmtl_edge.data.partition import (
    dirichlet_partition,
    iid_partition,
    split_train_test,
    stratified_subsample,
)
from fmtl_edge.data.registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "ClientData",
    "DataError",
    "DataOptions",
    "FederatedDataset",
    "dirichlet_partition",
    "iid_partition",
    "load_dataset",
    "split_train_test",
    "stratified_subsample",
]
