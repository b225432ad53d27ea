"""Jetson INA3221 meter on fake sysfs trees of six boards (JetPack 4 iio and JetPack 5/6 hwmon)."""

from __future__ import annotations

import time

import pytest

from fmtl_edge.runtime import MeterUnavailable, make_meter
from fmtl_edge.runtime.jetson import JetsonMeter, nvpmodel_mode, tegra_release
from fmtl_edge.runtime.sysfs import Sysfs
from runtime_fakes import BOARDS, SIX_BOARDS, build_jetson

ALL_BOARDS = SIX_BOARDS + ["xavier-nx-jp5"]


def _hand_meter(root, clock, **kw):
    """A JetsonMeter whose sampler thread never starts: samples are taken by hand at fake times."""
    m = JetsonMeter(sysfs_root=str(root), clock=lambda: clock[0], **kw)
    m.sampler.start = lambda: None
    return m


@pytest.mark.parametrize("board", ALL_BOARDS)
def test_rails_found_by_label_with_scope(tmp_path, board):
    fake = build_jetson(tmp_path, board)
    spec = BOARDS[board]
    m = JetsonMeter(sysfs_root=str(tmp_path))
    labels = [r.label for r in m.rails]
    expected = [lab for _, labs in spec["devices"] for lab in labs if lab != "NC"]
    assert sorted(labels) == sorted(expected)
    assert m.total_scope == spec["scope"]
    assert sorted(s.domain for s in m.domain_specs() if s.in_total) == sorted(spec["total"])
    for s in m.domain_specs():
        assert s.method == "integrated"
        if s.in_total:
            assert s.scope == ("board_input" if spec["scope"] == "board_input" else "rail")
        else:
            assert s.scope == "sub_rail"
    assert all(r.driver == spec["driver"] for r in m.rails)
    # units: mW (iio) and mV x mA (hwmon) -> W
    powers = m._read_powers()
    for label, w in fake.watts.items():
        assert powers[label] == pytest.approx(w, rel=1e-12)
    m.close()


@pytest.mark.parametrize("board", ALL_BOARDS)
def test_window_total_integrates_only_total_rails(tmp_path, board):
    fake = build_jetson(tmp_path, board)
    spec = BOARDS[board]
    clock = [100.0]
    m = _hand_meter(tmp_path, clock)
    # sub-rails draw absurd power: if they were added to the total, the test would see it
    targets = {}
    for label in fake.rails:
        targets[label] = fake.set_power(label, 3.0 if label in spec["total"] else 40.0)
    m.begin_window("round")
    for _ in range(10):
        clock[0] += 0.02
        m.integrator.sample()
    clock[0] += 0.01
    meas = m.end_window("round")  # 0.21 s of constant power
    expected_total = 0.21 * sum(targets[label] for label in spec["total"])
    assert meas.total_j == pytest.approx(expected_total, rel=1e-9)
    assert meas.total_scope == spec["scope"]
    assert not meas.estimated
    assert meas.sample_hz == 50.0
    for label, w in targets.items():
        d = meas.domain(label)
        assert d is not None and d.joules == pytest.approx(0.21 * w, rel=1e-9)
        assert d.in_total == (label in spec["total"])
    assert meas.power_mode == spec["modes"][0][1]  # the mode by its nvpmodel.conf name
    assert meas.source.startswith(f"jetson:ina3221-{spec['driver']}:")
    json_keys = set(meas.to_dict())
    assert {"wall_s", "total_j", "total_scope", "domains", "power_mode", "warnings"} <= json_keys


def test_trapezoid_against_known_power_ramp(tmp_path):
    fake = build_jetson(tmp_path, "orin-nano")
    clock = [0.0]
    m = _hand_meter(tmp_path, clock)
    # VDD_IN ramps 2 W -> 12 W over 1 s, sampled at 50 Hz (hwmon: 5 V x integer mA, exact)
    fake.set_power("VDD_IN", 2.0)
    m.begin_window("ramp")
    exact = 0.0
    prev_t, prev_p = 0.0, fake.watts["VDD_IN"]
    for i in range(1, 51):
        clock[0] = i / 50
        p = fake.set_power("VDD_IN", 2.0 + 10.0 * clock[0])
        m.integrator.sample()
        exact += 0.5 * (p + prev_p) * (clock[0] - prev_t)
        prev_t, prev_p = clock[0], p
    meas = m.end_window("ramp")
    assert meas.total_j == pytest.approx(exact, rel=1e-9)
    assert meas.total_j == pytest.approx(7.0, rel=1e-3)  # integral of 2 + 10 t over [0, 1]


def test_nc_rails_skipped_with_warning(tmp_path):
    build_jetson(tmp_path, "agx-orin")
    m = JetsonMeter(sysfs_root=str(tmp_path))
    assert "NC" not in [r.label for r in m.rails]
    nc = [w for w in m.warnings if "not connected" in w]
    assert len(nc) == 2 and all("1-0041" in w for w in nc)


