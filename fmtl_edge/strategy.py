"""Strategies: how one FL job's rounds run (Flower's ``Strategy`` is the anchor, docs/design.md §3).

A method (:mod:`fmtl_edge.methods`) plans jobs; for each job it gives the coordinator a
:class:`Strategy` that decides, round by round,

- :meth:`Strategy.configure_train` — which clients train (K sampled, K per task group, every
  client, one ring node) and what each one runs (its procedure and ``method_config``);
- :meth:`Strategy.aggregation` — how the replies are combined: FedAvg by scope through the
  streaming :class:`~fmtl_edge.aggregation.Accumulator` (O(P) memory, bit-exact resume; the
  default), the coordinate-wise median or the trimmed mean (both hold the round's K updates), or,
  for a sequential strategy (a ring), the one update taken as it is.

The coordinator (:mod:`fmtl_edge.coordinator`) fills in everything else an assignment carries
(global state, learning rate, budgets, the personal and frozen tensor names, the state key) and
knows nothing of any one method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fmtl_edge.aggregation import Accumulator, coordinate_median, trimmed_mean
from fmtl_edge.seeding import derive_seed

AGGREGATORS = ("fedavg", "median", "trimmed-mean")


@dataclass(frozen=True)
class ClientTask:
    """What one client runs in a round: its procedure and that procedure's settings."""

    procedure: str = "sgd"
    method_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RoundContext:
    """What a strategy may know when it configures a round.

    Attributes:
        job: the job (its name, tasks, sampling, procedure...).
        round: 0-based round index inside the job.
        seed: the run seed (sampling uses ``derive_seed(seed, job, round[, task])``).
        clients_per_round: K.
        eligible: ``tasks -> client ids`` holding labels for at least one of ``tasks``, sorted.
        select: ``(eligible, k, seed_parts) -> clients``: the run's energy policy
            (:meth:`fmtl_edge.energy_policy.EnergyPolicy.select`; may return fewer than K when
            budgets allow fewer), or None for the uniform draw.
    """

    job: Any
    round: int
    seed: int
    clients_per_round: int
    eligible: Callable[[Sequence[str]], list[int]]
    select: Callable[[Sequence[int], int, Sequence[Any]], list[int]] | None = None


class Aggregation(ABC):
    """One round's combination of client updates (flat float32 vectors in the layout's order)."""

    @abstractmethod
    def add(self, vec: np.ndarray, weight: float, contrib: np.ndarray) -> None:
        """Add one client's vector with its FedAvg ``weight`` (samples) and ``(S,)`` bool slice mask."""

    @property
    @abstractmethod
    def n_added(self) -> int:
        """Updates added so far."""

    @abstractmethod
    def result(self, global_vec: np.ndarray) -> np.ndarray:
        """Write the combined slices into ``global_vec`` (slices nobody contributed keep their value)
        and return it.

        Raises:
            ValueError: the combination is not finite (a NaN/Inf or an overflow).
        """


class FedAvgAggregation(Aggregation):
    """FedAvg by scope, streaming: ``out[p] = Σ_k w_k·x_k[p] / Σ_k w_k`` over the clients that hold
    each slice (McMahan et al., AISTATS 2017, Alg. 1), O(P) memory whatever K is."""

    def __init__(self, n_params: int, table: np.ndarray):
        self.acc = Accumulator(n_params, table)

    def add(self, vec, weight, contrib) -> None:
        self.acc.add(vec, float(weight), contrib)

    @property
    def n_added(self) -> int:
        return self.acc.n_added

    def result(self, global_vec):
        return self.acc.result(global_vec)


