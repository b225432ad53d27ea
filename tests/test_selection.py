"""Selection and power-mode policies: uniform = sample_uniform, energy and utility by hand, budgets
never exceeded (hypothesis over random fleets), auto power mode against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_edge.fleet import Fleet
from fmtl_edge.selection import (
    BudgetLedger,
    ClientRecord,
    DeviceBudget,
    DeviceModes,
    UtilityConfig,
    choose_power_modes,
    fleet_cost_fn,
    passes_per_device,
    select_clients,
)
from fmtl_edge.strategy import RoundContext, sample_uniform


# ---- uniform ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,job,rnd,n,k,salt", [
    (0, "merge", 0, 10, 3, ()), (7, "split-1", 12, 30, 8, ()), (123, "task-age", 4, 5, 5, ()),
    (3, "merge", 2, 20, 4, ("gender",)), (11, "loop-global", 29, 50, 1, ()),
])
def test_uniform_is_sample_uniform(seed, job, rnd, n, k, salt):
    eligible = list(range(0, 2 * n, 2))  # not 0..n-1: the draw picks from the list, not from range(n)
    ctx = RoundContext(SimpleNamespace(name=job), rnd, seed, k, lambda _t: eligible)
    expected = sample_uniform(ctx, ("t",), k, salt=salt)
    sel = select_clients("uniform", eligible, k, (seed, job, rnd, *salt))
    assert sel.clients == expected
    # with budgets that do not bind, still the same draw
    ledger = BudgetLedger({str(c): DeviceBudget(round_j=100.0, run_j=1000.0) for c in eligible})
    sel = select_clients("uniform", eligible, k, (seed, job, rnd, *salt), predict_energy=lambda c: 1.0, budget=ledger)
    assert sel.clients == expected
    assert sel.energy_budget_j == {c: 100.0 for c in expected}  # a device each: the whole round budget


def test_too_few_eligible_is_a_config_error():
    with pytest.raises(ValueError, match="3 eligible clients but clients_per_round is 4; lower --clients-per-round"):
        select_clients("energy", [0, 1, 2], 4, (0, "j", 0))
    with pytest.raises(ValueError, match="--selection: unknown policy 'cheapest'"):
        select_clients("cheapest", [0, 1], 1, (0, "j", 0))


# ---- energy -------------------------------------------------------------------------------------

def test_energy_takes_the_k_cheapest_that_budgets_allow():
    price = {0: 5.0, 1: 1.0, 2: 3.0, 3: 2.0, 4: 9.0, 5: 2.5}
    sel = select_clients("energy", list(price), 3, (0, "j", 0), predict_energy=price.get)
    assert sel.clients == [1, 3, 5] and sel.explored == []
    assert sel.predicted_j == {1: 1.0, 3: 2.0, 5: 2.5}
    # client 3's device has 1.5 J left: it is skipped, the next cheapest comes in
    ledger = BudgetLedger({"3": DeviceBudget(round_j=1.5)})
    sel = select_clients("energy", list(price), 3, (0, "j", 0), predict_energy=price.get, budget=ledger)
    assert sel.clients == [1, 2, 5] and "3" in sel.left_out[3] and "1.5 J left" in sel.left_out[3]
    assert ledger.round_spent_j == {}  # the caller's ledger is never changed
    # the run budget, spent by the history, counts too
    hist = [ClientRecord(1, "j", r, "1", 100, 1.0, 4.0) for r in range(3)]
    ledger = BudgetLedger.from_history({"1": DeviceBudget(run_j=12.5)}, hist)
    assert ledger.remaining_j("1") == pytest.approx(0.5)
    sel = select_clients("energy", list(price), 3, (0, "j", 0), predict_energy=price.get, budget=ledger)
    assert sel.clients == [2, 3, 5]


def test_energy_fewer_than_k_when_budgets_allow_fewer_and_shared_devices_add_up():
    price = {c: 2.0 for c in range(6)}
    device = {c: f"d{c % 2}" for c in range(6)}  # two devices, three clients each
    ledger = BudgetLedger({"d0": DeviceBudget(round_j=4.5), "d1": DeviceBudget(round_j=1.0)})
    sel = select_clients("energy", list(price), 5, (1, "j", 3), predict_energy=price.get, budget=ledger,
                         device_of=device.get)
    assert len(sel.clients) == 2 and all(device[c] == "d0" for c in sel.clients)  # 2 x 2 J <= 4.5 J; d1 none
    assert sum(sel.energy_budget_j[c] for c in sel.clients) == pytest.approx(4.5)  # allowances share the budget
    assert all(sel.energy_budget_j[c] >= 2.0 for c in sel.clients)


def test_energy_ties_are_a_seeded_draw_and_unknowns_are_explored_first():
    price = {c: 1.0 for c in range(12)}
    a = select_clients("energy", list(price), 4, (0, "j", 0), predict_energy=price.get).clients
    assert a == select_clients("energy", list(price), 4, (0, "j", 0), predict_energy=price.get).clients
    draws = {tuple(select_clients("energy", list(price), 4, (s, "j", 0), predict_energy=price.get).clients)
             for s in range(8)}
    assert len(draws) > 1  # ties are not always broken by client id
    price = {0: 1.0, 1: None, 2: 0.5, 3: None, 4: 3.0}
    sel = select_clients("energy", list(price), 3, (0, "j", 0), predict_energy=price.get)
    assert sorted(sel.explored) == [1, 3] and sel.clients == [1, 2, 3]
    sel = select_clients("energy", list(price), 3, (0, "j", 0), predict_energy=price.get, unknown="mean")
    # unknowns priced at the mean of 1.0, 0.5, 3.0 = 1.5: after 2 and 0
    assert sel.clients[:1] == [0] and 2 in sel.clients and len(sel.clients) == 3 and 4 not in sel.clients


# ---- utility (Oort) -----------------------------------------------------------------------------

def _hist(rows):
    return [ClientRecord(c, "j", 0, str(c), samples * 2, t, 1.0, samples=samples, train_loss=loss)
            for c, samples, loss, t in rows]


def test_utility_ranks_by_samples_times_loss_with_the_straggler_penalty():
    # client: samples, loss, seconds
    hist = _hist([(0, 100, 1.0, 1.0), (1, 100, 3.0, 1.0), (2, 300, 2.0, 1.0), (3, 50, 1.0, 1.0),
                  (4, 400, 2.5, 4.0)])
    cfg = UtilityConfig(explore_fraction=0.0, preferred_round_s=1.0, alpha=2.0)
    # utilities: 100, 300, 600, 50, and 1000 x (1/4)^2 = 62.5 for the slow client 4
    sel = select_clients("utility", [0, 1, 2, 3, 4], 2, (0, "j", 1), history=hist, utility=cfg)
    assert sel.clients == [1, 2]
    no_penalty = UtilityConfig(explore_fraction=0.0, preferred_round_s=10.0)
    sel = select_clients("utility", [0, 1, 2, 3, 4], 2, (0, "j", 1), history=hist, utility=no_penalty)
    assert sel.clients == [2, 4]  # 1000 and 600
    # the last record of a client is the one that counts
    hist2 = hist + _hist([(0, 100, 20.0, 1.0)])
    assert 0 in select_clients("utility", [0, 1, 2, 3, 4], 2, (0, "j", 2), history=hist2, utility=cfg).clients


def test_utility_explores_unseen_clients_with_its_share():
    hist = _hist([(c, 100, 1.0 + c, 1.0) for c in range(4)])
    cfg = UtilityConfig(explore_fraction=0.5, preferred_round_s=1.0)
    sel = select_clients("utility", list(range(10)), 4, (5, "j", 3), history=hist, utility=cfg)
    assert len(sel.clients) == 4 and len(sel.explored) == 2 and all(c >= 4 for c in sel.explored)
    assert {2, 3} <= set(sel.clients)  # the two best seen ones
    # no history at all: every slot explores, seeded
    first = select_clients("utility", list(range(10)), 4, (5, "j", 0), utility=cfg)
    assert len(first.clients) == 4 and sorted(first.explored) == first.clients
    assert first.clients == select_clients("utility", list(range(10)), 4, (5, "j", 0), utility=cfg).clients


# ---- budgets are never exceeded -----------------------------------------------------------------

@st.composite
def fleets(draw):
    n_dev = draw(st.integers(1, 5))
    budgets = {}
    for d in range(n_dev):
        budgets[f"d{d}"] = DeviceBudget(
            round_j=draw(st.one_of(st.none(), st.floats(0.5, 20.0))),
            run_j=draw(st.one_of(st.none(), st.floats(1.0, 60.0))))
    n_clients = draw(st.integers(1, 12))
    cost = {c: draw(st.floats(0.1, 10.0)) for c in range(n_clients)}
    known = {c: draw(st.booleans()) for c in range(n_clients)}
    return n_dev, budgets, cost, known


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.sampled_from(["uniform", "energy", "utility"]), st.integers(1, 12), st.integers(0, 10**6),
       st.integers(1, 6))
def test_budgets_are_never_exceeded(fleet, policy, k, seed, rounds):
    n_dev, budgets, cost, known = fleet
    k = min(k, len(cost))

    def device_of(c):
        return f"d{c % n_dev}"

    history: list[ClientRecord] = []
    for r in range(rounds):
        ledger = BudgetLedger.from_history(budgets, history)
        sel = select_clients(policy, sorted(cost), k, (seed, "job", r), budget=ledger, device_of=device_of,
                             predict_energy=lambda c: cost[c] if known[c] else None, history=history)
        assert len(set(sel.clients)) == len(sel.clients) <= k
        spent_round: dict[str, float] = {}
        for c in sel.clients:
            allowance = sel.energy_budget_j[c]
            # the runtime's per-round energy budget stops an execution at its allowance
            used = cost[c] if allowance is None else min(cost[c], allowance)
            assert used >= 0
            spent_round[device_of(c)] = spent_round.get(device_of(c), 0.0) + used
            history.append(ClientRecord(c, "job", r, device_of(c), 10, 1.0, used, samples=10, train_loss=1.0))
        for dev, b in budgets.items():
            if b.round_j is not None:
                assert spent_round.get(dev, 0.0) <= b.round_j * (1 + 1e-9)
            if b.run_j is not None:
                total = sum(h.energy_j for h in history if h.device == dev)
                assert total <= b.run_j * (1 + 1e-9)
        for c in sel.clients:  # a client with a known prediction is only taken when it fits whole
            if known[c] and sel.energy_budget_j[c] is not None:
                assert cost[c] <= sel.energy_budget_j[c] * (1 + 1e-9)


# ---- power modes --------------------------------------------------------------------------------

# a 3-mode device "a" (W, samples/s) and a 2-mode device "b"
SPEC = {"a": {"low": (10.0, 1.0), "mid": (20.0, 2.5), "high": (40.0, 3.0)},
        "b": {"slow": (5.0, 1.0), "fast": (9.0, 2.0)}}


def _cost(dev, mode, passes):
    w, sps = SPEC[dev][mode]
    return passes / sps, w * passes / sps


DEVS = [DeviceModes("a", ("low", "mid", "high"), "high"), DeviceModes("b", ("slow", "fast"), "fast")]


def test_power_mode_policy_by_hand_on_a_3_mode_device():
    # a, 100 passes: low 100 s / 1000 J, mid 40 s / 800 J, high 33.3 s / 1333 J
    assert choose_power_modes("keep", DEVS, {"a": 100, "b": 100}, _cost) == {"a": None, "b": None}
    assert choose_power_modes("max", DEVS, {"a": 100, "b": 100}, _cost) == {"a": "high", "b": "fast"}
    # b at fast: 100 passes -> 50 s: the deadline. a: mid (40 s <= 50 s, 800 J) beats low (too slow) and high
    # b itself: fast 50 s / 450 J; slow 100 s > 50 s
    assert choose_power_modes("auto", DEVS, {"a": 100, "b": 100}, _cost) == {"a": "mid", "b": "fast"}
    # b with 70 passes -> 35 s deadline: only a's high (33.3 s) meets it
    assert choose_power_modes("auto", DEVS, {"a": 100, "b": 70}, _cost) == {"a": "high", "b": "fast"}
    # b with 210 passes -> 105 s: a's low (100 s, 1000 J) meets it but mid (800 J) is cheaper still
    assert choose_power_modes("auto", DEVS, {"a": 100, "b": 210}, _cost)["a"] == "mid"
    # a alone sets its own deadline at its max: nothing slower fits
    assert choose_power_modes("auto", DEVS[:1], {"a": 100}, _cost) == {"a": "high"}
    # a mode with no cost is never chosen
    no_mid = lambda d, m, p: None if m == "mid" else _cost(d, m, p)  # noqa: E731
    assert choose_power_modes("auto", DEVS, {"a": 100, "b": 210}, no_mid)["a"] == "low"
    with pytest.raises(ValueError, match="--power-mode: unknown policy 'min'"):
        choose_power_modes("min", DEVS, {}, _cost)


def test_auto_on_orin_mix_slows_the_agx_to_the_nano():
    f = Fleet.load("orin-mix")
    nano, agx = f.device_of(0), f.device_of(16)
    work = passes_per_device([0, 16], lambda c: f.device_of(c).name, lambda c: 474)
    modes = choose_power_modes("auto", [nano, agx], work, fleet_cost_fn(f))
    # Nano at 25W: 474 / (0.474 x 1000) = 1 s. AGX: MODE_30W 1.28 s is too slow, MODE_50W 0.68 s / 13.1 J
    # beats MAXN 0.47 s / 16.9 J
    assert modes == {nano.name: "25W", agx.name: "MODE_50W"}
    t50, e50 = f.cost(16, "MODE_50W", 474)
    assert t50 <= 1.0 and e50 < f.cost(16, "MAXN", 474)[1]
    assert math.isclose(f.cost(0, "25W", 474)[0], 1.0)
