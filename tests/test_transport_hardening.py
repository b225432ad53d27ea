"""Issue 11: one device with a valid token must not be able to wreck, stall or impersonate.

A *raw* device speaks the protocol directly (real gRPC server on 127.0.0.1, real pool, a real
coordinator round on a thread) and sends crafted uploads: hostile safetensors headers, racing
streams, huge values, inflated sample counts, negative energy, absurd evaluation sums.
"""

from __future__ import annotations

import json
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import Job
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.transport import fmtl_edge_pb2 as pb
from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
from fmtl_edge.transport.pool import RemoteClientPool, RoundPolicy
from fmtl_edge.transport.service import CoordinatorServicer, Identity, bearer, channel, start_server
from fmtl_edge.transport.tensors import ChunkSink, SafetensorsFile, file_sha256, write_update_file

from test_transport_pool import SPEC, TASKS

try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout: the server package lives in server/
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

N_TRAIN, N_TEST = 50, 20
TOKENS = {"good": Identity("dev0", "device"), "good1": Identity("dev1", "device"), "root": Identity("ops", "admin")}


@pytest.fixture
def svc(tmp_path):
    made = []

    def make(policy=None, tokens=None, **kw):
        pool = RemoteClientPool(tmp_path / f"w{len(made)}", policy or RoundPolicy(heartbeat_timeout_s=3.0,
                                                                                   dispatch_wait_s=0.5, max_attempts=1),
                                seed=5, model_info={"input_shape": [1, 8, 8], "width": 4}, **kw)
        servicer = CoordinatorServicer(pool, (tokens or TOKENS).get, heartbeat_interval_s=0.2)
        server, port = start_server(servicer, "127.0.0.1:0", None, max_workers=16)
        made.append((server, pool))
        return pool, servicer, f"127.0.0.1:{port}"

    yield make
    for server, pool in made:
        pool.close()
        server.stop(0)


class Raw:
    """A device that registers, beats and pulls, then uploads whatever the test crafts."""

    def __init__(self, target, cid, token="good", n_train=N_TRAIN, beat=True, n_test=N_TEST):
        self.ch = channel(target, insecure=True)
        self.stub = pb_grpc.CoordinatorStub(self.ch)
        self.md = bearer(token)
        self.cid = cid
        self.n_test = n_test
        self.reg = self.stub.Register(self.request(n_train), timeout=10, metadata=self.md)
        self.sid = self.reg.session_id
        self.stop = threading.Event()
        if beat:
            threading.Thread(target=self._beat, daemon=True).start()

    def request(self, n_train=N_TRAIN):
        return pb.RegisterRequest(device=pb.DeviceInfo(hostname="raw"), data=pb.DataInfo(
            dataset="toy", client_id=self.cid, n_clients=6, input_shape=[1, 8, 8],
            tasks=[pb.TaskSpec(name=t, kind="binary", out_dim=1, target_std=1, train_samples=n_train,
                               test_samples=getattr(self, "n_test", N_TEST)) for t in ("a", "b")]))

    def _beat(self):
        while not self.stop.wait(0.2):
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.sid, state="idle"), timeout=5, metadata=self.md)
            except grpc.RpcError:
                pass

    def pull(self, timeout=10.0) -> pb.Work:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.stub.PullWork(pb.PullWorkRequest(session_id=self.sid, wait_s=0.5), timeout=10, metadata=self.md)
            if r.has_work:
                return r.work
        raise AssertionError(f"client {self.cid} got no work")

    def model(self, w, tmp_path):
        path = tmp_path / f"dl-{w.work_id}"
        sink = ChunkSink(path, w.model_bytes, None, w.model_sha256)
        for ch in self.stub.DownloadModel(pb.DownloadRequest(session_id=self.sid, work_id=w.work_id), metadata=self.md):
            sink.write(ch.offset, ch.data)
        sink.finish()
        f = SafetensorsFile(path)
        return f.load(), f.names

    def meta(self, w, **over):
        m = pb.UpdateMeta(session_id=self.sid, work_id=w.work_id, job=w.job, round=w.round, client_id=self.cid,
                          n_samples=N_TRAIN, train_loss={t: 1.0 for t in w.tasks}, device_s=0.5, energy_j=2.0,
                          energy_json='{"source": "test", "total_scope": "none"}')
        for k, v in over.items():
            if k == "eval":
                for t, s in v.items():
                    m.eval[t].CopyFrom(pb.EvalSums(**s))
            else:
                setattr(m, k, v)
        return m

    def messages(self, w, data: bytes, chunk=64, hold: threading.Event | None = None, **over):
        meta = self.meta(w, total_bytes=len(data), **over)
        yield pb.UploadMessage(meta=meta)
        for i, off in enumerate(range(0, len(data), chunk)):
            if i == 1 and hold is not None:
                hold.wait(10)
            yield pb.UploadMessage(chunk=pb.Chunk(offset=off, data=data[off:off + chunk], total_bytes=len(data)))

    def upload(self, w, data: bytes, **over) -> pb.UploadReply:
        return self.stub.UploadUpdate(self.messages(w, data, **over), timeout=20, metadata=self.md)

    def close(self):
        self.stop.set()
        self.ch.close()


