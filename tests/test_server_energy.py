"""fmtl-server decides from the joules its devices meter (issue 21): the energy policy selects the
cheaper device from the executions it has seen, the chance-loss weights come from the devices'
own label statistics, and the devices' energy profiles survive a server restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc")
try:
    import fmtl_server  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("fmtl_server is not importable (pip install .)", allow_module_level=True)

from deploy_helpers import SERVER_TABLE, Proc, agent_cmd, python_path, server_cmd  # noqa: E402
from fmtl_edge.transport.service import free_port  # noqa: E402
from fmtl_server.auth import add_token  # noqa: E402

JOB = """
[job]
name = "energy"
dataset = "digits"
clients = 3
max_samples = 240
methods = ["all-in-one"]
rounds = 5
clients_per_round = 1
width = 4
selection = "energy"
loss_weights = "chance"
dispatch_wait_s = 1.0
""" + SERVER_TABLE

PROFILE = """
name = "scripted-{w}w"
device_class = "generic"
[budgets]
[meter]
backend = "estimate"
power_w = {w}
idle_w = 0.0
"""


def test_the_server_selects_the_cheaper_device_and_keeps_its_profiles(tmp_path):
    (tmp_path / "job.toml").write_text(JOB)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    env = {"FMTL_EDGE_RUNTIME_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    watts = {0: 200.0, 1: 2.0, 2: 200.0}  # client 1's device pays 1/100 of the others' joules per CPU second
    procs = []
    try:
        server = Proc(server_cmd(tmp_path / "job.toml", addr, "--insecure"), tmp_path / "server.log", env=env,
                      cwd=tmp_path)
        procs.append(server)
        for c, w in watts.items():
            prof = tmp_path / f"profile{c}.toml"
            prof.write_text(PROFILE.format(w=w))
            token = add_token(tmp_path / "tokens.txt", f"dev-{c}")
            procs.append(Proc(agent_cmd(addr, f"digits:client={c},clients=3,max-samples=240", f"--token={token}",
                                        "--insecure", "--profile", str(prof), "--lease", f"e-{c}", "--threads", "1",
                                        "--max-backoff-s", "1", "--poll-wait-s", "2"), tmp_path / f"agent{c}.log", env=env))
        assert server.wait(240) == 0, server.text()[-4000:]
    finally:
        for p in procs:
            p.kill()
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    m = res["methods"]["all-in-one"]
    chosen = [h["clients"] for h in m["history"]]
    # every device is tried once (none has a profile), then the one of least predicted joules
    assert sorted(c for (c,) in chosen[:3]) == [0, 1, 2], chosen
    assert [c for (c,) in chosen[3:]] == [1, 1], chosen
    assert res["energy_policy"]["selection"] == "energy"
    assert res["loss_weights"] and sum(res["loss_weights"].values()) == pytest.approx(len(res["tasks"]))
    assert all(v is not None for v in res["chance_loss"].values())
    st = subprocess.run([sys.executable, "-m", "fmtl_server", "status", "--state-dir", str(tmp_path / "state"),
                         "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                        env={**env, "PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin"})
    assert st.returncode == 0, st.stderr
    prof = json.loads(st.stdout)["energy_profiles"]
    devices = {p["device"] for p in prof}
    assert devices == {"dev-0", "dev-1", "dev-2"} and {p["kind"] for p in prof} == {"estimated"}
    cheap = next(p for p in prof if p["device"] == "dev-1")
    dear = next(p for p in prof if p["device"] == "dev-0")
    assert cheap["j_per_pass"] < dear["j_per_pass"] and cheap["n"] >= 3
