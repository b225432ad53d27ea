"""``digits``: scikit-learn's bundled handwritten digits, the embedded default data set.

1,797 grey 8×8 images of the digits 0..9 (UCI "Optical Recognition of Handwritten Digits", the
test part, shipped inside scikit-learn: no download). Inputs ``(N, 1, 8, 8)`` float32 in [0, 1]
(pixel counts 0..16 divided by 16).

Tasks (all read the same image):

=============== ============== ======= ============================================================
name            kind           out_dim target
=============== ============== ======= ============================================================
``digit``       classification 10      the digit, int64 0..9
``parity``      binary         1       1.0 if the digit is odd, else 0.0
``ge5``         binary         1       1.0 if the digit is >= 5, else 0.0
``reconstruct`` dense          1       the input image itself (autoencoding; shares x's memory)
``edges``       dense          1       Sobel magnitude of the image, in [0, 1] (see ``sobel_edges``)
=============== ============== ======= ============================================================

Default federation: 8 clients, ``Dirichlet(0.5)`` over the digit class, each client split
80/20 into train/test stratified by digit.
"""

from __future__ import annotations

import numpy as np

from fmtl_edge.data._common import (
    build_clients,
    client_sizes,
    label_partition,
    reject_option,
    seed_streams,
    sobel_edges,
)
from fmtl_edge.data.base import DataError, DataOptions, FederatedDataset
from fmtl_edge.data.partition import split_train_test, stratified_subsample
from fmtl_edge.tasks import Task, TaskSet

DEFAULT_CLIENTS = 8
DEFAULT_ALPHA = 0.5

TASKS = TaskSet(
    [
        Task("digit", "classification", 10, description="handwritten digit 0-9"),
        Task("parity", "binary", 1, description="digit is odd (1) or even (0)"),
        Task("ge5", "binary", 1, description="digit is >= 5 (1) or < 5 (0)"),
        Task("reconstruct", "dense", 1, description="reconstruct the 8x8 image (autoencoding)"),
        Task("edges", "dense", 1, description="Sobel edge magnitude of the 8x8 image, [0, 1]"),
    ]
)


def load_digits(opts: DataOptions) -> FederatedDataset:
    """Load ``digits`` federated over ``opts.n_clients`` (default 8) with ``Dirichlet(alpha)`` (0.5)
    over the digit, or, with ``classes_per_client = C``, the pathological split (every client holds
    C digits: :func:`~fmtl_edge.data.partition.pathological_partition`).

    ``opts.cache_dir`` is accepted and unused (nothing to cache).

    Raises:
        DataError: ``data_dir`` given (the data is built in), ``image_size`` other than 8, both
            ``alpha`` and ``classes_per_client``, or a federation the 1,797 samples cannot fill.
    """
    if opts.data_dir is not None:
        reject_option("digits", "data_dir", opts.data_dir, "the digits ship inside scikit-learn; drop --data-dir")
    if opts.image_size not in (None, 8):
        reject_option("digits", "image_size", opts.image_size, "the digits are 8x8; drop --image-size or pass 8")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a dependency
        raise DataError(f"digits: scikit-learn is needed for the built-in digits ({e}); pip install scikit-learn") from e

    n_clients = DEFAULT_CLIENTS if opts.n_clients is None else int(opts.n_clients)
    if opts.classes_per_client is not None and opts.alpha is not None:
        reject_option("digits", "alpha", opts.alpha, "--classes-per-client gives the pathological split; drop --alpha")
    alpha = DEFAULT_ALPHA if opts.alpha is None else float(opts.alpha)
    rng_sub, rng_part, rng_split = seed_streams(opts.seed, 3)

    raw = _sk_load_digits()
    images = np.asarray(raw.images, dtype=np.float32)  # (1797, 8, 8), 0..16
    labels = np.asarray(raw.target, dtype=np.int64)
    keep = stratified_subsample(labels, opts.max_samples, rng_sub)
    images, labels = images[keep], labels[keep]

    x = (images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    edges = np.stack([sobel_edges(im[0]) for im in x])[:, None].astype(np.float32)
    n = len(labels)

    parts, partition = label_partition(labels, n_clients, alpha, opts.classes_per_client, rng_part, "class")
    splits = [split_train_test(p, opts.test_fraction, rng_split, stratify=labels[p]) for p in parts]

    def get_x(idx: np.ndarray) -> np.ndarray:
        return x[idx]

    def get_y(idx: np.ndarray, xi: np.ndarray) -> dict[str, np.ndarray]:
        d = labels[idx]
        return {
            "digit": d,
            "parity": (d % 2).astype(np.float32),
            "ge5": (d >= 5).astype(np.float32),
            "reconstruct": xi,
            "edges": edges[idx],
        }

    clients = build_clients(splits, get_x, get_y)
    ds = FederatedDataset(
        name="digits",
        tasks=TASKS,
        clients=clients,
        input_shape=(1, 8, 8),
        info={
            "source": "sklearn.datasets.load_digits (bundled, UCI optdigits test part)",
            "n_samples": int(n),
            "n_clients": int(n_clients),
            "partition": partition,
            "image_size": 8,
            "test_fraction": float(opts.test_fraction),
            "split": "per client, stratified by digit",
            "seed": int(opts.seed),
            "max_samples": None if opts.max_samples is None else int(opts.max_samples),
            "skipped_files": 0,
            "client_sizes": client_sizes(clients),
        },
    )
    ds.validate()
    return ds