def update_bytes(state, names, tmp_path, tag="u") -> bytes:
    p = tmp_path / f"{tag}.safetensors"
    write_update_file(p, state, names)
    return p.read_bytes()


def shifted(state, c):
    return {k: (v + np.float32(c) if np.issubdtype(v.dtype, np.floating) else v) for k, v in state.items()}


def run_round(pool, k=1, rounds=1, **kw):
    """Run a job on a thread; returns (thread, box) where box gets 'out' or 'error'."""
    box = {}

    def go():
        try:
            box["out"] = Coordinator(pool, SPEC, TASKS, TrainConfig(), clients_per_round=k, seed=5,
                                     **kw).run_job(Job("all", ("a", "b"), rounds))
        except Exception as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def _state_of(pool, cid):
    return {d["client_id"]: d for d in pool.status()["devices"]}[cid]


# -- fault 1 over gRPC: a hostile header is refused, the slot freed, the file deleted -------------------


@pytest.mark.parametrize("header", [b"[" * 100_000, b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}',
                                    b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'])
def test_a_hostile_upload_is_refused_with_a_reason_and_frees_the_slot(svc, tmp_path, header):
    pool, _, target = svc()
    dev = Raw(target, 0)
    try:
        t, box = run_round(pool)
        w = dev.pull()
        reply = dev.upload(w, struct.pack("<Q", len(header)) + header + b"\0" * 8)
        assert not reply.accepted and ("header" in reply.reason or "safetensors" in reply.reason)
        t.join(15)
        assert "error" in box  # the only slot had no update: the round failed, it did not hang
        assert not list((pool.work_dir / "incoming").iterdir())
        st = _state_of(pool, 0)
        assert st["rejected"] == 1 and st["work"] is None
    finally:
        dev.close()


# -- fault 2: two streams for one work item -----------------------------------------------------------


def test_two_streams_for_one_work_item_write_separate_files_and_the_accepted_one_stays_intact(svc, tmp_path):
    pool, _, target = svc(RoundPolicy(heartbeat_timeout_s=3.0, dispatch_wait_s=2.0, max_attempts=1))
    devs = [Raw(target, 0), Raw(target, 1, token="good1")]
    try:
        t, box = run_round(pool, k=2)
        works = [d.pull() for d in devs]
        index = [pool.work.get(w.work_id).slot.index for w in works]
        first, racer = (0, 1) if index[0] == 0 else (1, 0)
        w = works[racer]
        state, names = devs[racer].model(w, tmp_path)
        good = update_bytes(shifted(state, 0.5), names, tmp_path, "good")
        nan = dict(state)
        k0 = names[0]
        nan[k0] = np.full_like(state[k0], np.nan)
        bad = update_bytes(nan, names, tmp_path, "bad")
        assert len(bad) == len(good)
        hold = threading.Event()
        replies = {}
        b = threading.Thread(target=lambda: replies.setdefault("b", devs[racer].stub.UploadUpdate(
            devs[racer].messages(w, bad, hold=hold), timeout=20, metadata=devs[racer].md)))
        b.start()
        time.sleep(0.5)  # stream B is open and has sent its first chunk
        replies["a"] = devs[racer].upload(w, good)
        hold.set()  # B now sends its NaN chunks
        b.join(20)
        assert replies["a"].accepted, replies["a"].reason
        assert not replies["b"].accepted
        s2, n2 = devs[first].model(works[first], tmp_path)
        assert devs[first].upload(works[first], update_bytes(shifted(s2, 0.25), n2, tmp_path, "f")).accepted
        t.join(20)
        assert "out" in box, box.get("error")
        for k, v in box["out"].state.items():
            if np.issubdtype(v.dtype, np.floating):
                np.testing.assert_allclose(v, state[k] + np.float32(0.375), rtol=1e-5, atol=1e-6, err_msg=k)
    finally:
        for d in devs:
            d.close()


def test_a_late_duplicate_upload_is_refused_as_late_when_its_round_model_is_gone(svc, tmp_path, monkeypatch, caplog):
    """Issue 22: two streams for one work; the slower one's validation reads the round model after the
    round ended and deleted it: refused as late, without a traceback, not counted against the device."""
    import logging

    from fmtl_edge.transport import uploads

    caplog.set_level(logging.INFO)
    pool, _, target = svc()
    dev = Raw(target, 0)
    try:
        t, box = run_round(pool)
        w = dev.pull()
        state, names = dev.model(w, tmp_path)
        data = update_bytes(shifted(state, 0.1), names, tmp_path)
        real = uploads.validate_upload
        first = threading.Event()

        def slow_first(*a, **kw):
            if not first.is_set():  # this stream is validated slowly: the other one wins, the round ends
                first.set()
                t.join(15)
            return real(*a, **kw)

        monkeypatch.setattr(uploads, "validate_upload", slow_first)
        replies = {}
        late = threading.Thread(target=lambda: replies.setdefault("late", dev.upload(w, data)))
        late.start()
        assert first.wait(10)
        replies["first"] = dev.upload(w, data)
        late.join(20)
        assert replies["first"].accepted, replies["first"].reason
        assert "out" in box, box.get("error")
        r = replies["late"]
        assert not r.accepted and "too late" in r.reason and "could not validate" not in r.reason, r.reason
        assert "Traceback" not in caplog.text and "FileNotFoundError" not in caplog.text
        assert pool.counters["updates_rejected"] == 0 and _state_of(pool, 0)["rejected"] == 0
    finally:
        dev.close()


# -- faults 3-5: values, sample counts, energy ---------------------------------------------------------


def _one_update(svc, tmp_path, make_state=None, pool_kw=None, **over):
    pool, _, target = svc(**(pool_kw or {}))
    dev = Raw(target, 0)
    try:
        t, box = run_round(pool)
        w = dev.pull()
        state, names = dev.model(w, tmp_path)
        new = make_state(state) if make_state else shifted(state, 0.1)
        reply = dev.upload(w, update_bytes(new, names, tmp_path), **over)
        t.join(15)
        return reply, box, pool
    finally:
        dev.close()


def test_finite_but_huge_values_are_refused_by_the_norm_bound(svc, tmp_path):
    def huge(state):
        out = dict(state)
        k = next(n for n, v in state.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)
        out[k] = np.full_like(state[k], 1e38)
        return out

    reply, box, pool = _one_update(svc, tmp_path, huge)
    assert not reply.accepted and "norm" in reply.reason and "max_update_norm_ratio" in reply.reason
    assert "error" in box and pool.counters["updates_rejected"] == 1


def test_an_ordinary_update_passes_the_norm_bound(svc, tmp_path):
    reply, box, _ = _one_update(svc, tmp_path)
    assert reply.accepted, reply.reason
    assert "out" in box


def test_sample_counts_above_the_registered_count_are_refused(svc, tmp_path):
    reply, box, _ = _one_update(svc, tmp_path, n_samples=1000 * N_TRAIN)
    assert not reply.accepted and "n_samples" in reply.reason and str(N_TRAIN) in reply.reason


def test_the_per_job_sample_cap_bounds_the_weight(svc, tmp_path):
    reply, box, _ = _one_update(svc, tmp_path, pool_kw={"max_client_samples": 7})
    assert reply.accepted and box["out"].history[0].samples == 7


def test_sample_passes_travel_to_the_round_record_and_the_lookahead_share_is_bounded(svc, tmp_path):
    reply, box, _ = _one_update(svc, tmp_path, sample_passes=40, lookahead_passes=16)
    assert reply.accepted, reply.reason
    rec = box["out"].history[0]
    assert (rec.sample_passes, rec.lookahead_passes) == (40, 16)
    reply, box, _ = _one_update(svc, tmp_path, sample_passes=4, lookahead_passes=16)
    assert not reply.accepted and "lookahead_passes" in reply.reason


def test_a_device_may_not_change_its_registered_sample_count(svc, tmp_path, caplog):
    pool, _, target = svc()
    dev = Raw(target, 0)
    try:
        dev.stop.set()
        with pytest.raises(grpc.RpcError) as e:
            dev.stub.Register(dev.request(n_train=N_TRAIN * 1000), timeout=10, metadata=dev.md)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "train_samples" in e.value.details()
        assert "train_samples" in caplog.text
    finally:
        dev.close()


@pytest.mark.parametrize("field, value", [("energy_j", -1e6), ("energy_j", float("nan")), ("device_s", -1.0),
                                          ("peak_memory_bytes", -5), ("affinity_steps", -3),
                                          ("sample_passes", -2), ("lookahead_passes", -1),
                                          ("cpu_s", -0.5), ("cpu_s", float("inf")), ("threads", -1),
                                          ("threads", 100000),
                                          ("energy_json", '{"source": "x", "cpu_j": -4.0}'),
                                          ("energy_json", '{"source": "x", "total_j": NaN}')])
def test_negative_or_non_finite_resource_figures_are_refused(svc, tmp_path, field, value):
    reply, box, _ = _one_update(svc, tmp_path, **{field: value})
    assert not reply.accepted and field.split("_json")[0] in reply.reason, reply.reason


# -- fault 6: evaluation replies ----------------------------------------------------------------------


@pytest.mark.parametrize("sums, word", [({"loss_sum": -5.0, "metric_sum": 3.0, "n": 10}, "loss_sum"),
                                        ({"loss_sum": 5.0, "metric_sum": 1e7, "n": 10}, "metric_sum"),
                                        ({"loss_sum": 5.0, "metric_sum": -1.0, "n": 10}, "metric_sum"),
                                        ({"loss_sum": 5.0, "metric_sum": 3.0, "n": 10**15}, "n ")])
def test_absurd_evaluation_sums_are_refused(svc, tmp_path, sums, word):
    pool, _, target = svc()
    pool.task_kinds = {"a": "binary", "b": "binary"}
    dev = Raw(target, 0)
    try:
        box = {}
        state = {k: np.asarray(v) for k, v in _global_state().items()}
        a = Assignment(job="all", round=0, tasks=("a", "b"), state=state, lr=0.0, config=TrainConfig(), seed=0)
        t = threading.Thread(target=lambda: box.setdefault("out", pool.evaluate([(0, a)], timeout_s=5)))
        t.start()
        w = dev.pull()
        ok = {"loss_sum": 5.0, "metric_sum": 3.0, "n": 10}
        reply = dev.upload(w, b"", eval={"a": sums, "b": ok})
        t.join(15)
        assert not reply.accepted and word in reply.reason, reply.reason
        assert box["out"] == {}
    finally:
        dev.close()


def _global_state():
    from fmtl_edge.models import MultiTaskModel
    from fmtl_edge.partition import state_to_numpy

    return state_to_numpy(MultiTaskModel(SPEC, TASKS).state_dict())


# -- fault 7: a token is bound to its device and the clients it may serve ------------------------------


def test_one_token_may_not_hold_two_clients_or_take_over_another_devices_client(svc):
    tokens = dict(TOKENS, ops1=Identity("dev1", "device", clients=frozenset({1})))
    pool, _, target = svc(tokens=tokens)
    a = Raw(target, 0, token="good")
    try:
        with pytest.raises(grpc.RpcError) as e:  # the same token, a second client
            Raw(target, 1, token="good")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "dev0" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a token limited to client 1 asks for client 2
            Raw(target, 2, token="ops1")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "clients" in e.value.details()
        a.close()
        time.sleep(3.5)  # client 0's device goes offline
        pool.wait_for_devices(0, 0.1)
        with pytest.raises(grpc.RpcError) as e:  # another device may not take client 0 over while it is away
            Raw(target, 0, token="good1")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "dev0" in e.value.details()
        b = Raw(target, 0, token="good")  # its own device comes back
        b.close()
    finally:
        a.close()


# -- fault 8: two agents with one token and one client id ----------------------------------------------


def test_a_second_live_registration_is_refused_and_the_first_session_kept(svc):
    pool, _, target = svc()
    a = Raw(target, 0)
    try:
        with pytest.raises(grpc.RpcError) as e:
            Raw(target, 0)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already connected" in e.value.details()
        r = a.stub.Heartbeat(pb.HeartbeatRequest(session_id=a.sid, state="idle"), timeout=5, metadata=a.md)
        assert r.ok  # the first agent was not kicked out
        # the same agent reconnecting (it presents its session) may replace its own session at once
        req = a.request()
        req.resume_session_id = a.sid
        again = a.stub.Register(req, timeout=5, metadata=a.md)
        assert again.session_id != a.sid
    finally:
        a.close()


def test_the_agent_backs_off_with_jitter_when_its_registration_is_refused(svc, monkeypatch):
    from fmtl_edge.transport.agent import Agent, AgentOptions, DataSpec

    pool, _, target = svc()
    a = Raw(target, 0)
    try:
        agent = Agent(AgentOptions(server=target, token="good", data=DataSpec("toy", 0), insecure=True,
                                   min_backoff_s=0.5, max_backoff_s=4.0), log=lambda m: None)
        agent.client = object()
        monkeypatch.setattr(agent, "register_request", lambda: a.request())
        waits = []

        def wait(s):
            waits.append(s)
            if len(waits) >= 5:
                agent.stop.set()
            return agent.stop.is_set()

        monkeypatch.setattr(agent.stop, "wait", wait)
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("rc", agent.run()), daemon=True)
        th.start()
        th.join(30)
        agent.stop.set()
        assert res.get("rc") == 0, "the agent kept registering"
        assert len(waits) == 5 and len(set(waits)) == 5  # jittered
        for i, w in enumerate(waits):  # around an exponentially growing backoff: 0.5, 1, 2, 4, 4 s
            b = min(4.0, 0.5 * 2**i)
            assert 0.5 * b <= w <= 1.5 * b, waits
        assert pool.counters.get("registrations_refused", 0) == 5
    finally:
        a.close()


