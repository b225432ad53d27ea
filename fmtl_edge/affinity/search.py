"""Split search over task affinities: MAS (seed 003) exact partition and TAG's group selection.

Conventions (docs/design.md §2):

* ``S[i, j]`` = S_{α_i→α_j}, the effect of task i's lookahead step on task j's loss (MAS Eq. 3).  The
  diagonal of an input matrix is ignored (it may hold anything, NaN included).
* Affinity *onto* task j inside group G = mean of ``S[i, j]`` over i ∈ G \\ {j}.
* Self-affinity (MAS Eq. 4): ``S[i, i] = Σ_{j≠i} (S[i, j] + S[j, i]) / (2n − 2)``; it is the score of
  a task that sits alone in its group.
* The score of a group G is Σ_{j∈G} (affinity onto j in G) (= the sum of the off-diagonal entries
  inside G divided by |G| − 1), or ``S[j, j]`` for ``G = {j}``; a partition scores the sum over its
  groups.  MAS picks the partition into exactly x groups with the largest score (Alg. 1 line 14).

The searches run in C++ (:mod:`fmtl_edge._kernels`): the 2^n subset scores, then a DP over subsets
``best[k][mask] = max over sub ⊆ mask holding mask's lowest task of f(sub) + best[k−1][mask \\ sub]``,
O(x·3^n) time and O(x·2^n) memory; up to :data:`MAX_TASKS` tasks.

Tie-breaking (deterministic): the DP fixes the group of the lowest-index task first and, among
candidates with exactly equal float64 sums, keeps the one with the numerically largest bitmask (bit
i = task i), then recurses on the remaining tasks; ``best_partition_at_most`` prefers fewer groups on
equal scores.  :func:`best_partition_reference` enumerates partitions and keeps the first best one
in its own order and its own float summation, so on (near-)ties it may return different groups
with the same score; tests compare scores (within 1e-9) and check that the groups reach the score.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

try:
    from fmtl_edge import _kernels as _K
except ImportError:  # pragma: no cover - only in an unbuilt source tree
    import os as _os

    if _os.environ.get("FMTL_REQUIRE_NATIVE"):
        raise
    _K = None


def _native():
    """The compiled module, or None after warning once that the Python reference stands in."""
    if _K is None:
        from fmtl_edge.kernels import warn_fallback

        warn_fallback("the affinity/split search")
    return _K

__all__ = [
    "MAX_TASKS",
    "Partition",
    "TagSelection",
    "best_partition",
    "best_partition_at_most",
    "best_partition_reference",
    "group_score",
    "self_affinity",
    "self_affinity_reference",
    "subset_scores",
    "subset_scores_reference",
    "tag_groups",
    "tag_groups_reference",
]

#: Largest number of tasks the subset searches accept (memory 2^n doubles per DP layer; time 3^n).
MAX_TASKS: int = int(getattr(_K, "max_tasks", 20))


@dataclass(frozen=True)
class Partition:
    """A split of the tasks into disjoint groups.

    Attributes:
        groups: the groups as sorted tuples of task indices, ordered by their first (lowest) task.
        score: Σ over tasks j of the affinity onto j within its group (self-affinity for singletons).
    """

    groups: tuple[tuple[int, ...], ...]
    score: float


@dataclass(frozen=True)
class TagSelection:
    """TAG network selection: possibly overlapping groups that together cover every task.

    Attributes:
        groups: the chosen groups (sorted tuples, ordered by first task, then lexicographically).
        assignment: ``assignment[j]`` = index into ``groups`` of the group that serves task j best (the
            group whose trained model task j uses); the first such group on ties.
        score: Σ_j max over chosen groups G ∋ j of the affinity onto j in G.
    """

    groups: tuple[tuple[int, ...], ...]
    assignment: tuple[int, ...]
    score: float


# ---------------------------------------------------------------------------- validation ----

def _check_matrix(S: Any, name: str = "S", max_n: int | None = MAX_TASKS, diag_ok: bool = True) -> np.ndarray:
    if hasattr(S, "detach"):
        S = S.detach().cpu().numpy()
    try:
        a = np.array(S, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a square (n, n) matrix of real numbers: {e}") from None
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, n) matrix, got {a.ndim} dimension(s) with shape {a.shape}")
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be square (n, n), got shape {a.shape}; S[i, j] is task i's effect on task j")
    n = a.shape[0]
    if n == 0:
        raise ValueError(f"{name} is empty; need at least one task")
    off = ~np.eye(n, dtype=bool) if diag_ok else np.ones((n, n), dtype=bool)
    if not np.isfinite(a[off]).all():
        i, j = map(int, np.argwhere(~np.isfinite(a) & off)[0])
        raise ValueError(f"{name}[{i}, {j}] is not finite ({a[i, j]}); replace NaN/Inf affinities (e.g. with 0) "
                         "before searching")
    if max_n is not None and n > max_n:
        raise ValueError(f"{name} has n = {n} tasks; the exact subset search supports at most {max_n} "
                         f"(memory 2^n, time 3^n); group tasks first or use fewer")
    return a


def _check_count(v: Any, name: str, lo: int, hi: int | None) -> int:
    if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} = {v} is outside {rng}; pass a number of groups in that range")
    return v


# ------------------------------------------------------------------------- self-affinity ----

def self_affinity(S: Any) -> np.ndarray:
    """MAS Eq. 4: a float64 copy of S whose diagonal holds each task's self-affinity.

    ``out[i, i] = Σ_{j≠i} (S[i, j] + S[j, i]) / (2n − 2)`` (0 for n = 1); off-diagonal entries are
    copied.  The input diagonal is ignored.

    Args:
        S: ``(n, n)`` affinity matrix (any real dtype; NumPy array, nested lists or a torch tensor).

    Returns:
        ``(n, n)`` float64 array.

    Raises:
        ValueError: S not 2-D / not square / empty, or a non-finite off-diagonal entry.
    """
    a = _check_matrix(S, max_n=None)
    if _native() is not None:
        b = a.copy()
        np.fill_diagonal(b, 0.0)
        return np.asarray(_K.self_affinity(b))
    return self_affinity_reference(a)


def self_affinity_reference(S: Any) -> np.ndarray:
    """NumPy reference of :func:`self_affinity`."""
    a = _check_matrix(S, max_n=None)
    n = a.shape[0]
    np.fill_diagonal(a, 0.0)
    if n > 1:
        np.fill_diagonal(a, (a.sum(axis=1) + a.sum(axis=0)) / (2 * n - 2))
    return a


# ------------------------------------------------------------------------------- scores ----

def group_score(S_with_diag: Any, group: Iterable[int]) -> float:
    """Score of one group: Σ_{j∈G} mean_{i∈G\\{j}} S[i, j] for |G| ≥ 2, ``S[j, j]`` for G = {j}.

    Args:
        S_with_diag: ``(n, n)`` matrix whose diagonal holds the self-affinity (see :func:`self_affinity`).
        group: distinct task indices in ``0..n-1``.

    Raises:
        ValueError: malformed S, an empty group, a repeated or out-of-range index.
    """
    a = _check_matrix(S_with_diag, "S_with_diag", max_n=None, diag_ok=False)
    g = sorted(int(i) for i in group)
    n = a.shape[0]
    if not g:
        raise ValueError("group is empty; a group needs at least one task")
    if len(set(g)) != len(g) or g[0] < 0 or g[-1] >= n:
        raise ValueError(f"group {tuple(g)} must hold distinct task indices in 0..{n - 1}")
    if len(g) == 1:
        return float(a[g[0], g[0]])
    sub = a[np.ix_(g, g)]
    return float(sum((sub[:, j].sum() - sub[j, j]) / (len(g) - 1) for j in range(len(g))))


def subset_scores(S: Any) -> np.ndarray:
    """Scores of all 2^n task subsets (C++).

    ``out[mask]`` = :func:`group_score` of the tasks whose bits are set in ``mask`` (bit i = task i),
    computed on :func:`self_affinity` of S (so the input diagonal is ignored); ``out[0] = 0``.

    Returns:
        ``(2^n,)`` float64 array.

    Raises:
        ValueError: malformed S or n > :data:`MAX_TASKS`.
    """
    a = self_affinity(_check_matrix(S))
    if _native() is None:
        return subset_scores_reference(a, with_diag=True)
    return np.asarray(_K.subset_scores(a))


def subset_scores_reference(S: Any, with_diag: bool = False) -> np.ndarray:
    """Python reference of :func:`subset_scores` (``with_diag``: S already holds the self-affinity)."""
    a = _check_matrix(S, diag_ok=not with_diag)
    if not with_diag:
        a = self_affinity_reference(a)
    n = a.shape[0]
    out = np.zeros(1 << n)
    for mask in range(1, 1 << n):
        out[mask] = group_score(a, [i for i in range(n) if mask >> i & 1])
    return out


# ---------------------------------------------------------------------------- partitions ----

def best_partition(S: Any, n_splits: int) -> Partition:
    """MAS split search (Alg. 1 line 14): the partition into exactly ``n_splits`` groups of maximal score.

    Exact DP over subsets in C++, O(n_splits · 3^n).  Ties: see the module docstring.

    Args:
        S: ``(n, n)`` affinity matrix, ``S[i, j]`` = effect of task i's step on task j's loss; the
            diagonal is ignored (self-affinity, Eq. 4, is computed).
        n_splits: number of non-empty disjoint groups, ``1 <= n_splits <= n``.

    Returns:
        :class:`Partition`.

    Raises:
        ValueError: malformed/non-finite S, n > :data:`MAX_TASKS`, ``n_splits`` outside 1..n.
    """
    a = _check_matrix(S)
    k = _check_count(n_splits, "n_splits", 1, a.shape[0])
    return _partition(a, k, at_most=False)


def best_partition_at_most(S: Any, max_splits: int) -> Partition:
    """Best partition into 1..``max_splits`` groups (values above n are treated as n).

    Same as :func:`best_partition` but also chooses the number of groups; on equal scores the
    partition with fewer groups wins.

    Raises:
        ValueError: malformed/non-finite S, n > :data:`MAX_TASKS`, ``max_splits`` < 1.
    """
    a = _check_matrix(S)
    k = _check_count(max_splits, "max_splits", 1, None)
    return _partition(a, min(k, a.shape[0]), at_most=True)


def _partition(a: np.ndarray, k: int, at_most: bool) -> Partition:
    sd = self_affinity(a)
    if _native() is not None:
        groups, score = _K.best_partition(sd, k, at_most)
        return Partition(tuple(tuple(g) for g in groups), float(score))
    f = subset_scores_reference(sd, with_diag=True)
    return _dp_python(f, a.shape[0], k, at_most)


def _dp_python(f: np.ndarray, n: int, k: int, at_most: bool) -> Partition:
    """Pure-Python mirror of the C++ DP (same order, same float operations, same tie-breaking)."""
    N = 1 << n
    neg = -math.inf
    layers = [list(f)]
    layers[0][0] = neg

    def split(prev, mask):
        low = mask & -mask
        r = mask ^ low
        bv, ba = neg, 0
        s = r
        while True:
            v = f[s | low] + prev[r ^ s]
            if v > bv:
                bv, ba = v, s | low
            if s == 0:
                break
            s = (s - 1) & r
        return bv, ba

    for j in range(2, k):
        prev = layers[-1]
        layers.append([split(prev, m)[0] if bin(m).count("1") >= j else neg for m in range(N)])
    full = N - 1
    vals = {1: layers[0][full]}
    for j in range(2, k + 1):
        vals[j] = split(layers[j - 2], full)[0]
    kk = k
    if at_most:
        kk = 1
        for j in range(2, k + 1):
            if vals[j] > vals[kk]:
                kk = j
    groups, mask = [], full
    for j in range(kk, 1, -1):
        _, g = split(layers[j - 2], mask)
        groups.append(g)
        mask ^= g
    groups.append(mask)
    tup = tuple(sorted((tuple(i for i in range(n) if g >> i & 1) for g in groups), key=lambda t: t[0]))
    return Partition(tup, float(vals[kk]))


def set_partitions(n: int, k: int) -> Iterator[list[list[int]]]:
    """All partitions of ``range(n)`` into exactly ``k`` non-empty blocks (restricted growth strings),
    each block sorted, blocks ordered by their first element; Stirling(n, k) of them."""
    blocks: list[list[int]] = []

    def rec(i: int) -> Iterator[list[list[int]]]:
        if n - i < k - len(blocks):
            return
        if i == n:
            if len(blocks) == k:
                yield [list(b) for b in blocks]
            return
        for b in blocks:
            b.append(i)
            yield from rec(i + 1)
            b.pop()
        if len(blocks) < k:
            blocks.append([i])
            yield from rec(i + 1)
            blocks.pop()

    yield from rec(0)


def best_partition_reference(S: Any, n_splits: int) -> Partition:
    """Test oracle for :func:`best_partition`: exhaustive enumeration of the set partitions in Python.

    Scores every partition into exactly ``n_splits`` groups with :func:`group_score` on the
    self-affinity matrix and keeps the first best one (enumeration by restricted growth strings).
    Practical up to n ≈ 12 (Stirling numbers of the second kind).
    """
    a = _check_matrix(S, max_n=None)
    n = a.shape[0]
    k = _check_count(n_splits, "n_splits", 1, n)
    sd = self_affinity_reference(a)
    cache: dict[tuple[int, ...], float] = {}

    def score(g: tuple[int, ...]) -> float:
        v = cache.get(g)
        if v is None:
            v = cache[g] = group_score(sd, g)
        return v

    best: tuple[float, tuple[tuple[int, ...], ...]] | None = None
    for part in set_partitions(n, k):
        groups = tuple(tuple(b) for b in part)
        sc = sum(score(g) for g in groups)
        if best is None or sc > best[0]:
            best = (sc, groups)
    assert best is not None
    return Partition(tuple(sorted(best[1], key=lambda t: t[0])), float(best[0]))


# ------------------------------------------------------------------------------------ TAG ----

def _onto(sd: np.ndarray, j: int, g: tuple[int, ...]) -> float:
    return float(sum(sd[i, j] for i in g if i != j) / (len(g) - 1))


def tag_groups(S: Any, max_groups: int) -> TagSelection:
    """TAG network selection (Fifty et al. 2021, "Efficiently Identifying Task Groupings").

    Chooses at most ``max_groups`` possibly overlapping groups of size ≥ 2 (a single group ``(0,)``
    when n = 1) that together cover every task, maximising Σ_j max over chosen G ∋ j of the affinity
    onto j in G.  Exact (C++): the optimum equals the best partition of the tasks into ≤ max_groups
    parts T valued ``h(T) = max_{G ⊇ T, |G| ≥ 2} Σ_{j∈T} onto(j, G)``, found by the subset DP;
    O(3^n) for h plus the DP.  Tie-breaking: for each T the numerically smallest best G; the DP's
    rule for the parts.  Duplicate groups are merged.

    Args:
        S: ``(n, n)`` affinity matrix (diagonal ignored).
        max_groups: the budget x of groups, ≥ 1 (values above n act as n).

    Returns:
        :class:`TagSelection`.

    Raises:
        ValueError: malformed/non-finite S, n > :data:`MAX_TASKS`, ``max_groups`` < 1.
    """
    a = _check_matrix(S)
    x = _check_count(max_groups, "max_groups", 1, None)
    sd = self_affinity(a)
    n = a.shape[0]
    if _native() is None:
        return tag_groups_reference(a, x)
    raw, _assignment, score = _K.tag_select(sd, min(x, n))
    groups = tuple(sorted((tuple(g) for g in raw), key=lambda g: (g[0], g)))
    return TagSelection(groups, _assign(sd, groups), float(score))


def _assign(sd: np.ndarray, groups: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Per task, the index of the chosen group with the highest affinity onto it (first on ties)."""
    out = []
    for j in range(sd.shape[0]):
        best_i, best_v = -1, -math.inf
        for gi, g in enumerate(groups):
            if j in g:
                v = _onto(sd, j, g) if len(g) > 1 else float(sd[j, j])
                if v > best_v:
                    best_i, best_v = gi, v
        out.append(best_i)
    return tuple(out)


