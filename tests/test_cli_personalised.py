"""`fmtl-edge simulate` with the personalised and layer-typed methods, and their bad input: one line
naming the field and the fix, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmtl_edge.cli import main

QUICK = ["--rounds", "2", "--max-samples", "300", "--clients-per-round", "2", "--no-progress", "--meter", "estimate"]


def test_personalised_methods_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", *QUICK, "--methods", "layered,ditto,local,centralized,all-in-one",
               "--layers", "personal=heads.*", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    m = res["methods"]
    assert m["layered"]["total_test_loss"] is None  # personal heads: no global model
    for name in ("layered", "ditto", "local"):
        e = m[name]
        assert e["personalised_total_test_loss"] == pytest.approx(
            sum(e["per_task"][t]["personalised_test_loss"] for t in res["tasks"]))
        clients = e["per_client"]
        assert set(clients) == {str(c) for c in range(res["clients"])}
        for t in res["tasks"]:  # the per-task figure is the test-sample-weighted mean over clients
            n = sum(c[t]["n"] for c in clients.values())
            mean = sum(c[t]["test_loss"] * c[t]["n"] for c in clients.values()) / n
            assert e["per_task"][t]["personalised_test_loss"] == pytest.approx(mean, rel=1e-9)
    assert m["ditto"]["total_test_loss"] is not None and m["local"]["reference"] and m["centralized"]["reference"]
    assert m["local"]["client_executions"] == res["clients"] * 2  # every client, every round
    # personal heads: no global task models, one own model per client (issue 22.1); ditto has both
    assert not list((out / "models" / "layered").glob("*.safetensors"))
    for name in ("layered", "ditto", "local"):
        own = sorted(p.stem for p in (out / "models" / name / "clients").glob("*.safetensors"))
        assert own == sorted(str(c) for c in range(res["clients"])), name
    assert (out / "models" / "ditto" / "digit.safetensors").is_file()
    assert not (out / "models" / "centralized" / "clients").exists()
    assert "personalised" in capsys.readouterr().out


def _pretrained_file(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "pre.safetensors"
    save_file({"backbone.layers.0.0.weight": np.zeros((3, 3), np.float32)}, str(p))
    return p


@pytest.mark.parametrize("args, match", [
    (["--methods", "layered", "--layers", "personal=nothing.*"], r"--layers|\[layers\].personal: pattern 'nothing.\*' matches no parameter"),
    (["--methods", "layered", "--layers", "personal=heads.*", "--layers", "common=heads.digit.*"], "matches both a"),
    (["--methods", "layered", "--layers", "colour=x"], "unknown layer type"),
    (["--methods", "layered", "--layers", "personal"], "KIND=PATTERN"),
    (["--methods", "ditto", "--ditto-lambda", "-1"], "--ditto-lambda: must be >= 0"),
    (["--methods", "layered", "--task-groups", "5", "--clients-per-round", "2"], r"client group has 1 clients.*lower --clients-per-round"),
    (["--methods", "all-in-one", "--aggregator", "mean"], "--aggregator"),
    # issue 22.2: a lookahead needs clients holding two tasks; refused before training, naming what runs instead
    (["--methods", "mas-2", "--task-groups", "5", "--rounds", "3", "--r0", "1"],
     r"--methods: mas-2 measures task affinity .* every client here holds one task only .*Run layered .*one-by-one"),
    (["--methods", "layered,tag-2", "--task-groups", "3", "--rounds", "3", "--r0", "1"], r"tag-2 measures task affinity"),
    (["--methods", "mas-auto", "--task-groups", "2", "--rounds", "3", "--r0", "2"], r"mas-auto measures task affinity"),
    (["--methods", "layered", "--pretrained", "PRE"], r"--pretrained: .*shape"),
    (["--methods", "layered", "--pretrained", "/nonexistent.safetensors"], "--pretrained: no such file"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, match):
    args = [str(_pretrained_file(tmp_path)) if a == "PRE" else a for a in args]
    out = tmp_path / "run"
    rc = main(["simulate", *QUICK, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    import re

    assert re.search(match, err), err
    assert not out.exists()


def test_mas_on_npz_clients_with_one_label_set_each_is_refused_before_training(tmp_path, capsys):
    """Issue 22.2: npz client files with one y_<task> each (no file needs every task's labels)
    train layered, and MAS is refused with the reason before anything trains."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tasks.toml").write_text("".join(f'[tasks.{t}]\nkind = "binary"\n\n' for t in "abc"))
    rng = np.random.default_rng(0)
    for k in range(6):
        n = 40
        arrays = {"x": rng.random((n, 6)).astype("float32"), "split": (np.arange(n) >= 30).astype("int8")}
        arrays[f"y_{'abc'[k % 3]}"] = rng.integers(0, 2, n)
        np.savez(data / f"client_{k}.npz", **arrays)
    common = ["simulate", "--dataset", "npz", "--data-dir", str(data), "--rounds", "3", "--r0", "1",
              "--clients-per-round", "2", "--no-progress", "--meter", "estimate"]
    rc = main([*common, "--methods", "mas-2", "--out", str(tmp_path / "mas")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "every client here holds one task only" in err and "layered" in err, err
    assert not (tmp_path / "mas").exists()
    rc = main([*common, "--methods", "layered,one-by-one", "--out", str(tmp_path / "ok")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert set(res["methods"]) == {"layered", "one-by-one"}
