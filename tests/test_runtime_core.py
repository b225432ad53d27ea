"""Meter API: windows, nesting, null/estimate backends, Measurement arithmetic, make_meter."""

from __future__ import annotations

import json
import math
import sys
import threading
import time

import pytest

from fmtl_edge.runtime import (
    DomainEnergy,
    Measurement,
    MeterUnavailable,
    make_meter,
)
from fmtl_edge.runtime.estimate import EstimateMeter
from fmtl_edge.runtime.meter import Sampler, SampledMeter, TrapezoidIntegrator

MEASUREMENT_KEYS = {
    "wall_s",
    "total_j",
    "total_scope",
    "estimated",
    "source",
    "domains",
    "sample_hz",
    "power_mode",
    "warnings",
}


def _burn(seconds: float) -> None:
    t = time.process_time()
    x = 0
    while time.process_time() - t < seconds:
        x += 1


# ---- null -------------------------------------------------------------------------------------


def test_null_meter_reports_time_and_none_energy_never_zero():
    m = make_meter("null")
    with m.window("w") as win:
        time.sleep(0.01)
        assert win.peek().total_j is None
    meas = win.measurement
    assert meas.total_j is None
    assert meas.total_scope == "none"
    assert meas.domains == []
    assert meas.wall_s >= 0.01
    assert not meas.estimated
    d = meas.to_dict()
    assert set(d) == MEASUREMENT_KEYS
    assert d["total_j"] is None
    json.dumps(d)


# ---- estimate ---------------------------------------------------------------------------------


def test_estimate_is_flagged_and_proportional_to_cpu_time():
    m = make_meter("estimate", power_w=10.0)
    with m.window("busy") as win:
        _burn(0.05)
    meas = win.measurement
    assert meas.estimated is True
    assert meas.total_scope == "none"
    assert meas.source == "estimate:cpu_time*10W"
    (dom,) = meas.domains
    assert dom.method == "estimated" and dom.scope == "process_cpu" and dom.in_total
    # >= 0.05 s of CPU at 10 W; other threads of this process (pytest) may add a little
    assert 0.5 <= meas.total_j <= 10.0 * (meas.wall_s * 2 + 0.05)


def test_estimate_with_injected_clocks_is_exact():
    cpu = [0.0]
    wall = [100.0]
    m = EstimateMeter(power_w=4.0, idle_w=1.5, cpu_clock=lambda: cpu[0], wall_clock=lambda: wall[0])
    m.begin_window("w")
    cpu[0] += 2.0
    wall[0] += 10.0
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(4.0 * 2.0 + 1.5 * 10.0)
    assert "wall*1.5W" in meas.source
    assert meas.estimated


def test_estimate_counts_waited_children():
    import subprocess

    m = make_meter("estimate", power_w=100.0)
    with m.window("child") as win:
        subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.2: pass"], check=True)
    assert win.measurement.total_j >= 100.0 * 0.15


def test_estimate_rejects_negative_power():
    with pytest.raises(ValueError):
        make_meter("estimate", power_w=-1)


# ---- windows ----------------------------------------------------------------------------------


def test_windows_nest_and_interleave():
    cpu = [0.0]
    m = EstimateMeter(power_w=1.0, cpu_clock=lambda: cpu[0])
    with m.window("outer") as outer:
        cpu[0] += 1
        with m.window("inner") as inner:
            cpu[0] += 2
            assert inner.peek().total_j == pytest.approx(2)
            assert outer.peek().total_j == pytest.approx(3)
        cpu[0] += 4
    assert inner.measurement.total_j == pytest.approx(2)
    assert outer.measurement.total_j == pytest.approx(7)
    # begin/end API, overlapping (not nested) windows
    m.begin_window("a")
    cpu[0] += 1
    m.begin_window("b")
    cpu[0] += 1
    a = m.end_window("a")
    cpu[0] += 1
    b = m.end_window("b")
    assert (a.total_j, b.total_j) == (pytest.approx(2), pytest.approx(2))
    assert m.open_windows == []


def test_window_name_errors():
    m = make_meter("null")
    m.begin_window("x")
    with pytest.raises(ValueError):
        m.begin_window("x")
    with pytest.raises(KeyError):
        m.end_window("nope")
    m.end_window("x")
    with pytest.raises(KeyError):
        m.end_window("x")


def test_window_closed_even_when_body_raises():
    m = make_meter("estimate")
    with pytest.raises(RuntimeError):
        with m.window("boom") as win:
            raise RuntimeError("training failed")
    assert win.measurement is not None and win.closed
    assert m.open_windows == []


# ---- Measurement arithmetic -------------------------------------------------------------------


def _m(j, scope="board_input", est=False, src="jetson:x", warnings=(), mode="MAXN", domains=None):
    if domains is None:
        domains = [] if j is None else [DomainEnergy("VDD_IN", j, "integrated", "/sys/a", "board_input", True)]
    return Measurement(
        wall_s=1.0,
        total_j=j,
        total_scope=scope,
        estimated=est,
        source=src,
        domains=list(domains),
        sample_hz=50.0,
        power_mode=mode,
        warnings=list(warnings),
    )


def test_combine_adds_joules_and_merges_flags():
    c = Measurement.combine([_m(2.0, warnings=["w1"]), _m(3.0, est=True, warnings=["w1", "w2"])])
    assert c.wall_s == 2.0
    assert c.total_j == pytest.approx(5.0)
    assert c.estimated is True
    assert c.warnings == ["w1", "w2"]
    assert c.domain("VDD_IN").joules == pytest.approx(5.0)
    assert c.total_scope == "board_input"
    assert c.power_mode == "MAXN"


