"""fmtl-edge on Flower (``fmtl_edge.flower``): records codec, client state, the Grid pool, and the
ServerApp/ClientApp against ``simulate``'s in-process engine.

Default suite: the apps driven through a test grid that hands each message to the real ClientApp
with its node's Context (no Ray), and one run on Flower's Simulation Runtime (Ray backend) of
``mas-2,all-in-one`` on small digits whose final weights must equal the in-process ones bit for bit
(both with one torch thread: Ray gives a 1-CPU actor one thread). Marked slow: ``flwr run`` of the
example app on a local SuperLink against ``fmtl-edge simulate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fmtl_edge.config import ConfigError  # noqa: E402
from fmtl_edge.flower import codec  # noqa: E402
from fmtl_edge.flower.data import simulation_config, split_run_config  # noqa: E402
from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig  # noqa: E402
from fmtl_edge.models import ModelSpec  # noqa: E402

from conftest import assert_same_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: small digits: 4 clients, K = 2, R = 3 (R0 = 1), width 4
SMALL = {"dataset": "digits", "methods": "mas-2,all-in-one", "clients": 4, "rounds": 3, "r0": 1,
         "clients-per-round": 2, "max-samples": 300, "width": 4, "seed": 0, "meter": "null", "lease": "none"}


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message constructor reads the process's task identity (a ServerApp process has one)."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class AppGrid:
    """A Grid for tests: every pushed message goes at once to the real ClientApp with its node's
    own Context (node config ``partition-id``), in this process; ``pull_messages`` hands the
    replies back in the reverse of the push order (the worst arrival order for the pool's in-order
    hand-off). Messages to ``silent`` nodes get no reply. ``tamper(reply, request) -> reply`` may
    change a train reply. Requests and replies are kept for inspection."""

    def __init__(self, client_app, n: int, run_config: dict, node_base: int = 1000, tamper=None, silent=()):
        self.app = client_app
        self.contexts = {node_base + i: Context(run_id=1, node_id=node_base + i,
                                                node_config={"partition-id": i, "num-partitions": n},
                                                state=RecordDict(), run_config=dict(run_config)) for i in range(n)}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.tamper = tamper
        self.silent = set(silent)
        self.in_client = False
        self._waiting: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from uuid import uuid4

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            ids.append(m.metadata.message_id)
            self.sent.append(m)
            if m.metadata.dst_node_id in self.silent:
                continue
            self.in_client = True
            try:
                r = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as e:  # the Flower engine turns a ClientApp exception into an error reply
                r = Message(Error(code=1, reason=repr(e)), reply_to=m)
            finally:
                self.in_client = False
            if self.tamper is not None and m.metadata.message_type == "train" and not r.has_error():
                r = self.tamper(r, m)
            self.replies.append(r)
            self._waiting[m.metadata.message_id] = r
        return ids

    def pull_messages(self, message_ids):
        want = set(message_ids)
        out = [r for mid, r in reversed(list(self._waiting.items())) if mid in want]
        for r in out:
            del self._waiting[r.metadata.reply_to_message_id]
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _inprocess(rc: dict, threads: int | None = None):
    """``simulate``'s engine (simulation.run_simulation) on the same run config."""
    import torch

    from fmtl_edge.data import load_dataset
    from fmtl_edge.simulation import run_simulation

    cfg = simulation_config(rc)
    ds = load_dataset(cfg.dataset, n_clients=cfg.clients, seed=cfg.seed, max_samples=cfg.max_samples)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_simulation(cfg, ds)
    finally:
        torch.set_num_threads(old)


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    d = 0.0
    for m in a:
        assert a[m].keys() == b[m].keys()
        for t in a[m]:
            assert list(a[m][t]) == list(b[m][t])
            for k, v in a[m][t].items():
                assert v.dtype == b[m][t][k].dtype and v.shape == b[m][t][k].shape
                if v.size:
                    d = max(d, float(np.max(np.abs(v.astype(np.float64) - b[m][t][k].astype(np.float64)))))
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process results and models of SMALL (one torch thread), with the device lease in a
    private runtime folder (not waiting for another run on this machine)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path_factory.mktemp("lease")))
    try:
        return _inprocess(SMALL, threads=1)
    finally:
        mp.undo()


