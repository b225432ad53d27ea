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
def _data_cache(tmp_path, monkeypatch):
    """Each test's ClientApps keep their data cache in the test's own folder."""
    monkeypatch.setenv("FMTL_EDGE_CACHE_DIR", str(tmp_path / "data-cache"))


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
            if m.metadata.dst_node_id in self.silent or m.metadata.dst_node_id not in self.contexts:
                continue  # a silent or gone node: no reply (the pool's timeout)
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

    def local(cfg, app, pid, cache=None):
        served.append(int(pid))
        d = real_local(cfg, app, pid, cache)
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


def test_flower_nodes_train_the_users_network_as_simulate_does(tmp_path, monkeypatch):
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    from test_model_deploy import _factory

    monkeypatch.syspath_prepend(str(_factory(tmp_path / "a", 6)))
    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path / "lease"))
    rc = {**SMALL, "model": "usernet:build", "threads": "1"}
    ref_results, ref_models = _inprocess(rc, threads=1)
    results, models, _ = serve(AppGrid(make_client_app(), 4, rc), rc, write=False)
    assert _max_diff(models, ref_models) == 0.0
    assert all("backbone.0.weight" in s for m in models.values() for s in m.values())
    assert np.shape(next(iter(models["mas-2"].values()))["backbone.0.weight"])[0] == 6
    for m in results["methods"]:
        assert results["methods"][m]["total_test_loss"] == ref_results["methods"][m]["total_test_loss"]


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


# -- clients and nodes (issue 23, item 4) -----------------------------------------------------------
def test_choose_nodes_is_seeded_and_refuses_more_clients_than_nodes():
    from fmtl_edge.flower.pool import choose_nodes

    parts = {100 + i: p for i, p in enumerate([3, 0, 5, 1, 4, 2])}  # node id → partition-id
    every = choose_nodes(parts, None, 0)
    assert every == choose_nodes(parts, 6, 7) == {i: n for i, n in enumerate(sorted(parts, key=parts.get))}
    a, b = choose_nodes(parts, 3, 0), choose_nodes(parts, 3, 0)
    assert a == b and len(set(a.values())) == 3 and sorted(a) == [0, 1, 2]
    assert [parts[n] for n in a.values()] == sorted(parts[n] for n in a.values())  # client i: i-th partition-id
    assert {tuple(choose_nodes(parts, 3, s).values()) for s in range(8)} != {tuple(a.values())}  # the seed matters
    with pytest.raises(ConfigError, match="clients.*start more SuperNodes"):
        choose_nodes(parts, 7, 0)


