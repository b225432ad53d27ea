"""The remote client pool and its gRPC service, with scripted devices on threads (no training).

Each scripted device is a real gRPC client of a real server on 127.0.0.1: it registers, long-polls,
downloads the round's model in chunks, changes it in a scripted way and uploads it in chunks.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest

from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import RoundFailed
from fmtl_edge.pool import ClientPool
from fmtl_edge.messages import ClientUpdate, TrainConfig
from fmtl_edge.models import ModelSpec
from fmtl_edge.tasks import Task, TaskSet
from fmtl_edge.transport import fmtl_edge_pb2 as pb
from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
from fmtl_edge.transport.pool import RegistrationRefused, RemoteClientPool, RoundPolicy
from fmtl_edge.transport.service import CoordinatorServicer, Identity, TLSConfig, bearer, channel, start_server
from fmtl_edge.transport.tensors import ChunkSink, SafetensorsFile, iter_chunks, write_update_file

TASKS = TaskSet([Task("a", "binary"), Task("b", "binary")])
SPEC = ModelSpec((1, 8, 8), 4)
TOKENS = {"good": Identity("dev", "device"), "root": Identity("ops", "admin"),
          # a token serves one client at a time (issue 11): each scripted device has its own
          **{f"good-{c}": Identity(f"dev-c{c}", "device") for c in range(10)}}


def _shift(cid: int, job: str, rnd: int) -> float:
    return (cid + 1) * 0.01 + rnd * 0.001 + (0.1 if job != "all" else 0.0)


def scripted_state(state, cid, job, rnd):
    return {k: (np.asarray(v) + np.float32(_shift(cid, job, rnd)) if np.issubdtype(np.asarray(v).dtype, np.floating)
                else np.asarray(v)) for k, v in state.items()}


class ScriptedDevice(threading.Thread):
    """A device that adds a client-specific constant to the model (``behaviour`` changes that)."""

    def __init__(self, target, client_id, behaviour="add", delay_s=0.0, token=None, creds=None, tasks=("a", "b")):
        super().__init__(daemon=True)
        token = token or f"good-{client_id}"
        self.target, self.cid, self.behaviour, self.delay_s, self.token = target, client_id, behaviour, delay_s, token
        self.creds = creds or {"insecure": True}
        self.tasks = tasks
        self.stop = threading.Event()
        self.replies: list[tuple[str, int, bool, str]] = []
        self.error: Exception | None = None
        self.registered = threading.Event()

    def run(self):
        md = bearer(self.token)
        try:
            with channel(self.target, **self.creds) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                reg = stub.Register(pb.RegisterRequest(
                    device=pb.DeviceInfo(hostname="t"),
                    data=pb.DataInfo(dataset="toy", client_id=self.cid, n_clients=6, input_shape=[1, 8, 8],
                                     tasks=[pb.TaskSpec(name=t, kind="binary", out_dim=1, target_std=1, train_samples=50)
                                            for t in self.tasks])), timeout=10, metadata=md)
                self.registered.set()
                beat = threading.Thread(target=self._beat, args=(stub, reg.session_id), daemon=True)
                beat.start()
                while not self.stop.is_set():
                    r = stub.PullWork(pb.PullWorkRequest(session_id=reg.session_id, wait_s=0.5), timeout=10, metadata=md)
                    if r.has_work:
                        self._work(stub, reg.session_id, r.work, md)
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.error = e
            self.registered.set()

    def _beat(self, stub, sid):
        while not self.stop.wait(0.2):
            if self.behaviour == "hang" and self.replies == [] and getattr(self, "_hung", False):
                return  # a dead device: no more heartbeats
            try:
                stub.Heartbeat(pb.HeartbeatRequest(session_id=sid, state="idle"), timeout=5, metadata=bearer(self.token))
            except grpc.RpcError:
                pass

    def _work(self, stub, sid, w, md):
        path = f"/tmp/fmtl-test-dl-{w.work_id}"
        sink = ChunkSink(path, w.model_bytes, None, w.model_sha256)
        for ch in stub.DownloadModel(pb.DownloadRequest(session_id=sid, work_id=w.work_id), metadata=md):
            sink.write(ch.offset, ch.data)
        sink.finish()
        f = SafetensorsFile(path)
        state = f.load()
        if self.behaviour == "hang":
            self._hung = True
            self.stop.set()
            return
        if self.behaviour == "fail":
            stub.ReportFailure(pb.FailureReport(session_id=sid, work_id=w.work_id, kind="busy", reason="lease held"),
                               metadata=md)
            return
        time.sleep(self.delay_s)
        new = scripted_state(state, self.cid, w.job, w.round)
        first = next(k for k, v in new.items() if np.issubdtype(v.dtype, np.floating))
        if self.behaviour == "nan":
            new[first] = new[first].copy()
            new[first].reshape(-1)[0] = np.nan
        elif self.behaviour == "shape":
            new[first] = np.zeros((new[first].shape[0] + 1, *new[first].shape[1:]), np.float32)
        up = f"/tmp/fmtl-test-up-{w.work_id}"
        size, sha = write_update_file(up, new, f.names)
        meta = pb.UpdateMeta(session_id=sid, work_id=w.work_id, job=w.job, round=w.round, client_id=self.cid,
                             n_samples=10 * (self.cid + 1), train_loss={t: 1.0 for t in w.tasks}, device_s=0.5,
                             energy_j=2.0, energy_json='{"source": "test", "total_scope": "none"}',
                             total_bytes=size, sha256=sha)
        if w.measure_affinity:
            meta.affinity_n = len(w.tasks)
            meta.affinity.extend([0.1] * len(w.tasks) ** 2)

        def msgs():
            yield pb.UploadMessage(meta=meta)
            for off, data, total in iter_chunks(up, 1 << 20):
                yield pb.UploadMessage(chunk=pb.Chunk(offset=off, data=data, total_bytes=total))

        reply = stub.UploadUpdate(msgs(), metadata=md)
        self.replies.append((w.job, w.round, reply.accepted, reply.reason))


class ScriptedInProcess(ClientPool):
    """The same script without a network: the in-process reference."""

    def __init__(self, n):
        self.n = n

    @property
    def client_ids(self):
        return list(range(self.n))

    def execute_many(self, work):
        for cid, a in work:
            yield ClientUpdate(cid, a.job, a.round, a.tasks, scripted_state(a.state, cid, a.job, a.round),
                               10 * (cid + 1), {t: 1.0 for t in a.tasks},
                               np.full((len(a.tasks),) * 2, 0.1) if a.measure_affinity else None, 1, 0.5,
                               {"total_j": 2.0, "source": "test", "total_scope": "none"})


@pytest.fixture
def service(tmp_path):
    made = []

    def make(policy=None, tls=None, **kw):
        pool = RemoteClientPool(tmp_path / f"work{len(made)}", policy or RoundPolicy(heartbeat_timeout_s=2.0,
                                                                                      dispatch_wait_s=1.0),
                                seed=5, model_info={"input_shape": [1, 8, 8], "width": 4}, **kw)
        servicer = CoordinatorServicer(pool, TOKENS.get, heartbeat_interval_s=0.2)
        server, port = start_server(servicer, "127.0.0.1:0", tls, max_workers=32)
        made.append((server, pool))
        return pool, servicer, f"127.0.0.1:{port}"

    yield make
    for server, pool in made:
        pool.close()
        server.stop(0)


def _devices(target, n, per=None):
    per = per or {}
    devs = [ScriptedDevice(target, c, **per.get(c, {})) for c in range(n)]
    for d in devs:
        d.start()
    for d in devs:
        assert d.registered.wait(10) and d.error is None, d.error
    return devs


def _stop(devs):
    for d in devs:
        d.stop.set()
    for d in devs:
        d.join(5)


def _coord(pool, k, **kw):
    return Coordinator(pool, SPEC, TASKS, TrainConfig(), clients_per_round=k, seed=5, **kw)


def test_rounds_over_grpc_devices_equal_the_in_process_rounds(service):
    pool, _, target = service()
    # the fastest device is the last of every round's slot order: updates must still be added in slot order
    devs = _devices(target, 5, {c: {"delay_s": 0.05 * (5 - c)} for c in range(5)})
    try:
        from fmtl_edge.plan import Job

        job = Job("all", ("a", "b"), 3, measure_affinity=True)
        remote = _coord(pool, 3).run_job(job)
        ref = _coord(ScriptedInProcess(5), 3).run_job(job)
    finally:
        _stop(devs)
    for k, v in ref.state.items():
        np.testing.assert_array_equal(remote.state[k], v, err_msg=k)
    assert [r.clients for r in remote.history] == [r.clients for r in ref.history]
    np.testing.assert_array_equal(remote.affinity, ref.affinity)
    assert remote.energy.total_j == pytest.approx(2.0 * 9) and remote.energy.executions == 9
    assert pool.counters["updates_accepted"] == 9 and pool.counters["updates_rejected"] == 0
    assert not list((pool.work_dir / "incoming").iterdir()) and not list((pool.work_dir / "models").iterdir())


def test_bad_updates_are_rejected_with_a_reason_and_the_round_goes_on(service):
    pool, _, target = service()
    devs = _devices(target, 5, {0: {"behaviour": "nan"}, 1: {"behaviour": "shape"}})
    try:
        from fmtl_edge.plan import Job

        # K = 3 of 5: every round has 3 slots; bad devices lose theirs to good ones
        out = _coord(pool, 3).run_job(Job("all", ("a", "b"), 4))
    finally:
        _stop(devs)
    bad = [r for d in devs[:2] for r in d.replies]
    assert bad and not any(ok for *_, ok, _ in bad)
    reasons = " ".join(r for *_, r in bad)
    assert "NaN" in reasons or "shape" in reasons
    for d in devs[:2]:
        for *_, ok, reason in d.replies:
            assert ("NaN" in reason) if d.behaviour == "nan" else ("shape" in reason)
    assert all(rec.samples > 0 and not set(rec.executed) & {0, 1} for rec in out.history)
    assert all(len(rec.executed) == 3 for rec in out.history)  # replaced, not dropped
    assert pool.counters["updates_rejected"] == len(bad)
    assert all(np.isfinite(v).all() for v in out.state.values())


def test_failed_and_silent_devices_are_replaced(service):
    pool, _, target = service(RoundPolicy(heartbeat_timeout_s=1.0, dispatch_wait_s=0.5))
    devs = _devices(target, 4, {0: {"behaviour": "hang"}, 1: {"behaviour": "fail"}})
    try:
        from fmtl_edge.plan import Job

        out = _coord(pool, 4 - 2).run_job(Job("all", ("a", "b"), 3))
    finally:
        _stop(devs)
    assert all(set(r.executed) <= {2, 3} and len(r.executed) == 2 for r in out.history)
    assert pool.counters["replacements"] >= 1
    st = {d["client_id"]: d for d in pool.status()["devices"]}
    assert st[0]["online"] is False  # silent past the heartbeat timeout


def test_deadline_ends_a_round_with_min_updates_and_fails_below(service):
    pool, _, target = service(RoundPolicy(deadline_s=0.8, min_updates=2, heartbeat_timeout_s=5, dispatch_wait_s=0.3,
                                          deadline_retries=0, max_attempts=1))
    devs = _devices(target, 3, {2: {"delay_s": 2.0}})
    try:
        from fmtl_edge.plan import Job

        t0 = time.monotonic()
        out = _coord(pool, 3, min_updates=2).run_job(Job("all", ("a", "b"), 1))
        assert time.monotonic() - t0 < 1.9
        assert sorted(out.history[0].executed) == [0, 1]
        assert [r["sampled"] for r in out.history[0].refused] == [2]  # recorded as the simulation records refusals
        time.sleep(2.0)  # the slow device's late update is refused
        assert any(not ok and "late" in reason for *_, ok, reason in devs[2].replies)
        with pytest.raises(RoundFailed, match="at least 3"):
            _coord(pool, 3, min_updates=3).run_job(Job("x", ("a", "b"), 1))
    finally:
        _stop(devs)


def test_tokens_are_required_and_refusals_logged(service, caplog):
    pool, servicer, target = service()
    caplog.set_level(logging.WARNING)
    for token in ("wrong", ""):
        with channel(target, insecure=True) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Register(pb.RegisterRequest(), timeout=5, metadata=bearer(token) if token else None)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.refused == 2 and "refused" in caplog.text and "invalid bearer token" in caplog.text
    with channel(target, insecure=True) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetStatus(pb.StatusRequest(), timeout=5, metadata=bearer("good"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        st = stub.GetStatus(pb.StatusRequest(), timeout=5, metadata=bearer("root"))
        assert '"devices"' in st.json
        # an unknown session is told to register again
        r = stub.PullWork(pb.PullWorkRequest(session_id="nope", wait_s=0.1), timeout=5, metadata=bearer("good"))
        assert r.reregister


def test_one_device_per_client_and_registration_checks(service):
    def refuse_client_9(d):
        if d.client_id == 9:
            raise RegistrationRefused("FAILED_PRECONDITION", "no client 9 here")

    pool, _, target = service(validate_registration=refuse_client_9)
    a = ScriptedDevice(target, 1)
    a.start()
    assert a.registered.wait(10) and a.error is None
    TOKENS["other"] = Identity("dev2", "device")  # a second device claims client 1
    try:
        b = ScriptedDevice(target, 1, token="other")
        b.run()
        assert isinstance(b.error, grpc.RpcError) and b.error.code() == grpc.StatusCode.ALREADY_EXISTS
        c = ScriptedDevice(target, 9)
        c.run()
        assert c.error.code() == grpc.StatusCode.FAILED_PRECONDITION and "client 9" in c.error.details()
    finally:
        del TOKENS["other"]
        _stop([a])
    assert pool.eligible(["a"]) == [1] and pool.eligible(["zzz"]) == []


def test_tls_with_client_certificates(service, tmp_path):
    pytest.importorskip("cryptography")
    from deploy_helpers import self_signed_cert

    ca = self_signed_cert(tmp_path, name="ca")
    srv_cert = self_signed_cert(tmp_path, name="server", ca=ca)
    cli_cert = self_signed_cert(tmp_path, name="client", ca=ca)
    _, _, target = service(tls=TLSConfig(srv_cert[0], srv_cert[1], client_ca=ca[0]))
    ok = ScriptedDevice(target, 0, creds={"ca": ca[0], "cert": cli_cert[0], "key": cli_cert[1]})
    ok.start()
    assert ok.registered.wait(10) and ok.error is None, ok.error
    _stop([ok])
    no_cert = ScriptedDevice(target, 1, creds={"ca": ca[0]})
    no_cert.run()
    assert isinstance(no_cert.error, grpc.RpcError) and no_cert.error.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = self_signed_cert(tmp_path / "o", name="other")
    wrong_ca = ScriptedDevice(target, 2, creds={"ca": other_ca[0], "cert": cli_cert[0], "key": cli_cert[1]})
    wrong_ca.run()
    assert isinstance(wrong_ca.error, grpc.RpcError)
