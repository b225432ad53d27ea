"""Client execution: batching, per-round time budget (samples actually used), memory budget refusal,
metering and leasing of every execution."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_edge.client import execute, train_round
from fmtl_edge.procedures.sgd import batches as _batches
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import RoundFailed
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.methods import AllInOne
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import state_to_numpy
from fmtl_edge.runtime import BudgetExceeded, DeviceBusy, DeviceLease, make_meter

from conftest import make_toy_dataset

SPEC = ModelSpec((1, 8, 8), width=4)


def _assignment(ds, **kw):
    state = state_to_numpy(MultiTaskModel(SPEC, ds.tasks, seed=0).state_dict())
    cfg = TrainConfig(batch_size=kw.pop("batch_size", 4))
    return Assignment("all", 0, ds.tasks.names, state, 0.05, cfg, **kw)


@pytest.mark.parametrize("n, b", [(33, 32), (2, 32), (9, 4), (64, 32)])
def test_batches_cover_every_sample_once_and_never_hold_one(n, b):
    batches = _batches(n, b, np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(x) >= 2 for x in batches)


def test_time_budget_stops_early_and_reports_samples_used():
    ds = make_toy_dataset(n_clients=1, n_per_client=64)
    full = train_round(ds.clients[0], SPEC, ds.tasks, _assignment(ds))
    assert full.n_samples == 64 and full.stopped_by is None
    cut = train_round(ds.clients[0], SPEC, ds.tasks, _assignment(ds, time_budget_s=1e-9))
    assert cut.stopped_by == "time"
    assert cut.n_samples == 4  # one batch of 4 before the budget check
    # the energy budget uses the meter window's running total
    meter = make_meter("estimate", power_w=1e6)
    upd = execute(ds.clients[0], SPEC, ds.tasks, _assignment(ds, energy_budget_j=1e-9), meter)
    assert upd.stopped_by == "energy" and upd.n_samples < 64


def test_execution_is_metered_and_leased(tmp_path):
    ds = make_toy_dataset(n_clients=1)
    meter = make_meter("estimate")
    upd = execute(ds.clients[0], SPEC, ds.tasks, _assignment(ds), meter,
                  DeviceLease("dev0", runtime_dir=tmp_path))
    assert upd.device_s > 0 and upd.energy["estimated"] is True and upd.energy["total_j"] > 0
    assert upd.peak_memory_bytes is not None
    # while another task holds the device, the execution is refused, not run
    with DeviceLease("dev0", runtime_dir=tmp_path):
        with pytest.raises(DeviceBusy):
            execute(ds.clients[0], SPEC, ds.tasks, _assignment(ds), meter,
                    DeviceLease("dev0", runtime_dir=tmp_path, timeout_s=0))


def test_memory_budget_refuses_before_training_and_round_fails_clearly():
    ds = make_toy_dataset(n_clients=3)
    with pytest.raises(BudgetExceeded) as e:
        execute(ds.clients[0], SPEC, ds.tasks, _assignment(ds), None, None, memory_budget_bytes=1000)
    assert e.value.kind == "memory" and e.value.needed > 1000
    pool = InProcessClientPool(ds, SPEC, None, None, memory_budget_bytes=1000)
    coord = Coordinator(pool, SPEC, ds.tasks, TrainConfig(batch_size=4), clients_per_round=2)
    with pytest.raises(RoundFailed, match="memory budget"):
        coord.run_method(AllInOne(ds.tasks, 1))
    # a generous budget runs
    pool.memory_budget_bytes = 1 << 34
    done = coord.run_method(AllInOne(ds.tasks, 1))
    assert done["all"].history[0].refused == []
