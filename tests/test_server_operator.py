"""Issue 22 item 6: the server and the agents in their operator's world (full disks, TLS mistakes,
the end of a job, progress, token files, job-file errors), with a real gRPC server on 127.0.0.1
and scripted devices on threads (no training)."""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout
    sys.path.insert(0, str(ROOT / "server"))

from fmtl_edge.methods import make_method  # noqa: E402
from fmtl_edge.models import ModelSpec  # noqa: E402
from fmtl_edge.transport import fmtl_edge_pb2 as pb  # noqa: E402
from fmtl_edge.transport import model_files  # noqa: E402
from fmtl_edge.transport.pool import RemoteClientPool, RoundPolicy  # noqa: E402
from fmtl_edge.transport.service import CoordinatorServicer, TLSConfig, start_server  # noqa: E402
from fmtl_server.config import load_config  # noqa: E402
from fmtl_server.runner import JobServer  # noqa: E402
from fmtl_server.store import Store  # noqa: E402

from test_transport_pool import SPEC, TASKS, TOKENS, ScriptedDevice  # noqa: E402


def _job_server(tmp_path, methods='["all-in-one"]', rounds=2, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "job.toml"
    f.write_text(f'[job]\ndataset = "digits"\nclients = 3\nmethods = {methods}\nrounds = {rounds}\nclients_per_round = 2\n'
                 f'retry_wait_s = 0\nmax_round_retries = 3\nevaluate = false\n{extra}'
                 '[server]\ntokens = "t.txt"\ninsecure = true\nstate_dir = "st"\n')
    srv, job = load_config(f)
    said: list[str] = []
    js = JobServer(srv, job, echo=said.append)
    js.store = Store(tmp_path / "st")
    js.tasks = TASKS
    return js, said


@pytest.fixture
def deployment(tmp_path):
    """A JobServer over a real RemoteClientPool and gRPC service with three scripted devices."""
    made = []

    def make(**job_kw):
        js, said = _job_server(tmp_path / f"j{len(made)}", **job_kw)
        js.pool = RemoteClientPool(tmp_path / f"w{len(made)}", RoundPolicy(heartbeat_timeout_s=3.0, dispatch_wait_s=1.0),
                                   seed=js.job.sim.seed, model_info={"input_shape": [1, 8, 8], "width": 4},
                                   on_round_start=js._on_round_start)
        servicer = CoordinatorServicer(js.pool, TOKENS.get, heartbeat_interval_s=0.2)
        server, port = start_server(servicer, "127.0.0.1:0", None, max_workers=16)
        devs = [ScriptedDevice(f"127.0.0.1:{port}", c) for c in range(3)]
        for d in devs:
            d.start()
        for d in devs:
            assert d.registered.wait(10) and d.error is None, d.error
        made.append((server, js, devs))
        return js, said

    yield make
    for server, js, devs in made:
        for d in devs:
            d.stop.set()
        js.pool.close()
        server.stop(0)
        js.store.close()


# -- a full disk ------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_round_model_fails_the_round_and_the_job_goes_on(deployment, monkeypatch):
    js, said = deployment()
    real = model_files.write_state
    calls = []

    def full_once(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second round's model file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(model_files, "write_state", full_once)
    method = make_method("all-in-one", TASKS, js.job.sim)
    res, _ = js.train([method], SPEC, {"methods": {}})
    hist = res["methods"]["all-in-one"]["history"]
    assert [h["round"] for h in hist] == [0, 1]  # the failed round ran again from the last checkpoint
    assert len(calls) == 3
    failed = [m for m in said if "could not write the round model" in m]
    assert failed and "No space left on device" in failed[0] and "retrying from the last checkpoint" in failed[0]
    st = js.store.status()
    assert st["round_failures"] == 1 and "No space left on device" in st["last_round_failure"]["detail"]
    assert not list((js.pool.work_dir / "models").iterdir())  # nothing half-written left behind


def test_a_full_disk_while_writing_a_checkpoint_fails_the_round_not_the_server(tmp_path, monkeypatch):
    from fmtl_server import store as store_mod

    from test_server_state import Scripted

    js, said = _job_server(tmp_path)
    js.pool = Scripted(3)
    js.pool.round_info = {}
    real = store_mod.write_state
    calls = []

    def full_once(path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(store_mod, "write_state", full_once)
    res, _ = js.train([make_method("all-in-one", TASKS, js.job.sim)], SPEC, {"methods": {}})
    assert len(res["methods"]["all-in-one"]["history"]) == 2
    assert any("could not write the checkpoint" in m and "No space left" in m for m in said)
    assert js.store.status()["round_failures"] == 1


# -- progress, an ETA, the tasks of a split ----------------------------------------------------------------


def test_the_server_names_each_jobs_tasks_and_shows_overall_progress_and_an_eta(deployment):
    js, said = deployment(methods='["mas-2"]', rounds=3, extra="r0 = 1\n")
    phases = []
    set_phase = js._set_phase
    js._set_phase = lambda p: (phases.append(p), set_phase(p))
    method = make_method("mas-2", TASKS, js.job.sim)
    js.train([method], SPEC, {"methods": {}})
    starts = [m for m in said if " starts: tasks " in m]
    assert any("mas-2 merge starts: tasks a, b" in m for m in starts), said
    splits = sorted(m.split("tasks ")[1] for m in starts if "split-" in m)
    assert splits == ["a", "b"]  # two groups of one task each, named when each split starts
    rounds = [m for m in said if " round " in m and "overall" in m]
    assert len(rounds) == method.planned_rounds() == 5
    assert "overall 1/5 rounds (20%), ETA " in rounds[0] and "overall 5/5 rounds (100%)" in rounds[-1]
    st = js.store.status()
    assert st["progress"]["rounds_done"] == 5 and st["progress"]["rounds_planned"] == 5
    assert "training mas-2: 3/5 rounds (60%), ETA " in phases[3]  # what `fmtl-server status` shows meanwhile
    assert st["phase"] == "evaluating mas-2"


def test_progress_eta_extrapolates_this_sessions_seconds_per_round():
    from fmtl_server.progress import Progress

    now = [100.0]
    p = Progress(10, clock=lambda: now[0], wall=lambda: 1000.0)
    p.resumed("a", 3)
    p.resumed("b", 1)
    assert p.eta_s() is None and p.text() == "4/10 rounds (40%)"
    now[0] += 30.0
    p.round_done("b")
    p.round_done("b")  # 2 rounds in 30 s this session: 4 rounds left take 60 s
    assert p.eta_s() == pytest.approx(60.0)
    d = p.as_dict()
    assert d["rounds_done"] == 6 and d["percent"] == 60.0 and d["eta_unix_s"] == pytest.approx(1060.0)
    assert "ETA " in p.text() and "(in 60 s)" in p.text()
    assert p.text(pending=1).startswith("7/10 rounds (70%)")
    p.resumed("b", 3)  # a failed round retried from the last checkpoint: b's committed rounds, not added
    assert p.done == 6


# -- the end of a job, seen from an agent ----------------------------------------------------------------------


def _agent(target, monkeypatch, lines, **opts):
    from fmtl_edge.transport.agent import Agent, AgentOptions, DataSpec

    agent = Agent(AgentOptions(server=target, token="good-0", data=DataSpec("toy", 0), min_backoff_s=0.2,
                               max_backoff_s=0.5, poll_wait_s=1.0, **opts), log=lines.append)
    agent.client = object()
    monkeypatch.setattr(agent, "register_request", lambda: pb.RegisterRequest(
        device=pb.DeviceInfo(hostname="t"),
        data=pb.DataInfo(dataset="toy", client_id=0, n_clients=3, input_shape=[1, 8, 8],
                         tasks=[pb.TaskSpec(name=t, kind="binary", out_dim=1, target_std=1, train_samples=50,
                                            test_samples=10) for t in ("a", "b")])))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("rc", agent.run()), daemon=True)
    th.start()
    return agent, th, box


def test_agents_log_the_end_of_a_job_as_its_end_not_as_a_lost_connection(tmp_path, monkeypatch):
    pool = RemoteClientPool(tmp_path / "w", RoundPolicy(heartbeat_timeout_s=3.0))
    server, port = start_server(CoordinatorServicer(pool, TOKENS.get, heartbeat_interval_s=0.2), "127.0.0.1:0", None,
                                max_workers=8)
    lines: list[str] = []
    agent, th, box = _agent(f"127.0.0.1:{port}", monkeypatch, lines, insecure=True)
    try:
        end = time.monotonic() + 10
        while not any("registered with" in m for m in lines) and time.monotonic() < end:
            time.sleep(0.05)
        pool.close("job 'demo' is complete (out/results.json)", job_complete=True)
        time.sleep(0.5)
        server.stop(0)  # the server is gone: the agent keeps waiting for the next job, quietly
        time.sleep(2.0)
    finally:
        agent.stop.set()
        th.join(10)
        server.stop(0)
    text = "\n".join(lines)
    assert "the job is complete: job 'demo' is complete (out/results.json); waiting for its next job" in text, text
    assert "no connection" not in text, text
    assert box.get("rc") == 0


# -- TLS mistakes -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    pytest.importorskip("cryptography")
    from deploy_helpers import self_signed_cert

    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("server_tls, agent_opts, fix", [
    (True, {}, "--ca FILE"),                              # a self-signed server, no --ca
    (True, {"insecure": True}, "drop --insecure"),        # plaintext against a TLS server
    (False, {"ca": "CERT"}, "join with --insecure as well"),  # TLS against a plaintext server
    (True, {"ca": "CERT", "server_name": "elsewhere"}, "--server-name"),
])
def test_an_agent_with_a_tls_mistake_exits_naming_the_fix(tmp_path, monkeypatch, tls_files, server_tls, agent_opts,
                                                          fix):
    from fmtl_edge.transport.agent import EXIT_TLS

    crt, key = tls_files
    pool = RemoteClientPool(tmp_path / "w")
    server, port = start_server(CoordinatorServicer(pool, TOKENS.get), "127.0.0.1:0",
                                TLSConfig(crt, key) if server_tls else None, max_workers=4)
    opts = {k: (str(crt) if v == "CERT" else v) for k, v in agent_opts.items()}
    lines: list[str] = []
    try:
        agent, th, box = _agent(f"127.0.0.1:{port}", monkeypatch, lines, **opts)
        th.join(20)
        agent.stop.set()
        assert not th.is_alive(), f"the agent kept retrying: {lines}"
    finally:
        server.stop(0)
        pool.close()
    assert box.get("rc") == EXIT_TLS and len([m for m in lines if "cannot connect" in m]) == 1, lines
    assert fix in lines[-1], lines


def test_a_server_that_is_down_is_not_mistaken_for_a_tls_mistake():
    from fmtl_edge.transport.agent import AgentOptions, DataSpec, tls_mistake

    o = AgentOptions(server="127.0.0.1:1", token="t", data=DataSpec("toy", 0), insecure=True)
    down = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote "
            "host: Connection refused")
    assert tls_mistake(down, o) is None
    assert tls_mistake("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
                       o, probe=lambda target: None) is None  # nothing answers a TLS handshake there either


# -- token files ------------------------------------------------------------------------------------------------


def test_token_add_writes_the_tokens_file_readable_by_its_owner_only(tmp_path, capsys):
    from fmtl_server.cli import main

    p = tmp_path / "tokens.txt"
    assert main(["token", "add", "jetson-1", "--tokens", str(p)]) == 0
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    p.chmod(0o644)  # an existing file with loose permissions is tightened on the next add
    assert main(["token", "add", "jetson-2", "--tokens", str(p)]) == 0
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert len(p.read_text().splitlines()) == 2


# -- the job file and serve --help ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, where, near", [
    ('[job]\nrouns = 5\n[server]\ninsecure = true\n', "[job] rouns", "'rounds'"),
    ('[job]\nclients_per_rond = 2\n[server]\ninsecure = true\n', "[job] clients_per_rond", "'clients_per_round'"),
    ('[job]\nmax_update_norm_multipl = 2\n[server]\ninsecure = true\n', "[job]", "'max_update_norm_multiple'"),
    ('[job]\n[server]\ninsecure = true\nheartbeat_interval = 1\n', "[server] heartbeat_interval",
     "'heartbeat_interval_s'"),
    ('[job]\n[servr]\ninsecure = true\n', "--config", "[server]"),
])
def test_job_file_errors_suggest_the_nearest_key_and_do_not_list_every_key(tmp_path, text, where, near):
    from fmtl_edge.config import ConfigError

    f = tmp_path / "job.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert where in msg and f"did you mean {near}" in msg, msg
    assert len(msg) < 200 and "known keys" not in msg and "wait_for_devices" not in msg, msg


def test_serve_help_lists_every_method_it_accepts(capsys):
    from fmtl_edge.methods import METHODS
    from fmtl_server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    listed = out.split("methods ([job] methods")[1]
    for cls in METHODS.values():
        if cls.pooled_data:
            assert f"({cls.name}: a reference on pooled data, fmtl-edge simulate only)" in listed
        else:
            assert f"\n  {cls.name} " in listed, cls.name
