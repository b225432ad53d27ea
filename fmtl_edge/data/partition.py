"""Federated partitioners: which samples each client holds, and each client's train/test split.

All functions take a NumPy :class:`~numpy.random.Generator` (or an int seed) and are deterministic
for a given generator state. They return index arrays into the caller's sample axis.

- :func:`dirichlet_partition`: label-skewed non-IID partition (Hsu et al. 2019, "Measuring the
  effects of non-identical data distribution"): for each class, client shares are drawn from
  ``Dirichlet(alpha)``; small ``alpha`` gives each client few dominant classes.
- :func:`pathological_partition`: every client holds exactly ``C`` classes (McMahan et al. 2017's
  "pathological non-IID" split; the setting of Loop Improvement's Table 1 and FedALA).
- :func:`iid_partition`: a random, near-equal split.
- :func:`split_train_test`: one client's train/test split, optionally stratified.
- :func:`stratified_subsample`: a seeded subset of at most ``max_samples`` that keeps the
  proportions of a label (used for ``max_samples``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fmtl_edge.data.base import DataError

__all__ = [
    "as_rng",
    "dirichlet_partition",
    "iid_partition",
    "pathological_partition",
    "split_train_test",
    "stratified_subsample",
    "label_histograms",
]


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A :class:`numpy.random.Generator` from a generator (returned as is) or a seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_n_clients(n_clients: int, n_samples: int, min_size: int) -> None:
    if int(n_clients) != n_clients or n_clients < 1:
        raise DataError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n_clients * min_size > n_samples:
        raise DataError(
            f"cannot give {n_clients} clients at least {min_size} samples each from {n_samples} "
            "samples: lower n_clients (--clients) or use more samples (max_samples, --data-dir)"
        )


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of positions in which every prefix holds each label in (near) proportion.

    Each sample of a class with ``n_c`` members gets the key ``(rank + u) / n_c`` with a random
    within-class rank and ``u ~ U[0, 1)``; sorting by the key interleaves the classes evenly.
    """
    labels = np.asarray(labels)
    n = len(labels)
    keys = np.empty(n, dtype=np.float64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    for c, n_c in enumerate(counts):
        pos = np.flatnonzero(inverse == c)
        rank = rng.permutation(n_c)
        keys[pos] = (rank + rng.random(n_c)) / n_c
    return np.argsort(keys, kind="stable")


def iid_partition(
    n_samples: int | Sequence, n_clients: int, rng: np.random.Generator | int | None
) -> list[np.ndarray]:
    """Shuffle and split into ``n_clients`` near-equal parts.

    Args:
        n_samples: number of samples (or any sequence; its length is used).
        n_clients: number of clients.
        rng: generator or seed.

    Returns:
        ``n_clients`` sorted int64 index arrays covering ``range(n_samples)`` exactly once.

    Raises:
        DataError: fewer samples than clients.
    """
    n = n_samples if isinstance(n_samples, (int, np.integer)) else len(n_samples)
    n = int(n)
    _check_n_clients(n_clients, n, 1)
    perm = as_rng(rng).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, int(n_clients))]


