"""End to end on loopback: a real ``fmtl-server serve`` process and several ``fmtl-edge join`` agent
processes (one client of the ``digits`` partition each), bounded in time.

- a small MAS job completes over TLS with per-device tokens, and gives bit for bit the weights of
  the in-process simulation with the same seed; a wrong token is refused; status works;
- NaN and wrong-shape updates are rejected with a reason while the job goes on;
- an agent killed mid-round is replaced and the round completes;
- the server killed with SIGKILL mid-job resumes when started again and ends with the simulation's
  weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout: the server package lives in server/
    sys.path.insert(0, str(ROOT / "server"))

from fmtl_edge.transport.service import free_port  # noqa: E402
from deploy_helpers import (  # noqa: E402
    SERVER_TABLE, LoopbackDeployment, Proc, agent_cmd, deployment_fixture, python_path, server_cmd, wait_until,
)
from fmtl_server.auth import add_token  # noqa: E402

from conftest import assert_same_layout  # noqa: E402

CLIENTS, MAX_SAMPLES, WIDTH = 4, 320, 4
JOB = """
[job]
name = "it"
dataset = "{dataset}"
clients = {clients}
max_samples = {max_samples}
methods = ["mas-2"]
rounds = {rounds}
r0 = 1
clients_per_round = 2
width = {width}
dispatch_wait_s = 1.0
{extra}
""" + SERVER_TABLE


class Deployment(LoopbackDeployment):
    def __init__(self, tmp: Path, rounds: int = 3, extra: str = "", tls: bool = False, dataset: str = "digits",
                 clients: int = CLIENTS, max_samples: int = MAX_SAMPLES, data_dir: str | None = None):
        self.tmp = tmp
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.dataset, self.clients, self.max_samples, self.data_dir = dataset, clients, max_samples, data_dir
        (tmp / "job.toml").write_text(JOB.format(rounds=rounds, extra=extra, dataset=dataset, clients=clients,
                                                 max_samples=max_samples, width=WIDTH))
        self.tokens = {c: add_token(tmp / "tokens.txt", f"agent-{c}") for c in range(clients)}
        self.admin = add_token(tmp / "tokens.txt", "ops", "admin")
        self.tls = tls
        self.sec_server: list[str] = ["--insecure"]
        self.sec_agent: list[str] = ["--insecure"]
        if tls:
            from deploy_helpers import self_signed_cert

            crt, key = self_signed_cert(tmp / "tls", name="server")
            self.sec_server = ["--tls-cert", str(crt), "--tls-key", str(key)]
            self.sec_agent = ["--ca", str(crt)]
        self.env = {"FMTL_EDGE_RUNTIME_DIR": str(tmp / "run"), "FMTL_EDGE_PROFILE": "workstation",
                    "OMP_NUM_THREADS": "1"}
        self.server: Proc | None = None
        self.agents: dict[int, Proc] = {}
        self.procs: list[Proc] = []

    def start_server(self, log: str = "server.log") -> Proc:
        self.server = Proc(server_cmd(self.tmp / "job.toml", self.addr, *self.sec_server), self.tmp / log,
                           env=self.env, cwd=self.tmp)
        self.procs.append(self.server)
        return self.server

    def start_agent(self, c: int, *extra: str, token: str | None = None, log: str | None = None) -> Proc:
        data = f"{self.dataset}:client={c},clients={self.clients},max-samples={self.max_samples}"
        if self.data_dir:
            extra = ("--data-dir", self.data_dir, *extra)
        # one torch thread per agent: several agents share two cores (and the reference uses one too)
        p = Proc(agent_cmd(self.addr, data, f"--token={token or self.tokens[c]}", "--max-backoff-s", "1",
                           "--poll-wait-s", "2", "--lease", f"it-{c}", "--meter", "estimate", "--threads", "1",
                           *self.sec_agent, *extra),
                 self.tmp / (log or f"agent{c}.log"), env=self.env)
        if log is None:
            self.agents[c] = p
        self.procs.append(p)
        return p

    def jobs(self) -> list[tuple]:
        return self.job_rows()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fmtl_server", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": python_path()}, cwd=self.tmp)



deployment = deployment_fixture(Deployment)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    return _simulate(tmp_path_factory)


def _simulate(tmp_path_factory, dataset="digits", clients=CLIENTS, max_samples=MAX_SAMPLES, rounds=3, data_dir=None):
    """The in-process simulation of the same job (reference weights), on one torch thread like the agents."""
    import torch

    from fmtl_edge.config import build_config
    from fmtl_edge.data import load_dataset
    from fmtl_edge.simulation import run_simulation

    cfg = build_config({"dataset": dataset, "data_dir": data_dir, "rounds": rounds, "r0": 1, "max_samples": max_samples,
                        "clients_per_round": 2, "methods": "mas-2", "meter": "null", "clients": clients, "width": WIDTH})
    ds = load_dataset(dataset, data_dir=data_dir, n_clients=clients, seed=0, max_samples=max_samples)
    threads = torch.get_num_threads()
    old_dir = os.environ.get("FMTL_EDGE_RUNTIME_DIR")
    # a lease of our own: another FL process on this machine must not hold up the reference run
    os.environ["FMTL_EDGE_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("lease"))
    torch.set_num_threads(1)
    try:
        return run_simulation(cfg, ds)
    finally:
        torch.set_num_threads(threads)
        if old_dir is None:
            os.environ.pop("FMTL_EDGE_RUNTIME_DIR", None)
        else:
            os.environ["FMTL_EDGE_RUNTIME_DIR"] = old_dir


def _assert_same_models(out: Path, models: dict) -> None:
    from safetensors.numpy import load_file

    for task, state in models["mas-2"].items():
        got = load_file(str(out / "models" / "mas-2" / f"{task}.safetensors"))
        assert set(got) == set(state)
        for k, v in state.items():
            # (export writes 0-d buffers as shape (1,); values are what matters)
            np.testing.assert_array_equal(got[k].reshape(v.shape), v, err_msg=f"{task}: {k}")


def test_mas_job_over_tls_gives_the_simulations_weights(deployment, simulated):
    pytest.importorskip("cryptography")
    d = deployment(tls=True)
    d.start_server()
    for c in range(CLIENTS - 1):
        d.start_agent(c)
    wrong = d.start_agent(3, token="not-a-token", log="intruder.log")
    assert wrong.wait(60) == 3, wrong.text()  # refused: exits with the auth status
    assert "UNAUTHENTICATED" in wrong.text()
    wait_until(lambda: "refused" in d.server.text() and "invalid bearer token" in d.server.text(), 10,
               "the refusal in the server log", d.procs)
    # live status while the server waits for its fourth device (admin token)
    wait_until(lambda: d.server.text().count("registered as client") >= 3, 60, "three registrations", d.procs)
    st = d.cli("status", "--server", d.addr, "--token", d.admin, "--ca", d.sec_agent[1], "--json")
    assert st.returncode == 0, st.stderr
    live = json.loads(st.stdout)
    assert live["phase"] == "waiting for devices" and sum(x["online"] for x in live["devices"]) == 3
    d.start_agent(CLIENTS - 1)
    res = d.results()
    assert d.server.wait(30) == 0
    m = res["methods"]["mas-2"]
    ref_results, ref_models = simulated
    ref = ref_results["methods"]["mas-2"]
    assert m["splits"] == ref["splits"]
    assert [h["clients"] for h in m["history"]] == [h["clients"] for h in ref["history"]]
    np.testing.assert_allclose(m["affinity"], ref["affinity"], rtol=1e-12)
    assert m["total_test_loss"] == pytest.approx(ref["total_test_loss"], rel=1e-9)
    _assert_same_models(d.tmp / "out", ref_models)
    assert_same_layout(res, ref_results)  # the simulation's layout, key for key
    assert res["clients"] == CLIENTS and res["engine"]["name"] == "fmtl-server" and res["engine"]["devices"]
    assert m["device_s"] > 0 and m["energy_j"] > 0 and m["client_executions"] == ref["client_executions"]
    st = d.cli("status", "--state-dir", str(d.tmp / "state"), "--json")
    assert st.returncode == 0, st.stderr
    after = json.loads(st.stdout)
    assert after["phase"] == "complete" and all(j["done"] for j in after["jobs"])
    assert {x["client_id"] for x in after["devices"]} == set(range(CLIENTS))
    assert all(x["last_device_s"] and x["last_energy_j"] for x in after["devices"] if x["executions"])


def test_nan_and_wrong_shape_updates_are_rejected_and_the_job_goes_on(deployment):
    d = deployment(rounds=2)
    d.start_server()
    d.start_agent(0, "--inject-fault", "nan")
    d.start_agent(1, "--inject-fault", "shape")
    for c in (2, 3):
        d.start_agent(c)
    res = d.results()
    log0, log1 = d.agents[0].text(), d.agents[1].text()
    assert "REJECTED" in log0 and "NaN" in log0, log0[-2000:]
    assert "REJECTED" in log1 and "shape" in log1, log1[-2000:]
    m = res["methods"]["mas-2"]
    assert all(not {0, 1} & set(h["executed_by"]) and len(h["executed_by"]) == 2 for h in m["history"])
    assert np.isfinite(m["total_test_loss"])
    assert res["engine"]["counters"]["updates_rejected"] >= 2
    assert "rejected update of client" in d.server.text()


def test_an_agent_killed_mid_round_is_replaced(deployment):
    d = deployment(rounds=2)
    d.start_server()
    victim = d.start_agent(0, "--inject-fault", "delay:60")
    for c in (1, 2, 3):
        d.start_agent(c)
    # seed 0 samples clients [0, 2] in the merge round: wait until client 0 trained and holds its update
    wait_until(lambda: "fault injection: waiting" in victim.text(), 90, "client 0 busy in a round", d.procs)
    victim.kill(signal.SIGKILL)
    res = d.results()
    srv = d.server.text()
    assert "went silent" in srv and "replaces client 0" in srv
    first = res["methods"]["mas-2"]["history"][0]
    assert first["clients"] == [0, 2] and 0 not in first["executed_by"] and len(first["executed_by"]) == 2


def test_the_server_killed_mid_job_resumes_with_the_same_result(deployment, simulated):
    d = deployment()
    d.start_server()
    for c in range(CLIENTS):
        d.start_agent(c, "--inject-fault", "delay:1.5")  # slower rounds (same updates): the kill lands mid-round
    wait_until(lambda: any(j == "split-0" for j, *_ in d.jobs()), 120, "a split-0 checkpoint", d.procs, poll=0.05)
    d.server.kill(signal.SIGKILL)
    before = {j: (r, done) for j, r, done in d.jobs()}
    assert before["merge"][1] and before["split-0"] == (0, 0), before  # killed inside split-0's second round
    d.start_server("server2.log")
    res = d.results()
    assert d.server.wait(30) == 0
    assert "resuming" in d.server.text()
    ref_results, ref_models = simulated
    assert res["methods"]["mas-2"]["splits"] == ref_results["methods"]["mas-2"]["splits"]
    assert res["methods"]["mas-2"]["total_test_loss"] == pytest.approx(ref_results["methods"]["mas-2"]["total_test_loss"],
                                                                        rel=1e-9)
    _assert_same_models(d.tmp / "out", ref_models)


@pytest.mark.slow
@pytest.mark.data
def test_the_readme_loopback_mas_job_on_utkface(deployment, tmp_path_factory):
    """docs/deployment.md's quick start, smaller: server and two agents on the shared UTKFace images."""
    from conftest import shared_data_dir

    images = shared_data_dir() / "utkface" / "images"
    if not images.is_dir():
        pytest.skip(f"UTKFace images not found at {images}")
    d = deployment(dataset="utkface", clients=2, max_samples=600, data_dir=str(images))
    d.start_server()
    for c in range(2):
        d.start_agent(c)
    res = d.results(timeout=900)
    ref_results, ref_models = _simulate(tmp_path_factory, "utkface", 2, 600, data_dir=str(images))
    assert res["methods"]["mas-2"]["splits"] == ref_results["methods"]["mas-2"]["splits"]
    assert res["methods"]["mas-2"]["total_test_loss"] == pytest.approx(
        ref_results["methods"]["mas-2"]["total_test_loss"], rel=1e-9)
    _assert_same_models(d.tmp / "out", ref_models)
