"""Client state in a deployment: personal layers and Ditto's personal models stay on the devices.

- over the real gRPC transport (a ``fmtl-server serve`` process that records every upload it
  receives, ``fmtl-edge join`` agents on loopback, ``digits``): a ``layered`` job with personal heads
  and a ``ditto`` job complete; no upload carries a personal tensor (by name) nor the bytes of any
  tensor the agents keep in their state folders; the agents' folders hold the heads and p_k; the
  results equal the in-process simulation's, per client;
- the server refuses an update that carries a personal tensor, naming it (a raw device over gRPC);
- a corrupt client-state file is logged, deleted, and the client trains that state afresh;
- the server killed with SIGKILL mid-job (after a device has already written its state for the
  round being killed) resumes with the same command and ends with the simulation's per-client
  losses and global models.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout: the server package lives in server/
    sys.path.insert(0, str(ROOT / "server"))

from deploy_helpers import SERVER_TABLE, LoopbackDeployment, Proc, agent_cmd, deployment_fixture, wait_until  # noqa: E402
from fmtl_edge.transport.service import free_port  # noqa: E402
from fmtl_server.auth import add_token  # noqa: E402

CLIENTS, MAX_SAMPLES, WIDTH, ROUNDS, K = 4, 320, 4, 3, 2
PERSONAL = ["heads.*"]

JOB = """
[job]
name = "cs"
dataset = "digits"
clients = {clients}
max_samples = {max_samples}
methods = {methods}
rounds = {rounds}
clients_per_round = {k}
width = {width}
dispatch_wait_s = 1.0
layers = {{personal = {personal}}}
""" + SERVER_TABLE

# The server under test, with every received upload copied aside before validation sees it (the
# server deletes its incoming files once used): what left the devices, byte for byte.
RECORDING_SERVER = """
import os, shutil, sys
from pathlib import Path

from fmtl_edge.transport.uploads import Uploads

rec = Path(os.environ["FMTL_TEST_UPLOADS"])
rec.mkdir(parents=True, exist_ok=True)
_finish = Uploads.finish


def finish(self, item, meta, path):
    if path is not None:
        a = item.slot.assignment
        shutil.copyfile(path, rec / f"{a.job}-r{a.round}-c{item.client_id}-{item.work_id}-{os.getpid()}.safetensors")
    return _finish(self, item, meta, path)


Uploads.finish = finish

from fmtl_server.cli import main

sys.exit(main())
"""


class Deployment(LoopbackDeployment):
    """A recording server process and one agent process per client, each agent with its own work folder."""

    def __init__(self, tmp: Path, methods: list[str], rounds: int = ROUNDS):
        self.tmp = tmp
        self.addr = f"127.0.0.1:{free_port()}"
        (tmp / "job.toml").write_text(JOB.format(clients=CLIENTS, max_samples=MAX_SAMPLES, methods=json.dumps(methods),
                                                 rounds=rounds, k=K, width=WIDTH, personal=json.dumps(PERSONAL)))
        (tmp / "recording_server.py").write_text(RECORDING_SERVER)
        self.uploads = tmp / "uploads"
        self.tokens = {c: add_token(tmp / "tokens.txt", f"agent-{c}") for c in range(CLIENTS)}
        self.env = {"FMTL_EDGE_RUNTIME_DIR": str(tmp / "run"), "FMTL_EDGE_PROFILE": "workstation",
                    "OMP_NUM_THREADS": "1", "FMTL_TEST_UPLOADS": str(self.uploads)}
        self.server: Proc | None = None
        self.agents: dict[int, Proc] = {}
        self.procs: list[Proc] = []

    def work_dir(self, c: int) -> Path:
        return self.tmp / f"agent{c}-work"

    def state_dir(self, c: int, key: str) -> Path:
        """The agent's client-state folder of ``key`` (``<method>/<job>``, as FolderStateStore names it)."""
        return self.work_dir(c) / "state" / f"client-{c}" / key.replace("/", "_")

    def start_server(self, log: str = "server.log") -> Proc:
        cmd = [sys.executable, str(self.tmp / "recording_server.py"), "serve", "--config", str(self.tmp / "job.toml"),
               "--listen", self.addr, "--insecure"]
        self.server = Proc(cmd, self.tmp / log, env=self.env, cwd=self.tmp)
        self.procs.append(self.server)
        return self.server

    def start_agent(self, c: int, *extra: str) -> Proc:
        data = f"digits:client={c},clients={CLIENTS},max-samples={MAX_SAMPLES}"
        p = Proc(agent_cmd(self.addr, data, f"--token={self.tokens[c]}", "--max-backoff-s", "1", "--poll-wait-s", "2",
                           "--lease", f"cs-{c}", "--meter", "estimate", "--threads", "1", "--insecure",
                           "--work-dir", str(self.work_dir(c)), *extra),
                 self.tmp / f"agent{c}.log", env=self.env)
        self.agents[c] = p
        self.procs.append(p)
        return p

    def jobs(self) -> dict[str, tuple]:
        return {j: (r, done) for j, r, done in self.job_rows()}


