"""Model files: safetensors (always); ONNX files from these: :mod:`fmtl_edge.deploy.onnx_export`.

Two kinds: a run's **per-task** files ``models/<method>/<task>.safetensors`` (a task's final global
model) and, for personalised methods, one **client model** per client
``models/<method>/clients/<id>.safetensors`` (:func:`save_client_model`: that client's own model,
the one behind its personalised figures, with the heads of the tasks it holds).

A per-task file holds the backbone θ_s of the task's final group plus the task's head θ_i, under the
same names as :class:`~fmtl_edge.models.MultiTaskModel`'s state dict, with string metadata:
``task``, ``kind``, ``out_dim``, ``method``, ``input_shape`` (JSON), ``width``, ``depth``, ``model``
(the ``--model`` reference: a family or the factory, which must still import where the file is
loaded), ``head_hidden``, ``format`` = ``fmtl-edge/task-model/1``, and ``stacked_nodes`` (N) when the head is Loop Improvement's stacked
head (:class:`~fmtl_edge.models.StackedHead`: ``heads.<task>.nodes.<j>.*`` + ``heads.<task>.mix.*``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from fmtl_edge.models import ModelSpec, MultiTaskModel, stacked_head_model
from fmtl_edge.tasks import Task

FORMAT = "fmtl-edge/task-model/1"
CLIENT_FORMAT = "fmtl-edge/client-model/1"


def save_task_model(path: str | Path, state: Mapping[str, np.ndarray], task: Task, spec: ModelSpec,
                    method: str = "") -> Path:
    """Write one task's final model (``state``: backbone + that task's head) as safetensors."""
    meta = {
        "format": FORMAT, "task": task.name, "kind": task.kind, "out_dim": str(task.out_dim),
        "target_mean": repr(task.target_mean), "target_std": repr(task.target_std), "units": task.units,
        "method": method, "input_shape": json.dumps(list(spec.input_shape)), "width": str(spec.width),
        "depth": str(spec.depth), "model": spec.model, "head_hidden": str(spec.head_hidden),
    }
    prefix = f"heads.{task.name}.nodes."
    slots = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    if slots:
        meta["stacked_nodes"] = str(len(slots))
    # np.ascontiguousarray would turn 0-d buffers (num_batches_tracked) into shape (1,)
    arrays = {k: np.array(v, order="C", copy=True) for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path), metadata=meta)
    return path


def _task_dict(task: Task) -> dict:
    return {"name": task.name, "kind": task.kind, "out_dim": int(task.out_dim), "target_mean": float(task.target_mean),
            "target_std": float(task.target_std), "units": task.units}


def save_client_model(path: str | Path, state: Mapping[str, np.ndarray], tasks: Sequence[Task], spec: ModelSpec,
                      method: str, client: str | int, job: str = "") -> Path:
    """Write one client's own (personalised) model as safetensors: ``state`` holds the backbone and
    the heads of ``tasks`` (the tasks the client holds), under :class:`~fmtl_edge.models.MultiTaskModel`'s
    names — one backbone, one head per task, so a device loads one file for all its tasks.

    Metadata (strings): ``format`` = ``fmtl-edge/client-model/1``, ``client``, ``method``, ``job``,
    ``tasks`` (JSON list of ``{name, kind, out_dim, target_mean, target_std, units}`` in task
    order), ``input_shape`` (JSON), ``width``, ``depth``.

    Raises:
        ValueError: ``state`` lacks a tensor of that model or holds one it has not.
    """
    model = MultiTaskModel(spec, list(tasks))
    want = set(model.state_dict())
    if want != set(state):
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise ValueError(f"client {client} model of {method}: state does not fit its tasks "
                         f"({', '.join(t.name for t in tasks)}): missing {missing[:3]}, extra {extra[:3]}")
    meta = {"format": CLIENT_FORMAT, "client": str(client), "method": method, "job": job,
            "tasks": json.dumps([_task_dict(t) for t in tasks]), "input_shape": json.dumps(list(spec.input_shape)),
            "width": str(spec.width), "depth": str(spec.depth)}
    arrays = {k: np.array(v, order="C", copy=True) for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_model_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a model file (per-task or client model); ``{}`` when it has none.

    Raises:
        OSError, safetensors.SafetensorError: not a readable safetensors file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def load_client_model(path: str | Path) -> tuple[MultiTaskModel, dict[str, str]]:
    """Read a file written by :func:`save_client_model` into a multi-task model (eval mode).

    Returns:
        ``(model, metadata)``; ``model.task_names`` are the client's tasks.

    Raises:
        ValueError: the file is not an fmtl-edge client model.
    """
    import torch

    meta = read_model_metadata(path)
    if meta.get("format") != CLIENT_FORMAT:
        raise ValueError(f"{path}: not an fmtl-edge client model (metadata format {meta.get('format')!r})")
    tasks = [Task(d["name"], d["kind"], int(d["out_dim"]), float(d["target_mean"]), float(d["target_std"]),
                  d.get("units", "")) for d in json.loads(meta["tasks"])]
    spec = ModelSpec(tuple(json.loads(meta["input_shape"])), int(meta["width"]), int(meta["depth"]))
    model = MultiTaskModel(spec, tasks)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(path)).items()})
    return model.eval(), meta


def load_task_model(path: str | Path) -> tuple[MultiTaskModel, Task]:
    """Read a file written by :func:`save_task_model` back into a one-task model (eval mode), built
    by the file's ``model`` (files without it: ``auto``).

    Raises:
        ValueError: the file is not an fmtl-edge task model; its model cannot be built here
            (:class:`fmtl_edge.model_factory.ModelError`: e.g. the factory's module does not import).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an fmtl-edge task model (metadata format {meta.get('format')!r})")
    task = Task(meta["task"], meta["kind"], int(meta["out_dim"]), float(meta["target_mean"]),
                float(meta["target_std"]), meta.get("units", ""))
    spec = ModelSpec(tuple(json.loads(meta["input_shape"])), int(meta["width"]), int(meta["depth"]),
                     model=meta.get("model", "auto"), head_hidden=int(meta.get("head_hidden", 0)))
    import torch

    nodes = int(meta.get("stacked_nodes", 0))
    model = stacked_head_model(spec, [task], nodes) if nodes else MultiTaskModel(spec, [task])
    state = load_file(str(path))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval(), task
