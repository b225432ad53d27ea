"""The device agent's pieces: the --data spec, device-side evaluation sums, failure kinds, `join` errors."""

from __future__ import annotations

import pytest

from fmtl_edge.transport.agent import DataSpec, _failure_kind


def test_data_spec_parsing():
    s = DataSpec.parse("digits:client=3,clients=8,seed=2,max-samples=400,alpha=0.3,image-size=32")
    assert (s.dataset, s.client_id, s.n_clients, s.seed, s.max_samples, s.alpha, s.image_size) == \
        ("digits", 3, 8, 2, 400, 0.3, 32)
    assert DataSpec.parse("utkface:client=0", data_dir="/d").data_dir == "/d"
    for bad, match in [("digits", "client=ID"), ("digits:clients=4", "client=ID"), (":client=1", "expected"),
                       ("digits:client=x", "not a number"), ("digits:client=1,colour=red", "unknown")]:
        with pytest.raises(ValueError, match=match):
            DataSpec.parse(bad)


def test_device_evaluation_sums_add_up_to_the_union_evaluation():
    """Per-client sums (what each device sends back) added up equal one pass over the pooled test data."""
    from fmtl_edge.client import add_sums, build_model, evaluate_sums, finish_sums
    from fmtl_edge.models import ModelSpec
    from fmtl_edge.tasks import TaskSet

    from conftest import make_toy_dataset

    ds = make_toy_dataset(n_clients=3)
    spec = ModelSpec(ds.input_shape, 4)
    tasks: TaskSet = ds.tasks
    model = build_model(spec, tasks, None)
    total: dict = {}
    for c in ds.clients:
        add_sums(total, evaluate_sums(model, c, tasks.names))
    (pooled,) = ds.pooled().clients
    ref = finish_sums(tasks, evaluate_sums(model, pooled, tasks.names, batch_size=10_000))
    got = finish_sums(tasks, total)
    for t in tasks.names:
        assert got[t]["n"] == ref[t]["n"] == sum(c.n_test for c in ds.clients)
        assert got[t]["loss"] == pytest.approx(ref[t]["loss"], rel=1e-5)
        assert got[t]["metric"] == pytest.approx(ref[t]["metric"], rel=1e-5)


def test_failure_kinds_the_server_understands():
    from fmtl_edge.data.base import DataError
    from fmtl_edge.runtime import BudgetExceeded, DeviceBusy

    assert _failure_kind(DeviceBusy("local", None, 0.0, "/x")) == "busy"
    assert _failure_kind(BudgetExceeded("memory", 2.0, 1.0)) == "memory"
    assert _failure_kind(BudgetExceeded("time", 2.0, 1.0)) == "budget"
    assert _failure_kind(DataError("x")) == "data"
    assert _failure_kind(ValueError("x")) == "error"


def test_join_refuses_bad_arguments(capsys, monkeypatch):
    from fmtl_edge.cli import main

    monkeypatch.delenv("FMTL_EDGE_TOKEN", raising=False)
    assert main(["join", "--server", "127.0.0.1:1", "--insecure", "--data", "digits:client=0"]) == 2
    assert "no token" in capsys.readouterr().err
    assert main(["join", "--server", "127.0.0.1:1", "--insecure", "--token", "t", "--data", "digits"]) == 2
    assert "client=ID" in capsys.readouterr().err
    assert main(["join", "--server", "127.0.0.1:1", "--insecure", "--token", "t",
                 "--data", "digits:client=99,clients=4"]) == 2
    assert "not in the 4-client partition" in capsys.readouterr().err