# -- fault 12: refusals name their RPC and are counted per device ---------------------------------------


def test_refusals_name_the_rpc_and_status_counts_them_per_device(svc, tmp_path, caplog, capsys):
    import logging

    caplog.set_level(logging.WARNING)
    reply, box, pool = _one_update(svc, tmp_path, energy_j=-1e6)
    assert not reply.accepted
    assert "refused UploadUpdate from dev0: rejected update of client 0" in caplog.text
    r = pool.status()["refusals"]["dev0"]
    assert r["total"] == 1 and r["by_rpc"] == {"UploadUpdate": 1} and "energy_j" in r["last"]
    from fmtl_server.cli import _print_status

    _print_status({"job": "j", "phase": "p", "devices": [], "refusals": pool.status()["refusals"]})
    out = capsys.readouterr().out
    assert "refused calls per device" in out and "dev0" in out and "UploadUpdate 1" in out


# -- fault 11: idle upload streams ---------------------------------------------------------------------


def _idle_stream(dev, w, release: threading.Event, send_meta=True):
    def gen():
        if send_meta:
            yield pb.UploadMessage(meta=dev.meta(w, total_bytes=1000))
        release.wait(30)  # opened, never sent

    return dev.stub.UploadUpdate.future(gen(), timeout=30, metadata=dev.md)


