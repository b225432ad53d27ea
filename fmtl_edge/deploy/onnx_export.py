"""ONNX export of a run's task models, each checked against PyTorch with onnxruntime.

A run folder (``simulate --out``) holds ``models/<method>/<task>.safetensors`` (backbone θ_s of the
task's final group + the task's head θ_i, see :mod:`fmtl_edge.export`) and ``results.json`` whose
``methods.<m>.splits`` lists the groups of tasks trained together. :func:`export_run` writes

- ``onnx/<method>/<task>.onnx``: one model per task, input ``input`` float32 ``(batch, *input_shape)``
  (the dataset's own input convention, e.g. digits pixels in [0, 1]), one output named after the
  task: float32 ``(batch, out_dim)`` for classification/binary/regression heads, ``(batch, C, H, W)``
  for dense heads. Outputs are the raw head outputs (logits; standardised regression values); the
  metadata says how to decode each into the target's units.
- ``onnx/<method>/group-<g>.onnx``: for each group of ≥ 2 tasks whose per-task models share the same
  backbone weights (a MAS split, all-in-one), one model with the backbone once and one output per task
  (``g`` counts from 1 in ``splits`` order, as in the summary table).
- ``onnx/<method>/clients/<id>.onnx`` (with ``clients``: ``--clients all|ID,...``): each client's own
  model of a personalised method (``models/<method>/clients/<id>.safetensors``: layered's personal
  layers, ditto's p_k, local's model), one output per task the client holds — the model behind its
  personalised figures, for that client's device.
- ``onnx/export.json``: what was written, per file its size, weight bytes and parity.

The batch axis is dynamic. Every file is run with onnxruntime (CPU) on fixed seeded inputs at batch 1
and 32 and compared with the PyTorch model in eval mode; a max absolute difference above
``tolerance`` (1e-4 for fp32) deletes the file and raises :class:`ParityError`.

Metadata (ONNX ``metadata_props``, all strings): ``format`` = ``fmtl-edge/onnx-model/1``, ``method``,
``dataset``, ``tasks`` (JSON list), ``input`` (JSON: name, shape, dtype, units), ``outputs`` (JSON:
per task name, shape, dtype, kind, units, decode, target_mean, target_std), ``opset``,
``parity_max_abs_diff``, ``parity_tolerance``; a client model adds ``client`` and ``job``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fmtl_edge.deploy import require_onnx
from fmtl_edge.models import MultiTaskModel
from fmtl_edge.tasks import Task

FORMAT = "fmtl-edge/onnx-model/1"
INPUT_NAME = "input"
DEFAULT_OPSET = 18  # the torch.export-based exporter's lowest supported opset
TOLERANCE = 1e-4
PARITY_BATCHES = (1, 32)

_INPUT_UNITS = {
    "digits": "pixel intensity in [0, 1] (scikit-learn digits / 16)",
    "utkface": "RGB in [0, 1] (uint8 / 255), resized to image-size",
}


class ParityError(RuntimeError):
    """The ONNX model's outputs differ from PyTorch's by more than the tolerance.

    Attributes: ``path`` (the file, already deleted), ``max_abs_diff``, ``tolerance``.
    """

    def __init__(self, path: Path, max_abs_diff: float, tolerance: float):
        super().__init__(f"{path}: onnxruntime differs from PyTorch by {max_abs_diff:.3g} "
                         f"(> {tolerance:g}); the file was removed")
        self.path, self.max_abs_diff, self.tolerance = path, max_abs_diff, tolerance


@dataclass
class ExportedModel:
    """One written ONNX file.

    Attributes:
        path: the ``.onnx`` file. tasks: its outputs, in order. method: the run's method.
        group: 1-based group index for a shared-backbone group model, None for a per-task model.
        file_bytes: size of the file. weight_bytes: bytes of its float weights and buffers
            (what a device holds in memory for the model, activations excluded).
        max_abs_diff: parity against PyTorch (max over outputs and the batch sizes checked).
        client: the client whose own (personalised) model it is, None for a global model.
    """

    path: Path
    tasks: list[str]
    method: str
    group: int | None
    file_bytes: int
    weight_bytes: int
    max_abs_diff: float
    client: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class GroupSaving:
    """Memory a device saves by running a group's tasks as one shared-backbone model.

    ``per_task_weight_bytes`` = Σ of the group's per-task models (each with its own copy of the
    backbone); ``group_weight_bytes`` = the group model; ``saved_bytes`` = the difference.
    """

    method: str
    group: int
    tasks: list[str]
    per_task_weight_bytes: int
    group_weight_bytes: int
    per_task_file_bytes: int
    group_file_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.per_task_weight_bytes - self.group_weight_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_bytes": self.saved_bytes}


@dataclass
class ExportReport:
    """Everything :func:`export_run` wrote (``models``), the group savings and the notes (skipped
    groups and why)."""

    run_dir: Path
    opset: int
    tolerance: float
    models: list[ExportedModel] = field(default_factory=list)
    groups: list[GroupSaving] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((m.max_abs_diff for m in self.models), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "opset": self.opset, "tolerance": self.tolerance,
                "max_abs_diff": self.max_abs_diff, "models": [m.to_dict() for m in self.models],
                "groups": [g.to_dict() for g in self.groups], "notes": list(self.notes)}


# ------------------------------------------------------------------------------- one model ----

def _outputs_module(model: MultiTaskModel):
    import torch

    class TaskOutputs(torch.nn.Module):
        """``forward(x) -> tuple`` of the head outputs in task order (ONNX wants a flat output)."""

        def __init__(self, m: MultiTaskModel):
            super().__init__()
            self.m = m
            self.names = list(m.task_names)

        def forward(self, x):
            out = self.m(x)
            return tuple(out[n] for n in self.names)

    # eval() on the wrapper: an exporter restores the wrapper's training flag afterwards, and a
    # wrapper left in training mode would switch the model's BatchNorm to batch statistics.
    return TaskOutputs(model).eval()


def output_description(task: Task, spec_input_shape: Sequence[int]) -> dict[str, Any]:
    """What the ONNX output named ``task.name`` holds: shape (``"batch"`` first), dtype, kind, units
    and how to turn it into a prediction in the target's units."""
    if task.kind == "dense":
        shape = ["batch", task.out_dim, *list(spec_input_shape)[1:]]
        decode = "per-pixel value, same convention as the training target"
    else:
        shape = ["batch", task.out_dim]
        decode = {
            "classification": f"logits over {task.out_dim} classes: argmax = class index",
            "binary": "logit: sigmoid = P(y = 1)",
            "regression": (f"standardised value: value in {task.units or 'target units'} = "
                           f"output * {task.target_std!r} + {task.target_mean!r}"),
        }[task.kind]
    return {"shape": shape, "dtype": "float32", "kind": task.kind, "units": task.units,
            "decode": decode, "target_mean": task.target_mean, "target_std": task.target_std}