deployment = deployment_fixture(Deployment)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """The in-process simulation of the same jobs (one torch thread, like the agents): (results,
    exported models, method → job → final global state)."""
    import torch

    from fmtl_edge.config import build_config
    from fmtl_edge.coordinator import Coordinator
    from fmtl_edge.data import load_dataset
    from fmtl_edge.simulation import run_simulation

    cfg = build_config({"dataset": "digits", "rounds": ROUNDS, "max_samples": MAX_SAMPLES, "clients_per_round": K,
                        "methods": "layered,ditto", "meter": "null", "clients": CLIENTS, "width": WIDTH,
                        "layers": {"personal": PERSONAL}})
    ds = load_dataset("digits", n_clients=CLIENTS, seed=0, max_samples=MAX_SAMPLES)
    threads = torch.get_num_threads()
    old_dir = os.environ.get("FMTL_EDGE_RUNTIME_DIR")
    os.environ["FMTL_EDGE_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("lease"))
    torch.set_num_threads(1)
    finals: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    run_method = Coordinator.run_method

    def recording(self, method, *a, **kw):  # the final global state of every job (layered exports no model)
        done = run_method(self, method, *a, **kw)
        finals[method.name] = {j: {k: np.array(v, copy=True) for k, v in o.state.items()} for j, o in done.items()}
        return done

    Coordinator.run_method = recording
    try:
        results, models = run_simulation(cfg, ds)
        return results, models, finals
    finally:
        Coordinator.run_method = run_method
        torch.set_num_threads(threads)
        if old_dir is None:
            os.environ.pop("FMTL_EDGE_RUNTIME_DIR", None)
        else:
            os.environ["FMTL_EDGE_RUNTIME_DIR"] = old_dir


def _stored_versions(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {int(p.stem[1:]): load_file(str(p)) for p in sorted(folder.glob("r*.safetensors"))}


def _assert_same_per_client(got: dict, ref: dict) -> None:
    assert got["personalised_total_test_loss"] == pytest.approx(ref["personalised_total_test_loss"], rel=1e-9)
    assert set(got["per_client"]) == set(ref["per_client"]) == {str(c) for c in range(CLIENTS)}
    for c, tasks in ref["per_client"].items():
        assert set(got["per_client"][c]) == set(tasks)
        for t, v in tasks.items():
            g = got["per_client"][c][t]
            assert g["n"] == v["n"] > 0
            assert g["test_loss"] == pytest.approx(v["test_loss"], rel=1e-9), f"client {c} task {t}"


def _assert_same_final_state(state_dir: Path, method: str, job: str, finals: dict) -> None:
    """The server's checkpoint of the job's last round equals the simulation's final global state."""
    from safetensors.numpy import load_file

    ref = finals[method][job]
    ckpts = sorted((state_dir / "checkpoints" / method).glob(f"{job}.r*.safetensors"))
    assert ckpts, f"no checkpoint of {method}/{job}"
    assert ckpts[-1].name == f"{job}.r{ROUNDS - 1:05d}.safetensors", [p.name for p in ckpts]
    got = load_file(str(ckpts[-1]))
    assert set(got) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k].reshape(np.shape(v)), v, err_msg=f"{method}/{job}: {k}")