def test_idle_upload_streams_are_limited_per_device_and_closed_at_the_first_chunk_bound(tmp_path):
    pool = RemoteClientPool(tmp_path / "w", RoundPolicy(heartbeat_timeout_s=10.0, dispatch_wait_s=0.5, max_attempts=1),
                            seed=5, model_info={"input_shape": [1, 8, 8], "width": 4})
    servicer = CoordinatorServicer(pool, TOKENS.get, heartbeat_interval_s=0.2, upload_first_chunk_s=3.0,
                                   max_streams_per_device=1)
    server, port = start_server(servicer, "127.0.0.1:0", None, max_workers=4)
    release = threading.Event()
    dev = Raw(f"127.0.0.1:{port}", 0)
    try:
        t, box = run_round(pool)
        w = dev.pull()
        streams = [_idle_stream(dev, w, release, send_meta=i % 2 == 0) for i in range(6)]  # more than the workers
        # the other RPCs are still answered: the idle streams do not hold every worker
        r = dev.stub.Heartbeat(pb.HeartbeatRequest(session_id=dev.sid, state="uploading", work_id=w.work_id),
                               timeout=5, metadata=dev.md)
        assert r.ok
        codes = [s.exception(20).code() if s.exception(20) else None for s in streams]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5, codes  # one stream per device at a time
        assert grpc.StatusCode.CANCELLED in codes  # the one let in sent no chunk within the bound
        assert pool.status()["refusals"]["dev0"]["by_rpc"]["UploadUpdate"] >= 6
        # the device may upload again once the cancelled stream's handler has returned
        end = time.monotonic() + 10
        while servicer._streams.get("dev0", 0) and time.monotonic() < end:
            time.sleep(0.05)
        assert servicer._streams.get("dev0", 0) == 0
        state, names = dev.model(w, tmp_path)
        assert dev.upload(w, update_bytes(shifted(state, 0.1), names, tmp_path)).accepted
        t.join(15)
        assert "out" in box
    finally:
        release.set()
        dev.close()
        pool.close()
        server.stop(0)