def weight_bytes(model: MultiTaskModel) -> int:
    """Bytes of the model's floating-point parameters and buffers (integer counters excluded)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point()))


def export_onnx(model: MultiTaskModel, path: str | Path, *, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (eval mode) as ONNX: input ``input`` float32 ``(batch, *input_shape)``, one
    output per task named after it, dynamic batch axis, weights inside the file.

    Raises:
        ImportError: the onnx extra is missing. ValueError: ``opset`` < 18 or a task named ``input``.
    """
    require_onnx()
    import onnx
    import torch

    if opset < DEFAULT_OPSET:
        raise ValueError(f"--opset {opset}: the torch.export-based ONNX exporter needs opset >= {DEFAULT_OPSET}")
    if INPUT_NAME in model.task_names:
        raise ValueError(f"a task is named {INPUT_NAME!r}, which is the model's input name")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    wrapper = _outputs_module(model)
    x = torch.zeros((2, *model.spec.input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(wrapper, (x,), str(path), input_names=[INPUT_NAME],
                                  output_names=list(model.task_names), opset_version=opset, dynamo=True,
                                  external_data=False, dynamic_shapes=({0: batch},), verbose=False)
    finally:
        quiet.setLevel(level)
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
        onnx.save(proto, str(path))
    return path


def parity(model: MultiTaskModel, path: str | Path, batch_sizes: Sequence[int] = PARITY_BATCHES,
           seed: int = 0) -> float:
    """Max |onnxruntime − PyTorch| over every output and batch size, on fixed seeded inputs
    (standard normal float32, ``(b, *input_shape)``), CPU execution provider."""
    require_onnx()
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed)
    worst = 0.0
    model = model.eval()
    for b in batch_sizes:
        x = rng.standard_normal((b, *model.spec.input_shape)).astype(np.float32)
        got = sess.run(names, {INPUT_NAME: x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        for n, g in zip(names, got):
            r = ref[n].numpy()
            if g.shape != r.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))))
    return worst