# -- codec -----------------------------------------------------------------------------------------
def test_codec_round_trip_keeps_every_bit_and_never_pickles():
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(7, dtype=np.int64),
             "h": rng.normal(size=5).astype(np.float16)}
    a = Assignment(job="merge", round=2, tasks=("a", "b"), state=state, lr=0.0123, config=TrainConfig(batch_size=8),
                   measure_affinity=True, seed=5, time_budget_s=1.5, procedure="ditto", method_config={"lam": 0.1},
                   state_key="ditto/all", personal=("h",), frozen=(), personalised=False)
    back, spec = codec.decode_assignment(codec.encode_assignment(a, ModelSpec((1, 8, 8), width=4)))
    assert spec == ModelSpec((1, 8, 8), width=4)
    for k, v in state.items():
        assert back.state[k].dtype == v.dtype and back.state[k].shape == v.shape
        assert back.state[k].tobytes() == v.tobytes()
    assert (back.job, back.round, back.tasks, back.lr, back.config, back.measure_affinity, back.seed, back.time_budget_s,
            back.energy_budget_j, back.procedure, back.method_config, back.state_key, back.personal) == (
        a.job, a.round, a.tasks, a.lr, a.config, a.measure_affinity, a.seed, a.time_budget_s, a.energy_budget_j,
        a.procedure, a.method_config, a.state_key, a.personal)
    rec = codec.encode_assignment(a, spec)[codec.STATE]
    assert {arr.stype for arr in rec.values()} == {"numpy.ndarray"}
    aff = rng.normal(size=(2, 2))
    u = ClientUpdate(3, "merge", 2, ("a",), {"w": state["w"]}, 40, {"a": 0.5}, aff, 4, 1.25,
                     {"total_j": 2.5, "source": "rapl", "total_scope": "package", "estimated": False},
                     sample_passes=80, lookahead_passes=16)
    ub = codec.decode_update(codec.encode_update(u))
    assert ub.affinity.tobytes() == aff.tobytes()  # float64 through JSON, every bit
    assert (ub.client_id, ub.n_samples, ub.energy["source"], ub.energy["total_j"], ub.sample_passes) == (3, 40, "rapl", 2.5, 80)
    with pytest.raises(ValueError):  # an object array would need pickle: refused
        codec.state_to_record({"x": np.array([{"a": 1}], dtype=object)})


def test_run_config_keys_as_simulate_toml(tmp_path):
    cfg = simulation_config({"dataset": "digits", "clients-per-round": 3, "max_samples": 100, "out": "", "rounds": 9})
    assert (cfg.clients_per_round, cfg.max_samples, cfg.out, cfg.rounds, cfg.r0) == (3, 100, None, 9, 3)
    f = tmp_path / "x.toml"
    f.write_text("width = 4\nrounds = 5\n")
    cfg = simulation_config({"config": str(f), "rounds": 7})
    assert (cfg.width, cfg.rounds) == (4, 7)  # the run config's keys lie over the file's
    with pytest.raises(ConfigError, match="clients-per-round"):
        simulation_config({"clients-per-rnd": 3})
    _, app = split_run_config({"round-timeout-s": 5.0, "rounds": 2})
    assert app["round-timeout-s"] == 5.0 and "rounds" not in app


# -- client state ----------------------------------------------------------------------------------
def test_context_state_store_versions_like_memory_store():
    from fmtl_edge.client_state import MemoryStateStore
    from fmtl_edge.flower.client_app import ContextStateStore

    ctx, mem = ContextStateStore(RecordDict()), MemoryStateStore()
    for r in range(4):
        for s in (ctx, mem):
            s.save("m/j", r, {"p": np.full(3, r, np.float32)})
    for before in range(6):
        a, b = ctx.load("m/j", before), mem.load("m/j", before)
        assert (a is None) == (b is None)
        if a is not None:
            assert a["p"].tobytes() == b["p"].tobytes()
    assert ctx.keys() == ["m/j"]
    assert len([k for k in ctx.state.array_records if k.startswith("fmtl-state:")]) == 2  # the newest two