def _assert_same_models(out: Path, method: str, models: dict) -> None:
    from safetensors.numpy import load_file

    assert models[method], f"the simulation wrote no {method} models"
    for task, state in models[method].items():
        got = load_file(str(out / "models" / method / f"{task}.safetensors"))
        assert set(got) == set(state)
        for k, v in state.items():
            np.testing.assert_array_equal(got[k].reshape(v.shape), v, err_msg=f"{method} {task}: {k}")


# -- 1. personal tensors never leave the agents --------------------------------------------------------


def test_personal_heads_and_ditto_models_stay_on_the_agents(deployment, simulated):
    from fmtl_edge.transport.tensors import SafetensorsFile

    d = deployment(methods=["layered", "ditto"])
    d.start_server()
    for c in range(CLIENTS):
        d.start_agent(c, "--save-model", str(d.tmp / f"agent{c}-models"))
    res = d.results()
    assert d.server.wait(30) == 0, d.server.text()[-3000:]

    # what the server received: every training upload, as the bytes that crossed the wire
    uploads = sorted(d.uploads.glob("*.safetensors"))
    layered_up = [p for p in uploads if p.name.startswith("layered-")]
    ditto_up = [p for p in uploads if p.name.startswith("all-")]
    assert len(layered_up) == ROUNDS * K and len(ditto_up) == ROUNDS * K, [p.name for p in uploads]
    for p in uploads:
        names = SafetensorsFile(p).names
        assert names, p.name
        assert not [n for n in names if n.startswith("heads.")] or p in ditto_up, (p.name, names)
        # ditto shares the whole model: its uploads carry heads, but never p_k (prefix "p.", client state)
        assert not [n for n in names if n.startswith(("layer:", "p."))], (p.name, names)
    assert all(any(n.startswith("backbone.") for n in SafetensorsFile(p).names) for p in layered_up)
    blobs = [p.read_bytes() for p in uploads]

    ref_results, ref_models, ref_finals = simulated
    heads = {n for state in ref_models["ditto"].values() for n in state if n.startswith("heads.")}
    assert len(heads) >= 2 * len(ref_models["ditto"])
    for method, key, prefix in (("layered", "layered/layered", "layer:heads."), ("ditto", "ditto/all", "p.")):
        m = res["methods"][method]
        served = sorted({c for h in m["history"] for c in h["executed_by"]})
        assert served, m["history"]
        for c in range(CLIENTS):
            versions = _stored_versions(d.state_dir(c, key))
            if c not in served:
                assert not versions, (method, c)
                continue
            # the rounds it trained, the newest two kept (round-tagged versions)
            trained = sorted(i for i, h in enumerate(m["history"]) if c in h["executed_by"])
            assert sorted(versions) == trained[-2:], (method, c, sorted(versions), trained)
            for r, tensors in versions.items():
                assert tensors and all(n.startswith(prefix) for n in tensors), (method, c, r, list(tensors)[:4])
                if method == "layered":  # every head of the model, and nothing else
                    assert {n[len(prefix) - len("heads."):] for n in tensors} == heads, (c, r, sorted(tensors))
                # no byte of what the device keeps appears in anything it sent
                for n, v in tensors.items():
                    if np.issubdtype(v.dtype, np.floating) and v.size >= 16:
                        raw = np.ascontiguousarray(v).tobytes()
                        assert not any(raw in b for b in blobs), f"{method}: client {c}'s {n} (round {r}) was uploaded"
        ref = ref_results["methods"][method]
        assert [h["clients"] for h in m["history"]] == [h["clients"] for h in ref["history"]]
        assert m["per_client"] and m["personalised_total_test_loss"] is not None
        assert np.isfinite(m["personalised_total_test_loss"])
        _assert_same_per_client(m, ref)
    # layered with personal heads has no meaningful global model; ditto's global model is evaluated too
    assert res["methods"]["layered"]["total_test_loss"] is None
    assert res["methods"]["ditto"]["total_test_loss"] == pytest.approx(
        ref_results["methods"]["ditto"]["total_test_loss"], rel=1e-9)
    _assert_same_models(d.tmp / "out", "ditto", ref_models)
    _assert_same_final_state(d.tmp / "state", "layered", "layered", ref_finals)
    assert res["engine"]["counters"]["updates_rejected"] == 0
    # join --save-model (issue 22.1): each agent wrote its own model of each personalised method, equal
    # to the simulation's client model (models/<method>/clients/<id>.safetensors of `simulate`)
    from safetensors.numpy import load_file

    for method in ("layered", "ditto"):
        for c in range(CLIENTS):
            job, want, tasks = ref_models.clients[method][str(c)]
            got = load_file(str(d.tmp / f"agent{c}-models" / method / "clients" / f"{c}.safetensors"))
            assert set(got) == set(want) and tasks == list(ref_results["tasks"]), (method, c)
            for k, v in want.items():
                np.testing.assert_array_equal(got[k].reshape(np.shape(v)), v, err_msg=f"{method} client {c}: {k}")
    # the agents ran every evaluation (personalised ones read their state) and keep running
    assert all(a.alive() for a in d.agents.values()), [a.text()[-2000:] for a in d.agents.values() if not a.alive()]
    assert not any("cannot run it" in a.text() for a in d.agents.values())