class RobustAggregation(Aggregation):
    """Coordinate-wise median (Yin et al., ICML 2018, Def. 1) or β-trimmed mean (Def. 2) over the
    clients that hold each slice; sample counts are not weights. Holds the round's K vectors
    (O(K·P) memory: the price of order statistics)."""

    def __init__(self, table: np.ndarray, kind: str, trim_fraction: float = 0.1):
        if kind not in ("median", "trimmed-mean"):
            raise ValueError(f"robust aggregation kind {kind!r} is not median or trimmed-mean")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
        self.table, self.kind, self.trim = table, kind, trim_fraction
        self.vecs: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def add(self, vec, weight, contrib) -> None:
        self.vecs.append(np.array(vec, dtype=np.float32, copy=True))
        self.masks.append(np.asarray(contrib, dtype=bool))

    @property
    def n_added(self) -> int:
        return len(self.vecs)

    def result(self, global_vec):
        if not self.vecs:
            return global_vec
        contrib = np.stack(self.masks, axis=1)
        out = np.array(global_vec, copy=True)
        if self.kind == "median":
            coordinate_median(out, self.vecs, self.table, contrib)
        else:
            trimmed_mean(out, self.vecs, self.table, contrib, trim_fraction=self.trim)
        global_vec[...] = out
        return global_vec


