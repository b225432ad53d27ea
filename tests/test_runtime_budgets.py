"""Budgets: RoundBudget, BudgetExceeded, memory check / estimate / peak watcher, device profiles."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from fmtl_edge.runtime import (
    BudgetExceeded,
    DeviceProfile,
    PeakMemoryWatcher,
    RoundBudget,
    check_memory,
    estimate_job_memory_bytes,
    load_profile,
)
from fmtl_edge.runtime.profile import DEVICE_CLASSES, builtin_profile, detect_device_class


def test_round_budget_time_and_energy():
    b = RoundBudget(time_s=10.0, energy_j=50.0)
    assert b.exhausted(1.0, 1.0) is None
    assert b.exhausted(10.0, 1.0) == "time"
    assert b.exhausted(1.0, 50.0) == "energy"
    assert b.exhausted(11.0, 60.0) == "time"
    assert b.exhausted(1.0, None) is None  # unknown energy never exhausts the energy budget
    assert RoundBudget().unlimited and RoundBudget().exhausted(1e9, 1e9) is None
    with pytest.raises(ValueError):
        RoundBudget(time_s=0)
    with pytest.raises(ValueError):
        RoundBudget(energy_j=float("nan"))
    err = b.error("energy", 3.0, 51.0)
    assert (err.kind, err.needed, err.limit, err.unit) == ("energy", 51.0, 50.0, "J")


def test_budget_exceeded_structure():
    e = BudgetExceeded("memory", 3 * 2**30, 2 * 2**30)
    assert isinstance(e, RuntimeError)
    assert (e.kind, e.needed, e.limit, e.unit) == ("memory", 3 * 2**30, 2 * 2**30, "bytes")
    d = e.to_dict()
    assert d["error"] == "BudgetExceeded" and d["kind"] == "memory" and "MiB" in d["message"]
    back = BudgetExceeded.from_dict(d)
    assert (back.kind, back.needed, back.limit, back.message) == (e.kind, e.needed, e.limit, e.message)
    p = pickle.loads(pickle.dumps(e))
    assert p.to_dict() == d
    with pytest.raises(ValueError):
        BudgetExceeded("disk", 1, 0)


def test_check_memory_against_profile():
    prof = DeviceProfile(name="nano-1", device_class="jetson-nano", memory_budget_bytes=1000)
    check_memory(1000, prof)
    check_memory(10**12, None)
    check_memory(10**12, DeviceProfile(name="ws"))  # no memory budget: no limit
    with pytest.raises(BudgetExceeded) as ei:
        check_memory(1001, prof)
    assert ei.value.kind == "memory" and ei.value.needed == 1001 and ei.value.limit == 1000
    assert "nano-1" in str(ei.value)
    with pytest.raises(BudgetExceeded):
        check_memory(11, 10)


def _mlp(width=1024, depth=3):
    layers = [nn.Linear(256, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers += [nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def test_memory_estimate_parts_exact_for_mlp():
    net = _mlp(width=64, depth=1)
    p = sum(x.numel() for x in net.parameters()) * 4
    b = 32
    act = b * (64 + 64 + 64 + 64 + 10) * 4  # Linear, ReLU, Linear, ReLU, Linear outputs
    inp = b * 256 * 4 + 2 * b * 64 * 4  # input batch + backward transient (2 x largest activation)
    assert estimate_job_memory_bytes(net, (256,), b, "sgd") == 2 * p + act + inp
    assert estimate_job_memory_bytes(net, (256,), b, "sgd_momentum") == 3 * p + act + inp
    assert estimate_job_memory_bytes(net, (256,), b, "adam") == 4 * p + act + inp
    # frozen parameters: no gradient, no optimizer state
    for q in net[0].parameters():
        q.requires_grad_(False)
    frozen = sum(x.numel() for x in net[0].parameters()) * 4
    assert estimate_job_memory_bytes(net, (256,), b, "sgd_momentum") == 3 * p - 2 * frozen + act + inp
    with pytest.raises(ValueError):
        estimate_job_memory_bytes(net, (256,), b, "lbfgs")


def test_memory_estimate_leaves_model_untouched_and_handles_inplace():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n = estimate_job_memory_bytes(net, (3, 16, 16), 4, "sgd")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched
    params = sum(x.numel() for x in net.parameters()) * 4
    bufs = sum(x.numel() * x.element_size() for x in net.buffers())
    act = 2 * 4 * 8 * 16 * 16 * 4  # conv + bn outputs; in-place ReLU adds nothing
    transient = 2 * 4 * 8 * 16 * 16 * 4
    assert n == 2 * params + bufs + act + transient + 4 * 3 * 16 * 16 * 4


def test_memory_estimate_order_of_magnitude_vs_measured_training_step():
    torch.manual_seed(0)
    net = _mlp(width=1024, depth=3)  # ~3.4 M params, 13.6 MB
    batch = 512
    est = estimate_job_memory_bytes(net, (256,), batch, "sgd_momentum")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 256)
    y = torch.randint(0, 10, (batch,))
    with PeakMemoryWatcher("cpu") as w:
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    assert w.peak_bytes is not None and w.peak_bytes > 0
    if not w.peak_reset:
        pytest.skip("kernel does not allow resetting VmHWM; job peak not separable")
    # the model's parameters already live in the baseline; what training adds is est - params
    params = sum(p.numel() * 4 for p in net.parameters())
    added_est = est - params
    measured = w.job_peak_bytes
    assert measured > 0
    ratio = added_est / measured
    assert 0.2 < ratio < 5.0, (added_est, measured)


def test_peak_watcher_check_raises_over_limit():
    with PeakMemoryWatcher("cpu", limit_bytes=1) as w:
        with pytest.raises(BudgetExceeded) as ei:
            w.check()
    assert ei.value.kind == "memory" and ei.value.limit == 1
    with PeakMemoryWatcher("cpu", profile=DeviceProfile(name="big", memory_budget_bytes=2**50)) as w:
        assert w.check() > 0


# ---- profiles -----------------------------------------------------------------------------------


def test_builtin_profiles_load_for_every_class():
    for cls in DEVICE_CLASSES:
        p = builtin_profile(cls)
        assert p.device_class == cls and p.meter == "auto" and p.power_w > 0 and p.sample_hz > 0
    nano = load_profile("jetson-nano")
    assert nano.memory_budget_bytes == 2 * 2**30
    assert nano.round_budget() == RoundBudget(time_s=nano.round_time_s, energy_j=None)
    assert nano.meter_kwargs()["power_w"] == 1.5


def test_profile_file_overrides_class_defaults(tmp_path):
    f = tmp_path / "nano-07.toml"
    f.write_text(
        'device_class = "jetson-nano"\n[budgets]\nmemory_gib = 1.5\nround_energy_j = 900\n'
        '[meter]\nbackend = "estimate"\npower_w = 2.0\n[meter.options]\ninclude_children = false\n'
    )
    p = load_profile(f)
    assert p.name == "nano-07" and p.device_class == "jetson-nano"
    assert p.memory_budget_bytes == int(1.5 * 2**30)
    assert p.round_energy_j == 900.0
    assert p.round_time_s == builtin_profile("jetson-nano").round_time_s  # inherited
    m = p.make_meter()
    assert m.backend == "estimate" and m.power_w == 2.0 and m.include_children is False


def test_profile_rejects_typos(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[budgets]\nround_time = 10\n")
    with pytest.raises(ValueError, match="round_time"):
        load_profile(f)
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "missing.toml")


def test_profile_from_env_and_detection(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sys/firmware/devicetree/base").mkdir(parents=True)
    (root / "sys/firmware/devicetree/base/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(root))
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    assert detect_device_class() == "jetson-agx-orin"
    assert load_profile().device_class == "jetson-agx-orin"
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\ndevice_class = "workstation"\n')
    monkeypatch.setenv("FMTL_EDGE_PROFILE", str(f))
    assert load_profile().name == "x"


def test_peak_watcher_cuda_path_uses_max_memory_allocated(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: calls.append(("reset", i)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: 5000)
    with PeakMemoryWatcher("cuda:1", limit_bytes=4000) as w:
        assert w.is_cuda
        with pytest.raises(BudgetExceeded) as ei:
            w.check()
    assert calls == [("reset", 1)]
    assert w.peak_bytes == 5000 and w.job_peak_bytes == 4900
    assert "cuda:1" in ei.value.message


def test_memory_estimate_falls_back_to_a_real_sample_without_meta_support():
    class NoMeta(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            if x.device.type == "meta":
                raise NotImplementedError("this model cannot run on meta tensors")
            return self.lin(x)

    torch.manual_seed(0)
    weird, plain = NoMeta(), nn.Sequential(nn.Linear(8, 4))
    before = weird.lin.weight.clone()
    assert estimate_job_memory_bytes(weird, (8,), 16) == estimate_job_memory_bytes(plain, (8,), 16)
    assert torch.equal(weird.lin.weight, before)
