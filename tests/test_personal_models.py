"""Issue 22.1: personalised models reach the device. A personalised run saves each client's own
model (``models/<method>/clients/<id>.safetensors``: layered's personal heads, ditto's p_k), kept
through ``--resume``; ``fmtl-edge export --clients`` writes one ONNX per client with the onnxruntime
parity check, and the per-client accuracy of those ONNX files on each client's test split is the
run's personalised per-client figure."""

from __future__ import annotations

import dataclasses
import re
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fmtl_edge.cli import main
from fmtl_edge.data import load_dataset

SHARED = Path(os.environ.get("FMTL_EDGE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
HAR = SHARED / "uci_har"


def _onnx_hits(sess, x: np.ndarray, kinds: dict[str, str], ys: dict[str, np.ndarray]) -> dict[str, int]:
    """Correct predictions per output of an ONNX session on ``x`` (classification: argmax; binary: logit > 0)."""
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, {"input": x.astype(np.float32)})))
    hits = {}
    for t, y in ys.items():
        pred = outs[t].argmax(axis=1) if kinds[t] == "classification" else (outs[t].reshape(-1) > 0).astype(int)
        hits[t] = int((pred == np.asarray(y).reshape(-1).astype(int)).sum())
    return hits


@pytest.mark.data
def test_har_client_onnx_models_reproduce_the_personalised_figures(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if not (HAR / "har265_per_subject.npz").is_file():
        pytest.skip(f"shared UCI HAR data not found at {HAR} (set FMTL_EDGE_SHARED_DATA)")
    import onnxruntime as ort

    from fmtl_edge.data.npz import write_npz_dataset

    # two HAR subjects (their own train/test split), written as an npz data set: few clients keep the test fast
    har = load_dataset("uci-har", data_dir=HAR, max_samples=1200, seed=0)
    data = write_npz_dataset(dataclasses.replace(har, clients=har.clients[:2]), tmp_path / "har2")
    out = tmp_path / "run"
    rc = main(["simulate", "--dataset", "npz", "--data-dir", str(data), "--methods", "layered,ditto",
               "--layers", "personal=heads.*", "--rounds", "3", "--clients-per-round", "2", "--meter", "estimate",
               "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    ds = load_dataset("npz", data_dir=data)
    kinds = {t.name: t.kind for t in ds.tasks}
    assert set(kinds.values()) <= {"classification", "binary"}

    rc = main(["export", str(out), "--onnx", "--clients", "all", "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    files = {(m["method"], m["client"]): m for m in report["models"]}
    assert set(files) == {(meth, str(c.client_id)) for meth in ("layered", "ditto") for c in ds.clients}
    for (meth, cid), m in files.items():
        assert m["max_abs_diff"] <= report["tolerance"] == 1e-4
        assert Path(m["path"]) == out / "onnx" / meth / "clients" / f"{cid}.onnx"
        client = ds.clients[int(cid)]
        assert m["tasks"] == [t for t in ds.tasks.names if t in client.y_test]
        sess = ort.InferenceSession(m["path"], providers=["CPUExecutionProvider"])
        hits = _onnx_hits(sess, client.x_test, kinds, {t: client.y_test[t] for t in m["tasks"]})
        figures = res["methods"][meth]["per_client"][cid]
        for t, h in hits.items():
            n = figures[t]["n"]
            assert n == len(client.y_test[t])
            assert h / n == pytest.approx(figures[t]["metric"], abs=1e-12), (meth, cid, t)
    # the personalised models differ between clients (layered: personal heads; ditto: p_k)
    from safetensors.numpy import load_file

    a, b = (load_file(out / "models" / "layered" / "clients" / f"{c}.safetensors") for c in ("0", "1"))
    head = next(k for k in a if k.startswith("heads."))
    assert not np.array_equal(a[head], b[head])
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith("backbone."))  # the shared backbone


def _client_run(tmp_path):
    """A run folder with client models only (layered, personal heads) for clients 0 and 1, and a
    global-only method (all-in-one), from seeded random weights."""
    from conftest import make_toy_dataset

    from fmtl_edge.export import save_client_model, save_task_model
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import select_state

    ds = make_toy_dataset()
    spec = ModelSpec(ds.input_shape, width=4)
    run = tmp_path / "run"
    for c, names in ((0, ["cls", "bin"]), (1, ["bin"])):
        m = MultiTaskModel(spec, ds.tasks.subset(names), seed=c)
        save_client_model(run / "models" / "layered" / "clients" / f"{c}.safetensors",
                          {k: v.detach().numpy() for k, v in m.state_dict().items()}, ds.tasks.subset(names), spec,
                          "layered", c, "layered")
    m = MultiTaskModel(spec, ds.tasks.subset(["cls"]), seed=5)
    save_task_model(run / "models" / "all-in-one" / "cls.safetensors",
                    select_state({k: v.detach().numpy() for k, v in m.state_dict().items()}, ["cls"]), ds.tasks["cls"],
                    spec, "all-in-one")
    (run / "results.json").write_text(json.dumps({"dataset": "toy", "tasks": list(ds.tasks.names),
                                                  "methods": {"layered": {"splits": []}, "all-in-one": {"splits": []}}}))
    return run, ds, spec


def test_client_model_files_round_trip_and_refuse_a_state_that_does_not_fit(tmp_path):
    from fmtl_edge.export import load_client_model, save_client_model

    run, ds, spec = _client_run(tmp_path)
    model, meta = load_client_model(run / "models" / "layered" / "clients" / "0.safetensors")
    assert list(model.task_names) == ["cls", "bin"] and meta["client"] == "0" and meta["method"] == "layered"
    with pytest.raises(ValueError, match="does not fit its tasks"):
        save_client_model(tmp_path / "x.safetensors", {"backbone.w": np.zeros(2, np.float32)}, ds.tasks.subset(["cls"]),
                          spec, "layered", 0)
    with pytest.raises(ValueError, match="not an fmtl-edge client model"):
        load_client_model(run / "models" / "all-in-one" / "cls.safetensors")


def test_export_cli_names_the_clients_flag_and_exports_one_onnx_per_client(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run, ds, _ = _client_run(tmp_path)
    assert main(["export", str(run)]) == 0  # the listing names the client models
    out, err = capsys.readouterr()
    assert "layered" in out and "2 client models" in out and "--clients" in err
    for args, match in ((["--method", "layered"], r"layered has a personalised model per client.*--clients all"),
                        (["--method", "all-in-one", "--clients", "all"], r"--clients: all-in-one has no client models"),
                        (["--clients", "7"], r"--clients: layered has no model of client 7 \(it has 0, 1\)"),
                        (["--clients", "0;1"], r"--clients '0;1': expected all or a comma list")):
        assert main(["export", str(run), "--onnx", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert main(["export", str(run), "--onnx", "--clients", "1"]) == 0
    out = capsys.readouterr().out
    assert "client 1" in out and "client 0" not in out
    f = run / "onnx" / "layered" / "clients" / "1.onnx"
    from fmtl_edge.deploy.onnx_export import read_metadata

    meta = read_metadata(f)
    assert meta["client"] == "1" and json.loads(meta["tasks"]) == ["bin"]
    assert float(meta["parity_max_abs_diff"]) <= 1e-4
    # a single client model file (what `join --save-model` writes on a device)
    src = run / "models" / "layered" / "clients" / "0.safetensors"
    assert main(["export", str(src), "--onnx", "--out", str(tmp_path / "dev")]) == 0
    assert "client 0 of layered, outputs cls, bin" in capsys.readouterr().out
    assert (tmp_path / "dev" / "0.onnx").is_file()