# -- 2. the server refuses an update that carries a personal tensor ------------------------------------


@pytest.mark.parametrize("carry_personal", [True, False])
def test_an_update_carrying_a_personal_tensor_is_refused_naming_it(svc, tmp_path, carry_personal):
    from test_transport_hardening import Raw, shifted, update_bytes

    from fmtl_edge.plan import Job

    pool, _, target = svc()
    dev = Raw(target, 0)
    try:
        box: dict = {}

        def go():
            from fmtl_edge.coordinator import Coordinator
            from fmtl_edge.messages import TrainConfig
            from test_transport_pool import SPEC, TASKS

            try:
                box["out"] = Coordinator(pool, SPEC, TASKS, TrainConfig(), clients_per_round=1, seed=5).run_job(
                    Job("layered", ("a", "b"), 1, personal=("heads.a.*",)))
            except Exception as e:  # noqa: BLE001 - reported to the test
                box["error"] = e

        t = threading.Thread(target=go, daemon=True)
        t.start()
        w = dev.pull()
        personal = list(w.personal)
        assert personal and all(n.startswith("heads.a.") for n in personal), personal
        assert w.state_key  # the client-state namespace crosses with the work
        state, names = dev.model(w, tmp_path)
        assert set(personal) <= set(names)  # the broadcast carries them (a client's start before it has its own)
        new = shifted(state, 0.1)
        if not carry_personal:
            new = {k: v for k, v in new.items() if k not in set(personal)}
        reply = dev.upload(w, update_bytes(new, [n for n in names if n in new], tmp_path))
        t.join(15)
        assert not t.is_alive()
        if carry_personal:
            assert not reply.accepted
            assert "personal" in reply.reason and any(repr(n) in reply.reason for n in personal), reply.reason
            assert pool.counters["updates_rejected"] == 1 and "error" in box
            assert not list((pool.work_dir / "incoming").glob("*.safetensors"))  # the refused file is gone
        else:
            assert reply.accepted, reply.reason
            out = box["out"]
            # the personal head is not aggregated: the global keeps the broadcast value
            np.testing.assert_array_equal(out.state[personal[0]], state[personal[0]])
            other = next(n for n in names if n.startswith("backbone.") and np.issubdtype(state[n].dtype, np.floating))
            np.testing.assert_allclose(out.state[other], state[other] + np.float32(0.1), rtol=1e-6)
    finally:
        dev.close()


