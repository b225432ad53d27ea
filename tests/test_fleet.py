"""The simulated fleet: loading (shipped name or file, clear --fleet errors), client -> device, the
deterministic cost model and the shipped orin-mix figures."""

from __future__ import annotations

import pytest

from fmtl_edge.config import ConfigError
from fmtl_edge.fleet import FLEET_SOURCE, Fleet, shipped_fleets

SMALL = """
name = "two"
sample_passes_per_s = 100.0
[model_rates]
"big" = 10.0

[[kind]]
name = "slow"
count = 2
idle_w = 1.0
default_mode = "hi"
round_energy_j = 5.0
  [[kind.mode]]
  name = "hi"
  speed = 0.5
  watts = 4.0
  [[kind.mode]]
  name = "lo"
  speed = 0.25
  watts = 1.5

[[kind]]
name = "fast"
idle_w = 2.0
  [[kind.mode]]
  name = "only"
  speed = 2.0
  watts = 10.0
"""


def test_orin_mix_is_shipped_and_expands_in_file_order():
    assert "orin-mix" in shipped_fleets()
    f = Fleet.load("orin-mix")
    assert f.source == "builtin:orin-mix" and len(f) == 24
    assert [k.name for k in f.kinds] == ["orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"]
    assert [k.count for k in f.kinds] == [8, 8, 8]
    assert f.device_of(0).name == "orin-nano-8gb-0" and f.device_of(7).name == "orin-nano-8gb-7"
    assert f.device_of(8).name == "orin-nx-16gb-0" and f.device_of(23).name == "agx-orin-64gb-7"
    assert f.device_of(24) is f.device_of(0) and f.device_of(41).name == "agx-orin-64gb-1"  # k mod N
    nano, nx, agx = f.device_of(0), f.device_of(8), f.device_of(16)
    assert nano.mode_names == ("7W", "15W", "25W")
    assert nx.mode_names == ("10W", "15W", "25W", "MAXN")
    assert agx.mode_names == ("MODE_15W", "MODE_30W", "MODE_50W", "MAXN")
    assert [d.max_mode.name for d in (nano, nx, agx)] == ["25W", "MAXN", "MAXN"]
    assert [d.default_mode.name for d in (nano, nx, agx)] == ["25W", "15W", "MODE_30W"]  # PM_CONFIG DEFAULT
    for d in (nano, nx, agx):
        speeds = [m.speed for m in d.modes]
        assert speeds == sorted(speeds)
        assert d.round_energy_j > 0 and d.run_energy_j > d.round_energy_j


def test_orin_mix_makes_the_energy_question_non_trivial():
    f = Fleet.load("orin-mix")
    cheapest = {}
    for d in (f.device_of(0), f.device_of(8), f.device_of(16)):
        best = min(d.modes, key=lambda m: m.j_per_unit())
        cheapest[d.kind.name] = best.name
        # the slowest mode is never the cheapest: static power makes racing worth something
        assert best is not d.modes[0]
    # the top mode is not always the least J/sample ...
    assert cheapest["agx-orin-64gb"] == "MODE_50W"
    agx = f.device_of(16)
    saving = 1 - agx.mode("MODE_50W").j_per_unit() / agx.max_mode.j_per_unit()
    assert 0.10 < saving < 0.30
    # ... but sometimes it is
    assert cheapest["orin-nx-16gb"] == "MAXN" and cheapest["orin-nano-8gb"] == "25W"


def test_cost_by_hand(tmp_path):
    p = tmp_path / "two.toml"
    p.write_text(SMALL)
    f = Fleet.load(str(p))
    assert f.source == str(p) and len(f) == 3
    assert [d.name for d in f.devices] == ["slow-0", "slow-1", "fast-0"]
    assert f.device_of(0).mode_names == ("lo", "hi") and f.device_of(0).max_mode.name == "hi"
    # 100 passes at speed 0.5 x 100/s = 2 s; 4 W x 2 s = 8 J
    assert f.cost(0, "hi", 100) == pytest.approx((2.0, 8.0))
    assert f.cost(1, "lo", 100) == pytest.approx((4.0, 6.0))
    assert f.cost(0, None, 100) == f.cost(0, "hi", 100)  # default mode
    assert f.cost(2, "only", 100) == pytest.approx((0.5, 5.0))
    assert f.cost(5, "only", 100) == f.cost(2, "only", 100)  # client 5 -> device 5 mod 3 = 2
    assert f.cost(2, "only", 100, model="big") == pytest.approx((5.0, 50.0))  # its own rate
    assert f.cost(2, "only", 0) == (0.0, 0.0)
    assert f.idle_energy_j(2, 3.0) == pytest.approx(6.0) and f.idle_energy_j(2, -1.0) == 0.0
    with pytest.raises(KeyError, match="no power mode 'MAXN'; modes: lo, hi"):
        f.cost(0, "MAXN", 10)
    rec = f.energy_record(2, "only", 100)
    assert rec["source"].startswith(FLEET_SOURCE) and rec["estimated"] is True
    assert rec["total_j"] == pytest.approx(5.0) and rec["power_mode"] == "only"
    assert f.device_of(0).round_energy_j == 5.0 and f.device_of(0).run_energy_j is None
    assert f.to_dict()["kinds"][0]["modes"][0] == {"name": "lo", "watts": 1.5, "speed": 0.25}


@pytest.mark.parametrize("text,msg", [
    ("", "sample_passes_per_s must be a positive number"),
    ("sample_passes_per_s = 1.0\n", "no \\[\\[kind\\]\\] tables"),
    ("sample_passes_per_s = 1.0\nspeed = 2\n", "unknown keys \\['speed'\\]"),
    ("sample_passes_per_s = 1.0\n[[kind]]\nname='a'\n", "no \\[\\[kind.mode\\]\\] tables"),
    ("sample_passes_per_s = 1.0\n[[kind]]\nname='a'\ncount=0\n[[kind.mode]]\nname='m'\nspeed=1\nwatts=1\n",
     "count must be an integer >= 1"),
    ("sample_passes_per_s = 1.0\n[[kind]]\nname='a'\n[[kind.mode]]\nname='m'\nspeed=1\nwatts=-3\n",
     "mode m watts must be a positive number"),
    ("sample_passes_per_s = 1.0\n[[kind]]\nname='a'\ndefault_mode='x'\n[[kind.mode]]\nname='m'\nspeed=1\nwatts=1\n",
     "default_mode 'x' is not one of its modes"),
    ("sample_passes_per_s = 1.0\n[[kind]]\nname='a'\n[[kind.mode]]\nname='m'\nspeed=1\nwatts=1\nvolts=5\n",
     "must have exactly name, speed and watts"),
    ("sample_passes_per_s = [", "not valid TOML"),
])
def test_bad_fleet_files_name_the_flag(tmp_path, text, msg):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=msg) as ei:
        Fleet.load(str(p))
    assert ei.value.field == "--fleet"


def test_unknown_fleet_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="neither a TOML file nor a shipped fleet \\(.*orin-mix") as ei:
        Fleet.load("orin-max")
    assert ei.value.field == "--fleet"
    with pytest.raises(ValueError, match="client ids are >= 0"):
        Fleet.load("orin-mix").device_of(-1)
