"""fmtl-server's job file, tokens and persistence (SQLite + safetensors checkpoints), without processes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout
    sys.path.insert(0, str(ROOT / "server"))

from fmtl_edge.config import ConfigError  # noqa: E402
from fmtl_edge.coordinator import ClientPool, Coordinator, RoundCheckpoint  # noqa: E402
from fmtl_edge.messages import ClientUpdate, TrainConfig  # noqa: E402
from fmtl_edge.methods import MAS  # noqa: E402
from fmtl_edge.models import ModelSpec  # noqa: E402
from fmtl_edge.tasks import Task, TaskSet  # noqa: E402
from fmtl_server.auth import TokenError, TokenFile, add_token, parse_tokens  # noqa: E402
from fmtl_server.cli import main as server_main  # noqa: E402
from fmtl_server.config import load_config  # noqa: E402
from fmtl_server.store import StateMismatch, Store  # noqa: E402

TASKS = TaskSet([Task(n, "binary") for n in ("a", "b", "c", "d")])
S_TRUE = np.array([[0, .5, -.2, -.1], [.4, 0, -.3, -.2], [-.2, -.1, 0, .6], [-.3, -.2, .5, 0]])


class Scripted(ClientPool):
    """Clients whose update depends on (client, job, round) only, with a reproducible affinity."""

    def __init__(self, n=5):
        self.n = n
        self.calls = 0

    @property
    def client_ids(self):
        return list(range(self.n))

    def execute_many(self, work):
        for cid, a in work:
            self.calls += 1
            shift = np.float32(0.01 * (cid + 1) + 0.001 * a.round + 0.1 * len(a.job))
            idx = [TASKS.index(t) for t in a.tasks]
            aff = S_TRUE[np.ix_(idx, idx)] + 0.01 * cid if a.measure_affinity else None
            yield ClientUpdate(cid, a.job, a.round, a.tasks,
                               {k: v + shift if np.issubdtype(v.dtype, np.floating) else v for k, v in a.state.items()},
                               5 + cid, {t: 1.0 for t in a.tasks}, aff, 1, 0.25,
                               {"total_j": 1.0, "source": "test", "total_scope": "none"})


def _coord(pool, **kw):
    return Coordinator(pool, ModelSpec((1, 8, 8), 4), TASKS, TrainConfig(), clients_per_round=2, seed=3, **kw)


def test_job_file_parsing_and_errors(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text('[job]\ndataset = "digits"\nclients = 4\nmethods = ["mas-2"]\nrounds = 6\nclients_per_round = 2\n'
                 'round_deadline_s = 30\nmin_updates = 1\nlr = 1\n[server]\ntokens = "t.txt"\ninsecure = true\n')
    srv, job = load_config(f)
    assert job.sim.rounds == 6 and job.sim.r0 == 2 and job.sim.lr == 1.0 and job.round_deadline_s == 30.0
    assert job.devices_needed == 4 and srv.tokens == str(tmp_path / "t.txt") and srv.insecure
    assert load_config(f, {"listen": "127.0.0.1:1"})[0].listen == "127.0.0.1:1"
    fp = job.fingerprint()
    f.write_text(f.read_text().replace("rounds = 6", "rounds = 7"))
    assert load_config(f)[1].fingerprint() != fp
    for bad, match in [
        ('[job]\nmeter = "null"\n[server]\ninsecure = true\n', "device setting"),
        ('[job]\nbogus = 1\n[server]\ninsecure = true\n', "unknown key"),
        ('[job]\neval_every = 2\n[server]\ninsecure = true\n', "simulation only"),
        ('[job]\nclasses_per_client = 2\n[server]\ninsecure = true\n', "simulation only"),
        ('[job]\nmin_updates = 9\n[server]\ninsecure = true\n', "min_updates"),
        ('[job]\n[server]\n', "TLS needs a certificate"),
        ('[job]\n[server]\ninsecure = true\nchunk_mib = 8\n', "1..4 MiB"),
        ('[server]\ninsecure = true\n', "no \\[job\\]"),
        ('[job]\nround_deadline_s = "soon"\n[server]\ninsecure = true\n', "number"),
    ]:
        f.write_text(bad)
        with pytest.raises(ConfigError, match=match):
            load_config(f)


def test_tokens_file(tmp_path, capsys):
    p = tmp_path / "tokens.txt"
    t1 = add_token(p, "jetson-1")
    t2 = add_token(p, "ops", "admin")
    assert t1 not in p.read_text() and (p.stat().st_mode & 0o777) == 0o600
    tf = TokenFile(p)
    assert tf(t1).name == "jetson-1" and tf(t1).role == "device" and tf(t2).role == "admin"
    assert tf("nope") is None and tf("") is None
    with pytest.raises(TokenError, match="already has a token"):
        add_token(p, "jetson-1")
    # revoking = deleting the line; a running server re-reads the file
    import os
    import time

    p.write_text("\n".join(line for line in p.read_text().splitlines() if not line.startswith("jetson-1")) + "\n")
    os.utime(p, (time.time() + 5, time.time() + 5))
    assert tf(t1) is None and tf(t2) is not None
    with pytest.raises(TokenError, match="NAME ROLE"):
        parse_tokens("x device plaintext\n")
    assert server_main(["token", "add", "jetson-2", "--tokens", str(p)]) == 0
    printed = capsys.readouterr().out.strip()
    assert TokenFile(p)(printed).name == "jetson-2" and printed[0].isalnum()


def test_checkpoints_resume_a_plan_with_the_uninterrupted_result(tmp_path):
    """Kill after any round: resuming from the store gives the uninterrupted run's weights bit for bit."""
    mas = MAS(TASKS, rounds=4, r0=2, n_splits=2)
    ref = _coord(Scripted()).run_method(mas)
    total_rounds = mas.planned_rounds()
    for stop_after in (1, 2, 4):  # inside merge, at its end, inside a split
        store = Store(tmp_path / f"s{stop_after}")
        assert store.claim("fp", "job") is False
        seen = {"n": 0}

        class Crash(Exception):
            pass

        def on_end(ck: RoundCheckpoint, store=store, seen=seen):
            store.checkpoint("mas-2", seen["n"], ck)
            seen["n"] += 1
            if seen["n"] == stop_after:
                raise Crash()

        with pytest.raises(Crash):
            _coord(Scripted(), on_round_end=on_end).run_method(mas)
        store.close()
        store = Store(tmp_path / f"s{stop_after}")  # "restarted"
        assert store.claim("fp", "job") is True
        with pytest.raises(StateMismatch):
            store.claim("other", "job")
        pool = Scripted()
        coord = _coord(pool, on_round_end=lambda ck, store=store: store.checkpoint("mas-2", 0, ck))
        done, resume = {}, None
        for ck in store.load_checkpoints("mas-2"):
            if ck.job_done:
                done[ck.job.name] = coord.outcome_from_checkpoint(ck)
            else:
                resume = ck
        out = coord.run_method(mas, done=done, resume=resume)
        assert pool.calls == 2 * (total_rounds - stop_after)  # only the missing rounds ran
        assert list(out) == list(ref)
        for name, o in ref.items():
            for k, v in o.state.items():
                np.testing.assert_array_equal(out[name].state[k], v, err_msg=f"{name} {k}")
            assert [r.clients for r in out[name].history] == [r.clients for r in o.history]
            assert out[name].energy.executions == o.energy.executions
        np.testing.assert_array_equal(out["merge"].affinity, ref["merge"].affinity)
        st = store.status()
        assert {j["job"] for j in st["jobs"]} == {"merge", "split-0", "split-1"} and all(j["done"] for j in st["jobs"])
        ckpts = list((tmp_path / f"s{stop_after}" / "checkpoints").rglob("*.safetensors"))
        assert len(ckpts) == 3  # one per job: older rounds are deleted once the next one is committed
        store.close()