def test_unreadable_label_and_power_are_skipped(tmp_path):
    fake = build_jetson(tmp_path, "tx2")
    lab = fake.label_file("VDD_SYS_DDR")
    lab.unlink()
    lab.mkdir()  # reading a directory fails like an unreadable attribute (tests may run as root)
    pw = fake.power_file("VDD_4V0_WIFI")
    pw.unlink()
    pw.mkdir()
    m = JetsonMeter(sysfs_root=str(tmp_path))
    labels = [r.label for r in m.rails]
    assert "VDD_SYS_DDR" not in labels and "VDD_4V0_WIFI" not in labels
    assert any("label unreadable" in w for w in m.warnings)
    assert any("VDD_4V0_WIFI" in w and "unreadable" in w for w in m.warnings)
    assert m.total_scope == "board_input"


def test_unreadable_input_rail_means_unknown_total_not_sum_of_subrails(tmp_path):
    fake = build_jetson(tmp_path, "nano")
    pw = fake.power_file("POM_5V_IN")
    pw.unlink()
    pw.mkdir()
    clock = [0.0]
    m = _hand_meter(tmp_path, clock)
    assert m.total_scope == "none"
    m.begin_window("w")
    clock[0] = 1.0
    meas = m.end_window("w")
    assert meas.total_j is None  # never the sum of POM_5V_GPU + POM_5V_CPU
    assert meas.domain("POM_5V_GPU").joules > 0
    assert any("POM_5V_IN unreadable" in w for w in meas.warnings)


def test_read_failure_during_window_is_bridged_and_warned(tmp_path):
    fake = build_jetson(tmp_path, "xavier-nx", powers={"VDD_IN": 5.0})
    clock = [0.0]
    m = _hand_meter(tmp_path, clock)
    m.begin_window("w")
    clock[0] = 0.5
    m.integrator.sample()
    fake.file(f"{fake.rails['VDD_IN'][0]}/in_power0_input").write_text("garbage\n")
    clock[0] = 0.7
    m.integrator.sample()  # VDD_IN fails here
    fake.set_power("VDD_IN", 5.0)
    clock[0] = 1.0
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(5.0)  # 1 s at 5 W, gap bridged
    assert any("VDD_IN: read failed" in w for w in meas.warnings)


def test_total_rails_option_overrides(tmp_path):
    build_jetson(tmp_path, "agx-xavier")
    m = JetsonMeter(sysfs_root=str(tmp_path), total_rails=["GPU", "CPU"])
    assert m.total_scope == "sum_of_rails"
    assert sorted(s.domain for s in m.domain_specs() if s.in_total) == ["CPU", "GPU"]
    with pytest.raises(MeterUnavailable):
        JetsonMeter(sysfs_root=str(tmp_path), total_rails=["VDD_IN"])


def test_unknown_rails_without_input_give_no_total(tmp_path):
    fake = build_jetson(tmp_path, "nano")
    for label in ("POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"):
        fake.label_file(label).write_text(label.replace("POM", "XYZ") + "\n")
    m = JetsonMeter(sysfs_root=str(tmp_path))
    assert m.total_scope == "none"
    assert any("total unknown" in w for w in m.warnings)
    with m.window("w") as win:
        pass
    assert win.measurement.total_j is None


def test_no_rails_means_unavailable(tmp_path):
    with pytest.raises(MeterUnavailable) as ei:
        JetsonMeter(sysfs_root=str(tmp_path))
    assert "ina3221" in ei.value.reason


def test_release_and_power_mode_parsing(tmp_path):
    build_jetson(tmp_path, "xavier-nx", mode_id=2)
    s = Sysfs(tmp_path)
    assert tegra_release(s) == "L4T R32.7.1"
    assert nvpmodel_mode(s) == "MODE_15W_6CORE"
    (tmp_path / "etc/nvpmodel.conf").unlink()
    assert nvpmodel_mode(s) == "nvpmodel 2"
    (tmp_path / "var/lib/nvpmodel/status").unlink()
    assert nvpmodel_mode(s) is None


def test_real_sampler_thread_on_fake_tree(tmp_path, monkeypatch):
    build_jetson(tmp_path, "agx-orin", powers={"VDD_GPU_SOC": 10.0, "VDD_CPU_CV": 4.0, "VIN_SYS_5V0": 3.0, "VDDQ_VDD2_1V8AO": 1.0})
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    m = make_meter("auto", sample_hz=50.0)
    assert m.backend == "jetson"
    with m.window("w") as win:
        time.sleep(0.3)
    meas = win.measurement
    assert meas.total_scope == "sum_of_rails"
    assert meas.total_j == pytest.approx(18.0 * meas.wall_s, rel=0.02)
    assert m.sampler.ticks >= 8  # ~15 expected at 50 Hz; 2 shared cores may be slow
    m.close()


def test_power_mode_change_shows_up_in_later_windows(tmp_path):
    build_jetson(tmp_path, "orin-nano")
    clock = [0.0]
    m = _hand_meter(tmp_path, clock)
    m.power_mode_ttl_s = 0.0
    with m.window("a") as a:
        pass
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0001 fmode:quiet\n")
    with m.window("b") as b:
        pass
    assert a.measurement.power_mode == "15W"
    assert b.measurement.power_mode == "7W"