def test_client_state_stays_in_context_never_in_a_reply():
    """layered with personal heads: the heads live in each node's Context.state and no train reply
    carries them; a reply that does is refused by the pool."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    rc = {**SMALL, "methods": "layered", "rounds": 1, "layers": json.dumps({"personal": ["heads.*"]})}
    grid = AppGrid(make_client_app(), 4, rc)
    results, _, _ = serve(grid, rc, write=False)
    train = [(m, r) for m, r in zip(grid.sent, grid.replies) if m.metadata.message_type == "train"]
    assert train
    for m, r in train:
        personal = codec.decode_assignment(m.content)[0].personal
        assert personal and all(n.startswith("heads.") for n in personal)
        assert not set(r.content.array_records[codec.STATE]) & set(personal)
    stored = [k for c in grid.contexts.values() for k in c.state.array_records if k.startswith("fmtl-state:layered/")]
    assert stored, "the personal layers are kept in Context.state"
    assert results["methods"]["layered"]["personalised_total_test_loss"] is not None

    def leak(reply, request):  # a client that uploads its personal layers
        a = codec.decode_assignment(request.content)[0]
        st = codec.state_from_record(reply.content.array_records[codec.STATE])
        st.update({n: np.asarray(a.state[n]) for n in a.personal})
        reply.content[codec.STATE] = codec.state_to_record(st)
        return reply

    from fmtl_edge.flower.pool import check_update

    a = codec.decode_assignment(train[0][0].content)[0]
    u = codec.decode_update(train[0][1].content)
    u.state = dict(u.state, **{a.personal[0]: np.asarray(a.state[a.personal[0]])})
    assert "client state" in check_update(u.client_id, a, u)
    bad = AppGrid(make_client_app(), 4, rc, tamper=leak)
    from fmtl_edge.plan import RoundFailed

    with pytest.raises(RoundFailed, match="client state"):
        serve(bad, rc, write=False)


# -- the apps against the in-process engine ---------------------------------------------------------
def test_server_app_equals_simulate_and_loads_no_client_data(reference, tmp_path, monkeypatch):
    """The ServerApp + ClientApp give simulate's final weights bit for bit and the same results.json
    layout; the data are loaded only inside ClientApp calls, each node only its own client."""
    import fmtl_edge.flower.data as fdata
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    ref_results, ref_models = reference
    grid = AppGrid(make_client_app(), 4, SMALL)
    loads, served = [], []
    real_load, real_local = fdata._load_partitioned.__wrapped__, fdata.local_data

    def load(key):
        assert grid.in_client, "client data loaded outside a ClientApp call (by the driver)"
        loads.append(key)
        return real_load(key)

    def local(cfg, app, pid):
        served.append(int(pid))
        d = real_local(cfg, app, pid)
        assert d.client.client_id == int(pid)
        return d

    fdata._load_partitioned.cache_clear()
    monkeypatch.setattr(fdata, "_load_partitioned", load)
    monkeypatch.setattr("fmtl_edge.flower.client_app.local_data", local)
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results, models, out = serve(grid, {**SMALL, "out": str(tmp_path / "flower")})
    finally:
        torch.set_num_threads(old)
    assert loads and set(served) == {0, 1, 2, 3}
    assert _max_diff(models, ref_models) == 0.0
    for m, e in results["methods"].items():
        r = ref_results["methods"][m]
        assert e.keys() == r.keys()
        assert e["total_test_loss"] == r["total_test_loss"]
        assert e["splits"] == r["splits"] and e["affinity"] == r["affinity"]
        assert [h["clients"] for h in e["history"]] == [h["clients"] for h in r["history"]]
        assert e["client_executions"] == r["client_executions"]
    assert_same_layout(results, ref_results)
    written = json.loads((out / "results.json").read_text())
    assert written["engine"]["name"] == "flower" and ref_results["engine"]["name"] == "simulate"
    assert (out / "models" / "mas-2").is_dir()
    for m in written["methods"]:
        assert {p.name for p in (out / "models" / m).iterdir()} == {f"{t}.safetensors" for t in ref_models[m]}


def test_personalised_and_ring_methods_equal_simulate(tmp_path, monkeypatch):
    """ditto (p_k in Context.state), loop (a ring: one message per visit, execute_in_turn) and layered
    (personal heads) through the apps: simulate's final weights bit for bit, its personalised
    figures (per client too) and its ``eval-every`` curves."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path))
    import torch

    rc = {**SMALL, "methods": "ditto,loop,layered", "rounds": 2, "layers": json.dumps({"personal": ["heads.*"]}),
          "eval-every": 1}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results, models, _ = serve(AppGrid(make_client_app(), 4, rc), rc, write=False)
    finally:
        torch.set_num_threads(old)
    ref_results, ref_models = _inprocess(rc, threads=1)
    assert _max_diff(models, ref_models) == 0.0
    for m in ("ditto", "loop", "layered"):
        e, r = results["methods"][m], ref_results["methods"][m]
        assert e["personalised_total_test_loss"] == r["personalised_total_test_loss"] is not None
        assert e["per_client"] == r["per_client"]
        assert e["total_test_loss"] == r["total_test_loss"]
        assert e.keys() == r.keys() and e.get("curve") == r.get("curve")
    assert results["methods"]["ditto"]["curve"], "--eval-every's curve is recorded through the Flower pool"


