"""End-to-end `fmtl-edge simulate` on the embedded digits data, and its bad-input handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fmtl_edge.cli import main
from fmtl_edge.export import load_task_model

QUICK = ["--rounds", "3", "--r0", "1", "--max-samples", "400", "--clients-per-round", "2",
         "--no-progress", "--meter", "estimate"]


def test_simulate_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", *QUICK, "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert res["dataset"] == "digits" and len(tasks) == 5 and res["clients"] == 8
    assert set(res["methods"]) == {"mas-2", "all-in-one", "one-by-one"}
    assert {"config", "versions"} <= set(res)
    for name, m in res["methods"].items():
        assert m["total_test_loss"] == pytest.approx(sum(m["per_task"][t]["test_loss"] for t in tasks))
        assert set(m["per_task"]) == set(tasks)
        for t in tasks:
            pt = m["per_task"][t]
            assert np.isfinite(pt["test_loss"]) and pt["metric_name"] in ("accuracy", "mae", "rmse")
        assert m["device_s"] > 0 and m["energy_j"] > 0 and m["energy_estimated"] is True
        assert "estimate" in m["energy_source"]
        flat = sorted(t for g in m["splits"] for t in g)
        assert flat == sorted(tasks), f"{name} splits are not a partition of the tasks"
        for t in tasks:
            f = out / "models" / name / f"{t}.safetensors"
            assert f.is_file()
    mas, allin, obo = res["methods"]["mas-2"], res["methods"]["all-in-one"], res["methods"]["one-by-one"]
    assert len(mas["splits"]) == 2
    assert np.array(mas["affinity"]).shape == (5, 5)
    assert allin["splits"] == [tasks] and obo["splits"] == [[t] for t in tasks]
    # K clients per round, every round of every job: one-by-one runs n times the rounds
    assert obo["client_executions"] == 2 * 3 * 5 and allin["client_executions"] == 2 * 3
    assert mas["client_executions"] == 2 * (1 + 2 * 2)
    # a saved per-task model loads back and predicts
    model, task = load_task_model(out / "models" / "mas-2" / "digit.safetensors")
    import torch

    pred = model(torch.zeros(2, 1, 8, 8))["digit"]
    assert pred.shape == (2, 10) and task.kind == "classification"
    state = load_file(str(out / "models" / "one-by-one" / "parity.safetensors"))
    assert not any(k.startswith("heads.digit.") for k in state)
    table = capsys.readouterr().out
    assert "mas-2" in table and "one-by-one" in table
    # the report command reprints the table, and draws the figure where matplotlib is installed
    assert main(["report", str(out)]) == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = tmp_path / "summary.png"
    assert main(["report", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_same_seed_same_results(tmp_path):
    args = ["simulate", *QUICK, "--methods", "mas-2", "--max-samples", "200"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())["methods"]["mas-2"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["methods"]["mas-2"]
    assert a["total_test_loss"] == b["total_test_loss"] and a["splits"] == b["splits"]
    np.testing.assert_array_equal(np.array(a["affinity"]), np.array(b["affinity"]))


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--dataset", "mnist"], "unknown dataset"),
        (["--methods", "mas-2,fedsgd"], "unknown method"),
        (["--rounds", "5", "--r0", "5"], "--r0"),
        (["--methods", "mas-6"], "--methods"),
        (["--clients-per-round", "9"], "--clients-per-round"),
        (["--lr", "-1"], "--lr"),
        (["--dataset", "uci-har", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys, extra, field):
    out = tmp_path / "run"
    rc = main(["simulate", "--no-progress", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("fmtl-edge simulate: error:")
    assert field in err[0]
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_bad_config_file_and_wrong_layout(tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text('rounds = 4\nclient-per-round = 2\n')
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "client-per-round" in capsys.readouterr().err
    cfg.write_text('rounds = "many"\n')
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "rounds" in capsys.readouterr().err
    bad = tmp_path / "npzdata"
    bad.mkdir()
    (bad / "client_0.npz").write_bytes(b"not an npz")
    (bad / "tasks.toml").write_text('[tasks.y]\nkind = "binary"\n')
    assert main(["simulate", "--dataset", "npz", "--data-dir", str(bad), "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    assert "client_0.npz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_file_values_and_flag_override(tmp_path):
    from fmtl_edge.config import build_config

    cfg_file = tmp_path / "job.toml"
    cfg_file.write_text('rounds = 12\nclients-per-round = 3\nmethods = ["mas-3", "all-in-one"]\n')
    cfg = build_config({"rounds": 9}, cfg_file)
    assert cfg.rounds == 9 and cfg.r0 == 3 and cfg.clients_per_round == 3
    assert cfg.methods == ("mas-3", "all-in-one")


def test_out_folder_with_foreign_content_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["simulate", *QUICK, "--out", str(out)]) == 2
    assert (out / "thesis.tex").read_text() == "precious"
    assert "--out" in capsys.readouterr().err


def test_task_model_file_keeps_shapes(tmp_path):
    import torch

    from fmtl_edge.export import save_task_model
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import state_to_numpy
    from fmtl_edge.tasks import Task

    task = Task("y", "regression", target_mean=3.0, target_std=2.0, units="years")
    spec = ModelSpec((1, 8, 8), 4)
    model = MultiTaskModel(spec, [task], seed=1)
    state = state_to_numpy(model.state_dict())
    f = save_task_model(tmp_path / "y.safetensors", state, task, spec, "all-in-one")
    raw = load_file(str(f))
    assert {k: v.shape for k, v in raw.items()} == {k: v.shape for k, v in state.items()}
    back, t2 = load_task_model(f)
    assert t2 == task
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    assert torch.equal(back(x)["y"], model(x)["y"])
