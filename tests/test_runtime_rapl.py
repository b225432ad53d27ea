"""RAPL meter on fake powercap trees: domains, duplicates skipped, wrap-around, permission errors."""

from __future__ import annotations

import time

import pytest

from fmtl_edge.runtime import MeterUnavailable, make_meter
from fmtl_edge.runtime.rapl import RaplMeter
from fmtl_edge.runtime.sysfs import Sysfs
from runtime_fakes import build_rapl


def test_domains_and_duplicates(tmp_path):
    build_rapl(tmp_path, packages=2, dram=True, psys=True, mmio=True)
    m = RaplMeter(sysfs_root=str(tmp_path))
    specs = {s.domain: s for s in m.domain_specs()}
    assert sorted(specs) == ["dram-0", "dram-1", "package-0", "package-1"]  # no core/uncore/psys/mmio
    assert specs["package-1"].scope == "cpu_package" and specs["package-1"].in_total
    assert specs["dram-0"].scope == "dram" and not specs["dram-0"].in_total
    assert all(s.method == "counter" for s in specs.values())
    assert m.total_scope == "cpu_package"
    assert "intel-rapl-mmio" not in m.source and "intel-rapl:2" not in m.source
    m.close()


def test_window_energy_and_total_excludes_dram(tmp_path):
    fake = build_rapl(tmp_path, packages=2)
    m = RaplMeter(sysfs_root=str(tmp_path))
    m.sampler.start = lambda: None
    m.begin_window("w")
    fake.set_energy_uj("package-0", 1000 + 3_000_000)
    fake.set_energy_uj("package-1", 1000 + 2_000_000)
    fake.set_energy_uj("dram-0", 1000 + 500_000)
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(5.0)
    assert meas.domain("dram-0").joules == pytest.approx(0.5)
    assert meas.total_scope == "cpu_package" and not meas.estimated
    assert meas.sample_hz is None
    assert "PL1=62.5W" in meas.power_mode


def test_wrap_around_handled(tmp_path):
    rng = 1_000_000  # 1 J range
    fake = build_rapl(tmp_path, packages=1, dram=False, max_range_uj=rng, max_power_uw=10_000_000)
    m = RaplMeter(sysfs_root=str(tmp_path))
    # wrap period = 1 J / 10 W = 0.1 s -> polled every 25 ms
    assert m.wrap_period_s == pytest.approx(0.1)
    assert m.poll_s == pytest.approx(0.025)
    m.sampler.start = lambda: None
    fake.set_energy_uj("package-0", 900_000)
    m.begin_window("w")
    total = 0
    raw = 900_000
    for step in (300_000, 400_000, 350_000, 990_000):  # each below the range: at most one wrap per read
        raw = (raw + step) % rng
        total += step
        fake.set_energy_uj("package-0", raw)
        m._update()
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(total / 1e6)
    assert m.wraps == 2  # 900k -> 200k and 950k -> 940k
    assert meas.total_j > 0


def test_sampler_catches_wraps_in_real_time(tmp_path):
    fake = build_rapl(tmp_path, packages=1, dram=False, max_range_uj=1_000_000, max_power_uw=10_000_000)
    m = RaplMeter(sysfs_root=str(tmp_path))
    with m.window("w"):
        for i in range(1, 9):  # 0.8 J per 40 ms: the 25 ms sampler must see every wrap
            time.sleep(0.04)
            fake.set_energy_uj("package-0", (1000 + i * 800_000) % 1_000_000)
    # we cannot know how many reads the sampler managed; at least the counter never went "backwards"
    assert m.wraps >= 1
    assert not any("backwards" in w for w in m.warnings)


def test_permission_error_explains_how_to_grant_access(tmp_path, monkeypatch):
    build_rapl(tmp_path)
    real = Sysfs.read_int

    def deny(self, logical):
        if logical.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", logical)
        return real(self, logical)

    monkeypatch.setattr(Sysfs, "read_int", deny)
    with pytest.raises(MeterUnavailable) as ei:
        RaplMeter(sysfs_root=str(tmp_path))
    msg = ei.value.reason
    assert "permission denied" in msg and "chmod" in msg and "root" in msg
    # auto skips it and says why
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    m = make_meter("auto", order=("rapl",))
    assert m.backend == "estimate"
    assert "chmod" in m.probe_log[0].reason


def test_no_zones(tmp_path):
    with pytest.raises(MeterUnavailable):
        RaplMeter(sysfs_root=str(tmp_path))


def test_auto_picks_rapl_when_no_gpu(tmp_path, monkeypatch):
    build_rapl(tmp_path)
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    m = make_meter("auto")
    assert m.backend == "rapl"
    assert [(r.backend, r.ok) for r in m.probe_log] == [("jetson", False), ("nvml", False), ("rapl", True)]
    m.close()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    rng=st.integers(min_value=1000, max_value=2**40),
    start_frac=st.floats(min_value=0, max_value=0.999),
    steps_frac=st.lists(st.floats(min_value=0, max_value=0.999), min_size=1, max_size=20),
)
def test_wrap_accumulation_property(tmp_path_factory, rng, start_frac, steps_frac):
    """Any sequence of increases each below the range is recovered exactly, wraps or not."""
    root = tmp_path_factory.mktemp("rapl")
    fake = build_rapl(root, packages=1, dram=False, psys=False, mmio=False, max_range_uj=rng)
    raw = int(start_frac * rng)
    fake.set_energy_uj("package-0", raw)
    m = RaplMeter(sysfs_root=str(root))
    m.sampler.start = lambda: None
    m.begin_window("w")
    total = 0
    for f in steps_frac:
        step = int(f * rng)
        total += step
        raw = (raw + step) % rng
        fake.set_energy_uj("package-0", raw)
        m._update()
    meas = m.end_window("w")
    m.close()
    assert round(meas.total_j * 1e6) == total
