"""Client-selection and power-mode policies under per-device energy budgets (pure functions).

Every function here is a pure function of its arguments — the run seed (through ``seed_parts``),
the finished history, the predictions — so a resumed run (``--resume``, a server restart) selects
exactly what the first attempt selected.

Selection (``--selection``), :func:`select_clients`:

* ``uniform`` — K clients drawn without replacement, the very draw of
  :func:`fmtl_edge.strategy.sample_uniform` for the same ``(seed, job, round, *salt)``;
* ``energy`` — the K eligible clients of least predicted joules whose budgets allow the round;
  ties are broken by a seeded draw; clients without a prediction are explored first (``unknown=
  "explore"``, the default, in a seeded order) or priced at the mean of the known predictions
  (``unknown="mean"``);
* ``utility`` — Oort (Lai et al., OSDI 2021, "Oort: Efficient Federated Learning via Guided
  Participant Selection", §4 and Alg. 1): statistical utility ``|B_k| · sqrt(mean of the squared
  sample losses)`` times the system penalty ``(T / t_k)^α`` when the client is slower than the
  preferred round duration ``T``; a share ε of the K slots explores clients never seen, the rest
  are sampled by utility among the clients within ``cutoff`` of the K-th best. We know each client's
  mean training loss, not its per-sample losses, so ``sqrt(mean L²)`` is approximated by the mean
  loss (a lower bound, Jensen); Oort's staleness bonus is left out.

Budgets (:class:`BudgetLedger`): per device, joules per round and per run (a run = the history the
caller hands in); spent = the finished history's joules. No policy picks a client whose device's
predicted energy would exceed what is left (two clients on one device in a round add up); when
fewer than K clients fit, the round goes on with those that do. The budget a selected execution may
spend (:attr:`Selection.energy_budget_j`) is meant for ``Assignment.energy_budget_j``: the runtime
(:mod:`fmtl_edge.runtime.budgets`, ``RoundBudget``) stops an execution that reaches it.

Power modes (``--power-mode``), :func:`choose_power_modes`: ``keep`` (no change), ``max`` (every
device its fastest mode), ``auto`` (per device the mode of least joules whose time still meets the
round's deadline = the slowest selected device's time at its fastest mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

POLICIES = ("uniform", "energy", "utility")
POWER_MODE_POLICIES = ("keep", "max", "auto")
UNKNOWN_PRICING = ("explore", "mean")


# ---- history -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRecord:
    """One finished client execution as the policies read the history.

    Attributes:
        client_id, job, round: which execution.
        device: the device it ran on (agent id or fleet device name).
        sample_passes: its sample-passes; samples: the samples it used (FedAvg weight, ``|B_k|``).
        device_s: its seconds; energy_j: its joules (None: unknown).
        train_loss: Σ over its tasks of the mean training loss (None: unknown, e.g. refused).
        mode: the power mode it ran in, by name.
    """

    client_id: int
    job: str
    round: int
    device: str
    sample_passes: int
    device_s: float
    energy_j: float | None
    samples: int = 0
    train_loss: float | None = None
    mode: str | None = None
    source: str = ""
    estimated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a round's ``per_client`` history); :meth:`from_dict` reads it back."""
        return {"client_id": self.client_id, "job": self.job, "round": self.round, "device": self.device,
                "sample_passes": self.sample_passes, "device_s": self.device_s, "energy_j": self.energy_j,
                "samples": self.samples, "train_loss": self.train_loss, "mode": self.mode, "source": self.source,
                "estimated": self.estimated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClientRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_update(cls, update: Any, device: str) -> "ClientRecord":
        """The record of a :class:`~fmtl_edge.messages.ClientUpdate` (its energy dict's ``total_j``
        and ``power_mode``; a refused update has no loss)."""
        energy = getattr(update, "energy", None) or {}
        losses = [float(v) for v in (getattr(update, "train_loss", None) or {}).values() if math.isfinite(float(v))]
        refused = getattr(update, "error", None) is not None
        return cls(client_id=int(update.client_id), job=str(update.job), round=int(update.round), device=str(device),
                   sample_passes=int(getattr(update, "sample_passes", 0) or 0), device_s=float(update.device_s or 0.0),
                   energy_j=None if energy.get("total_j") is None else float(energy["total_j"]),
                   samples=int(update.n_samples or 0), train_loss=None if (refused or not losses) else sum(losses),
                   mode=energy.get("power_mode"), source=str(energy.get("source") or ""),
                   estimated=bool(energy.get("estimated", False)))


# ---- budgets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceBudget:
    """A device's energy budget: J per round and J per run (None: no limit)."""

    round_j: float | None = None
    run_j: float | None = None


class BudgetLedger:
    """What each device may still spend: ``min(round budget − this round's charges, run budget −
    the history's joules − this round's charges)``.

    Args:
        budgets: device → :class:`DeviceBudget` (a device not named has no budget).
        run_spent_j: device → joules spent so far in the run (the finished history).
    """

    def __init__(self, budgets: Mapping[str, DeviceBudget], run_spent_j: Mapping[str, float] | None = None) -> None:
        self.budgets = dict(budgets)
        self.run_spent_j: dict[str, float] = {k: float(v) for k, v in (run_spent_j or {}).items()}
        self.round_spent_j: dict[str, float] = {}

    @classmethod
    def from_history(cls, budgets: Mapping[str, DeviceBudget], history: Iterable[ClientRecord]) -> "BudgetLedger":
        """A ledger whose run spending is the history's joules per device (unknown joules count 0:
        they cannot be charged; the runtime budget bounds such executions)."""
        spent: dict[str, float] = {}
        for r in history:
            if r.energy_j is not None and math.isfinite(r.energy_j):
                spent[r.device] = spent.get(r.device, 0.0) + float(r.energy_j)
        return cls(budgets, spent)

    @classmethod
    def from_fleet(cls, fleet: Any, history: Iterable[ClientRecord] = ()) -> "BudgetLedger":
        """A ledger with the budgets of every device of a :class:`~fmtl_edge.fleet.Fleet`."""
        budgets = {d.name: DeviceBudget(d.round_energy_j, d.run_energy_j) for d in fleet.devices}
        return cls.from_history(budgets, history)

    def copy(self) -> "BudgetLedger":
        out = BudgetLedger(self.budgets, self.run_spent_j)
        out.round_spent_j = dict(self.round_spent_j)
        return out

    def remaining_j(self, device: str) -> float:
        """Joules ``device`` may still spend this round (``inf`` without a budget; may be < 0 when
        the history already overspent)."""
        b = self.budgets.get(device)
        if b is None:
            return math.inf
        this_round = self.round_spent_j.get(device, 0.0)
        left = math.inf
        if b.round_j is not None:
            left = min(left, b.round_j - this_round)
        if b.run_j is not None:
            left = min(left, b.run_j - self.run_spent_j.get(device, 0.0) - this_round)
        return left

    def allows(self, device: str, predicted_j: float | None) -> bool:
        """Whether ``device`` can afford ``predicted_j`` more joules this round (with no prediction:
        whether anything is left)."""
        left = self.remaining_j(device)
        if predicted_j is None:
            return left > 0
        return float(predicted_j) <= left

    def charge(self, device: str, joules: float) -> None:
        """Book ``joules`` on ``device`` for this round."""
        self.round_spent_j[device] = self.round_spent_j.get(device, 0.0) + float(joules)


# ---- client selection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UtilityConfig:
    """Oort's knobs (§4): ``alpha`` the straggler penalty exponent, ``preferred_round_s`` T (None:
    the median predicted time of the eligible clients), ``explore_fraction`` ε, ``cutoff`` c (clients
    with utility ≥ c × the K-th best are sampled by utility)."""

    alpha: float = 2.0
    preferred_round_s: float | None = None
    explore_fraction: float = 0.2
    cutoff: float = 0.95


@dataclass
class Selection:
    """The clients of one round and why.

    Attributes:
        clients: the selected client ids, sorted.
        policy: the policy that chose them.
        predicted_j: selected client → its predicted joules (None: no prediction).
        energy_budget_j: selected client → the joules its execution may spend (its share of its
            device's remaining budget: its prediction plus an equal part of the slack), None where
            the device has no budget; for ``Assignment.energy_budget_j``.
        left_out: eligible client → why it was not taken when a budget kept it out.
        explored: the selected clients chosen to explore (no prediction / never seen).
    """

    clients: list[int]
    policy: str
    predicted_j: dict[int, float | None] = field(default_factory=dict)
    energy_budget_j: dict[int, float | None] = field(default_factory=dict)
    left_out: dict[int, str] = field(default_factory=dict)
    explored: list[int] = field(default_factory=list)


def _rng(seed_parts: Sequence[Any], *salt: Any) -> np.random.Generator:
    from fmtl_edge.seeding import derive_seed

    return np.random.default_rng(derive_seed(*seed_parts, *salt))


def uniform_draw(eligible: Sequence[int], k: int, seed_parts: Sequence[Any]) -> list[int]:
    """K of ``eligible`` without replacement, seeded by ``seed_parts`` = ``(seed, job, round, *salt)``:
    the draw of :func:`fmtl_edge.strategy.sample_uniform`, sorted."""
    rng = _rng(seed_parts)
    return sorted(int(c) for c in rng.choice(list(eligible), size=k, replace=False))


def select_clients(policy: str, eligible: Sequence[int], k: int, seed_parts: Sequence[Any], *,
                   predict_energy: Callable[[int], float | None] | None = None,
                   budget: BudgetLedger | None = None,
                   device_of: Callable[[int], str] = str,
                   history: Sequence[ClientRecord] = (),
                   predict_time: Callable[[int], float | None] | None = None,
                   unknown: str = "explore",
                   utility: UtilityConfig = UtilityConfig(),
                   candidates: int | None = None) -> Selection:
    """The round's clients under ``policy`` (see the module docstring).

    Args:
        policy: ``uniform`` | ``energy`` | ``utility``.
        eligible: the client ids that hold a task of the job (sorted, as ``RoundContext.eligible``).
        k: K, clients per round.
        seed_parts: ``(seed, job name, round, *salt)`` — what :func:`sample_uniform` seeds with.
        predict_energy: client → predicted joules of its round (in the mode it will run), or None.
        budget: the devices' budgets and spending (copied, never changed); None: no budgets.
        device_of: client → device id (default: ``str(client)``, one device per client).
        history: the finished client executions (``utility`` reads losses, samples and times).
        predict_time: client → predicted device seconds (``utility``; default: its last time).
        unknown: ``explore`` or ``mean`` (clients without a prediction under ``energy``).
        utility: :class:`UtilityConfig`.
        candidates: ``energy`` only: draw this many candidates uniformly (seeded) first and take
            the K of least predicted joules among them (``--energy-candidates``: every client keeps
            a chance to train each round, so the federation's data stays covered); None: every
            eligible client is a candidate (the greedy choice, which keeps picking the same cheapest
            clients).

    Returns:
        A :class:`Selection`; fewer than K clients when the budgets allow fewer.

    Raises:
        ValueError: unknown policy or ``unknown``; fewer eligible clients than K (lower
            ``--clients-per-round``); K < 1.
    """
    if policy not in POLICIES:
        raise ValueError(f"--selection: unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if unknown not in UNKNOWN_PRICING:
        raise ValueError(f"unknown must be one of {UNKNOWN_PRICING}, got {unknown!r}")
    if k < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {k}")
    eligible = [int(c) for c in eligible]
    if len(eligible) < k:
        raise ValueError(f"{len(eligible)} eligible clients but clients_per_round is {k}; lower --clients-per-round")
    ledger = budget.copy() if budget is not None else None
    pred: dict[int, float | None] = {c: (predict_energy(c) if predict_energy is not None else None) for c in eligible}
    out = Selection(clients=[], policy=policy)

    def try_take(c: int, charge_j: float | None) -> bool:
        if ledger is not None:
            dev = device_of(c)
            if not ledger.allows(dev, charge_j):
                left = ledger.remaining_j(dev)
                out.left_out[c] = (f"device {dev}: predicted {charge_j:.4g} J > {left:.4g} J left" if charge_j is not None
                                   else f"device {dev}: no energy budget left ({left:.4g} J)")
                return False
            ledger.charge(dev, charge_j or 0.0)
        out.clients.append(c)
        out.predicted_j[c] = pred[c]
        return True

    if policy == "uniform":
        allowed = [c for c in eligible if ledger is None or ledger.allows(device_of(c), pred[c])]
        for c in eligible:
            if c not in allowed:
                try_take(c, pred[c])  # records why it was left out
        drawn = uniform_draw(allowed, min(k, len(allowed)), seed_parts) if allowed else []
        for c in drawn:
            try_take(c, pred[c])
    elif policy == "energy":
        rng = _rng(seed_parts, "energy")
        tiebreak = dict(zip(eligible, rng.random(len(eligible))))
        if candidates is not None and candidates < len(eligible):
            eligible = uniform_draw(eligible, max(int(candidates), k), (*seed_parts, "candidates"))
        known = [p for p in pred.values() if p is not None]
        mean = float(np.mean(known)) if known else 0.0
        if unknown == "explore":
            first = sorted((c for c in eligible if pred[c] is None), key=lambda c: tiebreak[c])
            rest = sorted((c for c in eligible if pred[c] is not None), key=lambda c: (pred[c], tiebreak[c]))
            order = first + rest
        else:
            order = sorted(eligible, key=lambda c: (pred[c] if pred[c] is not None else mean, tiebreak[c]))
        for c in order:
            if len(out.clients) >= k:
                break
            if try_take(c, pred[c] if pred[c] is not None else (mean if unknown == "mean" and known else None)) \
                    and pred[c] is None:
                out.explored.append(c)
    else:
        _select_utility(eligible, k, seed_parts, pred, history, predict_time, utility, try_take, out)

    out.clients.sort()
    out.energy_budget_j = _allowances(out, budget, device_of)
    return out


def _select_utility(eligible, k, seed_parts, pred, history, predict_time, cfg: UtilityConfig, try_take, out) -> None:
    rng = _rng(seed_parts, "utility")
    last: dict[int, ClientRecord] = {}
    for r in history:
        if r.train_loss is not None and math.isfinite(r.train_loss):
            last[int(r.client_id)] = r
    seen = [c for c in eligible if c in last]
    unseen = [c for c in eligible if c not in last]
    times: dict[int, float | None] = {}
    for c in eligible:
        t = predict_time(c) if predict_time is not None else (last[c].device_s if c in last else None)
        times[c] = None if t is None or not math.isfinite(t) or t <= 0 else float(t)
    known_t = [t for t in times.values() if t is not None]
    T = cfg.preferred_round_s if cfg.preferred_round_s is not None else (float(np.median(known_t)) if known_t else None)

    def util(c: int) -> float:
        r = last[c]
        u = max(0, r.samples) * max(0.0, float(r.train_loss))  # |B_k| · sqrt(mean L²) ≈ |B_k| · mean loss
        t = times[c]
        if T is not None and t is not None and t > T:
            u *= (T / t) ** cfg.alpha
        return u

    n_explore = min(len(unseen), int(round(cfg.explore_fraction * k)))
    n_exploit = k - n_explore
    if len(seen) < n_exploit:  # not enough history yet: explore the rest
        n_exploit = len(seen)
        n_explore = min(len(unseen), k - n_exploit)
    # exploitation: sample by utility among the clients within `cutoff` of the n_exploit-th best
    u = {c: util(c) for c in seen}
    ranked = sorted(seen, key=lambda c: (-u[c], c))
    order: list[int] = []
    if ranked and n_exploit > 0:
        bar = cfg.cutoff * u[ranked[min(n_exploit, len(ranked)) - 1]]
        pool = [c for c in ranked if u[c] >= bar]
        keys = {c: (math.log(rng.random() + 1e-300) / u[c] if u[c] > 0 else -math.inf) for c in pool}
        order = sorted(pool, key=lambda c: (-keys[c], c))  # weighted sampling without replacement (Efraimidis-Spirakis)
        order += [c for c in ranked if c not in set(pool)]
    explore_order = [unseen[i] for i in rng.permutation(len(unseen))] if unseen else []
    taken = 0
    for c in order:
        if taken >= n_exploit:
            break
        taken += try_take(c, pred[c])
    for c in explore_order:
        if len(out.clients) >= k:
            break
        if try_take(c, pred[c]):
            out.explored.append(c)
    for c in order:  # budgets refused some explorers: fill from the exploitation order
        if len(out.clients) >= k:
            break
        if c not in out.clients and c not in out.left_out:
            try_take(c, pred[c])


def _allowances(sel: Selection, budget: BudgetLedger | None, device_of: Callable[[int], str]) -> dict[int, float | None]:
    if budget is None:
        return {c: None for c in sel.clients}
    by_dev: dict[str, list[int]] = {}
    for c in sel.clients:
        by_dev.setdefault(device_of(c), []).append(c)
    out: dict[int, float | None] = {}
    for dev, cs in by_dev.items():
        left = budget.remaining_j(dev)
        if math.isinf(left):
            out.update({c: None for c in cs})
            continue
        preds = [sel.predicted_j.get(c) or 0.0 for c in cs]
        slack = max(0.0, left - sum(preds)) / len(cs)
        for c, p in zip(cs, preds):
            out[c] = p + slack
    return out


# ---- power modes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceModes:
    """A device as :func:`choose_power_modes` sees it: its id, its modes, its fastest mode.
    (:class:`fmtl_edge.fleet.Device` has the same attributes.)"""

    name: str
    mode_names: tuple[str, ...]
    max_mode: str


def _mode_name(m: Any) -> str:
    return str(getattr(m, "name", m))


def choose_power_modes(policy: str, devices: Sequence[Any], sample_passes_per_device: Mapping[str, int],
                       cost_fn: Callable[[str, str, int], tuple[float, float] | None]) -> dict[str, str | None]:
    """Each selected device's power mode for the round.

    Args:
        policy: ``keep`` (every device None: leave it as it is), ``max`` (its fastest mode) or
            ``auto``: the round's deadline D is the largest ``device_s`` of a device with work at its
            fastest mode; each device takes the mode of least ``energy_j`` among those with
            ``device_s ≤ D`` (ties: the faster mode).
        devices: objects with ``name``, ``mode_names`` and ``max_mode`` (:class:`DeviceModes`,
            :class:`fmtl_edge.fleet.Device`).
        sample_passes_per_device: device → the round's sample-passes on it (the sum over its
            selected clients).
        cost_fn: ``(device, mode, sample_passes) -> (device_s, energy_j)``, or None when unknown
            (a mode without a cost is not chosen by ``auto``; a device whose fastest mode has no
            cost gets its fastest mode and does not set the deadline).

    Returns:
        device name → mode name (None under ``keep``).

    Raises:
        ValueError: unknown policy.
    """
    if policy not in POWER_MODE_POLICIES:
        raise ValueError(f"--power-mode: unknown policy {policy!r}; known: {', '.join(POWER_MODE_POLICIES)}")
    if policy == "keep":
        return {d.name: None for d in devices}
    if policy == "max":
        return {d.name: _mode_name(d.max_mode) for d in devices}
    at_max: dict[str, tuple[float, float] | None] = {}
    for d in devices:
        passes = int(sample_passes_per_device.get(d.name, 0))
        at_max[d.name] = cost_fn(d.name, _mode_name(d.max_mode), passes) if passes > 0 else None
    known = [c[0] for c in at_max.values() if c is not None]
    deadline = max(known) if known else None
    out: dict[str, str | None] = {}
    for d in devices:
        top = _mode_name(d.max_mode)
        passes = int(sample_passes_per_device.get(d.name, 0))
        if deadline is None or passes <= 0 or at_max[d.name] is None:
            out[d.name] = top
            continue
        best: tuple[float, float, str] | None = None  # (energy, time, mode)
        for m in d.mode_names:
            c = cost_fn(d.name, _mode_name(m), passes)
            if c is None:
                continue
            t, e = c
            if t <= deadline * (1 + 1e-12):
                cand = (e, t, _mode_name(m))
                if best is None or cand[:2] < best[:2]:
                    best = cand
        out[d.name] = best[2] if best is not None else top
    return out


def fleet_cost_fn(fleet: Any, model: str | None = None) -> Callable[[str, str, int], tuple[float, float]]:
    """``cost_fn`` for :func:`choose_power_modes` from a :class:`~fmtl_edge.fleet.Fleet` (by device name)."""

    def cost(device: str, mode: str, passes: int) -> tuple[float, float]:
        return fleet.cost(fleet.device(device).index, mode, passes, model)

    return cost


def passes_per_device(clients: Iterable[int], device_of: Callable[[int], str],
                      passes_of: Callable[[int], int]) -> dict[str, int]:
    """device → Σ sample-passes of the selected clients on it (two clients of one device run one
    after another on it)."""
    out: dict[str, int] = {}
    for c in clients:
        d = device_of(c)
        out[d] = out.get(d, 0) + int(passes_of(c))
    return out