# -- issue 22: idle upload streams from many tokens ----------------------------------------------------


def test_idle_upload_streams_from_many_tokens_do_not_starve_honest_heartbeats_or_uploads(tmp_path):
    """32 devices x 2 idle upload streams against 64 workers: the server keeps workers for heartbeats
    and at most ``max_idle_streams`` idle uploads, so an honest device beats, downloads and uploads."""
    n_bad = 32
    tokens = dict(TOKENS, **{f"bad{i}": Identity(f"bad{i}", "device") for i in range(n_bad)})
    pool = RemoteClientPool(tmp_path / "w", RoundPolicy(heartbeat_timeout_s=3.0, dispatch_wait_s=0.5, max_attempts=1),
                            seed=5, model_info={"input_shape": [1, 8, 8], "width": 4})
    servicer = CoordinatorServicer(pool, tokens.get, heartbeat_interval_s=0.2, upload_first_chunk_s=20.0)
    server, port = start_server(servicer, "127.0.0.1:0", None, max_workers=64)
    target = f"127.0.0.1:{port}"
    release = threading.Event()
    dev = Raw(target, 0)
    chans = []
    try:
        t, box = run_round(pool)
        w = dev.pull()

        def nothing():
            release.wait(30)  # opened, never sends a message
            return
            yield

        streams = []
        for i in range(n_bad):
            ch = channel(target, insecure=True)
            chans.append(ch)
            stub = pb_grpc.CoordinatorStub(ch)
            streams += [stub.UploadUpdate.future(nothing(), timeout=30, metadata=bearer(f"bad{i}")) for _ in range(2)]
        time.sleep(1.5)  # every idle stream is open, or refused
        for _ in range(5):  # heartbeats are answered at once, whatever the idle streams do
            t0 = time.monotonic()
            r = dev.stub.Heartbeat(pb.HeartbeatRequest(session_id=dev.sid, state="downloading", work_id=w.work_id),
                                   timeout=2, metadata=dev.md)
            assert r.ok and time.monotonic() - t0 < 1.5
        state, names = dev.model(w, tmp_path)  # the honest device still downloads and uploads
        reply = dev.upload(w, update_bytes(shifted(state, 0.1), names, tmp_path))
        assert reply.accepted, reply.reason
        t.join(15)
        assert "out" in box, box.get("error")
        refused = [s for s in streams if s.done() and s.exception() is not None
                   and s.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) >= 2 * n_bad - servicer.max_idle_streams - 1, len(refused)
        assert any("max_idle_streams" in s.exception().details() for s in refused)
    finally:
        release.set()
        dev.close()
        for ch in chans:
            ch.close()
        pool.close()
        server.stop(0)