def tag_groups_reference(S: Any, max_groups: int) -> TagSelection:
    """Test oracle for :func:`tag_groups`: exhaustive search over combinations of candidate groups.

    Every combination of 1..max_groups distinct groups of size ≥ 2 that covers all tasks is scored;
    the first best (combinations in :func:`itertools.combinations` order over candidates sorted by size
    then lexicographically) is kept.  Practical up to n ≈ 6.
    """
    a = _check_matrix(S, max_n=None)
    x = _check_count(max_groups, "max_groups", 1, None)
    sd = self_affinity_reference(a)
    n = a.shape[0]
    if n == 1:
        return TagSelection(((0,),), (0,), float(sd[0, 0]))
    cands = [c for r in range(2, n + 1) for c in itertools.combinations(range(n), r)]
    onto = {g: {j: _onto(sd, j, g) for j in g} for g in cands}
    best: tuple[float, tuple[tuple[int, ...], ...]] | None = None
    for m in range(1, min(x, len(cands)) + 1):
        for combo in itertools.combinations(cands, m):
            covered = set().union(*combo)
            if len(covered) != n:
                continue
            sc = sum(max(onto[g][j] for g in combo if j in g) for j in range(n))
            if best is None or sc > best[0]:
                best = (sc, combo)
    assert best is not None
    groups = tuple(sorted(best[1], key=lambda g: (g[0], g)))
    return TagSelection(groups, _assign(sd, groups), float(best[0]))
