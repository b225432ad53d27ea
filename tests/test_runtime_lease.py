"""DeviceLease: exclusive across real processes, released on exit and on crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fmtl_edge.runtime import DeviceBusy, DeviceLease

HOLDER = textwrap.dedent(
    """
    import sys, time
    from fmtl_edge.runtime import DeviceLease
    lease = DeviceLease(sys.argv[1], runtime_dir=sys.argv[2], owner="task-A").acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


def _start_holder(tmp_path, device, hold_s):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, device, str(tmp_path), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_lease_exclusive_across_processes_and_released_on_exit(tmp_path):
    p = _start_holder(tmp_path, "jetson-3", 0.6)
    try:
        with pytest.raises(DeviceBusy) as ei:
            DeviceLease("jetson-3", runtime_dir=tmp_path, timeout_s=0).acquire()
        err = ei.value
        assert err.device_id == "jetson-3"
        assert err.holder.get("pid") == p.pid and err.holder.get("owner") == "task-A"
        assert err.waited_s < 0.5
        assert err.to_dict()["error"] == "DeviceBusy"
        # another device is free
        with DeviceLease("jetson-4", runtime_dir=tmp_path):
            pass
        # waiting long enough gets the lease once the holder exits
        t0 = time.monotonic()
        with DeviceLease("jetson-3", runtime_dir=tmp_path, timeout_s=10) as lease:
            assert lease.held
            assert time.monotonic() - t0 < 9
    finally:
        p.wait(timeout=10)


def test_lease_released_when_holder_is_killed(tmp_path):
    p = _start_holder(tmp_path, "dev", 60)
    try:
        with pytest.raises(DeviceBusy):
            DeviceLease("dev", runtime_dir=tmp_path, timeout_s=0.1).acquire()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        with DeviceLease("dev", runtime_dir=tmp_path, timeout_s=2):
            pass
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_lease_not_reentrant_and_timeout_respected(tmp_path):
    with DeviceLease("d", runtime_dir=tmp_path):
        t0 = time.monotonic()
        with pytest.raises(DeviceBusy):
            DeviceLease("d", runtime_dir=tmp_path, timeout_s=0.2).acquire()
        assert 0.15 <= time.monotonic() - t0 < 2.0
    lease = DeviceLease("d", runtime_dir=tmp_path)
    lease.acquire()
    with pytest.raises(RuntimeError):
        lease.acquire()
    lease.release()
    lease.release()  # idempotent
    with DeviceLease("d", runtime_dir=tmp_path):
        pass


def test_lease_runtime_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path / "rt"))
    lease = DeviceLease("gpu/0 weird id")
    assert lease.path.parent == tmp_path / "rt"
    assert "/" not in lease.path.name[len("device-"):]
    with lease:
        assert lease.path.exists()
