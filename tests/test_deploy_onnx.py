"""ONNX export of a run's task models (parity with PyTorch via onnxruntime) and bench-infer."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402

from fmtl_edge.cli import main  # noqa: E402
from fmtl_edge.deploy import onnx_export as ox  # noqa: E402
from fmtl_edge.export import save_task_model  # noqa: E402
from fmtl_edge.models import ModelSpec, MultiTaskModel  # noqa: E402
from fmtl_edge.partition import select_state  # noqa: E402
from conftest import make_toy_dataset  # noqa: E402


def _fake_run(tmp_path, width=4):
    """A tiny run folder: method "mas-2" with groups [cls, reg, den] and [bin], trained weights
    replaced by seeded random ones (BatchNorm statistics too, so eval mode matters)."""
    ds = make_toy_dataset()
    spec = ModelSpec(ds.input_shape, width=width)
    groups = [["cls", "reg", "den"], ["bin"]]
    run = tmp_path / "run"
    for g, names in enumerate(groups):
        m = MultiTaskModel(spec, ds.tasks.subset(names), seed=g)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
        for t in names:
            save_task_model(run / "models" / "mas-2" / f"{t}.safetensors", select_state(state, [t]), ds.tasks[t],
                            spec, "mas-2")
    results = {"dataset": "toy", "tasks": list(ds.tasks.names), "clients": 4,
               "methods": {"mas-2": {"splits": groups}}}
    (run / "results.json").write_text(json.dumps(results))
    return run, ds, spec


def test_export_run_writes_checked_models_per_task_and_group(tmp_path):
    run, ds, spec = _fake_run(tmp_path)
    rep = ox.export_run(run)
    per_task = {m.tasks[0]: m for m in rep.models if m.group is None}
    assert set(per_task) == set(ds.tasks.names)
    groups = [m for m in rep.models if m.group is not None]
    assert [(g.group, g.tasks) for g in groups] == [(1, ["cls", "reg", "den"])]  # a 1-task group is its task model
    assert rep.max_abs_diff <= 1e-4

    import onnxruntime as ort

    from fmtl_edge.export import load_task_model

    x = np.random.default_rng(5).random((3, *spec.input_shape), dtype=np.float32)
    for t, m in per_task.items():
        assert m.path == run / "onnx" / "mas-2" / f"{t}.onnx" and m.path.is_file()
        sess = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == [t]
        assert isinstance(sess.get_inputs()[0].shape[0], str)  # dynamic batch axis
        model, _ = load_task_model(run / "models" / "mas-2" / f"{t}.safetensors")
        with torch.no_grad():
            ref = model(torch.from_numpy(x))[t].numpy()
        (got,) = sess.run(None, {"input": x})
        assert got.shape == ref.shape and np.max(np.abs(got - ref)) <= 1e-4
        meta = ox.read_metadata(m.path)
        assert meta["format"] == ox.FORMAT and json.loads(meta["tasks"]) == [t]
        assert json.loads(meta["input"])["shape"] == ["batch", *spec.input_shape]
        assert float(meta["parity_max_abs_diff"]) == pytest.approx(m.max_abs_diff)
    out = json.loads(ox.read_metadata(per_task["reg"].path)["outputs"])["reg"]
    assert out["units"] == "u" and "1.5" in out["decode"] and "2.0" in out["decode"]

    # the group model: one backbone, one output per task, equal to the per-task models
    g = groups[0]
    sess = ort.InferenceSession(str(g.path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    assert list(outs) == ["cls", "reg", "den"]
    for t in g.tasks:
        (alone,) = ort.InferenceSession(str(per_task[t].path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        assert np.max(np.abs(outs[t] - alone)) <= 1e-5
    (saving,) = rep.groups
    assert saving.per_task_weight_bytes == sum(per_task[t].weight_bytes for t in g.tasks)
    assert 0 < saving.saved_bytes < saving.per_task_weight_bytes
    assert json.loads((run / "onnx" / "export.json").read_text())["groups"][0]["saved_bytes"] == saving.saved_bytes


def test_parity_failure_removes_the_file(tmp_path, monkeypatch):
    run, _, _ = _fake_run(tmp_path)
    real = ox.parity
    monkeypatch.setattr(ox, "parity", lambda model, path: real(model, path) + 1e-3)
    with pytest.raises(ox.ParityError) as ei:
        ox.export_run(run)
    assert not ei.value.path.exists() and ei.value.max_abs_diff > 1e-4
    assert main(["export", str(run), "--onnx"]) == 1


def test_parity_detects_a_different_model(tmp_path):
    ds = make_toy_dataset()
    spec = ModelSpec(ds.input_shape, width=4)
    a = MultiTaskModel(spec, ds.tasks.subset(["cls"]), seed=0).eval()
    b = MultiTaskModel(spec, ds.tasks.subset(["cls"]), seed=1).eval()
    path = ox.export_onnx(a, tmp_path / "a.onnx")
    assert ox.parity(a, path) <= 1e-4
    assert ox.parity(b, path) > 1e-3


def test_export_cli_and_bench_infer(tmp_path, capsys):
    run, _, _ = _fake_run(tmp_path)
    assert main(["export", str(run)]) == 0  # lists, writes nothing
    assert "pass --onnx" in capsys.readouterr().err and not (run / "onnx").exists()
    assert main(["export", str(run), "--method", "nope", "--onnx"]) == 2
    assert "no " in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", "--opset", "17"]) == 2
    assert main(["export", str(run), "--onnx"]) == 0
    cap = capsys.readouterr()
    assert "group 1 (cls+reg+den)" in cap.out and "saves" in cap.out and "5 ONNX files" in cap.err

    model = run / "onnx" / "mas-2" / "group-1.onnx"
    assert main(["bench-infer", str(model), "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1",
                 "--meter", "estimate", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "CPUExecutionProvider" in res["available_providers"]
    rows = {(r["provider"], r["batch"]): r for r in res["results"]}
    r = rows[("CPUExecutionProvider", 4)]
    assert r["ms_per_sample_p50"] > 0 and r["ms_per_sample_p95"] >= r["ms_per_sample_p50"]
    assert r["throughput_per_s"] > 0 and r["energy_j_per_inference"] > 0 and r["energy_estimated"] is True
    assert main(["bench-infer", str(model), "--providers", "NoSuchExecutionProvider"]) == 2
    assert "not available" in capsys.readouterr().err
    assert main(["bench-infer", str(tmp_path / "missing.onnx")]) == 2
