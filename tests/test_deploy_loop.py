"""Loop Improvement (``loop``, the clients ring) over a real deployment: a ``fmtl-server serve``
process that records every upload, one ``fmtl-edge join`` agent per client on loopback, ``digits``.

- the ring finishes; the coordinator relays the backbone from device to device; no upload carries a
  head (the heads stay in the agents' state folders); the per-client (personalised) results equal
  ``fmtl-edge simulate``'s with the same settings, exactly (rel 1e-9, as the other deployment tests);
  the stacked-head global model's explicit gather pass sends each node's head once, its integrator
  pass only the integrator, and its total test loss equals the simulation's;
- an agent SIGKILLed mid-ring (after its first visit) is skipped, the refusal is in the round
  history, the run completes; its slot is never handed to another device (a ring node is a client:
  another device would train its own client out of turn, twice in the round);
- the server SIGKILLed mid-ring (round 0 checkpointed, a node of round 1 already visited) resumes
  and ends with the uninterrupted run's (the simulation's) per-client losses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import fmtl_server  # noqa: F401
except ImportError:  # running from a checkout: the server package lives in server/
    sys.path.insert(0, str(ROOT / "server"))

from deploy_helpers import SERVER_TABLE, wait_until  # noqa: E402
from test_deploy_client_state import CLIENTS, MAX_SAMPLES, WIDTH, Deployment, _assert_same_per_client  # noqa: E402

ROUNDS, K = 2, 2     # two passes over the ring, then one parallel head fine-tuning round
KEY = "loop/loop"    # the client-state key (FolderStateStore folder loop_loop)

JOB = f"""
[job]
name = "ring"
dataset = "digits"
clients = {CLIENTS}
max_samples = {MAX_SAMPLES}
methods = ["loop"]
rounds = {ROUNDS}
clients_per_round = {K}
width = {WIDTH}
loop_epochs = 1
loop_finetune_epochs = 1
loop_global_rounds = 1
dispatch_wait_s = 1.0
""" + SERVER_TABLE


class RingDeployment(Deployment):
    def __init__(self, tmp: Path):
        super().__init__(tmp, methods=["loop"], rounds=ROUNDS)
        (tmp / "job.toml").write_text(JOB)


@pytest.fixture
def ring(tmp_path):
    d = RingDeployment(tmp_path)
    yield d
    d.close()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """``fmtl-edge simulate`` of the same job, in process (one torch thread, like the agents)."""
    import torch

    from fmtl_edge.config import build_config
    from fmtl_edge.data import load_dataset
    from fmtl_edge.simulation import run_simulation

    cfg = build_config({"dataset": "digits", "rounds": ROUNDS, "max_samples": MAX_SAMPLES, "clients_per_round": K,
                        "methods": "loop", "meter": "null", "clients": CLIENTS, "width": WIDTH,
                        "loop_epochs": 1, "loop_finetune_epochs": 1, "loop_global_rounds": 1})
    ds = load_dataset("digits", n_clients=CLIENTS, seed=0, max_samples=MAX_SAMPLES)
    threads = torch.get_num_threads()
    old_dir = os.environ.get("FMTL_EDGE_RUNTIME_DIR")
    os.environ["FMTL_EDGE_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("lease"))
    torch.set_num_threads(1)
    try:
        results, _models = run_simulation(cfg, ds)
        return results
    finally:
        torch.set_num_threads(threads)
        if old_dir is None:
            os.environ.pop("FMTL_EDGE_RUNTIME_DIR", None)
        else:
            os.environ["FMTL_EDGE_RUNTIME_DIR"] = old_dir


def _ring() -> list[int]:
    from fmtl_edge.methods.loop import ring_order

    return ring_order(range(CLIENTS), 0, "loop")


def _assert_no_head_uploaded(d: Deployment) -> list[Path]:
    from fmtl_edge.transport.tensors import SafetensorsFile

    uploads = sorted(d.uploads.glob("loop-r*.safetensors"))  # the ring's (job loop) uploads
    assert uploads
    for p in uploads:
        names = SafetensorsFile(p).names
        assert names and not [n for n in names if n.startswith("heads.")], (p.name, names)
    return uploads


def test_a_loop_ring_over_agents_keeps_heads_on_devices_and_equals_the_simulation(ring, simulated):
    d = ring
    d.start_server()
    for c in range(CLIENTS):
        d.start_agent(c)
    res = d.results()
    assert d.server.wait(30) == 0, d.server.text()[-3000:]
    m = res["methods"]["loop"]
    ref = simulated["methods"]["loop"]
    assert [h["job"] for h in m["history"]] == ["loop"] * (ROUNDS + 1) + ["loop-gather", "loop-global"]
    hist = [h for h in m["history"] if h["job"] == "loop"]
    order = _ring()
    for h in hist[:ROUNDS]:   # a ring round: every node, one after another, in the ring's order
        assert h["clients"] == order and h["executed_by"] == order and not h["refused"], h
    assert sorted(hist[ROUNDS]["executed_by"]) == list(range(CLIENTS))   # the fine-tuning round
    assert [h["clients"] for h in m["history"]] == [h["clients"] for h in ref["history"]]
    # the global model's passes: the explicit gather sends the stacked heads, the integrator pass only mix.*
    from fmtl_edge.transport.tensors import SafetensorsFile

    gather = sorted(d.uploads.glob("loop-gather-r*.safetensors"))
    assert len(gather) == CLIENTS and all(any(".nodes." in n for n in SafetensorsFile(p).names) for p in gather)
    mix = sorted(d.uploads.glob("loop-global-r*.safetensors"))
    assert len(mix) == CLIENTS
    for p in mix:
        assert {n for n in SafetensorsFile(p).names if n.startswith("heads.")} <= {n for n in SafetensorsFile(p).names
                                                                                  if ".mix." in n}
    assert m["total_test_loss"] == pytest.approx(ref["total_test_loss"], rel=1e-9)
    # the ring's visits uploaded the backbone only (the fine-tuning round uploads nothing of note)
    uploads = _assert_no_head_uploaded(d)
    assert len(uploads) == ROUNDS * CLIENTS + CLIENTS, [p.name for p in uploads]
    # ... while each agent keeps its heads (newest two versions: the last ring round, the fine-tuning)
    from safetensors.numpy import load_file

    for c in range(CLIENTS):
        files = sorted(p.name for p in d.state_dir(c, KEY).glob("r*.safetensors"))
        assert files == [f"r{ROUNDS - 1}.safetensors", f"r{ROUNDS}.safetensors"], (c, files)
        kept = load_file(str(d.state_dir(c, KEY) / files[-1]))
        assert kept and all(".heads." in n or n.startswith(("layer:heads.", "heads.")) for n in kept), list(kept)
    assert m["personalised_total_test_loss"] is not None
    _assert_same_per_client(m, ref)
    assert res["engine"]["counters"]["updates_rejected"] == 0
    assert res["engine"]["counters"]["replacements"] == 0


def test_an_agent_killed_mid_ring_is_skipped_never_replaced_and_the_run_completes(ring):
    d = ring
    order = _ring()
    victim = order[1]
    d.start_server()
    for c in range(CLIENTS):
        # slower visits (same updates): the kill lands mid-ring
        d.start_agent(c, *(("--inject-fault", "delay:1.0") if c != victim else ()))
    # the victim has trained once (its round-0 heads in its state folder, its backbone accepted): kill it
    wait_until(lambda: (d.state_dir(victim, KEY) / "r0.safetensors").is_file()
               and "train loop round 1: update accepted" in d.agents[victim].text(), 120, "the victim's first visit",
               d.procs, poll=0.05)
    d.agents[victim].kill(signal.SIGKILL)
    res = d.results(timeout=180)
    assert d.server.wait(30) == 0, d.server.text()[-3000:]
    hist = [h for h in res["methods"]["loop"]["history"] if h["job"] == "loop"]
    assert len(hist) == ROUNDS + 1
    assert victim in hist[0]["executed_by"]
    for h in hist:
        assert len(h["executed_by"]) == len(set(h["executed_by"])), h   # no node trained twice in a round
    for h in hist[1:]:
        assert victim not in h["executed_by"], h
        refused = [x for x in h["refused"] if x["client_id"] == victim]
        assert len(refused) == 1, h["refused"]
        assert set(refused[0].get("tried", [victim])) <= {victim}, refused   # nobody else took its slot
    for h in hist[1:ROUNDS]:   # the rest of the ring ran in its order, from the last good backbone
        assert h["executed_by"] == [c for c in order if c != victim], h
    assert res["engine"]["counters"]["replacements"] == 0
    _assert_no_head_uploaded(d)
    # the survivors' personalised results are there (the victim cannot evaluate)
    per = res["methods"]["loop"]["per_client"]
    assert {str(c) for c in range(CLIENTS) if c != victim} <= set(per), per.keys()
    assert "went silent" in d.server.text() or "offline" in d.server.text()


def test_the_server_killed_mid_ring_resumes_with_the_uninterrupted_result(ring, simulated):
    d = ring
    d.start_server()
    for c in range(CLIENTS):
        d.start_agent(c, "--inject-fault", "delay:1.5")  # slower visits (same updates): the kill lands mid-ring
    order = _ring()

    # kill once round 0 is checkpointed and the first node of round 1 has written its round-1 heads
    # (round 1 is run again after the restart: that node must start from its round-0 heads)
    def round1_visited():
        return d.jobs().get("loop", (None, 0))[0] == 0 and (d.state_dir(order[0], KEY) / "r1.safetensors").is_file()

    wait_until(round1_visited, 150, "a round-1 visit", d.procs, poll=0.05)
    d.server.kill(signal.SIGKILL)
    assert d.jobs()["loop"] == (0, 0), d.jobs()
    d.start_server("server2.log")
    res = d.results(timeout=240)
    assert d.server.wait(30) == 0, d.server.text()[-3000:]
    assert "resuming" in d.server.text()
    m = res["methods"]["loop"]
    ref = simulated["methods"]["loop"]
    assert [h["clients"] for h in m["history"]] == [h["clients"] for h in ref["history"]]
    assert [h["executed_by"] for h in m["history"][:ROUNDS]] == [order] * ROUNDS
    assert m["total_test_loss"] == pytest.approx(ref["total_test_loss"], rel=1e-9)  # the global model too
    _assert_no_head_uploaded(d)
    _assert_same_per_client(m, ref)
    json.dumps(res)  # (the results stay JSON)