def export_checked(model: MultiTaskModel, path: str | Path, *, opset: int = DEFAULT_OPSET,
                   metadata: dict[str, str] | None = None, tolerance: float = TOLERANCE) -> float:
    """:func:`export_onnx` then :func:`parity`; records the parity in the metadata.

    Returns: the max absolute difference. Raises: :class:`ParityError` (file removed) above ``tolerance``.
    """
    path = Path(path)
    export_onnx(model, path, opset=opset, metadata=metadata)
    diff = parity(model, path)
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        raise ParityError(path, diff, tolerance)
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(parity_max_abs_diff=repr(diff), parity_tolerance=repr(tolerance))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return diff


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


# ------------------------------------------------------------------------------- a run -------

def _metadata(model: MultiTaskModel, method: str, dataset: str, opset: int) -> dict[str, str]:
    shape = list(model.spec.input_shape)
    return {
        "format": FORMAT, "method": method, "dataset": dataset, "opset": str(opset),
        "tasks": json.dumps(list(model.task_names)),
        "input": json.dumps({"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32",
                             "units": _INPUT_UNITS.get(dataset, f"as produced by the {dataset!r} loader")}),
        "outputs": json.dumps({t.name: output_description(t, shape) for t in model.tasks}),
    }


def _same_backbone(models: Sequence[MultiTaskModel]) -> bool:
    import torch

    first = {k: v for k, v in models[0].state_dict().items() if k.startswith("backbone.")}
    for m in models[1:]:
        other = {k: v for k, v in m.state_dict().items() if k.startswith("backbone.")}
        if other.keys() != first.keys() or not all(torch.equal(first[k], other[k]) for k in first):
            return False
    return True


def group_model(models: Sequence[MultiTaskModel]) -> MultiTaskModel:
    """One model with the (shared) backbone of ``models`` and every one of their heads.

    Raises:
        ValueError: the models' backbones differ (they were not trained as one group).
    """
    if not _same_backbone(models):
        raise ValueError("the task models do not share one backbone")
    import copy

    tasks = [t for m in models for t in m.tasks]
    merged = MultiTaskModel(models[0].spec, tasks)
    merged.backbone.load_state_dict(models[0].backbone.state_dict())
    for m in models:  # the heads as they are (a stacked head keeps its own structure)
        for t in m.task_names:
            merged.heads[t] = copy.deepcopy(m.heads[t])
    return merged.eval()


def parse_clients(text: str | None) -> str | list[str] | None:
    """``--clients``: ``all`` → ``"all"``; ``0,3,7`` → ``["0", "3", "7"]``; None → None.

    Raises:
        ValueError: empty, or an item that is not a client name (names ``--clients``).
    """
    if text is None:
        return None
    text = text.strip()
    if text == "all":
        return "all"
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items or not all(c.replace("-", "").replace("_", "").isalnum() for c in items):
        raise ValueError(f"--clients {text!r}: expected all or a comma list of client ids (e.g. 0,3,7)")
    return items


def client_model_files(models_dir: Path, method: str) -> dict[str, Path]:
    """``name → file`` of ``models/<method>/clients/*.safetensors``, by client id (numeric order)."""
    files = {p.stem: p for p in (models_dir / method / "clients").glob("*.safetensors")}
    return dict(sorted(files.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0])))


def export_client_model(src: str | Path, target: str | Path, *, dataset: str = "", opset: int = DEFAULT_OPSET,
                        tolerance: float = TOLERANCE) -> ExportedModel:
    """Export one client model file (:func:`fmtl_edge.export.save_client_model`, e.g. what
    ``fmtl-edge join --save-model`` wrote on a device) to ONNX with the onnxruntime parity check:
    one output per task the client holds.

    Raises:
        ValueError: not a client model file. ParityError: above ``tolerance`` (file removed).
    """
    from fmtl_edge.export import load_client_model

    model, meta = load_client_model(src)
    method = meta.get("method", "")
    md = _metadata(model, method, dataset, opset)
    md.update(client=meta.get("client", ""), job=meta.get("job", ""))
    target = Path(target)
    diff = export_checked(model, target, opset=opset, metadata=md, tolerance=tolerance)
    return ExportedModel(target, list(model.task_names), method, None, target.stat().st_size, weight_bytes(model), diff,
                         client=meta.get("client") or Path(src).stem)