def test_fewer_clients_than_nodes(tmp_path):
    """clients = 2 on 4 nodes: two nodes, chosen by the seed, serve clients 0 and 1 of a 2-client
    split (the message names the client); the others get no train message."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    rc = {**SMALL, "methods": "all-in-one", "clients": 2, "clients-per-round": 2, "rounds": 2}
    grid = AppGrid(make_client_app(), 4, rc)
    results, _, _ = serve(grid, rc, write=False)
    used = results["engine"]["client_partition_ids"]
    assert sorted(used) == ["0", "1"] and len(set(used.values())) == 2 and results["engine"]["nodes"] == 4
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    by_node = {m.metadata.dst_node_id: codec.client_of(m.content) for m in train}
    assert sorted(by_node.values()) == [0, 1] and len(by_node) == 2
    assert {grid.contexts[n].node_config["partition-id"]: c for n, c in by_node.items()} == {
        p: int(c) for c, p in used.items()}
    assert results["clients"] == 2 and all(len(h["clients"]) == 2 for h in results["methods"]["all-in-one"]["history"])
    again, _, _ = serve(AppGrid(make_client_app(), 4, rc), rc, write=False)
    assert again["engine"]["client_partition_ids"] == used  # the same seed: the same nodes


def test_app_keys_per_run_and_in_the_config_file(tmp_path):
    """Every app key is listed in the example app (so `flwr run -c` accepts it), can be set in the
    `config` file, and the run config wins; a bad value or an unknown key is named with the fix."""
    import tomllib

    from fmtl_edge.flower.data import APP_KEYS

    app_cfg = tomllib.loads((ROOT / "examples" / "flower-app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(APP_KEYS) <= set(app_cfg), f"not settable with flwr run -c: {sorted(set(APP_KEYS) - set(app_cfg))}"
    f = tmp_path / "run.toml"
    f.write_text('rounds = 4\nnodes-wait-s = 5.0\nlease = "none"\noverwrite = false\nround_timeout_s = 9\n')
    sim, app = split_run_config({"config": str(f), "nodes-wait-s": "", "lease": "gpu0", "rounds": 2})
    assert (app["nodes-wait-s"], app["lease"], app["overwrite"], app["round-timeout-s"]) == (5.0, "gpu0", False, 9.0)
    assert "nodes-wait-s" not in sim and sim["rounds"] == 2
    cfg = simulation_config({"config": str(f), "dataset": "digits"})
    assert cfg.rounds == 4  # the file's simulate keys still apply beside its app keys
    with pytest.raises(ConfigError, match="nodes-wait-s.*number"):
        split_run_config({"nodes-wait-s": "soon"})
    with pytest.raises(ConfigError, match="round-timeout-s.*> 0"):
        split_run_config({"round-timeout-s": 0})
    with pytest.raises(ConfigError, match="nodes-wiat-s.*did you mean nodes-wait-s"):
        simulation_config({"nodes-wiat-s": 3})
    f.write_text("nodes-wiat-s = 3\n")
    with pytest.raises(ConfigError, match="nodes-wiat-s.*did you mean nodes-wait-s"):
        simulation_config({"config": str(f)})


def test_reconnected_node_serves_its_client_again():
    """A SuperNode that dies after round 1 and comes back (a new node id, the same partition-id)
    serves its client again from the next round on."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    rc = {**SMALL, "methods": "all-in-one", "rounds": 3, "clients-per-round": 4, "round-timeout-s": 1.0}

    class Reconnect(AppGrid):
        def push_messages(self, messages):
            trains = [m for m in self.sent if m.metadata.message_type == "train"]
            if len(trains) == 4 and 1001 in self.contexts:  # after round 1: node 1001 restarts as 2001
                old = self.contexts.pop(1001)
                self.contexts[2001] = Context(run_id=1, node_id=2001, node_config=dict(old.node_config),
                                              state=RecordDict(), run_config=dict(old.run_config))
            return super().push_messages(messages)

    grid = Reconnect(make_client_app(), 4, rc)
    results, _, _ = serve(grid, rc, write=False)
    assert results["engine"]["clients_remapped"] == [[1, 1001, 2001]]
    assert [sorted(h["clients"]) for h in results["methods"]["all-in-one"]["history"]] == [[0, 1, 2, 3]] * 3
    assert not [m for m in grid.sent if m.metadata.dst_node_id == 1001 and m.metadata.message_type == "train"][4:]