def test_pool_refuses_missing_and_error_replies():
    """A node that does not answer in time, or answers with a Flower error, is a structured
    refusal; the others' updates come back in the work's order."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.pool import FlowerGridPool, query_nodes

    grid = AppGrid(make_client_app(), 4, SMALL)
    infos = query_nodes(grid, grid.get_node_ids(), 10)
    assert sorted(i["client_id"] for i in infos.values()) == [0, 1, 2, 3]
    pool = FlowerGridPool(grid, infos, ModelSpec((1, 8, 8), width=4), timeout_s=0.3)
    grid.silent = {pool.node_of(1)}
    a = Assignment("j", 0, ("digit",), {"x": np.zeros(2, np.float32)}, 0.1, TrainConfig())  # fits no model
    t0 = time.monotonic()
    ups = list(pool.execute_many([(0, a), (1, a), (2, a)]))
    assert [u.client_id for u in ups] == [0, 1, 2]
    assert [u.error["kind"] for u in ups] == ["error", "timeout", "error"]
    assert "lacks" in ups[0].error["message"] and time.monotonic() - t0 < 5


def test_flower_simulation_engine_matches_inprocess(reference):
    """Flower's Simulation Runtime (Ray backend, 4 SuperNodes, 1 CPU per ClientApp actor) gives the
    in-process engine's final weights bit for bit (both on one torch thread) and its losses."""
    from flwr.simulation import run_simulation

    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import make_server_app

    ref_results, ref_models = reference
    sink: dict = {}
    run_simulation(make_server_app(SMALL, sink, write=False), make_client_app(SMALL), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    assert "results" in sink, "the ServerApp did not finish"
    assert _max_diff(sink["models"], ref_models) == 0.0
    for m, e in sink["results"]["methods"].items():
        assert e["total_test_loss"] == ref_results["methods"][m]["total_test_loss"]
    assert sink["results"]["engine"]["nodes"] == 4


# -- flwr run (slow) ---------------------------------------------------------------------------------
def _superlinks(home: Path) -> list[int]:
    """Pids of the flower-superlink / flower-superexec processes using FLWR_HOME ``home``."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        if ("flower-superlink" in cmd or "flower-superexec" in cmd) and f"FLWR_HOME={home}".encode() in env:
            pids.append(int(p.name))
    return pids


@pytest.mark.slow
def test_flwr_run_matches_simulate(tmp_path):
    """``flwr run examples/flower-app local`` on a fresh local SuperLink gives ``fmtl-edge simulate``'s
    final weights bit for bit and its total test losses: each ClientApp actor gets as many CPUs as
    simulate has torch threads (Ray sets an actor's torch threads to its CPUs; other thread counts
    sum floats in another order)."""
    import shutil

    import socket

    if shutil.which("flwr") is None:
        pytest.skip("no flwr command")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 39091)) == 0:
            pytest.skip("a local Flower SuperLink already runs on 127.0.0.1:39091 (this test starts its own)")
    home = tmp_path / "flwr-home"
    cfgfile = tmp_path / "small.toml"
    cfgfile.write_text("max-samples = 300\nwidth = 4\n")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FMTL_EDGE_RUNTIME_DIR": str(tmp_path / "lease")}
    import torch

    over = (f"config='{cfgfile}' rounds=3 r0=1 clients=4 clients-per-round=2 seed=0 meter='null' "
            f"out='{tmp_path / 'flower'}'")
    try:
        subprocess.run(["flwr", "run", str(ROOT / "examples" / "flower-app"), "local", "--stream", "-c", over,
                        "--federation-config",
                        f"num-supernodes=4 client-resources-num-cpus={torch.get_num_threads()}"],
                       env=env, cwd=tmp_path, timeout=600, check=True, capture_output=True)
    finally:
        for pid in _superlinks(home):
            os.kill(pid, 15)
    subprocess.run([sys.executable, "-m", "fmtl_edge.cli", "simulate", "--config", str(cfgfile), "--dataset", "digits",
                    "--methods", "mas-2,all-in-one", "--clients", "4", "--rounds", "3", "--r0", "1",
                    "--clients-per-round", "2", "--meter", "null", "--seed", "0", "--out", str(tmp_path / "sim"),
                    "--no-progress"], check=True, timeout=600, capture_output=True, cwd=tmp_path, env=env)
    sys.path.insert(0, str(ROOT))
    from bench.flower_scale import compare

    c = compare(str(tmp_path / "flower"), str(tmp_path / "sim"))
    assert c["tensors"] > 0 and c["max_abs_diff"] == 0.0
    for m, (a, b) in ((m, v["total_test_loss"]) for m, v in c["methods"].items()):
        assert a == b
    ra = json.loads((tmp_path / "flower" / "results.json").read_text())
    rb = json.loads((tmp_path / "sim" / "results.json").read_text())
    assert_same_layout(ra, rb)
