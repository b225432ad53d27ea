"""Training sample-passes (the machine-load-independent cost of issue 10 item 7): counted per client
execution against a hand count, carried over the wire and summed per round, job and method."""

from __future__ import annotations

import pytest

from fmtl_edge.client import train_round
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import EnergyTally
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.methods import AllInOne
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import state_to_numpy

from conftest import make_toy_dataset

SPEC = ModelSpec((1, 8, 8), width=4)
TWO = ("cls", "bin")


def _client(n):
    ds = make_toy_dataset(n_clients=1, n_per_client=n)
    c = ds.clients[0]
    c.x_train, c.y_train = c.x_train[:n], {k: v[:n] for k, v in c.y_train.items()}
    assert c.n_train == n
    return ds, c


@pytest.mark.parametrize("n, training, lookahead", [
    # 10 samples, batch 4: batches 4, 4, 2 per epoch; E = 2 -> 6 steps, 20 training passes;
    # lookahead at steps 0, 2, 4 (batch sizes 4, 2, 4), 2 tasks each: 2 x 10 = 20.
    (10, 20, 20),
    # 9 samples: 4, 4, 1 -> the one-sample batch folded: 4, 5; 4 steps, 18 passes;
    # lookahead at steps 0 and 2 (sizes 4 and 4): 2 x 8 = 16.
    (9, 18, 16),
])
def test_sample_passes_against_a_hand_count(n, training, lookahead):
    ds, c = _client(n)
    state = state_to_numpy(MultiTaskModel(SPEC, ds.tasks.subset(TWO), seed=0).state_dict())
    cfg = TrainConfig(batch_size=4, local_epochs=2, affinity_every=2)
    a = Assignment("all", 0, TWO, state, 0.05, cfg, measure_affinity=True)
    upd = train_round(c, SPEC, ds.tasks, a)
    assert upd.affinity_steps == {10: 3, 9: 2}[n]
    assert upd.lookahead_passes == lookahead
    assert upd.sample_passes == training + lookahead
    # without the lookahead only the training passes
    plain = train_round(c, SPEC, ds.tasks, Assignment("all", 0, TWO, state, 0.05, cfg))
    assert plain.sample_passes == training and plain.lookahead_passes == 0


def test_sample_passes_summed_per_round_job_and_method():
    ds = make_toy_dataset(n_clients=3, n_per_client=12)
    coord = Coordinator(InProcessClientPool(ds, SPEC), SPEC, ds.tasks, TrainConfig(batch_size=4),
                        clients_per_round=2)
    done = coord.run_method(AllInOne(ds.tasks, 2))
    o = done["all"]
    n = {c.client_id: c.n_train for c in ds.clients}
    for rec in o.history:
        assert rec.sample_passes == sum(n[c] for c in rec.executed) and rec.lookahead_passes == 0
    assert o.energy.sample_passes == sum(r.sample_passes for r in o.history) > 0
    t = EnergyTally.from_dict(o.energy.to_dict())
    assert t.sample_passes == o.energy.sample_passes


def test_energy_tally_merges_passes():
    a, b = EnergyTally(), EnergyTally()
    a.add(1.0, {}, 10, 4)
    b.add(2.0, {}, 5)
    a.merge(b)
    assert (a.sample_passes, a.lookahead_passes) == (15, 4)


def test_flops_estimate_is_one_counted_step_times_the_passes():
    from fmtl_edge.flops import training_flops_per_sample
    from fmtl_edge.results import method_entry

    ds = make_toy_dataset(n_clients=2, n_per_client=12)
    coord = Coordinator(InProcessClientPool(ds, SPEC), SPEC, ds.tasks, TrainConfig(batch_size=4),
                        clients_per_round=2)
    method = AllInOne(ds.tasks, 1)
    done = coord.run_method(method)
    per = training_flops_per_sample(SPEC, ds.tasks, 4)
    assert per is not None and per > 0
    # linear in the batch: the per-sample figure does not depend on the batch counted
    assert training_flops_per_sample(SPEC, ds.tasks, 8) == pytest.approx(per, rel=1e-6)
    entry = method_entry(method, done, {}, 1, 0.0, SPEC, 4)
    assert entry["sample_passes"] == 24
    assert entry["flops_estimate"] == pytest.approx(per * 24)
    assert method_entry(method, done, {}, 1, 0.0)["flops_estimate"] is None
