"""Loop Improvement (``loop``): heads stay on their node, a visit equals its steps run by hand, the
ring skips a failed node with the last good backbone, a round with no survivor fails, and the
critical path is the slowest client of a parallel round but every visit of a ring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmtl_edge.client import build_model, train_round
from fmtl_edge.seeding import derive_seed
from fmtl_edge.client_state import MemoryStateStore
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import RoundFailed
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.methods import AllInOne, Loop
from fmtl_edge.models import ModelSpec
from fmtl_edge.partition import state_to_numpy
from fmtl_edge.procedures.sgd import batches
from fmtl_edge.simulated_pool import dropout_faults

from conftest import make_toy_dataset

TRAIN = TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0)


class RecordingPool(InProcessClientPool):
    """The in-process pool, keeping every (client, assignment) sent and every update returned."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent, self.updates, self.received = [], [], []

    def execute_many(self, work):
        for cid, a in work:
            self.sent.append((cid, a))
            # the assignment's arrays are views of the coordinator's working vector: copy them now
            self.received.append({n: np.array(v, copy=True) for n, v in a.state.items()})
            for upd in super().execute_many([(cid, a)]):
                self.updates.append(upd)
                yield upd


def _run(method, faults=None, n_clients=3, k=2):
    ds = make_toy_dataset(n_clients=n_clients, n_per_client=12)
    spec = ModelSpec((1, 8, 8), width=4)
    pool = RecordingPool(ds, spec, faults=faults)
    coord = Coordinator(pool, spec, ds.tasks, TRAIN, k, seed=3)
    return ds, pool, coord, coord.run_method(method)


def _loop(tasks, **kw):
    base = dict(rounds=2, epochs=1, optimizer="sgd", finetune_epochs=1, global_rounds=0)
    base.update(kw)
    return Loop(tasks, base.pop("rounds"), **base)