def _dirichlet_draw(
    classes: list[np.ndarray], n_total: int, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One draw: for each class, Dirichlet shares over clients; a client already holding its fair
    share ``n_total / n_clients`` gets no more (the common balancing rule, keeps sizes sane)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    sizes = np.zeros(n_clients, dtype=np.int64)
    cap = n_total / n_clients
    for idx in classes:
        idx = idx[rng.permutation(len(idx))]
        p = rng.dirichlet(np.full(n_clients, alpha))
        p = p * (sizes < cap)
        s = p.sum()
        p = p / s if s > 0 else np.full(n_clients, 1.0 / n_clients)
        cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
        for j, chunk in enumerate(np.split(idx, cuts)):
            if len(chunk):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
    return parts


def dirichlet_partition(
    labels: Sequence | np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator | int | None,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed non-IID partition with ``Dirichlet(alpha)`` class shares per client.

    For each class, the class's samples are shuffled and cut into client shares drawn from
    ``Dirichlet(alpha · 1)``; clients that already hold ``N / n_clients`` samples get no more of
    later classes. The draw is repeated until every client holds at least ``min_size`` samples
    (common practice). If ``max_tries`` draws all fail (tiny data sets, many clients, tiny
    ``alpha``), the draw with the largest smallest client is topped up by moving random samples
    from the largest clients to the small ones, so the call always terminates.

    Args:
        labels: one label per sample (any hashable dtype), length ``N``.
        n_clients: number of clients.
        alpha: Dirichlet concentration, ``> 0``; small is skewed (0.1), large is near IID (100).
        rng: generator or seed.
        min_size: smallest client size accepted; ``n_clients * min_size <= N`` is required.
        max_tries: draws before the top-up fallback.

    Returns:
        ``n_clients`` sorted int64 index arrays into ``labels``; every sample appears exactly once
        and every client holds at least ``min_size`` samples.

    Raises:
        DataError: ``alpha <= 0``, bad ``n_clients``, or ``n_clients * min_size > N``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"dirichlet_partition needs 1-D labels, got shape {labels.shape}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise DataError(f"Dirichlet alpha must be > 0 (e.g. 0.5), got {alpha!r}")
    n = len(labels)
    min_size = max(1, int(min_size))
    _check_n_clients(n_clients, n, min_size)
    n_clients = int(n_clients)
    rng = as_rng(rng)
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    classes = [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)] if n else []

    best, best_min = None, -1
    for _ in range(max(1, int(max_tries))):
        parts = _dirichlet_draw(classes, n, n_clients, float(alpha), rng)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            best = parts
            break
        if min(sizes) > best_min:
            best, best_min = parts, min(sizes)
    assert best is not None
    out = [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in best]
    out = [rng.permutation(p) for p in out]

    # Top-up fallback: move random samples from the largest clients to the ones below min_size.
    sizes = np.array([len(p) for p in out])
    while sizes.min() < min_size:
        small, big = int(sizes.argmin()), int(sizes.argmax())
        take = min(min_size - sizes[small], sizes[big] - min_size)
        out[small] = np.concatenate([out[small], out[big][:take]])
        out[big] = out[big][take:]
        sizes[small] += take
        sizes[big] -= take
    return [np.sort(p).astype(np.int64) for p in out]


def pathological_partition(
    labels: Sequence | np.ndarray,
    n_clients: int,
    classes_per_client: int,
    rng: np.random.Generator | int | None,
) -> list[np.ndarray]:
    """Pathological non-IID partition: every client holds the samples of exactly ``C`` classes.

    The classes are put in a seeded order and dealt round-robin, ``C`` consecutive ones per client:
    client ``i`` gets classes ``order[(i·C + j) mod K]`` for ``j < C`` (``K`` classes). A class held
    by ``m`` clients is shuffled and cut into ``m`` near-equal shares. With ``n_clients · C`` a
    multiple of ``K`` every class is held by the same number of clients (digits, 10 clients, C = 2:
    each digit on exactly 2 clients). Source: McMahan et al. 2017 (FedAvg, §3 "pathological
    non-IID"), as used by Li et al. 2024 (Loop Improvement, Table 1: "pathological").

    Args:
        labels: one label per sample, length ``N`` (any hashable dtype).
        n_clients: number of clients.
        classes_per_client: ``C``, ``1 <= C <= K``.
        rng: generator or seed.

    Returns:
        ``n_clients`` sorted int64 index arrays into ``labels``; every sample held by a client is in
        exactly one array; a class no client was dealt (``n_clients · C < K``) is left out.

    Raises:
        DataError: 1-D labels required; ``C`` outside ``[1, K]``; a client whose share would be empty
            (a class split over more clients than it has samples).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"pathological_partition needs 1-D labels, got shape {labels.shape}")
    n = len(labels)
    _check_n_clients(n_clients, n, 1)
    n_clients = int(n_clients)
    values, inverse = np.unique(labels, return_inverse=True)
    k = len(values)
    if int(classes_per_client) != classes_per_client or not 1 <= classes_per_client <= k:
        raise DataError(f"classes_per_client (--classes-per-client) must be an integer in [1, {k}] "
                        f"(the number of classes), got {classes_per_client!r}")
    c = int(classes_per_client)
    rng = as_rng(rng)
    order = rng.permutation(k)
    dealt = [[int(order[(i * c + j) % k]) for j in range(c)] for i in range(n_clients)]
    holders: dict[int, list[int]] = {}
    for i, cls in enumerate(dealt):
        for cl in cls:
            holders.setdefault(cl, []).append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for cl in sorted(holders):
        idx = np.flatnonzero(inverse.reshape(-1) == cl)
        idx = idx[rng.permutation(len(idx))]
        owners = holders[cl]
        if len(idx) < len(owners):
            raise DataError(f"class {values[cl]!r} has {len(idx)} samples for {len(owners)} clients: "
                            "lower --clients or --classes-per-client")
        for owner, share in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(share)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def split_train_test(
    indices: Sequence[int] | np.ndarray,
    test_fraction: float,
    rng: np.random.Generator | int | None,
    stratify: Sequence | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples into train and test.

    The test set gets ``round(test_fraction * n)`` samples, but at least one (and at least one is
    left to train) when ``0 < test_fraction`` and ``n >= 2``. With ``stratify`` (labels aligned
    with ``indices``) each label appears in the test set in (near) proportion.

    Args:
        indices: the client's sample indices.
        test_fraction: in ``[0, 1)``; ``0`` puts everything in train.
        rng: generator or seed.
        stratify: optional labels, one per entry of ``indices``.

    Returns:
        ``(train, test)``: sorted int64 arrays drawn from ``indices``, disjoint, covering it.

    Raises:
        DataError: ``test_fraction`` outside ``[0, 1)`` or ``stratify`` of another length.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not (0.0 <= float(test_fraction) < 1.0):
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    rng = as_rng(rng)
    n = len(indices)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    if stratify is not None:
        stratify = np.asarray(stratify).reshape(-1)
        if len(stratify) != n:
            raise DataError(
                f"stratify has {len(stratify)} labels but indices has {n}: pass one label per index"
            )
        order = _stratified_order(stratify, rng) if n else np.empty(0, dtype=np.int64)
    else:
        order = rng.permutation(n)
    test = np.sort(indices[order[:n_test]])
    train = np.sort(indices[order[n_test:]])
    return train, test


def stratified_subsample(
    labels: Sequence | np.ndarray,
    max_samples: int | None,
    rng: np.random.Generator | int | None,
    cover: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """At most ``max_samples`` positions of ``labels``, keeping each label's share (seeded).

    Args:
        labels: one label per sample; the subset keeps their proportions (near) exactly.
        max_samples: size of the subset; ``None`` or ``>= N`` keeps everything.
        rng: generator or seed.
        cover: optional coarser groups (one per sample) of which each gets at least one sample
            when ``max_samples`` is at least the number of groups (e.g. every client's train and
            test part).

    Returns:
        Sorted int64 positions.

    Raises:
        DataError: ``max_samples < 1`` or ``cover`` of another length.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if max_samples is None or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    if int(max_samples) != max_samples or max_samples < 1:
        raise DataError(f"max_samples must be a positive integer, got {max_samples!r}")
    order = _stratified_order(labels, as_rng(rng))
    if cover is not None:
        cover = np.asarray(cover).reshape(-1)
        if len(cover) != n:
            raise DataError(f"cover has {len(cover)} entries but labels has {n}")
        _, first = np.unique(cover[order], return_index=True)
        front = np.zeros(n, dtype=bool)
        front[first] = True
        order = np.concatenate([order[front], order[~front]])
    return np.sort(order[: int(max_samples)]).astype(np.int64)


def label_histograms(labels: np.ndarray, parts: Sequence[np.ndarray], n_classes: int | None = None) -> np.ndarray:
    """``(n_clients, n_classes)`` counts of integer ``labels`` per client (for reports and tests)."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(n_classes if n_classes is not None else labels.max() + 1)
    return np.stack([np.bincount(labels[p], minlength=k) for p in parts])