class Overflowing(Scripted):
    """Two finite updates whose weighted float32 sum overflows, for the first ``bad_calls`` rounds."""

    def __init__(self, bad_calls=1):
        super().__init__(2)
        self.bad_calls = bad_calls
        self.rounds = 0
        self.round_info = {}  # (what the runner's timing log reads from a RemoteClientPool)

    def execute_many(self, work):
        self.rounds += 1
        for upd in super().execute_many(work):
            if self.rounds <= self.bad_calls:
                upd.state = {k: np.full_like(v, 3e38) if np.issubdtype(v.dtype, np.floating) else v
                             for k, v in upd.state.items()}
            yield upd


def _job_server(tmp_path, retries=1):
    from fmtl_server.runner import JobServer

    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "job.toml"
    f.write_text('[job]\ndataset = "digits"\nclients = 2\nmethods = ["all-in-one"]\nrounds = 2\nclients_per_round = 2\n'
                 f'retry_wait_s = 0\nmax_round_retries = {retries}\nevaluate = false\n[server]\ntokens = "t.txt"\ninsecure = true\n'
                 'state_dir = "st"\n')
    srv, job = load_config(f)
    js = JobServer(srv, job, echo=lambda m: None)
    js.store = Store(tmp_path / "st")
    js.tasks = TASKS
    return js


def test_an_aggregation_error_fails_the_round_not_the_server(tmp_path):
    from fmtl_edge.methods import make_method
    from fmtl_edge.plan import RoundFailed

    js = _job_server(tmp_path)
    js.pool = Overflowing(bad_calls=1)  # the first attempt overflows, the retry succeeds
    method = make_method("all-in-one", TASKS, js.job.sim)
    res, _ = js.train([method], ModelSpec((1, 8, 8), 4), {"methods": {}})
    assert res["methods"]["all-in-one"]["rounds"] == 2
    rows = js.store.db.execute("SELECT kind, detail FROM events").fetchall()
    assert any(k == "round_failed" and "overflow" in d for k, d in rows), rows
    js2 = _job_server(tmp_path / "b", retries=0)
    js2.pool = Overflowing(bad_calls=99)
    with pytest.raises(RoundFailed, match="overflow"):  # given up as a failed round (exit 5), not a crash
        js2.train([method], ModelSpec((1, 8, 8), 4), {"methods": {}})