def test_a_node_never_sends_its_head_and_keeps_it_in_its_state():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    ds, pool, coord, done = _run(_loop(ds.tasks, global_rounds=1))
    assert pool.updates and all(u.error is None for u in pool.updates)
    for u in pool.updates:
        heads = [n for n in u.state if n.startswith("heads.")]
        if u.job == "loop-gather":  # the one explicit step where the heads leave their nodes
            assert heads and all(".nodes." in n or ".mix." in n for n in heads)
        elif u.job == "loop":
            assert not heads and any(n.startswith("backbone.") for n in u.state)
        else:  # the integrator passes (int counters such as num_batches_tracked aside)
            assert all(".mix." in n for n, v in u.state.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
    for c in pool.client_ids:
        kept = pool.state_store(c).load("loop/loop", 1 << 30)
        assert kept is not None and any(k.startswith("layer:heads.") for k in kept)
    # 2 passes over the ring of 3 + the fine-tuning round (every node once, in parallel)
    assert [len(r.executed) for r in done["loop"].history] == [3, 3, 3]


def test_finetune_round_keeps_the_backbone_and_changes_the_heads():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    ds, pool, coord, done = _run(_loop(ds.tasks, rounds=1))
    ring = [a for _, a in pool.sent if a.round == 0]
    fine = [a for _, a in pool.sent if a.round == 1]
    assert all(a.method_config.get("phase") == "finetune" for a in fine)
    assert all("phase" not in a.method_config for a in ring)
    last = pool.updates[len(ring) - 1].state
    for n, v in done["loop"].state.items():
        if n.startswith("backbone.") and np.issubdtype(np.asarray(v).dtype, np.floating):
            np.testing.assert_array_equal(v, last[n])  # the fine-tuning round moved no backbone tensor


def _hand_visit(ds, spec, a, names, steps):
    """The three steps of a visit, written out: SGD (momentum 0), one batch each."""
    model = build_model(spec, ds.tasks.subset(a.tasks), a.state)
    data = ds.clients[0]
    rng = np.random.default_rng(derive_seed(a.seed, a.job, a.round, data.client_id))
    x_all = torch.from_numpy(data.x_train)
    for part, lr in steps:
        model.train()
        heads = [p for n in names for p in model.heads[n].parameters()]
        body = list(model.backbone.parameters())
        train = {"heads": heads, "backbone": body, "all": body + heads}[part]
        ids = {id(p) for p in train}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        if part == "heads":
            model.backbone.eval()
        if part == "backbone":
            model.heads.eval()
        opt = torch.optim.SGD(train, lr=lr)
        (idx,) = batches(data.n_train, a.config.batch_size, rng)
        x = x_all[torch.from_numpy(idx)]
        outs = model(x, names)
        loss = sum(ds.tasks[n].loss(outs[n], torch.from_numpy(data.y_train[n][idx])) for n in names)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return state_to_numpy(model.state_dict())


def test_the_backbone_after_a_visit_equals_a_hand_run_of_the_three_steps():
    ds = make_toy_dataset(n_clients=1, n_per_client=16)
    spec = ModelSpec((1, 8, 8), width=4)
    state = state_to_numpy(build_model(spec, ds.tasks, None).state_dict())
    names = list(ds.tasks.names)
    personal = tuple(n for n in state if n.startswith("heads."))
    cfg = {"steps": 3, "epochs": 1, "optimizer": "sgd", "lr_head": 0.05, "lr_backbone": 0.1, "lr_all": 0.02}
    a = Assignment(job="loop", round=0, tasks=tuple(names), state=state, lr=0.0, config=TRAIN, seed=1,
                   procedure="loop", method_config=cfg, state_key="loop/loop", personal=personal)
    store = MemoryStateStore()
    upd = train_round(ds.clients[0], spec, ds.tasks, a, state_store=store)
    want = _hand_visit(ds, spec, a, names, [("heads", 0.05), ("backbone", 0.1), ("all", 0.02)])
    backbone = [n for n in state if n.startswith("backbone.")]
    assert backbone and set(backbone) <= set(upd.state)
    for n in backbone:
        np.testing.assert_allclose(upd.state[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)
    kept = store.load("loop/loop", 1)
    for n in personal:  # the trained head is client state, equal to the hand-run's
        np.testing.assert_allclose(kept["layer:" + n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)
    # and the hand-run did move the backbone (the check is not vacuous)
    assert any(not np.allclose(want[n], state[n]) for n in backbone if n.endswith("weight"))


def test_the_ring_skips_a_failed_node_with_the_last_good_backbone_and_it_rejoins():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    failed = {}

    def faults(cid, a):
        if a.round == 0 and not failed:  # the second node of the first pass fails
            order = [c for c, _ in pool_ref[0].sent if _.round == 0]
            if len(order) == 2:
                failed[cid] = True
                return "lost mid-visit"
        return None

    pool_ref = []
    spec = ModelSpec((1, 8, 8), width=4)
    pool = RecordingPool(ds, spec, faults=faults)
    pool_ref.append(pool)
    coord = Coordinator(pool, spec, ds.tasks, TRAIN, 2, seed=3)
    done = coord.run_method(_loop(ds.tasks))
    hist = done["loop"].history
    (bad,) = failed
    assert [r["client_id"] for r in hist[0].refused] == [bad]
    assert bad not in hist[0].executed and len(hist[0].executed) == 2
    assert bad in hist[1].executed  # it rejoins in the next pass
    first_upd, third = pool.updates[0], pool.received[2]
    assert pool.sent[2][1].round == 0 and pool.updates[1].error is not None
    for n, v in first_upd.state.items():  # the node after the failed one got the last good backbone
        if n.startswith("backbone.") and np.issubdtype(v.dtype, np.floating):  # (integer counters are not carried)
            np.testing.assert_array_equal(third[n], v)


def test_dropout_lets_the_ring_finish_and_is_recorded():
    ds = make_toy_dataset(n_clients=4, n_per_client=12)
    ds, pool, coord, done = _run(_loop(ds.tasks, rounds=3), faults=dropout_faults(0, 0.3), n_clients=4)
    hist = done["loop"].history
    assert len(hist) == 4
    refused = [r for h in hist for r in h.refused]
    assert refused and all("dropout" in r["message"] for r in refused)
    # seeded: the same draw for the same (seed, job, round, client)
    f = dropout_faults(0, 0.3)
    a = pool.sent[0][1]
    assert [f(c, a) for c in range(20)] == [dropout_faults(0, 0.3)(c, a) for c in range(20)]
    assert dropout_faults(0, 0.0) is None


def test_a_round_with_every_node_failing_raises_round_failed():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    with pytest.raises(RoundFailed, match="round 1"):
        _run(_loop(ds.tasks), faults=lambda cid, a: "down" if a.round == 1 else None)


def test_critical_path_is_the_max_of_a_parallel_round_and_the_sum_of_a_ring():
    ds = make_toy_dataset(n_clients=4, n_per_client=12)
    ds, pool, coord, done = _run(AllInOne(ds.tasks, 2), n_clients=4, k=3)
    for rec in done["all"].history:
        times = [u.device_s for u in pool.updates if u.round == rec.round]
        assert len(times) == 3 and rec.critical_path_s == pytest.approx(max(times))
        assert rec.device_s == pytest.approx(sum(times)) and rec.critical_path_s < rec.device_s
    assert done["all"].energy.critical_path_s == pytest.approx(sum(r.critical_path_s for r in done["all"].history))
    ds, pool, coord, done = _run(_loop(ds.tasks, finetune_epochs=0), n_clients=4)
    for rec in done["loop"].history:
        times = [u.device_s for u in pool.updates if u.round == rec.round]
        assert len(times) == 4 and rec.critical_path_s == pytest.approx(sum(times))


def test_the_tasks_ring_visits_one_task_per_round_and_reports_only_it():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    ds, pool, coord, done = _run(_loop(ds.tasks, rounds=1, nodes="tasks"))
    T = len(ds.tasks.names)
    assert done["loop"].job.rounds == 2 * T
    visited = [a.method_config["task"] for _, a in pool.sent if a.round < T]
    assert sorted(set(visited)) == sorted(ds.tasks.names)
    for u in pool.updates:
        assert len(u.tasks) == 1
    m = _loop(ds.tasks, nodes="tasks")
    assert m.global_model and not m.personalised


# -- the stacked-head global model (LI §3.4, solution 2) ------------------------------------------

def test_stacked_head_starts_as_the_mean_of_the_node_heads():
    from fmtl_edge.models import MultiTaskModel, stack_head_state, stacked_head_model

    ds = make_toy_dataset(n_clients=2, n_per_client=8)
    spec = ModelSpec((1, 8, 8), width=4)
    nodes = [MultiTaskModel(spec, ds.tasks, seed=s) for s in (1, 2, 3)]
    base = state_to_numpy(nodes[0].state_dict())
    state = stack_head_state(base, ds.tasks, 3)
    for j, m in enumerate(nodes):  # fill the slots as the gather pass does
        for t in ds.tasks.names:
            for n, v in m.heads[t].state_dict().items():
                state[f"heads.{t}.nodes.{j}.{n}"] = v.numpy()
    g = build_model(spec, ds.tasks, state, model=stacked_head_model(spec, ds.tasks, 3)).eval()
    x = torch.from_numpy(ds.clients[0].x_test[:5])
    with torch.no_grad():
        f = g.backbone(x)
        out = g.forward_heads(f)
        for t in ds.tasks.names:
            mean = sum(m.heads[t](f) for m in nodes) / 3
            torch.testing.assert_close(out[t], mean, rtol=1e-5, atol=1e-6)


def test_the_gather_pass_stacks_every_node_kept_head_and_the_integrator_pass_sends_only_the_integrator():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    ds, pool, coord, done = _run(_loop(ds.tasks, rounds=1, global_rounds=2))
    assert list(done) == ["loop", "loop-gather", "loop-global"]
    nodes = done["loop-gather"].job.method_config["nodes"]
    assert nodes == sorted(pool.client_ids)
    gathered = done["loop-gather"].state
    for j, c in enumerate(nodes):  # slot j holds exactly the head node j kept after the ring
        kept = pool.state_store(c).load("loop/loop", 1 << 30)
        for t in ds.tasks.names:
            for k, v in kept.items():
                if k.startswith(f"layer:heads.{t}."):
                    rest = k[len(f"layer:heads.{t}."):]
                    np.testing.assert_array_equal(gathered[f"heads.{t}.nodes.{j}.{rest}"], v)
    train = [u for u, (_, a) in zip(pool.updates, pool.sent) if a.job == "loop-global"]
    assert len(train) == 2 * len(nodes)  # two ring passes
    for u in train:
        floats = [n for n, v in u.state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        assert floats and all(".mix." in n for n in floats), floats[:3]
    final = done["loop-global"].state
    for n, v in gathered.items():  # backbone and stacked heads frozen; the integrator moved
        if ".mix." not in n and np.issubdtype(np.asarray(v).dtype, np.floating):
            np.testing.assert_array_equal(final[n], v)
    assert any(not np.array_equal(final[n], gathered[n]) for n in final if ".mix." in n)


def test_loop_reports_the_global_model_beside_the_personalised_one():
    from fmtl_edge.evaluation import evaluate_method

    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    method = _loop(ds.tasks, rounds=1, global_rounds=1)
    ds, pool, coord, done = _run(method)
    ev = evaluate_method(method, done, coord)
    assert ev["global"] is not None and ev["personalised"] is not None
    assert set(ev["global"]) == set(ds.tasks.names)
    assert set(ev["personalised"]["per_client"]) == set(pool.client_ids)
    off = _loop(ds.tasks, rounds=1, global_rounds=0)
    assert not off.global_model and off.next_jobs({"loop": done["loop"]}) == []
