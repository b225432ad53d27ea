"""A 600 MB model crosses in 1-4 MiB chunks (far above gRPC's 4 MiB message limit) through the real
service and the real device agent (which echoes it back). Slow: run with ``pytest -m slow``."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.transport.pool import RemoteClientPool, RoundPolicy
from fmtl_edge.transport.service import MAX_MESSAGE_BYTES, CoordinatorServicer, Identity, start_server
from fmtl_edge.transport.tensors import MAX_CHUNK_BYTES


@pytest.mark.slow
def test_a_600_mb_model_goes_down_and_back_up_in_chunks(tmp_path, monkeypatch):
    from fmtl_edge.transport.agent import Agent, AgentOptions, DataSpec

    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path / "run"))
    n = 150 * 1000 * 1000  # float32: 600 MB
    big = np.empty(n, dtype=np.float32)
    big[:] = np.float32(0.5)
    big[::1_000_003] = np.arange(len(big[::1_000_003]), dtype=np.float32)
    state = {"backbone.big": big, "heads.digit.w": np.ones((10, 3), np.float32),
             "backbone.n": np.array(3, dtype=np.int64)}
    pool = RemoteClientPool(tmp_path / "work", RoundPolicy(heartbeat_timeout_s=60, dispatch_wait_s=120), seed=0,
                            model_info={"input_shape": [1, 8, 8], "width": 4}, chunk_bytes=MAX_CHUNK_BYTES)
    server, port = start_server(CoordinatorServicer(pool, {"t": Identity("dev")}.get, 1.0), "127.0.0.1:0", None)
    agent = Agent(AgentOptions(server=f"127.0.0.1:{port}", token="t", data=DataSpec("digits", 0, n_clients=4),
                               insecure=True, fault="echo", max_works=1, meter="null", work_dir=str(tmp_path / "agent")))
    agent.prepare()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        assert pool.wait_for_devices(1, 60)
        a = Assignment("all", 0, ("digit",), state, 0.1, TrainConfig())
        t0 = time.perf_counter()
        seen = 0
        # (an update's mapped file lives until the consumer asks for the next one, as in the coordinator)
        for upd in pool.execute_many([(0, a)]):  # validation (names, shapes, dtypes, NaN scan) included
            elapsed = time.perf_counter() - t0
            got = upd.state["backbone.big"]
            assert got.shape == (n,) and got.dtype == np.float32
            np.testing.assert_array_equal(got[::1_000_003], big[::1_000_003])
            assert float(got[-1]) == float(big[-1]) and int(upd.state["backbone.n"]) == 3
            del got
            seen += 1
        assert seen == 1
        size = n * 4
        assert size > 100 * MAX_MESSAGE_BYTES  # only chunking can carry it
        print(f"600 MB down and up through the service and the agent in {elapsed:.1f} s "
              f"({2 * size / elapsed / 1e6:.0f} MB/s)")
    finally:
        agent.stop.set()
        pool.close()
        server.stop(0)
        t.join(10)