def test_the_tokens_file_fails_closed_and_says_why(tmp_path, caplog):
    import logging

    import grpc

    from fmtl_edge.transport import fmtl_edge_pb2 as pb
    from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
    from fmtl_edge.transport.pool import RemoteClientPool
    from fmtl_edge.transport.service import CoordinatorServicer, bearer, channel, start_server

    p = tmp_path / "tokens.txt"
    dev = add_token(p, "jetson-1")
    admin = add_token(p, "ops", "admin")
    good = p.read_text()
    tf = TokenFile(p)
    assert tf(dev).name == "jetson-1" and tf.error is None
    p.unlink()  # deleted: nobody gets in, not even the admin
    assert tf(dev) is None and tf(admin) is None and "missing" in tf.error
    p.write_text(good + "this line is wrong\n")  # malformed: every token refused, the line named
    assert tf(dev) is None and tf(admin) is None and ":3:" in tf.error
    p.write_text(good)
    assert tf(dev).name == "jetson-1" and tf.error is None
    # a line may limit the clients a token serves
    p.write_text(good.replace("jetson-1 device", "jetson-1 device").rstrip("\n").replace(
        good.splitlines()[0], good.splitlines()[0] + " clients=3,4") + "\n")
    assert tf(dev).clients == frozenset({3, 4})
    # over gRPC the refusal says why
    pool = RemoteClientPool(tmp_path / "w")
    server, port = start_server(CoordinatorServicer(pool, tf), "127.0.0.1:0", None, max_workers=4)
    caplog.set_level(logging.WARNING)
    try:
        p.write_text("garbage\n")
        with channel(f"127.0.0.1:{port}", insecure=True) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.CoordinatorStub(ch).GetStatus(pb.StatusRequest(), timeout=5, metadata=bearer(admin))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "tokens file" in e.value.details()
        assert "tokens file" in caplog.text and "GetStatus" in caplog.text
    finally:
        server.stop(0)
        pool.close()


def test_checkpoints_are_verified_on_resume_and_roll_back_to_the_kept_round(tmp_path):
    from fmtl_server.store import CheckpointCorrupt

    from fmtl_edge.plan import Job

    store = Store(tmp_path / "s")
    store.claim("fp", "job")

    class Crash(Exception):
        pass

    def on_end(ck):
        store.checkpoint("all", 0, ck)
        if ck.round == 2:
            raise Crash()  # killed after round 3 of 5

    with pytest.raises(Crash):
        _coord(Scripted(), on_round_end=on_end).run_job(Job("all", ("a", "b"), 5))
    (ck,) = store.load_checkpoints("all")
    assert ck.round == 2
    files = sorted((tmp_path / "s" / "checkpoints").rglob("*.safetensors"))
    assert [f.name for f in files] == ["all.r00001.safetensors", "all.r00002.safetensors"]  # the previous round is kept
    last = files[-1]
    good = last.read_bytes()
    raw = bytearray(good)
    raw[-4] ^= 0x80  # a flipped sign
    last.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt) as e:
        store.load_checkpoints("all")
    msg = str(e.value)
    assert str(last) in msg and "SHA-256" in msg and "after round 3" in msg
    assert "fmtl-server rollback" in msg and "round 2" in msg  # the fix: the kept previous round
    last.unlink()  # deleted: the same clear refusal, no traceback
    with pytest.raises(CheckpointCorrupt, match="missing"):
        store.load_checkpoints("all")
    assert server_main(["rollback", "--state-dir", str(tmp_path / "s")]) == 0
    assert store.rollback() == []  # done by the command
    (ck,) = store.load_checkpoints("all")
    assert ck.round == 1 and len(ck.history) == 2
    # a NaN written with a matching checksum is refused too
    from fmtl_edge.transport.tensors import write_state

    state = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in ck.state.items()}
    bad = RoundCheckpoint(ck.job, 2, state, ck.affinity_per_round, ck.energy, ck.history, ck.wall_s)
    store.checkpoint("all", 0, bad)
    with pytest.raises(CheckpointCorrupt, match="NaN"):
        store.load_checkpoints("all")
    store.close()


def test_round_records_keep_every_field_through_the_store():
    """A resumed job's history keeps the critical path and sample-passes of the rounds before the kill."""
    import json

    from fmtl_edge.plan import RoundRecord

    r = RoundRecord("j", 1, [1, 2], 0.1, {"a": 1.0}, 10, 0.5, None, 0.7, 0, [1, 2], [{"client_id": 3}],
                    critical_path_s=0.4, sample_passes=100, lookahead_passes=20, cpu_s=0.3)
    back = RoundRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r
    old = {k: v for k, v in r.to_dict().items() if k not in ("cpu_s", "sample_passes")}  # state of an older version
    assert RoundRecord.from_dict(old).cpu_s is None
