"""FedAvg of parameter slices over the clients that hold them, against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmtl_edge.aggregation import Accumulator, weighted_average_slices
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import ParameterLayout, default_scope, select_state
from fmtl_edge.tasks import Task, TaskSet


def _layout():
    state = {
        "backbone.w": np.zeros((2, 2), np.float32),   # common
        "heads.a.w": np.zeros(3, np.float32),         # task:a
        "heads.b.w": np.zeros(1, np.float32),         # task:b
        "personal.w": np.zeros(2, np.float32),        # personal (by pattern)
        "frozen.w": np.zeros(2, np.float32),          # frozen (by pattern)
        "backbone.n": np.zeros((), np.int64),         # integer buffer: not in the layout
    }
    return state, ParameterLayout.from_state(state, frozen=["frozen.*"], personal=["personal.*"])


def test_layout_scopes_and_offsets():
    state, layout = _layout()
    assert layout.names == ("backbone.w", "heads.a.w", "heads.b.w", "personal.w", "frozen.w")
    assert layout.scopes() == ("common", "task:a", "task:b", "personal", "frozen")
    assert layout.table.tolist() == [[0, 4], [4, 3], [7, 1], [8, 2], [10, 2]]
    assert layout.n_params == 12
    assert layout.contributes(["a"]).tolist() == [True, True, False, False, False]
    assert default_scope("heads.age.fc.weight") == "task:age"
    assert default_scope("backbone.layers.0.0.weight") == "common"


def test_slice_fedavg_hand_computation():
    _, layout = _layout()
    g = np.arange(12, dtype=np.float32)  # current global values
    # client 0 trained task a (weight 1), client 1 tasks a+b (weight 3), client 2 task b (weight 2)
    xs = [np.full(12, 10.0, np.float32), np.full(12, 20.0, np.float32), np.full(12, 40.0, np.float32)]
    w = [1.0, 3.0, 2.0]
    mask = layout.contribution_mask([["a"], ["a", "b"], ["b"]])
    out = weighted_average_slices(g.copy(), xs, w, layout.table, mask)
    common = (1 * 10 + 3 * 20 + 2 * 40) / 6      # all three clients
    task_a = (1 * 10 + 3 * 20) / 4               # clients 0, 1
    task_b = (3 * 20 + 2 * 40) / 5               # clients 1, 2
    expect = np.concatenate([[common] * 4, [task_a] * 3, [task_b], g[8:10], g[10:12]])
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    # streaming form gives the same
    acc = Accumulator(layout.n_params, layout.table)
    for x, wk, k in zip(xs, w, range(3)):
        acc.add(x, wk, mask[:, k])
    np.testing.assert_allclose(acc.result(g.copy()), expect, rtol=1e-6)


def test_flatten_unflatten_roundtrip_and_errors():
    model = MultiTaskModel(ModelSpec((1, 8, 8), 4), TaskSet([Task("a", "binary"), Task("b", "dense")]), seed=0)
    state = model.state_dict()
    layout = ParameterLayout.from_model(model)
    vec = layout.flatten(state)
    back = layout.unflatten(vec)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k].numpy())
    assert not any("num_batches_tracked" in n for n in layout.names)
    bad = dict(state)
    bad["heads.a.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="heads.a.fc.weight"):
        layout.flatten(bad)
    sub = select_state({k: v.numpy() for k, v in state.items()}, ["b"])
    assert not any(k.startswith("heads.a.") for k in sub) and any(k.startswith("heads.b.") for k in sub)