class TakeAggregation(Aggregation):
    """A sequential strategy's step: the one update's contributed slices taken as they are."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self._vec: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._n = 0

    def add(self, vec, weight, contrib) -> None:
        if self._n:
            raise ValueError("a sequential step takes exactly one update")
        self._vec, self._mask, self._n = vec, np.asarray(contrib, dtype=bool), 1

    @property
    def n_added(self) -> int:
        return self._n

    def result(self, global_vec):
        if self._vec is None:
            return global_vec
        if not np.all(np.isfinite(self._vec)):
            raise ValueError("the update has NaN/Inf entries")
        for (off, length), take in zip(self.table, self._mask):
            if take:
                global_vec[off : off + length] = self._vec[off : off + length]
        return global_vec


class KeepAggregation(Aggregation):
    """Counts the updates and keeps the global model as it is (a round whose shared slices must
    not move, e.g. Loop Improvement's final head fine-tuning: only client state changes)."""

    def __init__(self) -> None:
        self._n = 0

    def add(self, vec, weight, contrib) -> None:
        self._n += 1

    @property
    def n_added(self) -> int:
        return self._n

    def result(self, global_vec):
        return global_vec


def make_aggregation(aggregator: str, n_params: int, table: np.ndarray, trim_fraction: float = 0.1) -> Aggregation:
    """The :class:`Aggregation` named by ``--aggregator``.

    Raises:
        ValueError: unknown name (lists the known ones).
    """
    if aggregator == "fedavg":
        return FedAvgAggregation(n_params, table)
    if aggregator in ("median", "trimmed-mean"):
        return RobustAggregation(table, aggregator, trim_fraction)
    raise ValueError(f"unknown aggregator {aggregator!r}; known: {', '.join(AGGREGATORS)}")


class Strategy(ABC):
    """How one job's rounds run (see the module docstring).

    Attributes:
        sequential: clients of a round run one after another, each from the model the previous one
            left (a ring); otherwise they all start from the round's global model.
    """

    sequential: bool = False

    @abstractmethod
    def configure_train(self, ctx: RoundContext) -> list[tuple[int, ClientTask]]:
        """The round's clients, in order, with what each runs.

        Raises:
            ValueError: the pool cannot serve the round (too few clients for the sampling).
        """

    def aggregation(self, n_params: int, table: np.ndarray) -> Aggregation:
        """A fresh :class:`Aggregation` for one round (or one sequential step)."""
        return TakeAggregation(table) if self.sequential else FedAvgAggregation(n_params, table)

    def is_sequential_round(self, r: int) -> bool:
        """Whether round ``r`` runs its clients one after another (default: :attr:`sequential`)."""
        return self.sequential

    def round_aggregation(self, r: int, n_params: int, table: np.ndarray) -> Aggregation:
        """The aggregation of round ``r`` (default: :meth:`aggregation`, whatever the round)."""
        return self.aggregation(n_params, table)


def sample_uniform(ctx: RoundContext, tasks: Sequence[str], k: int, salt: Sequence[Any] = ()) -> list[int]:
    """K clients drawn without replacement from those holding any of ``tasks``, seeded by
    ``(seed, job, round, *salt)``, sorted; with an energy policy (``ctx.select``) its choice among
    them instead (fewer when the devices' budgets allow fewer).

    Raises:
        ValueError: fewer eligible clients than K (names the fix).
    """
    eligible = ctx.eligible(tasks)
    if len(eligible) < k:
        raise ValueError(
            f"job {ctx.job.name!r}: {len(eligible)} clients hold tasks {list(tasks)} but "
            f"clients_per_round is {k}; lower --clients-per-round"
        )
    if ctx.select is not None:
        return sorted(int(c) for c in ctx.select(eligible, k, (ctx.seed, ctx.job.name, ctx.round, *salt)))
    rng = np.random.default_rng(derive_seed(ctx.seed, ctx.job.name, ctx.round, *salt))
    return sorted(int(c) for c in rng.choice(eligible, size=k, replace=False))


class FedAvgStrategy(Strategy):
    """Sample clients, send every one the job's procedure, combine by ``aggregator``.

    Args:
        procedure, method_config: what every sampled client runs.
        sampling: ``uniform`` (K of the clients holding any of the job's tasks), ``per-group`` (K
            from each task's client group, seed 000 §III: "clients are chosen randomly from each
            client group") or ``all`` (every client holding a task of the job, every round).
        aggregator: ``fedavg`` | ``median`` | ``trimmed-mean``.
        trim_fraction: β of the trimmed mean.

    Raises:
        ValueError: unknown sampling or aggregator.
    """

    SAMPLINGS = ("uniform", "per-group", "all")

    def __init__(self, procedure: str = "sgd", method_config: Mapping[str, Any] | None = None,
                 sampling: str = "uniform", aggregator: str = "fedavg", trim_fraction: float = 0.1):
        if sampling not in self.SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; known: {', '.join(self.SAMPLINGS)}")
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; known: {', '.join(AGGREGATORS)}")
        self.task = ClientTask(procedure, dict(method_config or {}))
        self.sampling = sampling
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction

    def configure_train(self, ctx: RoundContext) -> list[tuple[int, ClientTask]]:
        tasks = tuple(ctx.job.tasks)
        if self.sampling == "all":
            chosen = ctx.eligible(tasks)
        elif self.sampling == "uniform":
            chosen = sample_uniform(ctx, tasks, ctx.clients_per_round)
        else:
            chosen_set: set[int] = set()
            for t in tasks:
                group = [c for c in ctx.eligible((t,)) if c not in chosen_set]
                if len(group) < ctx.clients_per_round:
                    raise ValueError(
                        f"job {ctx.job.name!r}: task {t!r}'s client group has {len(group)} clients free for "
                        f"sampling but clients_per_round is {ctx.clients_per_round} per group; lower "
                        "--clients-per-round or give the group more clients (--task-groups, --clients)"
                    )
                chosen_set.update(sample_uniform(
                    RoundContext(ctx.job, ctx.round, ctx.seed, ctx.clients_per_round, lambda _t, g=group: g, ctx.select),
                    (t,), ctx.clients_per_round, salt=(t,)))
            chosen = sorted(chosen_set)
        return [(c, self.task) for c in chosen]

    def aggregation(self, n_params: int, table: np.ndarray) -> Aggregation:
        return make_aggregation(self.aggregator, n_params, table, self.trim_fraction)


class SequentialStrategy(Strategy):
    """Every client holding a task of the job, one after another in client-id order, each from the
    model the previous one left (centralized training over pooled task groups; the ring of Loop
    Improvement builds on this). A client that fails is skipped with the last good model."""

    sequential = True

    def __init__(self, procedure: str = "sgd", method_config: Mapping[str, Any] | None = None):
        self.task = ClientTask(procedure, dict(method_config or {}))

    def configure_train(self, ctx: RoundContext) -> list[tuple[int, ClientTask]]:
        return [(c, self.task) for c in ctx.eligible(tuple(ctx.job.tasks))]