# -- faults and checks (items 5, 6) -------------------------------------------------------------------
def test_evaluation_lists_the_clients_that_did_not_answer(caplog):
    """A node silent at evaluation time: the final evaluation covers the others, and the pool says
    which clients are missing (logged, and in last_evaluation)."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    rc = {**SMALL, "methods": "all-in-one", "rounds": 1, "round-timeout-s": 0.5}

    class DeadAtEvaluation(AppGrid):
        def push_messages(self, messages):
            if any(m.metadata.message_type == "evaluate" for m in messages):
                self.silent = {1002}
            return super().push_messages(messages)

    import logging

    with caplog.at_level(logging.WARNING, logger="fmtl_edge.flower"):
        serve(DeadAtEvaluation(make_client_app(), 4, rc), rc, write=False)
    assert any("evaluation reached 3 of 4 clients" in r.getMessage() and "client 2" in r.getMessage()
               for r in caplog.records)

    from fmtl_edge.flower.pool import FlowerGridPool, query_nodes

    grid = AppGrid(make_client_app(), 4, SMALL)
    pool = FlowerGridPool(grid, query_nodes(grid, grid.get_node_ids(), 10), ModelSpec((1, 8, 8), width=4), timeout_s=0.3)
    grid.silent = {pool.node_of(3)}
    a = Assignment("j", 0, ("digit",), {"x": np.zeros(2, np.float32)}, 0.1, TrainConfig())  # fits no model: errors
    assert pool.evaluate([(0, a), (3, a)]) == {}
    ev = pool.last_evaluation
    assert ev["asked"] == [0, 3] and ev["answered"] == [] and sorted(ev["missing"]) == [0, 3]
    assert "no reply" in ev["missing"][3]


def _one_update():
    """A real train request/reply pair through the ClientApp (digits, all-in-one)."""
    from fmtl_edge.flower.client_app import make_client_app
    from fmtl_edge.flower.server_app import serve

    rc = {**SMALL, "methods": "all-in-one", "rounds": 1}
    grid = AppGrid(make_client_app(), 4, rc)
    serve(grid, rc, write=False)
    m, r = next((m, r) for m, r in zip(grid.sent, grid.replies) if m.metadata.message_type == "train")
    return codec.decode_assignment(m.content)[0], codec.decode_update(r.content)


def test_pool_applies_fmtl_server_update_checks():
    """check_update: the norm bound, the sample-count bound and the resource figures, as
    fmtl-server's validation (the same functions), besides the echo/name/shape checks."""
    from fmtl_edge.flower.pool import check_update
    from fmtl_edge.transport.validation import Limits

    a, u = _one_update()
    cid = u.client_id
    assert check_update(cid, a, u, n_train=u.n_samples) is None

    def changed(**kw):
        import copy

        v = copy.deepcopy(u)
        for k, val in kw.items():
            setattr(v, k, val)
        return v

    far = {k: (np.asarray(v) + np.float32(100.0) if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
           for k, v in u.state.items()}
    assert "norm bound" in check_update(cid, a, changed(state=far))
    assert "max-update-norm-ratio" in check_update(cid, a, changed(state=far))
    assert check_update(cid, a, changed(state=far), limits=Limits(max_update_norm_ratio=1e6)) is None
    nan = dict(u.state)
    k0 = next(k for k, v in nan.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and np.asarray(v).size)
    nan[k0] = np.full_like(nan[k0], np.nan)
    assert "NaN" in check_update(cid, a, changed(state=nan))
    assert "n_samples" in check_update(cid, a, changed(n_samples=u.n_samples + 1), n_train=u.n_samples)
    assert "n_samples" in check_update(cid, a, changed(n_samples=-1))
    assert "device_s" in check_update(cid, a, changed(device_s=float("inf")))
    assert "energy_json['total_j']" in check_update(cid, a, changed(energy={"total_j": -1.0, "source": "x"}))
    assert "train_loss" in check_update(cid, a, changed(train_loss={t: float("nan") for t in u.train_loss}))
    capped = changed()
    assert check_update(cid, a, capped, limits=Limits(max_client_samples=3)) is None and capped.n_samples == 3


def test_example_app_meters_energy_by_default():
    import tomllib

    app_cfg = tomllib.loads((ROOT / "examples" / "flower-app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg["meter"] == "auto"
    assert simulation_config(app_cfg).meter == "auto"


# -- the data cache (item 3) ----------------------------------------------------------------------------
def test_data_partition_cached_on_disk_keyed_by_the_settings(tmp_path, monkeypatch):
    """A node's client data is read from its cache file after the first load (the data set is not
    loaded and partitioned again), bit for bit and with the same memory layout; other settings are
    another entry; a torn file is made again."""
    import fmtl_edge.flower.data as fdata

    loads = []
    real = fdata._load_partitioned.__wrapped__
    monkeypatch.setattr(fdata, "_load_partitioned", lambda key: loads.append(key) or real(key))
    cfg = simulation_config(SMALL)
    _, app = split_run_config(SMALL)
    first = fdata.local_data(cfg, app, 2, tmp_path)
    again = fdata.local_data(cfg, app, 2, tmp_path)
    assert len(loads) == 1
    for x, y in [(first.client.x_train, again.client.x_train), (first.client.x_test, again.client.x_test),
                 *[(first.client.y_train[t], again.client.y_train[t]) for t in first.client.y_train]]:
        assert x.dtype == y.dtype and x.shape == y.shape and x.strides == y.strides and x.tobytes() == y.tobytes()
    assert (again.name, again.n_clients, again.tasks, again.input_shape) == (first.name, 4, first.tasks, first.input_shape)
    fdata.local_data(simulation_config({**SMALL, "seed": 1}), app, 2, tmp_path)
    assert len(loads) == 2  # another seed: another partition
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(f.read_bytes()[:50])
    fdata.local_data(cfg, app, 2, tmp_path)
    assert len(loads) == 3
    fdata.local_data(cfg, app, 2, None)
    assert len(loads) == 4  # no cache folder: loaded (the process's own lru cache aside)


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
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FMTL_EDGE_RUNTIME_DIR": str(tmp_path / "lease"),
           "PYTHONPATH": _package_env(tmp_path)["PYTHONPATH"]}  # the fmtl_edge this test imports
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


# -- the deployment guide (item 2) -------------------------------------------------------------------------
def _deploy():
    sys.path.insert(0, str(ROOT))
    import bench.flower_deploy as fd

    return fd


def test_the_deployment_guide_holds_the_tested_commands():
    """docs/flower.md gives, verbatim, the commands that bench/flower_deploy.Deployment runs (the
    slow tests below run them): SuperLink, SuperNodes with their own --port and a TOML node config,
    the [superlink.<name>] connection, insecure and with TLS, and the certificate commands."""
    import shlex

    fd = _deploy()
    doc = (ROOT / "docs" / "flower.md").read_text()
    nc = 'state-dir="/var/lib/fmtl/node-{i}"'
    plain = fd.Deployment("/tmp/unused", nodes=2, node_config=nc)
    certs = {"ca": "/etc/fmtl/certs/ca.crt", "cert": "/etc/fmtl/certs/server.pem", "key": "/etc/fmtl/certs/server.key"}
    tls = fd.Deployment("/tmp/unused", nodes=1, certs=certs, node_config=nc)
    for d in (plain, tls):
        for cmd in (d.superlink_command(), *(d.supernode_command(i) for i in range(d.nodes))):
            assert shlex.join(cmd) in doc, shlex.join(cmd)
        assert d.flower_config().strip() in doc
    for cmd in fd.OPENSSL:
        assert cmd in doc
    assert fd.SAN.strip() in doc
    assert "flwr run examples/flower-app fmtl-loopback" in doc and "flwr ls fmtl-loopback --run-id" in doc
    from flwr.supercore.constant import SUPERLINK_UVICORN_DEFAULT_PORT, SUPERNODE_UVICORN_DEFAULT_PORT

    assert (plain.port, plain.node_port) == (SUPERLINK_UVICORN_DEFAULT_PORT, SUPERNODE_UVICORN_DEFAULT_PORT)
    from fmtl_edge.flower import client_app

    assert "--node-config 'partition-id=3 state-dir=\"/var/lib/fmtl\"" in client_app.__doc__.replace("\n", " ")


def _package_env(tmp_path) -> dict:
    """Subprocesses import the fmtl_edge this test imports, with one torch thread, and a private lease
    folder."""
    import fmtl_edge

    pkg = str(Path(fmtl_edge.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([pkg, str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "FMTL_EDGE_RUNTIME_DIR": str(tmp_path / "lease")}


def _free_port_block(n: int) -> int:
    import socket

    for base in range(39400, 39900, 10):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    ok = False
                    break
        if ok:
            return base
    pytest.skip("no free block of loopback ports in 39400..39900")


@pytest.mark.slow
def test_deployment_on_loopback_matches_simulate_and_shows_failures(tmp_path):
    """The guide's insecure deployment (a SuperLink, 2 SuperNodes, `flwr run` through a
    [superlink.<name>] connection) gives `fmtl-edge simulate`'s final weights bit for bit; a run
    whose ServerApp fails still exits 0 from `flwr run`, and `flwr ls` shows it finished:failed."""
    import shutil

    if shutil.which("flower-superlink") is None:
        pytest.skip("no flower-superlink command")
    fd = _deploy()
    env = _package_env(tmp_path)
    small = tmp_path / "small.toml"
    small.write_text("max-samples = 300\nwidth = 4\nthreads = \"1\"\n")  # one intra-op thread on both sides
    settings = (f"config='{small}' dataset='digits' methods='mas-2,all-in-one' clients=2 clients-per-round=2 "
                "rounds=3 r0=1 seed=0 meter='null'")
    port = _free_port_block(3)
    with fd.Deployment(tmp_path / "dep", nodes=2, port=port, node_port=port + 1, env=env,
                       node_config='state-dir="' + str(tmp_path) + '/node-{i}"') as dep:
        code, run_id, out = dep.run(f"{settings} out='{tmp_path / 'flower'}'", timeout_s=900)
        assert code == 0 and run_id, out[-3000:]
        st = dep.status(run_id)
        assert st["status"] == "finished:completed", (st.get("status-details"), out[-3000:])
        bad = tmp_path / "bad.toml"
        bad.write_text("nodes-wiat-s = 3\n")
        code, bad_id, out = dep.run(f"config='{bad}'", timeout_s=300)
        assert code == 0 and bad_id, out[-3000:]  # flwr run carries no exit code of the run
        st = dep.status(bad_id)
        assert st["status"] == "finished:failed" and "did you mean nodes-wait-s" in st["status-details"]
    subprocess.run([sys.executable, "-m", "fmtl_edge.cli", "simulate", "--config", str(small), "--dataset", "digits",
                    "--methods", "mas-2,all-in-one", "--clients", "2", "--rounds", "3", "--r0", "1",
                    "--clients-per-round", "2", "--meter", "null", "--seed", "0", "--out", str(tmp_path / "sim"),
                    "--no-progress"], check=True, timeout=600, capture_output=True, cwd=tmp_path,
                   env={**os.environ, **env})
    from bench.flower_scale import compare

    c = compare(str(tmp_path / "flower"), str(tmp_path / "sim"))
    assert c["tensors"] > 0 and c["max_abs_diff"] == 0.0
    for m, (a, b) in ((m, v["total_test_loss"]) for m, v in c["methods"].items()):
        assert a == b
    assert list((tmp_path / "node-0").glob("data-cache/*.safetensors")), "the node kept its data in its cache"


@pytest.mark.slow
def test_deployment_with_tls(tmp_path):
    """The guide's TLS deployment (certificates from its openssl commands; no --insecure anywhere)
    completes a run."""
    import shutil

    if shutil.which("flower-superlink") is None or shutil.which("openssl") is None:
        pytest.skip("no flower-superlink or openssl command")
    fd = _deploy()
    certs = fd.make_certificates(tmp_path / "certs")
    small = tmp_path / "small.toml"
    small.write_text("max-samples = 300\nwidth = 4\n")
    port = _free_port_block(3)
    with fd.Deployment(tmp_path / "dep", nodes=2, port=port, node_port=port + 1, certs=certs,
                       env=_package_env(tmp_path)) as dep:
        assert "--insecure" not in dep.superlink_command() + dep.supernode_command(0)
        code, run_id, out = dep.run(f"config='{small}' dataset='digits' methods='all-in-one' clients=2 "
                                    f"clients-per-round=2 rounds=1 meter='null' out='{tmp_path / 'out'}'", timeout_s=600)
        assert code == 0 and run_id, out[-3000:]
        st = dep.status(run_id)
        assert st["status"] == "finished:completed", (st.get("status-details"), out[-3000:])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["engine"]["nodes"] == 2