def test_combine_none_if_any_unknown_and_mixed_scopes_flagged():
    assert Measurement.combine([_m(2.0), _m(None)]).total_j is None
    mixed = Measurement.combine([_m(1.0), _m(1.0, scope="gpu_device", src="nvml")])
    assert mixed.total_scope == "none"
    assert any("different total scopes" in w for w in mixed.warnings)
    assert "jetson:x" in mixed.source and "nvml" in mixed.source
    empty = Measurement.combine([])
    assert empty.total_j is None and empty.wall_s == 0


def test_measurement_roundtrip_and_scope_validation():
    m = _m(1.25)
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(ValueError):
        Measurement(wall_s=1, total_j=1, total_scope="wall_socket")


# ---- make_meter -------------------------------------------------------------------------------


def test_make_meter_unknown_backend_and_option():
    with pytest.raises(ValueError):
        make_meter("psu")
    with pytest.raises(TypeError):
        make_meter("estimate", powr_w=3)


def test_auto_falls_back_to_estimate_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))  # an empty machine
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    m = make_meter("auto", power_w=2.0)
    assert m.backend == "estimate"
    assert [r.backend for r in m.probe_log] == ["jetson", "nvml", "rapl", "estimate"]
    assert all(not r.ok for r in m.probe_log[:3])
    with m.window("w") as win:
        pass
    assert win.measurement.estimated
    assert any("no hardware energy meter" in w for w in win.measurement.warnings)


def test_explicit_backend_unavailable_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    with pytest.raises(MeterUnavailable) as ei:
        make_meter("rapl")
    assert ei.value.backend == "rapl" and ei.value.reason


# ---- sampler / trapezoid ----------------------------------------------------------------------


def test_trapezoid_exact_on_piecewise_linear_power():
    # P(t) = 2 + 3t W sampled at irregular times: trapezoid is exact for linear power
    clock = [0.0]
    it = TrapezoidIntegrator(lambda: {"rail": 2 + 3 * clock[0]}, clock=lambda: clock[0])
    for t in [0.0, 0.013, 0.02, 0.5, 0.51, 1.7, 2.0]:
        clock[0] = t
        it.sample()
    assert it.energy()["rail"] == pytest.approx(2 * 2.0 + 1.5 * 2.0**2)


def test_trapezoid_converges_on_sine_and_bridges_failed_reads():
    clock = [0.0]
    fail_at = {5, 6, 7}
    n = [0]

    def read():
        n[0] += 1
        p = 5 + 2 * math.sin(2 * math.pi * clock[0])
        return {"a": None if n[0] in fail_at else p, "b": 1.0}

    it = TrapezoidIntegrator(read, clock=lambda: clock[0])
    hz = 50
    for i in range(hz * 3 + 1):  # 3 s at 50 Hz
        clock[0] = i / hz
        it.sample()
    e = it.energy()
    assert e["a"] == pytest.approx(15.0, rel=1e-3)  # sine integrates to 0 over whole periods
    assert e["b"] == pytest.approx(3.0)
    assert it.failures == {"a": 3}


class _SineMeter(SampledMeter):
    backend = "fake"
    total_scope = "board_input"

    def __init__(self, clock, **kw):
        self._clock_ref = clock
        super().__init__(clock=lambda: clock[0], **kw)

    def domain_specs(self):
        from fmtl_edge.runtime.meter import DomainSpec

        return [DomainSpec("IN", "integrated", "fake", "board_input", True)]

    def _read_powers(self):
        return {"IN": 10.0 + self._clock_ref[0]}


def test_sampled_meter_edges_are_exact_with_fake_clock():
    clock = [0.0]
    m = _SineMeter(clock, sample_hz=1000.0)
    m.sampler.start = lambda: None  # drive samples by hand
    m.begin_window("w")
    for i in range(1, 11):
        clock[0] = i * 0.1
        m.integrator.sample()
    clock[0] = 1.05
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(10 * 1.05 + 0.5 * 1.05**2)
    assert meas.sample_hz == 1000.0
    assert meas.domains[0].method == "integrated"


def test_sampler_thread_runs_only_while_a_window_is_open():
    clock = [0.0]
    m = _SineMeter(clock, sample_hz=200.0)
    assert not m.sampler.running
    with m.window("w"):
        time.sleep(0.1)
        assert m.sampler.running
    assert not m.sampler.running
    assert 5 <= m.sampler.ticks <= 40


def test_sampler_keeps_running_through_errors():
    calls = []

    def fn():
        calls.append(1)
        raise OSError("i2c timeout")

    s = Sampler(fn, 200.0)
    s.start()
    time.sleep(0.05)
    s.stop()
    assert s.errors == len(calls) >= 3
    assert isinstance(s.last_error, OSError)
    assert not s.running


def test_concurrent_windows_from_threads():
    m = make_meter("estimate")
    errors = []

    def worker(i):
        try:
            for r in range(20):
                with m.window(f"c{i}/r{r}") as w:
                    pass
                assert w.measurement.total_j >= 0
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and m.open_windows == []


# ---- CUDA synchronisation at window edges (fake torch.cuda) -------------------------------------


def test_window_edges_synchronize_initialised_cuda(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: calls.append(i))
    m = make_meter("null")
    with m.window("w") as win:
        assert calls == [0, 1]
        win.peek()
    assert calls == [0, 1, 0, 1, 0, 1]
    m2 = make_meter("null", sync_cuda=False)
    with m2.window("w"):
        pass
    assert len(calls) == 6


def test_no_sync_when_cuda_not_initialised(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: (_ for _ in ()).throw(AssertionError("synced")))
    with make_meter("null").window("w"):
        pass
