"""Strategies, client procedures and client state (docs/design.md §3): per-group slice averaging, robust
aggregators, personal and frozen layers, Ditto's personal step, resume with client state."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fmtl_edge.client import build_model, train_round
from fmtl_edge.client_state import MemoryStateStore
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import Job
from fmtl_edge.pool import ClientPool
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.data.base import DataError, assign_task_groups
from fmtl_edge.evaluation import evaluate_method
from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig
from fmtl_edge.methods import Ditto, Layered, Local
from fmtl_edge.models import ModelSpec
from fmtl_edge.partition import state_to_numpy
from fmtl_edge.strategy import FedAvgStrategy

from conftest import make_toy_dataset

SPEC = ModelSpec((1, 8, 8), 4)


class GroupPool(ClientPool):
    """Client c holds task ``tasks_of[c]`` only and returns global + (c + 1) on every float tensor,
    with ``10 * (c + 1)`` samples: the expected FedAvg is computable by hand."""

    def __init__(self, tasks_of):
        self.tasks_of = tasks_of
        self.seen = []

    @property
    def client_ids(self):
        return sorted(self.tasks_of)

    def eligible(self, tasks):
        return [c for c in self.client_ids if self.tasks_of[c] in tasks]

    def execute_many(self, work):
        for cid, a in work:
            self.seen.append((cid, a))
            state = {k: (v + (cid + 1.0) if np.issubdtype(v.dtype, np.floating) else v) for k, v in a.state.items()
                     if k not in a.personal}
            yield ClientUpdate(cid, a.job, a.round, (self.tasks_of[cid],), state, 10 * (cid + 1),
                               {self.tasks_of[cid]: 1.0}, None, 0, 0.1, {"total_j": 1.0, "source": "test"})


def test_task_slices_average_over_their_group_and_common_over_all():
    ds = make_toy_dataset(n_clients=1)
    tasks = ds.tasks.subset(["cls", "bin"])
    pool = GroupPool({0: "cls", 1: "cls", 2: "bin", 3: "bin", 4: "bin"})
    coord = Coordinator(pool, SPEC, tasks, TrainConfig(), clients_per_round=2, seed=3)
    job = Job("layered", ("cls", "bin"), 1, sampling="per-group")
    init = coord.initial_state(job.tasks)
    out = coord.run_job(job, init, strategy=FedAvgStrategy(sampling="per-group"))
    chosen = sorted(c for c, _ in pool.seen)
    cls_c = [c for c in chosen if pool.tasks_of[c] == "cls"]
    bin_c = [c for c in chosen if pool.tasks_of[c] == "bin"]
    assert len(cls_c) == 2 and len(bin_c) == 2  # K from each task's client group

    def avg(cs):  # Σ w_c (g + c + 1) / Σ w_c with w_c = 10 (c + 1)
        w = np.array([10.0 * (c + 1) for c in cs])
        return float((w * np.array([c + 1.0 for c in cs])).sum() / w.sum())

    k = "backbone.layers.0.0.weight"
    np.testing.assert_allclose(out.state[k], init[k] + avg(chosen), rtol=1e-6)
    np.testing.assert_allclose(out.state["heads.cls.fc.weight"], init["heads.cls.fc.weight"] + avg(cls_c), rtol=1e-6)
    np.testing.assert_allclose(out.state["heads.bin.fc.weight"], init["heads.bin.fc.weight"] + avg(bin_c), rtol=1e-6)


def test_a_group_smaller_than_its_sampling_is_refused_with_the_fix():
    pool = GroupPool({0: "cls", 1: "bin", 2: "bin"})
    ds = make_toy_dataset(n_clients=1)
    coord = Coordinator(pool, SPEC, ds.tasks.subset(["cls", "bin"]), TrainConfig(), clients_per_round=2)
    with pytest.raises(ValueError, match=r"task 'cls'.*1 clients.*lower --clients-per-round"):
        coord.run_job(Job("j", ("cls", "bin"), 1), strategy=FedAvgStrategy(sampling="per-group"))


def test_median_aggregator_is_the_coordinate_median_of_the_updates():
    pool = GroupPool({0: "cls", 1: "cls", 2: "cls"})
    ds = make_toy_dataset(n_clients=1)
    coord = Coordinator(pool, SPEC, ds.tasks.subset(["cls"]), TrainConfig(), clients_per_round=3)
    job = Job("j", ("cls",), 1)
    init = coord.initial_state(job.tasks)
    out = coord.run_job(job, init, strategy=FedAvgStrategy(aggregator="median"))
    k = "backbone.layers.0.0.weight"
    np.testing.assert_allclose(out.state[k], init[k] + 2.0, rtol=1e-6)  # median of +1, +2, +3
    fed = coord.run_job(job, init, strategy=FedAvgStrategy(aggregator="fedavg"))
    assert not np.allclose(fed.state[k], out.state[k])  # weights 10, 20, 30 pull the mean above 2


def _assignment(ds, state, **kw):
    base = dict(job="j", round=0, tasks=tuple(ds.tasks.names), state=state, lr=0.05,
                config=TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0), seed=1, state_key="m/j")
    base.update(kw)
    return Assignment(**base)


def test_personal_layers_stay_on_the_client_and_carry_over_rounds():
    ds = make_toy_dataset(n_clients=1)
    c = ds.clients[0]
    g = state_to_numpy(build_model(SPEC, ds.tasks, None).state_dict())
    personal = tuple(k for k in g if k.startswith("heads.") and np.issubdtype(g[k].dtype, np.floating))
    store = MemoryStateStore()
    u0 = train_round(c, SPEC, ds.tasks, _assignment(ds, g, personal=personal), state_store=store)
    assert not set(personal) & set(u0.state)  # never uploaded
    kept = store.load("m/j", 1)
    assert kept is not None and all(not np.allclose(kept["layer:" + n], g[n]) for n in personal[:2])
    # round 1 starts from the client's own heads, not the broadcast ones: same as a stateless client
    # whose broadcast already had them
    u1 = train_round(c, SPEC, ds.tasks, _assignment(ds, g, round=1, personal=personal), state_store=store)
    g_own = {**g, **{n: kept["layer:" + n] for n in personal}}
    ref = train_round(c, SPEC, ds.tasks, _assignment(ds, g_own, round=1))
    for k in u1.state:
        np.testing.assert_array_equal(u1.state[k], ref.state[k])


def test_frozen_layers_are_unchanged_by_training_and_never_sent():
    ds = make_toy_dataset(n_clients=1)
    g = state_to_numpy(build_model(SPEC, ds.tasks, None).state_dict())
    frozen = tuple(k for k in g if k.startswith("backbone.") and np.issubdtype(g[k].dtype, np.floating))
    assert any("running_mean" in k for k in frozen)
    seen = {}

    class Spy:  # a procedure wrapper would be heavier: read the trained model through the state store
        def load(self, key, before_round):
            return None

        def save(self, key, round_idx, tensors):
            seen.update(tensors)

    upd = train_round(ds.clients[0], SPEC, ds.tasks, _assignment(ds, g, frozen=frozen, personal=frozen), state_store=Spy())
    assert not set(frozen) & set(upd.state)
    for k in frozen:  # the model the client trained (its stored copy) kept every frozen value
        np.testing.assert_array_equal(seen["layer:" + k], g[k])
    assert any(not np.allclose(upd.state[k], g[k]) for k in upd.state if k.startswith("heads.") and "weight" in k)


def test_ditto_personal_step_equals_a_manual_step():
    ds = make_toy_dataset(n_clients=1, n_per_client=16)
    c = ds.clients[0]
    tasks = ds.tasks.subset(["cls", "bin"])
    g = state_to_numpy(build_model(SPEC, tasks, None).state_dict())
    p0 = state_to_numpy(build_model(SPEC, tasks, None).state_dict())  # a different init: the pull is not zero
    lam, lr = 0.7, 0.05
    store = MemoryStateStore()
    store.save("m/j", -1, {"p." + k: v for k, v in p0.items()})
    a = Assignment(job="j", round=0, tasks=("cls", "bin"), state=g, lr=lr,
                   config=TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0), seed=1, state_key="m/j",
                   procedure="ditto", method_config={"lambda": lam})
    train_round(c, SPEC, tasks, a, state_store=store)
    p1 = store.load("m/j", 1)
    # by hand: one full batch, p1 = p0 − lr·(∇F(p0) + λ·(p0 − w*)), BatchNorm in train mode
    m = build_model(SPEC, tasks, p0)
    m.train()
    x = torch.from_numpy(c.x_train)
    outs = m(x, ["cls", "bin"])
    loss = sum(tasks[t].loss(outs[t], torch.from_numpy(c.y_train[t])) for t in ("cls", "bin"))
    grads = torch.autograd.grad(loss, list(m.parameters()))
    for (n, p), gr in zip(m.named_parameters(), grads):
        want = p.detach().numpy() - lr * (gr.numpy() + lam * (p0[n] - g[n]))
        np.testing.assert_allclose(p1["p." + n], want, rtol=1e-4, atol=1e-6)


def _cfg(**kw):
    base = dict(rounds=3, aggregator="fedavg", trim_fraction=0.1, layers=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_resume_with_client_state_equals_an_uninterrupted_run():
    ds = make_toy_dataset(n_clients=4)
    method = Layered(ds.tasks, 3, layers={"personal": ["heads.*"]})

    def coord(pool, **kw):
        return Coordinator(pool, SPEC, ds.tasks, TrainConfig(batch_size=8), clients_per_round=2, seed=5, **kw)

    full_pool = InProcessClientPool(ds, SPEC)
    c_full = coord(full_pool)
    full = c_full.run_method(method)
    ref = evaluate_method(method, full, c_full)["personalised"]["per_client"]

    snaps = {}
    pool = InProcessClientPool(ds, SPEC)

    def on_end(ck):
        if ck.round == 1:
            snaps["ck"] = ck
            snaps["state"] = pool.state_snapshot()
            snaps["vec"] = {k: np.array(v, copy=True) for k, v in ck.state.items()}
            raise KeyboardInterrupt  # the run is killed after round 1

    with pytest.raises(KeyboardInterrupt):
        coord(pool, on_round_end=on_end).run_method(method)
    ck = snaps["ck"]
    ck.state = snaps["vec"]
    pool2 = InProcessClientPool(ds, SPEC)
    pool2.restore_state(snaps["state"])
    c2 = coord(pool2)
    resumed = c2.run_method(method, resume=ck)
    for k, v in full["layered"].state.items():
        np.testing.assert_array_equal(resumed["layered"].state[k], v)
    got = evaluate_method(method, resumed, c2)["personalised"]["per_client"]
    assert got == ref


def test_local_and_ditto_report_personalised_figures():
    ds = make_toy_dataset(n_clients=3)
    pool = InProcessClientPool(ds, SPEC)
    coord = Coordinator(pool, SPEC, ds.tasks, TrainConfig(batch_size=8), clients_per_round=2, seed=0)
    local = Local(ds.tasks, 1)
    done = coord.run_method(local)
    ev = evaluate_method(local, done, coord)
    assert ev["global"] is None and set(ev["personalised"]["per_client"]) == {0, 1, 2}
    assert len(done["local"].history[0].clients) == 3  # every client, every round
    ditto = Ditto(ds.tasks, 1, lam=0.5)
    done = coord.run_method(ditto)
    ev = evaluate_method(ditto, done, coord)
    assert ev["global"] is not None and ev["personalised"] is not None
    n = {t: sum(pc[t]["n"] for pc in ev["personalised"]["per_client"].values()) for t in ds.tasks.names}
    assert n == {t: ev["global"][t]["n"] for t in ds.tasks.names}  # every test sample counted once


def test_task_groups_give_each_client_one_task():
    ds = assign_task_groups(make_toy_dataset(n_clients=7), 3, seed=1)
    assert ds.tasks.names == ("cls", "bin", "reg")
    sizes = [len(ds.clients_of(t)) for t in ds.tasks.names]
    assert sorted(sizes) == [2, 2, 3] and all(len(c.y_train) == 1 for c in ds.clients)
    with pytest.raises(DataError, match="--task-groups"):
        assign_task_groups(make_toy_dataset(n_clients=2), 3)


def test_layer_patterns_are_checked_against_the_model():
    ds = make_toy_dataset(n_clients=1)
    state = state_to_numpy(build_model(SPEC, ds.tasks, None).state_dict())
    for layers, match in [({"personal": ["nothing.*"]}, "matches no parameter"),
                          ({"personal": ["heads.*"], "common": ["heads.cls.*"]}, "both a"),
                          ({"task": ["backbone.*"]}, "task-specific layers are a task's head"),
                          ({"colour": ["x"]}, "unknown layer type")]:
        with pytest.raises(ValueError, match=match):
            Layered(ds.tasks, 1, layers=layers).check(state)
    bad = {k: v for k, v in state.items() if k != "backbone.layers.0.0.weight"}
    with pytest.raises(ValueError, match="--pretrained: the file has no tensor"):
        Layered(ds.tasks, 1, pretrained=bad).check(state)
    wrong = {**state, "backbone.layers.0.0.weight": np.zeros((1, 1), np.float32)}
    with pytest.raises(ValueError, match="--pretrained: tensor .* has shape"):
        Layered(ds.tasks, 1, pretrained=wrong).check(state)
    with pytest.raises(ValueError, match="--ditto-lambda"):
        Ditto(ds.tasks, 1, lam=-1.0)
