"""Jetson power modes: nvpmodel.conf parsing, the current mode, switching only when allowed, and the
guard that restores the original mode (also after SIGINT and SIGTERM) — against a fake nvpmodel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtl_edge.runtime.jetson import JetsonMeter
from fmtl_edge.runtime.power_modes import (
    ENV_NVPMODEL,
    PowerModeControl,
    PowerModeError,
    PowerModeNotAllowed,
    parse_nvpmodel_conf,
    parse_nvpmodel_query,
    query_power_mode,
)
from fmtl_edge.runtime.sysfs import ENV_ROOT, Sysfs
from runtime_fakes import build_jetson, install_fake_nvpmodel

REPO = Path(__file__).resolve().parents[1]

CONF = """\
# a cut-down nvpmodel_p3701_0000.conf
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
CORE_1 /sys/devices/system/cpu/cpu1/online

< PARAM TYPE=CLOCK NAME=GPU >
MAX_FREQ /sys/devices/17000000.ga10b/devfreq/17000000.ga10b/max_freq

# MAXN is the NONE power model to release all constraints
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_1 1
GPU MAX_FREQ -1

< POWER_MODEL ID=1 NAME=MODE_15W >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_1 0
GPU MAX_FREQ 408000000   # Hz

< POWER_MODEL ID=2 NAME=MODE_30W >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_1 1
GPU MAX_FREQ 612000000