def export_run(run_dir: str | Path, methods: Sequence[str] | None = None, *, opset: int = DEFAULT_OPSET,
               tolerance: float = TOLERANCE, out_dir: str | Path | None = None,
               clients: str | Sequence[str] | None = None) -> ExportReport:
    """Export every task model (and every shared-backbone group) of a finished run to ONNX or, with
    ``clients``, the client models of its personalised methods.

    Args:
        run_dir: a ``simulate --out`` folder (``results.json`` + ``models/``), or a symlink to one.
        methods: method names (default: every method with models of the kind asked for).
        out_dir: where the files go (default ``<run_dir>/onnx``).
        clients: ``"all"`` or client ids (``--clients``): export those clients' own models
            (``models/<method>/clients/<id>.safetensors`` → ``onnx/<method>/clients/<id>.onnx``) of
            every method that has them (default methods: those). None: the global task models.

    Raises:
        FileNotFoundError: no ``results.json`` / ``models/<method>``. ValueError: unknown method, a
            method with client models only and no ``clients`` (names ``--clients``), an unknown
            client. ParityError: a model failed the onnxruntime check. ImportError: the onnx extra
            is missing.
    """
    from fmtl_edge.export import load_task_model

    require_onnx()
    run = Path(run_dir)
    results_path = run / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{run}: no results.json (pass the --out folder of a finished simulate run)")
    results = json.loads(results_path.read_text())
    models_dir = run / "models"
    available = sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    with_global = [m for m in available if any((models_dir / m).glob("*.safetensors"))]
    with_clients = [m for m in available if client_model_files(models_dir, m)]
    order = list(results.get("methods", {}))
    if methods is None:
        pool = with_global if clients is None else with_clients
        methods = [m for m in order if m in pool] or pool
        if not methods:
            if with_clients:
                raise ValueError(f"{models_dir}: this run has client (personalised) models only "
                                 f"({', '.join(with_clients)}): pass --clients all or --clients ID,...")
            raise FileNotFoundError(f"{models_dir}: no models/<method>/ folders")
    for m in methods:
        if m not in available:
            raise ValueError(f"--method {m}: no {models_dir / m}; this run has {', '.join(available) or 'none'}")
        if clients is None and m not in with_global:
            raise ValueError(f"--method {m}: {m} has a personalised model per client, no global task models: "
                             f"pass --clients all (or --clients ID,...) to export them "
                             f"({len(client_model_files(models_dir, m))} in {models_dir / m / 'clients'})")
        if clients is not None and m not in with_clients:
            raise ValueError(f"--clients: {m} has no client models (global models only: export them without "
                             f"--clients); methods with client models here: {', '.join(with_clients) or 'none'}")
    out = Path(out_dir) if out_dir is not None else run / "onnx"
    dataset = str(results.get("dataset", ""))
    report = ExportReport(run, opset, tolerance)
    for method in methods:
        if clients is not None:
            files = client_model_files(models_dir, method)
            names = list(files) if clients == "all" else list(clients)
            unknown = [c for c in names if c not in files]
            if unknown:
                raise ValueError(f"--clients: {method} has no model of client {', '.join(unknown)} "
                                 f"(it has {', '.join(files)})")
            for c in names:
                report.models.append(export_client_model(files[c], out / method / "clients" / f"{c}.onnx",
                                                         dataset=dataset, opset=opset, tolerance=tolerance))
            continue
        task_order = list(results.get("tasks", []))
        files = sorted((models_dir / method).glob("*.safetensors"),
                       key=lambda p: task_order.index(p.stem) if p.stem in task_order else len(task_order))
        loaded: dict[str, MultiTaskModel] = {}
        for f in files:
            model, task = load_task_model(f)
            loaded[task.name] = model
            target = out / method / f"{task.name}.onnx"
            diff = export_checked(model, target, opset=opset, metadata=_metadata(model, method, dataset, opset),
                                  tolerance=tolerance)
            report.models.append(ExportedModel(target, [task.name], method, None, target.stat().st_size,
                                               weight_bytes(model), diff))
        splits = results.get("methods", {}).get(method, {}).get("splits") or []
        for g, group in enumerate(splits, start=1):
            if len(group) < 2:
                continue
            missing = [t for t in group if t not in loaded]
            if missing:
                report.notes.append(f"{method} group {g}: no model file for {', '.join(missing)}; skipped")
                continue
            members = [loaded[t] for t in group]
            try:
                merged = group_model(members)
            except ValueError as e:
                report.notes.append(f"{method} group {g} ({'+'.join(group)}): {e}; skipped")
                continue
            target = out / method / f"group-{g}.onnx"
            meta = _metadata(merged, method, dataset, opset)
            meta["group"] = str(g)
            diff = export_checked(merged, target, opset=opset, metadata=meta, tolerance=tolerance)
            em = ExportedModel(target, list(group), method, g, target.stat().st_size, weight_bytes(merged), diff)
            report.models.append(em)
            per = [m for m in report.models if m.method == method and m.group is None and m.tasks[0] in group]
            report.groups.append(GroupSaving(method, g, list(group), sum(m.weight_bytes for m in per),
                                             em.weight_bytes, sum(m.file_bytes for m in per), em.file_bytes))
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
