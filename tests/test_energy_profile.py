"""Energy profiles: Welford estimates, kinds kept apart (metered / estimated / model:fleet), predict's
preference, JSON round trip and merge."""

from __future__ import annotations

import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtl_edge.energy_profile import EnergyProfiles, Estimate, source_kind
from fmtl_edge.fleet import Fleet


def test_source_kinds():
    assert source_kind("jetson:ina3221-hwmon:VDD_IN@x", False) == "metered"
    assert source_kind("estimate:cpu-time x 15W", True) == "estimated"
    assert source_kind("model:fleet:orin-mix:agx-orin-64gb-0", True) == "model:fleet"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=30), st.integers(0, 29))
def test_welford_and_merge_match_statistics(xs, cut):
    a, b, whole = Estimate(), Estimate(), Estimate()
    for i, x in enumerate(xs):
        (a if i < cut else b).add(x)
        whole.add(x)
    m = a.merged(b)
    assert m.n == whole.n == len(xs)
    assert m.mean == pytest.approx(statistics.fmean(xs), rel=1e-9, abs=1e-9)
    if len(xs) > 1:
        assert whole.std == pytest.approx(statistics.stdev(xs), rel=1e-6, abs=1e-6)
        assert m.std == pytest.approx(statistics.stdev(xs), rel=1e-6, abs=1e-6)


def test_kinds_are_kept_apart_and_predict_says_which_it_used():
    p = EnergyProfiles()
    # the same device, mode and model: a metered execution and an estimated one
    p.observe("nano-07", "15W", "har", 100, 2.0, 10.0, "jetson:ina3221-hwmon:VDD_IN@1-0040", estimated=False)
    p.observe("nano-07", "15W", "har", 100, 3.0, 40.0, "estimate:cpu-time", estimated=True)
    assert len(p) == 2
    pred = p.predict("nano-07", "15W", "har", 50)
    assert pred.source == "metered" and pred.energy_j == pytest.approx(5.0) and pred.device_s == pytest.approx(1.0)
    assert pred.n == 1
    est = p.predict("nano-07", "15W", "har", 50, prefer=("estimated",))
    assert est.source == "estimated" and est.energy_j == pytest.approx(20.0)
    # more metered observations never move the estimated entry
    p.observe("nano-07", "15W", "har", 200, 4.0, 30.0, "jetson:ina3221-hwmon:VDD_IN@1-0040")
    m = p.predict("nano-07", "15W", "har", 100)
    assert m.n == 2 and m.energy_j == pytest.approx(100 * (0.1 + 0.15) / 2)
    assert m.energy_std_j == pytest.approx(100 * statistics.stdev([0.1, 0.15]))
    assert p.predict("nano-07", "15W", "har", 100, prefer=("estimated",)).energy_j == pytest.approx(40.0)
    # unknown: another mode, model or device
    assert p.predict("nano-07", "7W", "har", 10) is None
    assert p.predict("nano-07", "15W", "utk", 10) is None
    with pytest.raises(ValueError, match="unknown energy kind 'joules'"):
        p.predict("nano-07", "15W", "har", 10, prefer=("joules",))


def test_unknown_energy_counts_time_only_and_zero_passes_nothing():
    p = EnergyProfiles()
    assert not p.observe("d", "MAXN", "m", 0, 1.0, 1.0, "x")
    assert p.observe("d", "MAXN", "m", 10, 1.0, None, "null:time-only")
    e = p.entry("d", "MAXN", "m", "metered")
    assert e.s_per_pass.n == 1 and e.j_per_pass.n == 0
    assert p.predict("d", "MAXN", "m", 10) is None  # no energy yet
    assert p.observe("d", None, "m", 10, 1.0, 2.0, "x")
    assert p.modes_of("d") == ["MAXN", "unknown"]


def test_round_trip_through_json_and_merge():
    a, b = EnergyProfiles(), EnergyProfiles()
    f = Fleet.load("orin-mix")
    for c in range(6):
        rec = f.energy_record(c, "15W" if c % 2 else None, 120 + c)  # Orin Nanos 0-5
        a.observe_record(f.device_of(c).name, "har", 120 + c, rec["wall_s"], rec)
    a.observe("agx-0", "MAXN", "har", 64, 0.1, 3.0, "jetson:x")
    a.observe("agx-0", "MAXN", "har", 64, 0.12, 3.3, "jetson:x")
    b.observe("agx-0", "MAXN", "har", 32, 0.05, 1.4, "jetson:x")
    b.observe("agx-0", "MAXN", "har", 32, 0.06, 1.0, "estimate:cpu", estimated=True)
    d = a.to_dict()
    back = EnergyProfiles.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    fleet_kinds = {k[3] for k in back.entries if k[0].startswith("orin")}
    assert fleet_kinds == {"model:fleet"}  # fleet-model energies are never metered entries
    m = a.merge(b)
    e = m.entry("agx-0", "MAXN", "har", "metered")
    assert e.j_per_pass.n == 3 and e.sample_passes == 160
    assert e.j_per_pass.mean == pytest.approx(statistics.fmean([3.0 / 64, 3.3 / 64, 1.4 / 32]))
    assert e.j_per_pass.std == pytest.approx(statistics.stdev([3.0 / 64, 3.3 / 64, 1.4 / 32]))
    assert m.entry("agx-0", "MAXN", "har", "estimated").j_per_pass.n == 1
    assert a.entry("agx-0", "MAXN", "har", "metered").j_per_pass.n == 2  # merge leaves its inputs alone
    with pytest.raises(ValueError, match="format version"):
        EnergyProfiles.from_dict({"version": 9, "entries": []})
    with pytest.raises(ValueError, match="unknown energy kind"):
        EnergyProfiles.from_dict({"version": 1, "entries": [dict(d["entries"][0], kind="guess")]})
