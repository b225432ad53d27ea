"""Per-task model files: safetensors (always); ONNX files from these: :mod:`fmtl_edge.deploy.onnx_export`.

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
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from fmtl_edge.models import ModelSpec, MultiTaskModel, stacked_head_model
from fmtl_edge.tasks import Task

FORMAT = "fmtl-edge/task-model/1"


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
