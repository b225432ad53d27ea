"""NVML meter against a fake pynvml: counter path, sampling path, Tegra init-but-read-fails."""

from __future__ import annotations

import sys

import pytest

from fmtl_edge.runtime import MeterUnavailable, make_meter
from fmtl_edge.runtime.nvml import NvmlMeter
from runtime_fakes import build_jetson, fake_pynvml


@pytest.fixture
def use_nvml(monkeypatch, tmp_path):
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(**kw):
        mod = fake_pynvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod

    return install


def test_counter_path_volta_plus(use_nvml):
    nv = use_nvml(devices=[{"name": "NVIDIA A100", "energy_mj": [5_000_000] * 4 + [5_012_500], "power_mw": 250_000, "limit_mw": 400_000}])
    m = make_meter("nvml")
    assert [g.mode for g in m.gpus] == ["counter"]
    assert m.sample_hz is None
    with m.window("w") as win:
        pass
    meas = win.measurement
    assert meas.total_j == pytest.approx(12.5)
    assert meas.total_scope == "gpu_device" and not meas.estimated
    (d,) = meas.domains
    assert (d.domain, d.method, d.scope) == ("gpu:0", "counter", "gpu_device")
    assert "nvmlDeviceGetTotalEnergyConsumption" in meas.source
    assert meas.power_mode == "gpu0 power_limit=400W"
    assert not m.sampler.running
    m.close()
    assert nv._state["shutdown"] == 1


def test_sampling_path_pre_volta(use_nvml):
    use_nvml(devices=[{"name": "Tesla P100", "energy_mj": None, "power_mw": 100_000}])
    clock = [0.0]
    m = NvmlMeter(clock=lambda: clock[0])
    m.sampler.start = lambda: None
    assert [g.mode for g in m.gpus] == ["integrated"]
    assert m.sample_hz == 50.0
    m.begin_window("w")
    for i in range(1, 11):
        clock[0] = i * 0.1
        m.integrator.sample()
    meas = m.end_window("w")
    assert meas.total_j == pytest.approx(100.0)  # 100 W for 1 s
    assert meas.domains[0].method == "integrated"
    assert "nvmlDeviceGetPowerUsage" in meas.source


def test_mixed_gpus_and_visible_devices(use_nvml, monkeypatch):
    use_nvml(
        devices=[
            {"name": "A", "energy_mj": [1000, 1000, 3000], "uuid": "GPU-aaa"},
            {"name": "B", "energy_mj": None, "power_mw": 50_000, "uuid": "GPU-bbb"},
            {"name": "C", "energy_mj": 7, "uuid": "GPU-ccc"},
        ]
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbb,0")
    m = NvmlMeter()
    assert [(g.index, g.mode) for g in m.gpus] == [("GPU-bbb", "integrated"), (0, "counter")]
    m.close()
    m = NvmlMeter(gpu_indices=[2])
    assert [g.name for g in m.gpus] == ["C"]
    m.close()


def test_tegra_init_but_reads_fail_is_not_chosen(use_nvml, tmp_path):
    build_jetson(tmp_path, "orin-nano")
    use_nvml(devices=[{"name": "Orin (nvgpu)", "energy_mj": None, "power_mw": None}])
    with pytest.raises(MeterUnavailable) as ei:
        make_meter("nvml")
    assert "Tegra" in ei.value.reason
    m = make_meter("auto")
    assert m.backend == "jetson"
    m.close()
    # jetson meter unavailable too (empty rails): auto must still not pick NVML
    m = make_meter("auto", order=("nvml",))
    assert m.backend == "estimate"
    assert "Tegra" in m.probe_log[0].reason


def test_zero_readings_are_not_energy(use_nvml):
    use_nvml(devices=[{"name": "weird", "energy_mj": 0, "power_mw": 0}])
    with pytest.raises(MeterUnavailable) as ei:
        make_meter("nvml")
    assert "reads 0" in ei.value.reason


def test_init_failure_and_missing_package(use_nvml, monkeypatch):
    use_nvml(init_error=12)
    with pytest.raises(MeterUnavailable) as ei:
        make_meter("nvml")
    assert "nvmlInit failed" in ei.value.reason
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterUnavailable) as ei:
        make_meter("nvml")
    assert "nvidia-ml-py" in ei.value.reason


def test_counter_read_failure_mid_run_gives_unknown_total(use_nvml):
    # reads: probe, baseline, probe read, window start; the fifth (window end) raises NOT_SUPPORTED:
    # the total must be None, not 0
    use_nvml(devices=[{"name": "A", "energy_mj": [10, 10, 10, 10, None]}])
    m = make_meter("nvml")
    with m.window("w") as win:
        pass
    assert win.measurement.total_j is None
    assert win.measurement.domains == []
    assert any("gpu:0: energy counter read failed" in w for w in win.measurement.warnings)


def test_real_pynvml_without_driver_is_unavailable(monkeypatch):
    pytest.importorskip("pynvml")
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")
    except pynvml.NVMLError:
        pass
    with pytest.raises(MeterUnavailable):
        make_meter("nvml")