# -- issue 22: sample counts and the round's relative norm bound ----------------------------------------

MORE = dict(TOKENS, **{f"t{c}": Identity(f"dev{c}", "device") for c in range(2, 6)})


def _token(c):
    return {0: "good", 1: "good1"}.get(c, f"t{c}")


def _round_of(pool, target, tmp_path, shifts, n_train=None, n_samples=None):
    """One K = len(shifts) round: device c uploads the model shifted by ``shifts[c]`` with
    ``n_samples[c]``; returns the coordinator's outcome (or error) and the replies."""
    n_train, n_samples = n_train or {}, n_samples or {}
    devs = [Raw(target, c, token=_token(c), n_train=n_train.get(c, N_TRAIN)) for c in range(len(shifts))]
    try:
        t, box = run_round(pool, k=len(shifts))
        replies = {}
        for d in devs:
            w = d.pull()
            state, names = d.model(w, tmp_path)
            replies[d.cid] = d.upload(w, update_bytes(shifted(state, shifts[d.cid]), names, tmp_path, f"u{d.cid}"),
                                      n_samples=n_samples.get(d.cid, N_TRAIN))
        t.join(20)
        return box, replies, state
    finally:
        for d in devs:
            d.close()


def test_an_inflated_training_sample_count_gets_a_bounded_fedavg_weight(svc, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    pool, _, target = svc(tokens=MORE)
    box, replies, _ = _round_of(pool, target, tmp_path, [0.1, 0.1, 0.1], n_train={2: 1000 * N_TRAIN},
                                n_samples={2: 1000 * N_TRAIN})
    assert all(r.accepted for r in replies.values()), replies
    # 10 (max_samples_ratio) x the low median of the registered counts (50, 50, 50000) = 500
    assert box["out"].history[0].samples == 2 * N_TRAIN + 10 * N_TRAIN
    assert "FedAvg weight is capped at 500 samples" in caplog.text


def test_test_sample_counts_are_bounded_at_registration_and_in_evaluation_replies(svc, tmp_path):
    pool, _, target = svc(tokens=MORE)
    pool.task_kinds = {"a": "binary", "b": "binary"}
    # a device that registers first with a huge test count is accepted (nothing to compare yet) ...
    big = Raw(target, 2, token="t2", n_test=10**6)
    honest = [Raw(target, 0), Raw(target, 1, token="good1")]
    none = Raw(target, 3, token="t3", n_test=0)
    try:
        # ... a later one is refused
        with pytest.raises(grpc.RpcError) as e:
            Raw(target, 4, token="t4", n_test=10**6)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "test_samples" in e.value.details()
        state = {k: np.asarray(v) for k, v in _global_state().items()}
        a = Assignment(job="all", round=0, tasks=("a", "b"), state=state, lr=0.0, config=TrainConfig(), seed=0)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("out", pool.evaluate([(2, a), (3, a), (0, a)], timeout_s=5)))
        t.start()
        claims = {big: 10**5, none: 10, honest[0]: N_TEST}
        replies = {}
        for dev, n in claims.items():
            w = dev.pull()
            s = {"loss_sum": 0.0, "metric_sum": 0.0, "n": n}
            replies[dev.cid] = dev.upload(w, b"", eval={"a": s, "b": s})
        t.join(15)
        # the first device's n is bounded by the others' counts: 10 x the low median (20) = 200
        assert not replies[2].accepted and "max_samples_ratio" in replies[2].reason, replies[2].reason
        # a device that registered no test samples may not claim any
        assert not replies[3].accepted and "outside 0..0" in replies[3].reason, replies[3].reason
        assert replies[0].accepted and set(box["out"]) == {0}
    finally:
        for d in (big, none, *honest):
            d.close()


