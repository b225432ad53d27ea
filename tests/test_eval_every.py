"""``--eval-every N``: test-loss points of every job's global model during training (positions,
values equal to the final evaluation, training unchanged, not metered, resume exact)."""

from __future__ import annotations

import json

import pytest

from fmtl_edge.cli import main
from fmtl_edge.config import ConfigError, build_config
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import Job
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.evaluation import evaluate_method
from fmtl_edge.messages import TrainConfig
from fmtl_edge.methods import MAS
from fmtl_edge.models import ModelSpec
from fmtl_edge.report import method_curve
from fmtl_edge.curves import CurveRecorder

from conftest import interrupt_then_resume, make_toy_dataset

SPEC = ModelSpec((1, 8, 8), 4)
TINY = ["simulate", "--methods", "all-in-one,mas-2", "--rounds", "3", "--r0", "1", "--max-samples", "200",
        "--clients-per-round", "2", "--meter", "estimate", "--no-progress"]


def test_positions_count_the_jobs_a_job_continues_from():
    merge = Job("merge", ("a", "b"), 3)
    split = Job("split-0", ("a",), 4, init_from="merge")
    rec = CurveRecorder(2, jobs=[merge, split])
    assert rec.offset(merge) == 0 and rec.offset(split) == 3
    assert [r for r in range(3) if rec.due(merge, r)] == [1, 2]  # position 2, and the job's end (3)
    assert [r for r in range(4) if rec.due(split, r)] == [0, 2, 3]  # positions 4, 6 and the end (7)
    with pytest.raises(ValueError, match="--eval-every"):
        CurveRecorder(0)
    with pytest.raises(ConfigError, match="--eval-every"):
        build_config({"eval_every": -1})


def test_points_are_the_union_test_loss_of_the_current_global_model():
    ds = make_toy_dataset(n_clients=3, n_per_client=16)
    tasks = ds.tasks.subset(["cls", "bin", "reg"])
    ds.tasks = tasks
    pool = InProcessClientPool(ds, SPEC)
    coord = Coordinator(pool, SPEC, tasks, TrainConfig(batch_size=8), clients_per_round=2, seed=0)
    rec = CurveRecorder(1)
    coord.on_round_end = lambda ck: rec.record(coord, ck)
    mas = MAS(tasks, rounds=3, r0=1, n_splits=2)
    done = coord.run_method(mas)
    assert [(p["job"], p["position"]) for p in rec.points] == [
        ("merge", 1), ("split-0", 2), ("split-0", 3), ("split-1", 2), ("split-1", 3)]
    final = evaluate_method(mas, done, coord)["global"]
    for p in rec.points:
        if p["position"] == 3:  # a split job's last round: its final model
            assert p["per_task"] == pytest.approx({t: final[t]["loss"] for t in p["per_task"]}, rel=1e-12)
            assert p["total_test_loss"] == pytest.approx(sum(p["per_task"].values()))
    entry = {"curve": rec.points, "final_jobs": mas.final_jobs(done),
             "jobs": [{"name": o.job.name, "init_from": o.job.init_from} for o in done.values()]}
    total = method_curve(entry)
    assert [p["position"] for p in total] == [1, 2, 3]
    assert total[0]["total_test_loss"] == pytest.approx(rec.points[0]["total_test_loss"])  # the merge model
    assert total[-1]["total_test_loss"] == pytest.approx(sum(v["loss"] for v in final.values()))
    # evaluations are not client executions: nothing metered, nothing tallied
    assert sum(o.energy.executions for o in done.values()) == 2 * (1 + 2 + 2)
    # the same training without the curve
    coord2 = Coordinator(InProcessClientPool(ds, SPEC), SPEC, tasks, TrainConfig(batch_size=8), clients_per_round=2,
                         seed=0)
    done2 = coord2.run_method(MAS(tasks, rounds=3, r0=1, n_splits=2))
    for name, o in done.items():
        assert [h.train_loss for h in o.history] == [h.train_loss for h in done2[name].history]
        assert all((o.state[k] == done2[name].state[k]).all() for k in o.state)


def _methods(out):
    return json.loads((out / "results.json").read_text())["methods"]


@pytest.mark.slow
def test_simulate_with_eval_every_writes_curves_and_trains_the_same(tmp_path):
    assert main([*TINY, "--eval-every", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*TINY, "--out", str(tmp_path / "b")]) == 0
    a, b = _methods(tmp_path / "a"), _methods(tmp_path / "b")
    for name in ("all-in-one", "mas-2"):
        for k in ("total_test_loss", "per_task", "splits", "client_executions", "sample_passes"):
            assert a[name][k] == b[name][k], (name, k)
        assert "curve" not in b[name]
        assert a[name]["curve_total"][-1]["total_test_loss"] == pytest.approx(a[name]["total_test_loss"], rel=1e-9)
    assert [(p["job"], p["position"]) for p in a["all-in-one"]["curve"]] == [("all", 2), ("all", 3)]
    assert [p["position"] for p in a["mas-2"]["curve_total"]] == [1, 2, 3]


@pytest.mark.slow
def test_resume_keeps_the_curve_exact(tmp_path, monkeypatch):
    args = [*TINY, "--eval-every", "1"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    interrupt_then_resume(monkeypatch, main, args, tmp_path / "run", lambda a: a.state_key == "mas-2/split-1")
    ref, got = _methods(tmp_path / "ref"), _methods(tmp_path / "run")
    for name in ref:
        assert got[name]["curve"] == ref[name]["curve"], name
        assert got[name]["curve_total"] == ref[name]["curve_total"], name