< PM_CONFIG DEFAULT=2 >
"""


def test_parse_conf_modes_settings_and_default():
    conf = parse_nvpmodel_conf(CONF)
    assert conf.names == ["MAXN", "MODE_15W", "MODE_30W"]
    assert [m.id for m in conf.modes] == [0, 1, 2]
    assert conf.default_id == 2 and conf.default.name == "MODE_30W"
    m15 = conf.by_name("MODE_15W")
    assert m15.cpu_cores_online == 1 and m15.gpu_max_freq_hz == 408_000_000
    assert conf.by_id(0).gpu_max_freq_hz is None  # -1: uncapped
    assert conf.find("1").name == "MODE_15W" and conf.find(2).name == "MODE_30W"
    with pytest.raises(PowerModeError, match="known: MAXN \\(id 0\\), MODE_15W"):
        conf.find("MODE_99W")
    with pytest.raises(PowerModeError, match="no '< POWER_MODEL"):
        parse_nvpmodel_conf("# nothing here\n< PM_CONFIG DEFAULT=0 >\n")
    with pytest.raises(PowerModeError, match="two power modes with id 0"):
        parse_nvpmodel_conf("< POWER_MODEL ID=0 NAME=A >\n< POWER_MODEL ID=0 NAME=B >\n")


def test_parse_query_output():
    assert parse_nvpmodel_query("NV Fan Mode:quiet\nNV Power Mode: MODE_30W\n2\n") == ("MODE_30W", 2)
    assert parse_nvpmodel_query("NVPM WARN: x\nNV Power Mode: MAXN\n\n0\n") == ("MAXN", 0)
    assert parse_nvpmodel_query("garbage") == (None, None)


@pytest.fixture
def orin(tmp_path, monkeypatch):
    """A fake AGX Orin tree in MODE_30W (id 2) with a fake nvpmodel logging to ``log``."""
    fake = build_jetson(tmp_path / "root", "agx-orin", mode_id=2)
    log = tmp_path / "nvpmodel.log"
    exe = install_fake_nvpmodel(fake, log)
    monkeypatch.setenv(ENV_ROOT, str(fake.root))
    monkeypatch.setenv(ENV_NVPMODEL, str(exe))
    return fake, log


def _calls(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


def _status_id(fake) -> int:
    return int((fake.root / "var/lib/nvpmodel/status").read_text().split()[0].split(":")[1])


def test_current_mode_by_name_from_status_and_command(orin):
    fake, log = orin
    s = Sysfs()
    assert query_power_mode(s, prefer="status").name == "MODE_30W"
    assert _calls(log) == []  # the status file answered: no process started
    assert query_power_mode(s, prefer="command").name == "MODE_30W"
    assert _calls(log) == ["-q"]
    (fake.root / "var/lib/nvpmodel/status").write_text("unreadable\n")
    other = [sys.executable, "-c", "print('NV Power Mode: MAXN'); print(0)"]
    assert query_power_mode(s, prefer="status", command=other).name == "MAXN"  # falls back to nvpmodel -q
    assert query_power_mode(s, prefer="status", command=[]) is None
    ctl = PowerModeControl()
    assert [m.name for m in ctl.modes()] == ["MAXN", "MODE_15W", "MODE_30W", "MODE_50W"]
    assert ctl.available


def test_set_refused_without_allow(orin):
    fake, log = orin
    ctl = PowerModeControl(allow=False)
    with pytest.raises(PowerModeNotAllowed, match="--allow-power-mode"):
        ctl.set("MODE_15W")
    assert not any(c.startswith("-m") for c in _calls(log))
    assert _status_id(fake) == 2


def test_set_calls_nvpmodel_with_the_mode_id(orin):
    fake, log = orin
    lines: list[str] = []
    ctl = PowerModeControl(allow=True, log=lines.append)
    assert ctl.set("MODE_15W").name == "MODE_15W"
    assert "-m 1" in _calls(log) and _status_id(fake) == 1
    assert lines == ["power mode MODE_30W -> MODE_15W"]
    n = len(_calls(log))
    assert ctl.set(1).name == "MODE_15W"  # already there: no -m
    assert not any(c.startswith("-m") for c in _calls(log)[n:])
    with pytest.raises(PowerModeError, match="not in /etc/nvpmodel.conf; known: MAXN"):
        ctl.set("MODE_99W")


def test_failing_nvpmodel_is_a_clear_error(tmp_path, monkeypatch):
    fake = build_jetson(tmp_path / "root", "agx-orin", mode_id=2)
    exe = install_fake_nvpmodel(fake, tmp_path / "log", fail_on=3)
    monkeypatch.setenv(ENV_ROOT, str(fake.root))
    monkeypatch.setenv(ENV_NVPMODEL, str(exe))
    with pytest.raises(PowerModeError, match="exited 1: NVPM ERROR.*needs root"):
        PowerModeControl(allow=True).set("MODE_50W")
    assert _status_id(fake) == 2


def test_no_conf_means_no_modes(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path))
    monkeypatch.delenv(ENV_NVPMODEL, raising=False)
    ctl = PowerModeControl(allow=True)
    assert not ctl.available and ctl.current() is None
    with pytest.raises(PowerModeError, match="no /etc/nvpmodel.conf under"):
        ctl.set("MAXN")


def test_guard_restores_on_exit_and_on_exception(orin):
    fake, log = orin
    ctl = PowerModeControl(allow=True)
    with ctl.guard() as g:
        assert g.original.name == "MODE_30W"
        g.set("MAXN")
        g.set("MODE_15W")
        assert _status_id(fake) == 1
    assert _status_id(fake) == 2
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 0", "-m 1", "-m 2"]
    with pytest.raises(RuntimeError, match="boom"):
        with ctl.guard() as g:
            g.set("MODE_50W")
            raise RuntimeError("boom")
    assert _status_id(fake) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_guard_without_allow_refuses_to_switch(orin):
    fake, log = orin
    with PowerModeControl(allow=False).guard() as g:
        with pytest.raises(PowerModeNotAllowed):
            g.set("MAXN")
        assert not g.switched
    assert _status_id(fake) == 2
    assert not any(c.startswith("-m") for c in _calls(log))


HOLDER = """\
import signal, sys, time
sys.path.insert(0, {repo!r})
from fmtl_edge.runtime.power_modes import PowerModeControl
stop = []
if {chain!r}:
    def on_stop(signum, frame):
        print("STOPPING", signum, flush=True)
        stop.append(signum)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
with PowerModeControl(allow=True).guard() as g:
    g.set("MODE_15W")
    print("READY", flush=True)
    t0 = time.monotonic()
    while not stop and time.monotonic() - t0 < 60:
        time.sleep(0.02)
