"""Conversions between the protocol's messages and the library's objects (no I/O here)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from fmtl_edge.models import signature_digest, state_signature
from fmtl_edge.messages import Assignment, TrainConfig
from fmtl_edge.tasks import Task, TaskSet
from fmtl_edge.transport import fmtl_edge_pb2 as pb


def task_to_pb(task: Task, train_samples: int = 0, test_samples: int = 0) -> pb.TaskSpec:
    return pb.TaskSpec(name=task.name, kind=task.kind, out_dim=task.out_dim, target_mean=task.target_mean,
                       target_std=task.target_std, units=task.units, description=task.description,
                       train_samples=int(train_samples), test_samples=int(test_samples))


def task_from_pb(t: pb.TaskSpec) -> Task:
    """Raises ValueError for an invalid task (bad name, kind, out_dim...)."""
    return Task(t.name, t.kind, int(t.out_dim), float(t.target_mean), float(t.target_std), t.units, t.description)


def task_signature(tasks: Sequence[Task] | TaskSet, input_shape: Sequence[int]) -> str:
    """Canonical JSON of what makes two devices' data compatible: tasks (definitions, order) and input shape."""
    return json.dumps({
        "input_shape": [int(s) for s in input_shape],
        "tasks": [[t.name, t.kind, t.out_dim, repr(float(t.target_mean)), repr(float(t.target_std)), t.units] for t in tasks],
    }, separators=(",", ":"))


def train_config_to_pb(c: TrainConfig) -> pb.TrainSettings:
    return pb.TrainSettings(local_epochs=c.local_epochs, batch_size=c.batch_size, base_lr=c.lr, momentum=c.momentum,
                            weight_decay=c.weight_decay, affinity_every=c.affinity_every,
                            affinity_divide_by_lr=c.affinity_divide_by_lr, device=c.device)


def train_config_from_pb(s: pb.TrainSettings, device: str | None = None) -> TrainConfig:
    return TrainConfig(local_epochs=int(s.local_epochs), batch_size=int(s.batch_size), lr=float(s.base_lr),
                       momentum=float(s.momentum), weight_decay=float(s.weight_decay),
                       affinity_every=int(s.affinity_every), affinity_divide_by_lr=bool(s.affinity_divide_by_lr),
                       device=device or s.device or "cpu")


def work_to_pb(work_id: str, kind: str, a: Assignment, model: Mapping[str, Any], model_bytes: int, model_sha256: str,
               deadline_s: float | None) -> pb.Work:
    w = pb.Work(work_id=work_id, kind=kind, job=a.job, round=int(a.round), tasks=list(a.tasks), lr=float(a.lr),
                config=train_config_to_pb(a.config), measure_affinity=bool(a.measure_affinity), seed=int(a.seed),
                model=pb.ModelInfo(input_shape=[int(s) for s in model["input_shape"]], width=int(model["width"]),
                                   depth=int(model.get("depth", 1)), model=str(model.get("model") or "auto"),
                                   head_hidden=int(model.get("head_hidden", 0)),
                                   signature=signature_digest(state_signature(a.state))),
                model_bytes=int(model_bytes), model_sha256=model_sha256, deadline_s=float(deadline_s or 0.0),
                procedure=a.procedure, method_config_json=json.dumps(dict(a.method_config), sort_keys=True),
                state_key=a.state_key, personal=list(a.personal), frozen=list(a.frozen), personalised=bool(a.personalised))
    if a.time_budget_s is not None:
        w.time_budget_s = float(a.time_budget_s)
    if a.energy_budget_j is not None:
        w.energy_budget_j = float(a.energy_budget_j)
    if a.power_mode:
        w.power_mode = a.power_mode
    for t, v in a.loss_weights.items():
        w.loss_weights[t] = float(v)
    return w


def spec_from_pb(m: pb.ModelInfo):
    """The job's :class:`~fmtl_edge.models.ModelSpec` of a work item's ``ModelInfo``."""
    from fmtl_edge.models import ModelSpec

    return ModelSpec(tuple(int(s) for s in m.input_shape), width=int(m.width), depth=int(m.depth or 1),
                     model=m.model or "auto", head_hidden=int(m.head_hidden))


def assignment_from_pb(w: pb.Work, state: dict[str, np.ndarray], device: str | None = None,
                       time_budget_s: float | None = None, energy_budget_j: float | None = None) -> Assignment:
    """The :class:`Assignment` of a work item; the device's own budgets (profile) tighten the job's.

    Raises:
        ValueError: ``method_config_json`` is not a JSON object.
    """
    tb = w.time_budget_s if w.HasField("time_budget_s") else None
    eb = w.energy_budget_j if w.HasField("energy_budget_j") else None
    try:
        method_config = json.loads(w.method_config_json) if w.method_config_json else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"work {w.work_id}: method_config_json is not JSON ({e})") from None
    if not isinstance(method_config, dict):
        raise ValueError(f"work {w.work_id}: method_config_json is not a JSON object")
    weights = {str(t): float(v) for t, v in w.loss_weights.items()}
    bad = [t for t, v in weights.items() if not (finite(v) and v >= 0) or t not in w.tasks]
    if bad:
        raise ValueError(f"work {w.work_id}: loss weight of {bad[0]!r} is not a finite number >= 0 of one of its tasks")
    return Assignment(job=w.job, round=int(w.round), tasks=tuple(w.tasks), state=state, lr=float(w.lr),
                      config=train_config_from_pb(w.config, device), measure_affinity=bool(w.measure_affinity),
                      seed=int(w.seed), time_budget_s=_min(tb, time_budget_s), energy_budget_j=_min(eb, energy_budget_j),
                      procedure=w.procedure or "sgd", method_config=method_config, state_key=w.state_key,
                      personal=tuple(w.personal), frozen=tuple(w.frozen), personalised=bool(w.personalised),
                      power_mode=w.power_mode or None, loss_weights=weights)


def _min(a: float | None, b: float | None) -> float | None:
    vals = [v for v in (a, b) if v is not None]
    return min(vals) if vals else None


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def message_to_dict(msg) -> dict[str, Any]:
    """A protobuf message as a plain dict with Python values (ints stay ints, unlike the JSON
    mapping's int64-as-string), defaults included; nested and repeated messages recurse."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = {k: (message_to_dict(x) if hasattr(x, "DESCRIPTOR") else x) for k, x in v.items()}
        elif _is_repeated(f):
            out[f.name] = [message_to_dict(x) if f.message_type is not None else x for x in v]
        elif f.message_type is not None:
            out[f.name] = message_to_dict(v)
        else:
            out[f.name] = v
    return out


def _is_repeated(f) -> bool:
    rep = getattr(f, "is_repeated", None)
    if rep is not None:
        return bool(rep() if callable(rep) else rep)
    return f.label == f.LABEL_REPEATED