def test_an_update_far_beyond_the_rounds_median_distance_is_refused(svc, tmp_path):
    """The round's relative bound: poison x-10 of an honest step stays inside the static bound
    (10 x |global|) but is 10 x the round's median distance."""
    pool, _, target = svc(tokens=MORE)
    box, replies, state = _round_of(pool, target, tmp_path, [0.1, 0.12, 0.08, -1.0])
    assert all(r.accepted for r in replies.values())  # each inside the static bound when it arrived
    rec = box["out"].history[0]
    assert sorted(rec.executed) == [0, 1, 2]
    (ref,) = rec.refused
    assert ref["client_id"] == 3 and "max_update_norm_multiple" in ref["message"]
    assert pool.counters["updates_rejected"] == 1 and _state_of(pool, 3)["rejected"] == 1
    assert pool.status()["refusals"]["dev3"]["by_rpc"] == {"UploadUpdate": 1}
    for k, v in box["out"].state.items():  # the honest mean, equal weights
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(v, state[k] + np.float32(0.1), rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_relative_norm_bound_needs_three_updates_and_can_be_turned_off():
    from fmtl_edge.transport.validation import norm_outliers

    assert norm_outliers({0: 1.0, 1: 10.0}, 4.0) == {}  # two updates: neither can be told honest
    out = norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 10.0}, 4.0)
    assert list(out) == [3] and "10" in out[3] and "median distance 1.1" in out[3]
    assert norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 10.0}, 0) == {}
    assert norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 10.0}, 12.0) == {}
    # a client with more data moves farther: its bound grows with its share of the round's median weight ...
    w = {0: 100, 1: 120, 2: 90, 3: 300}
    assert norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 10.0}, 4.0, w) == {}
    # ... up to 4 x (a weight is already capped by max_samples_ratio)
    out = norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 30.0}, 4.0, {**w, 3: 10_000})
    assert list(out) == [3] and "data share 4" in out[3]
