"""GradNorm (Chen et al. 2018): one client step against a hand-computed GradNorm step (Eq. 1–2 with
autograd on L_grad), the initial losses set from the first batch, and the weights as FedAvg'd model
state through the coordinator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmtl_edge.client import build_model, train_round
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.evaluation import evaluate_method
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.methods import GradNorm, make_method
from fmtl_edge.config import SimulationConfig
from fmtl_edge.models import ModelSpec
from fmtl_edge.partition import ParameterLayout, state_to_numpy
from fmtl_edge.procedures.gradnorm import LOSS0, WEIGHTS
from fmtl_edge.strategy import ClientTask

from conftest import make_toy_dataset

SPEC = ModelSpec((1, 8, 8), 4)
NAMES = ("cls", "bin", "reg")


def _setup(w0, l0, alpha=1.5, lr=0.05):
    ds = make_toy_dataset(n_clients=1, n_per_client=16)
    tasks = ds.tasks.subset(NAMES)
    g = state_to_numpy(build_model(SPEC, tasks, None).state_dict())
    g[WEIGHTS] = np.asarray(w0, dtype=np.float32)
    g[LOSS0] = np.asarray(l0, dtype=np.float32)
    a = Assignment(job="all", round=0, tasks=NAMES, state=g, lr=lr,
                   config=TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0), seed=1,
                   procedure="gradnorm", method_config={"alpha": alpha})
    upd = train_round(ds.clients[0], SPEC, tasks, a)  # 16 samples, batch 64: exactly one step
    return ds.clients[0], tasks, g, upd


def _hand_step(c, tasks, g, w0, l0, alpha, lr):
    """Chen et al. Eq. 1–2 written out: G_i = ‖∇_W w_i L_i‖ (W: the backbone's last conv weight),
    L_grad = Σ_i |G_i − Ḡ·r_i^α| with Ḡ·r_i^α constant, one SGD step on w, renormalised to Σ w = n."""
    m = build_model(SPEC, tasks, g)
    m.train()
    outs = m(torch.from_numpy(c.x_train), list(NAMES))
    L = [tasks[t].loss(outs[t], torch.from_numpy(c.y_train[t])) for t in NAMES]
    W = m.backbone.layers[-1][0].weight
    assert W.dim() == 4  # a conv weight: the last shared layer
    w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    G = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(w[i] * L[i], W, retain_graph=True,
                                                                  create_graph=True)[0]) for i in range(3)])
    Lt = torch.stack([x.detach() for x in L]) / torch.tensor(l0 if l0 is not None else [float(x.detach()) for x in L])
    r = Lt / Lt.mean()
    target = (G.mean() * r ** alpha).detach()
    L_grad = (G - target).abs().sum()
    (gw,) = torch.autograd.grad(L_grad, w, retain_graph=True)
    new = w.detach() - lr * gw
    new = new * 3 / new.sum()
    # the model's own step on Σ w_i L_i with the step's (old) weights
    obj = sum(float(w0[i]) * L[i] for i in range(3))
    grads = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(obj, list(m.parameters()))))
    stepped = {n: (p.detach() - lr * grads[n]).numpy() for n, p in m.named_parameters()}
    return new.numpy(), [float(x.detach()) for x in L], stepped


def test_weights_after_one_step_equal_a_hand_computed_gradnorm_step():
    w0, l0, alpha, lr = [1.0, 0.5, 1.5], [2.0, 0.5, 1.0], 1.5, 0.05
    c, tasks, g, upd = _setup(w0, l0, alpha, lr)
    want_w, _, stepped = _hand_step(c, tasks, g, w0, l0, alpha, lr)
    got = upd.state[WEIGHTS]
    np.testing.assert_allclose(got, want_w, rtol=1e-5, atol=1e-7)
    assert got.sum() == pytest.approx(3.0, rel=1e-6)
    assert not np.allclose(got, w0, atol=1e-4)  # the step moved them
    np.testing.assert_array_equal(upd.state[LOSS0], np.asarray(l0, dtype=np.float32))  # set: kept
    for n in ("backbone.layers.2.0.weight", "heads.reg.fc.weight", "heads.cls.fc.bias"):
        np.testing.assert_allclose(upd.state[n], stepped[n], rtol=1e-4, atol=1e-6)


def test_unset_initial_losses_come_from_the_first_batch():
    w0 = [1.0, 1.0, 1.0]
    c, tasks, g, upd = _setup(w0, [0.0, 0.0, 0.0], alpha=1.5, lr=0.1)
    want_w, first, _ = _hand_step(c, tasks, g, w0, None, 1.5, 0.1)  # r_i = 1: L̃_i = 1 at t = 0
    np.testing.assert_allclose(upd.state[LOSS0], first, rtol=1e-5)
    np.testing.assert_allclose(upd.state[WEIGHTS], want_w, rtol=1e-5, atol=1e-7)


def test_weights_are_common_model_state_fedavgd_by_the_coordinator():
    ds = make_toy_dataset(n_clients=3, n_per_client=16)
    tasks = ds.tasks.subset(NAMES)
    ds.tasks = tasks
    coord = Coordinator(InProcessClientPool(ds, SPEC), SPEC, tasks, TrainConfig(batch_size=8), clients_per_round=2,
                        seed=0)
    m = GradNorm(tasks, 1, alpha=1.0)
    done = coord.run_method(m)
    st = done["all"].state
    assert ParameterLayout.from_state(st)[WEIGHTS].scope == "common"
    assert st[WEIGHTS].shape == (3,) and st[WEIGHTS].sum() == pytest.approx(3.0, rel=1e-5)
    assert not np.allclose(st[WEIGHTS], 1.0) and np.all(st[LOSS0] > 0)
    # the aggregate is the sample-weighted mean of the round's uploads (the clients rerun by hand)
    rec = done["all"].history[0]
    job = m.next_jobs({})[0]
    init = m.initial_state(job, coord.initial_state(NAMES))
    layout = ParameterLayout.from_state(init)
    ups = [train_round(ds.clients[c], SPEC, tasks,
                       coord.assignment(job, 0, ClientTask(job.procedure, job.method_config), init, rec.lr, layout))
           for c in rec.clients]
    n = np.array([u.n_samples for u in ups], dtype=np.float64)
    for key in (WEIGHTS, LOSS0):
        want = sum(u.state[key] * k for u, k in zip(ups, n)) / n.sum()
        np.testing.assert_allclose(st[key], want, rtol=1e-5)
    assert not np.allclose(ups[0].state[WEIGHTS], ups[1].state[WEIGHTS])
    ev = evaluate_method(m, done, coord)  # the extra state entries do not disturb evaluation
    assert set(ev["global"]) == set(NAMES)


def test_option_and_bad_alpha():
    cfg = SimulationConfig(rounds=3, r0=1, method_options={"gradnorm_alpha": 0.5})
    cfg.validate()
    assert make_method("gradnorm", make_toy_dataset(1).tasks, cfg).alpha == 0.5
    assert make_method("gradnorm", make_toy_dataset(1).tasks, SimulationConfig(rounds=3, r0=1)).alpha == 1.5
    with pytest.raises(ValueError, match="--gradnorm-alpha"):
        GradNorm(make_toy_dataset(1).tasks, 3, alpha=-1.0)


def test_gradnorm_counts_its_gradient_norm_passes():
    """16 samples, batch 64: one step of B = 16. The step is B sample-passes; balancing 3 tasks adds
    one ∇_W L_i per task: 3 × 16 more (lookahead off). A one-task job balances nothing."""
    _, _, _, upd = _setup([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert upd.lookahead_passes == 0
    assert upd.sample_passes == 16 + 3 * 16
    ds = make_toy_dataset(n_clients=1, n_per_client=16)
    tasks = ds.tasks.subset(("cls",))
    g = state_to_numpy(build_model(SPEC, tasks, None).state_dict())
    g[WEIGHTS], g[LOSS0] = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    a = Assignment(job="all", round=0, tasks=("cls",), state=g, lr=0.05,
                   config=TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0), seed=1,
                   procedure="gradnorm", method_config={"alpha": 1.5})
    assert train_round(ds.clients[0], SPEC, tasks, a).sample_passes == 16
    # with the lookahead on (one measurement of 3 tasks x 16), GradNorm's share stays 3 x 16
    c, tasks3, g3, _ = _setup([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    a = Assignment(job="all", round=0, tasks=NAMES, state=g3, lr=0.05, measure_affinity=True,
                   config=TrainConfig(batch_size=64, momentum=0.0, weight_decay=0.0), seed=1,
                   procedure="gradnorm", method_config={"alpha": 1.5})
    upd = train_round(c, SPEC, tasks3, a)
    assert upd.lookahead_passes == 3 * 16 and upd.sample_passes == 16 + 3 * 16 + 3 * 16