from test_transport_hardening import svc  # noqa: E402,F401  (the raw-device gRPC harness)


# -- 3. a corrupt state file on the device -------------------------------------------------------------


def test_a_corrupt_state_file_is_logged_discarded_and_trained_afresh(tmp_path, caplog):
    from conftest import make_toy_dataset
    from fmtl_edge.client import train_round
    from fmtl_edge.layer_names import LAYER_PREFIX
    from fmtl_edge.client_state import FolderStateStore
    from fmtl_edge.messages import Assignment, TrainConfig
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import state_to_numpy

    ds = make_toy_dataset(n_clients=1)
    client = ds.clients[0]
    spec = ModelSpec(ds.input_shape, width=4)
    g0 = state_to_numpy(MultiTaskModel(spec, ds.tasks, seed=0).state_dict())
    personal = tuple(n for n in g0 if n.startswith("heads."))
    key = "layered/layered"

    def assignment(r, state):
        return Assignment(job="layered", round=r, tasks=tuple(ds.tasks.names), state=state, lr=0.05,
                          config=TrainConfig(batch_size=8), seed=0, state_key=key, personal=personal)

    def run(store, r, state=g0):
        return train_round(client, spec, ds.tasks, assignment(r, state), state_store=store)

    store = FolderStateStore(tmp_path / "dev")
    u0 = run(store, 0)
    assert not set(personal) & set(u0.state)  # personal heads are not in the update
    kept = store.load(key, 1)
    assert kept is not None and set(kept) == {LAYER_PREFIX + n for n in personal}
    for n in personal:  # the client's own heads moved away from the broadcast
        if np.issubdtype(g0[n].dtype, np.floating) and g0[n].size > 1:
            assert not np.array_equal(kept[LAYER_PREFIX + n], g0[n]), n
    # the next round reads them: a stateful client's round 1 differs from a stateless one's
    with_state = run(store, 1)
    fresh = run(FolderStateStore(tmp_path / "fresh"), 1)
    assert any(not np.array_equal(with_state.state[n], fresh.state[n]) for n in fresh.state)

    # flip bytes in every version file: nothing valid is left
    folder = tmp_path / "dev" / "layered_layered"
    files = sorted(folder.glob("r*.safetensors"))
    assert [f.name for f in files] == ["r0.safetensors", "r1.safetensors"]
    for f in files:
        blob = bytearray(f.read_bytes())
        for i in (len(blob) - 1, len(blob) // 2):
            blob[i] ^= 0xFF
        f.write_bytes(bytes(blob))
    caplog.set_level(logging.WARNING, logger="fmtl_edge.client_state")
    again = run(store, 2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "fmtl_edge.client_state"]
    assert len(msgs) == 2 and all("corrupt" in m and "checksum" in m and "afresh" in m for m in msgs), msgs
    assert any("round 1" in m for m in msgs) and any("round 0" in m for m in msgs)
    # the corrupt versions are deleted; only the one this round wrote is left
    assert sorted(f.name for f in folder.glob("r*")) == ["r2.safetensors", "r2.sha256"]
    # ... and round 2 trained exactly as a client with no state does (its heads from the broadcast)
    ref = run(FolderStateStore(tmp_path / "fresh2"), 2)
    assert set(again.state) == set(ref.state)
    for n in ref.state:
        np.testing.assert_array_equal(again.state[n], ref.state[n], err_msg=n)
    assert again.train_loss == ref.train_loss
    a2, r2 = store.load(key, 3), FolderStateStore(tmp_path / "fresh2").load(key, 3)
    assert set(a2) == set(r2) and all(np.array_equal(a2[n], r2[n]) for n in r2)


def test_a_missing_checksum_or_a_truncated_state_file_is_discarded(tmp_path, caplog):
    from fmtl_edge.client_state import FolderStateStore

    store = FolderStateStore(tmp_path)
    x = {"layer:heads.a.w": np.arange(32, dtype=np.float32)}
    store.save("m/j", 0, x)
    store.save("m/j", 1, {k: v + 1 for k, v in x.items()})
    caplog.set_level(logging.WARNING, logger="fmtl_edge.client_state")
    # a version written before round 1 is read for round 1 (a re-run round 1 sees the same state)
    np.testing.assert_array_equal(store.load("m/j", 1)["layer:heads.a.w"], x["layer:heads.a.w"])
    np.testing.assert_array_equal(store.load("m/j", 2)["layer:heads.a.w"], x["layer:heads.a.w"] + 1)
    (tmp_path / "m_j" / "r1.sha256").unlink()
    # the newest version unusable: logged, deleted, and the version before it is used
    np.testing.assert_array_equal(store.load("m/j", 2)["layer:heads.a.w"], x["layer:heads.a.w"])
    assert sorted(f.name for f in (tmp_path / "m_j").iterdir()) == ["r0.safetensors", "r0.sha256"]
    p0 = tmp_path / "m_j" / "r0.safetensors"
    p0.write_bytes(p0.read_bytes()[:20])
    assert store.load("m/j", 2) is None
    assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 2
    assert not list((tmp_path / "m_j").iterdir())
    assert store.keys() == []


def test_state_versions_round_trip_exactly_including_0d_buffers(tmp_path):
    """A BatchNorm's ``num_batches_tracked`` is 0-d: it must come back 0-d (a model refuses shape (1,))."""
    from fmtl_edge.client_state import FolderStateStore

    x = {"p.bn.num_batches_tracked": np.array(7, dtype=np.int64), "p.w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    store = FolderStateStore(tmp_path)
    store.save("ditto/all", 4, x)
    got = FolderStateStore(tmp_path).load("ditto/all", 5)  # (a restarted agent reads the folder again)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in x.items()}
    for k in x:
        np.testing.assert_array_equal(got[k], x[k])
    assert store.load("ditto/all", 4) is None  # written at round 4: not visible to round 4 itself


# -- 4. the server killed mid-job resumes with the client state on the devices -------------------------


def test_the_server_killed_mid_layered_job_resumes_with_the_same_result(deployment, simulated):
    d = deployment(methods=["layered"])
    d.start_server()
    for c in range(CLIENTS):
        d.start_agent(c, "--inject-fault", "delay:1.5")  # slower rounds (same updates): the kill lands mid-round
    ref_results, ref_models, ref_finals = simulated
    ref_hist = ref_results["methods"]["layered"]["history"]
    second = ref_hist[1]["clients"]

    # kill once round 0 is checkpointed and a device of round 1 has written its state for round 1
    # (that round is run again after the restart: the device must start it from its round-0 state)
    def round1_state_written():
        return d.jobs().get("layered", (None, 0))[0] == 0 and any(
            (d.state_dir(c, "layered/layered") / "r1.safetensors").is_file() for c in second)

    wait_until(round1_state_written, 120, "round 1 client state on a device", d.procs, poll=0.05)
    d.server.kill(signal.SIGKILL)
    assert d.jobs()["layered"] == (0, 0), d.jobs()
    d.start_server("server2.log")
    res = d.results()
    assert d.server.wait(30) == 0, d.server.text()[-3000:]
    assert "resuming" in d.server.text()
    m = res["methods"]["layered"]
    ref = ref_results["methods"]["layered"]
    assert [h["clients"] for h in m["history"]] == [h["clients"] for h in ref_hist]
    _assert_same_per_client(m, ref)
    # (layered with personal layers exports no global model: the final global state is the server's
    # checkpoint of the last round)
    _assert_same_final_state(d.tmp / "state", "layered", "layered", ref_finals)
