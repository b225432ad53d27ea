"""Lookahead affinity (MAS Eq. 3): leaves model, BatchNorm statistics and optimizer untouched,
and matches a hand-made lookahead on a deep copy of the model."""

from __future__ import annotations

import copy

import numpy as np
import torch

from fmtl_edge.affinity import AffinityAverager, lookahead_affinity
from fmtl_edge.models import ModelSpec, MultiTaskModel

from conftest import make_toy_dataset


def _setup(seed=0):
    ds = make_toy_dataset(n_clients=1, n_per_client=16, seed=seed)
    model = MultiTaskModel(ModelSpec((1, 8, 8), width=4), ds.tasks, seed=seed).train()
    c = ds.clients[0]
    x = torch.from_numpy(c.x_train)
    ys = {k: torch.from_numpy(v) for k, v in c.y_train.items()}
    return ds, model, x, ys


def _losses(model, x, ys):
    outs = model(x)
    return {n: model.tasks[n].loss(outs[n], ys[n]) for n in model.task_names}


def test_lookahead_leaves_model_bn_and_optimizer_unchanged():
    ds, model, x, ys = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    # one real step so the optimizer has momentum buffers to compare
    sum(_losses(model, x, ys).values()).backward()
    opt.step()
    opt.zero_grad()
    losses = _losses(model, x, ys)
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    S = lookahead_affinity(model, x, ys, losses, lr=0.1, weight_decay=1e-4)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed by the lookahead"
    assert all(p.grad is None for p in model.parameters()), "lookahead left gradients behind"
    opt_after = opt.state_dict()
    for pid, st in opt_before["state"].items():
        assert torch.equal(st["momentum_buffer"], opt_after["state"][pid]["momentum_buffer"])
    assert S.shape == (4, 4) and np.all(np.isfinite(S))
    # the graph of the training forward is still usable for the real step
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_lookahead_matches_manual_step_on_copy():
    ds, model, x, ys = _setup(seed=1)
    lr, wd = 0.05, 1e-3
    losses = _losses(model, x, ys)
    bn_state = copy.deepcopy(model.state_dict())
    S = lookahead_affinity(model, x, ys, losses, lr=lr, weight_decay=wd)
    names = model.task_names
    for i, ti in enumerate(names):
        m2 = copy.deepcopy(model)
        m2.load_state_dict(bn_state)
        base = _losses(m2, x, ys)
        grads = torch.autograd.grad(base[ti], list(m2.backbone.parameters()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(m2.backbone.parameters(), grads):
                p -= lr * ((g if g is not None else 0) + wd * p)
            new = _losses(m2, x, ys)
        for j, tj in enumerate(names):
            expect = 1 - float(new[tj]) / float(base[tj].detach())
            assert abs(S[i, j] - expect) < 1e-5, (ti, tj, S[i, j], expect)


def test_lookahead_own_step_helps_own_loss_and_divide_by_lr():
    ds, model, x, ys = _setup(seed=2)
    losses = _losses(model, x, ys)
    S = lookahead_affinity(model, x, ys, losses, lr=0.01)
    # a small gradient step on task i lowers L_i: positive self-effect
    assert np.all(np.diag(S) > 0)
    S2 = lookahead_affinity(model, x, ys, losses, lr=0.01, divide_by_lr=True)
    np.testing.assert_allclose(S2, S / 0.01, rtol=1e-6)


def test_affinity_averager_weights_clients_equally_keeps_negatives():
    avg = AffinityAverager(2)
    a = np.array([[0.0, -0.5], [0.2, 0.0]])
    b = np.array([[0.0, 0.1], [0.4, 0.0]])
    r0 = avg.add_round(0, [a, None, b])
    np.testing.assert_allclose(r0, (a + b) / 2)
    avg.add_round(1, [b])
    np.testing.assert_allclose(avg.result(), ((a + b) / 2 + b) / 2)
    only_first = AffinityAverager(2, rounds=[0])
    only_first.add_round(0, [a])
    only_first.add_round(1, [b])
    np.testing.assert_allclose(only_first.result(), a)
    assert AffinityAverager(2).result() is None