print("LEFT", flush=True)
"""


@pytest.mark.parametrize("sig,chain", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                       (signal.SIGINT, True), (signal.SIGTERM, True)])
def test_original_mode_restored_after_signal(orin, tmp_path, sig, chain):
    fake, log = orin
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(repo=str(REPO), chain=chain))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ))
    try:
        assert p.stdout.readline().strip() == "READY"
        assert _status_id(fake) == 1
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 1", "-m 2"]  # switched, then restored
    assert _status_id(fake) == 2
    if chain:  # the program's own handler ran, the program left the guard normally
        assert f"STOPPING {int(sig)}" in out and "LEFT" in out and p.returncode == 0
    elif sig == signal.SIGINT:  # KeyboardInterrupt through the `with`
        assert "KeyboardInterrupt" in err and p.returncode != 0 and "LEFT" not in out
    else:  # SIGTERM's default action still ends the process, after the restore
        assert p.returncode == -signal.SIGTERM and "LEFT" not in out


def test_jetson_meter_names_the_mode_after_a_switch(orin):
    fake, _ = orin
    m = JetsonMeter(sysfs_root=str(fake.root))
    m.sampler.start = lambda: None
    assert m.power_mode == "MODE_30W"
    PowerModeControl(allow=True).set("MODE_50W")
    m.refresh_power_mode()
    assert m.power_mode == "MODE_50W"
    with m.window("w") as w:
        time.sleep(0.01)
    assert w.measurement.power_mode == "MODE_50W"
    m.close()



# ---- fmtl-edge profile-modes ----------------------------------------------------------------------

MODE_WATTS = {  # fake AGX Orin rails per mode (sum_of_rails total = the sum)
    0: {"VDD_GPU_SOC": 20.0, "VDD_CPU_CV": 8.0, "VIN_SYS_5V0": 5.0, "VDDQ_VDD2_1V8AO": 2.0},
    1: {"VDD_GPU_SOC": 5.0, "VDD_CPU_CV": 3.0, "VIN_SYS_5V0": 4.0, "VDDQ_VDD2_1V8AO": 1.0},
    2: {"VDD_GPU_SOC": 9.0, "VDD_CPU_CV": 5.0, "VIN_SYS_5V0": 4.0, "VDDQ_VDD2_1V8AO": 1.5},
    3: {"VDD_GPU_SOC": 14.0, "VDD_CPU_CV": 6.0, "VIN_SYS_5V0": 5.0, "VDDQ_VDD2_1V8AO": 2.0},
}


@pytest.fixture
def orin_watts(tmp_path, monkeypatch):
    fake = build_jetson(tmp_path / "root", "agx-orin", mode_id=2, powers=MODE_WATTS[2])
    log = tmp_path / "nvpmodel.log"
    exe = install_fake_nvpmodel(fake, log, mode_watts=MODE_WATTS)
    monkeypatch.setenv(ENV_ROOT, str(fake.root))
    monkeypatch.setenv(ENV_NVPMODEL, str(exe))
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    return fake, log


def _cli(argv):
    from fmtl_edge.cli import main

    return main(argv)


PM_ARGS = ["profile-modes", "--samples", "64", "--warmup-samples", "0", "--settle-s", "0", "--device", "cpu"]


def test_profile_modes_prints_one_row_per_mode_on_fake_agx_orin(orin_watts, capsys):
    fake, log = orin_watts
    assert _cli(PM_ARGS + ["--allow-power-mode", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = rep["modes"]
    assert [r["mode"] for r in rows] == ["MAXN", "MODE_15W", "MODE_30W", "MODE_50W"]
    assert [r["mode_id"] for r in rows] == [0, 1, 2, 3]
    assert rep["meter"]["backend"] == "jetson" and not rep["meter"]["estimated"]
    for r in rows:
        assert r["samples"] == 64 and not r["estimated"] and r["total_scope"] == "sum_of_rails"
        watts = sum(MODE_WATTS[r["mode_id"]].values())
        # the rails' power of that mode x the window's seconds, per sample
        assert r["j_per_sample"] == pytest.approx(watts * r["s_per_sample"], rel=0.02)
        assert r["s_per_sample"] == pytest.approx(r["wall_s"] / 64)
    assert rep["original_mode"] == "MODE_30W" and rep["switched"]
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 0", "-m 1", "-m 2", "-m 3", "-m 2"]
    assert _status_id(fake) == 2  # restored


def test_profile_modes_table_and_selected_modes(orin_watts, capsys):
    assert _cli(PM_ARGS + ["--allow-power-mode", "--modes", "MODE_50W,1"]) == 0
    out = capsys.readouterr().out
    table = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  ") and not ln.strip().startswith("mode")]
    assert table == ["MODE_50W", "MODE_15W"]
    assert "energy measured" in out and "original mode: MODE_30W (restored)" in out
    assert _cli(PM_ARGS + ["--allow-power-mode", "--modes", "MODE_99W"]) == 2
    assert "known: MAXN (id 0)" in capsys.readouterr().err


def test_profile_modes_without_allow_profiles_the_current_mode_and_says_so(orin_watts, capsys):
    fake, log = orin_watts
    assert _cli(PM_ARGS + ["--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["mode"] for r in rep["modes"]] == ["MODE_30W"]
    assert "--allow-power-mode" in rep["note"] and "MODE_15W" in rep["note"]
    assert not rep["switched"]
    assert not any(c.startswith("-m") for c in _calls(log))


def test_profile_modes_labels_estimated_energy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path))  # no Jetson here
    monkeypatch.delenv(ENV_NVPMODEL, raising=False)
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    assert _cli(PM_ARGS + ["--backend", "estimate", "--power-w", "2"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED" in out and out.count("estimated") >= 1
    assert "no nvpmodel power modes" in out
    assert _cli(PM_ARGS + ["--backend", "estimate", "--allow-power-mode"]) == 2
    assert "no /etc/nvpmodel.conf" in capsys.readouterr().err


# ---- the device agent (fmtl-edge join --allow-power-mode) -----------------------------------------

def _agent(allow: bool):
    from fmtl_edge.transport.agent import Agent, AgentOptions, DataSpec

    a = Agent(AgentOptions(server="127.0.0.1:9", token="t", data=DataSpec.parse("digits:client=0,clients=4"),
                           allow_power_mode=allow), log=lambda _m: None)
    a.prepare()
    return a


def test_agent_switches_to_the_assignments_mode_only_when_allowed(orin):
    fake, log = orin
    agent = _agent(allow=True)
    assert agent.meter.backend == "jetson"
    with agent.power_session():
        assert agent.apply_power_mode(None) is None and _status_id(fake) == 2
        assert agent.apply_power_mode("MODE_15W") is None
        assert _status_id(fake) == 1
        energy = {"power_mode": agent.meter.power_mode, "warnings": []}
        agent.note_power_mode(energy, None)
        assert energy == {"power_mode": "MODE_15W", "warnings": []}  # the meter re-read the mode
        why = agent.apply_power_mode("MODE_99W")
        assert "MODE_99W requested but not applied" in why and _status_id(fake) == 1
    assert _status_id(fake) == 2  # the mode found at start, back on exit
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 1", "-m 2"]

    plain = _agent(allow=False)
    with plain.power_session():
        why = plain.apply_power_mode("MODE_15W")
    assert "without --allow-power-mode" in why and _status_id(fake) == 2
    energy = {"power_mode": None, "warnings": []}
    plain.note_power_mode(energy, why)  # a meter that does not read the mode: nvpmodel names it
    assert energy["power_mode"] == "MODE_30W" and energy["warnings"] == [why]
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 1", "-m 2"]


def test_assignment_power_mode_crosses_the_codecs():
    import numpy as np

    from fmtl_edge.messages import Assignment, TrainConfig
    from fmtl_edge.transport.convert import assignment_from_pb, work_to_pb

    a = Assignment("merge", 0, ("t",), {"w": np.zeros(2, np.float32)}, 0.1, TrainConfig(), power_mode="MODE_30W")
    w = work_to_pb("w1", "train", a, {"input_shape": [4], "width": 8}, 10, "", None)
    back = assignment_from_pb(w, a.state)
    from fmtl_edge.transport import fmtl_edge_pb2 as pb

    # the protocol carries it once Work has a power_mode field; until then it arrives as None
    expected = "MODE_30W" if "power_mode" in pb.Work.DESCRIPTOR.fields_by_name else None
    assert back.power_mode == expected
    assert Assignment("j", 0, (), {}, 0.1, TrainConfig()).power_mode is None
    try:
        from fmtl_edge.flower import codec
        from fmtl_edge.models import ModelSpec
    except ImportError:  # the [flower] extra is not installed
        return
    back, _ = codec.decode_assignment(codec.encode_assignment(a, ModelSpec((4,), width=8)))
    assert back.power_mode == "MODE_30W"


JOIN = """\
import sys, time
sys.path.insert(0, {repo!r})
from fmtl_edge.transport import agent as A

def serve(self):  # no server here: take the mode an assignment would ask for, then wait like the agent
    assert self.apply_power_mode("MODE_15W") is None
    print("READY", flush=True)
    while not self.stop.is_set():
        time.sleep(0.02)
    print("STOPPED", flush=True)
    return 0

A.Agent._serve = serve
from fmtl_edge.cli import main
sys.exit(main(["join", "--server", "127.0.0.1:9", "--insecure", "--token", "t",
               "--data", "digits:client=0,clients=4", "--allow-power-mode"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_join_restores_the_mode_after_a_signal(orin, tmp_path, sig):
    fake, log = orin
    script = tmp_path / "join.py"
    script.write_text(JOIN.format(repo=str(REPO)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = p.stdout.readline().strip()
        assert line == "READY", p.stderr.read() if p.poll() is not None else line
        assert _status_id(fake) == 1
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "STOPPED" in out  # join's own stop handler ran (chained by the guard)
    assert f"signal {int(sig)}: stopping" in err and "power mode MODE_30W in effect" in err
    assert [c for c in _calls(log) if c.startswith("-m")] == ["-m 1", "-m 2"]
    assert _status_id(fake) == 2
