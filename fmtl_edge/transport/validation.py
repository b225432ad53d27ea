"""Validation of every upload before it touches the aggregate (DESIGN.md §9).

One function, :func:`validate_upload`, used by every upload path: a training update (its
safetensors file and metadata) or an evaluation reply. It raises :class:`UpdateRejected` (a
``ValueError``) naming the field and what is wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fmtl_edge.messages import ClientUpdate
from fmtl_edge.transport.tensors import MappedState, SafetensorsFile, TensorFileError, check_finite


class UpdateRejected(ValueError):
    """An upload that fails validation (the message names the field and what is wrong)."""


def validate_upload(item, meta, path: Path | None, max_update_bytes: int, device=None):
    """Check an upload against its work item; return what the slot receives.

    Args:
    item: the :class:`~fmtl_edge.transport.scheduler.WorkItem` the upload answers.
    meta: its ``UpdateMeta``.
    path: the received safetensors file (None for evaluation work).
    max_update_bytes: size limit of the file.
    device: the :class:`~fmtl_edge.transport.registry.Device` that sent it (its registered counts).

    Returns:
    a :class:`ClientUpdate` over the mapped file (train) or ``{client_id, job, sums}`` (evaluate).

    Raises:
    UpdateRejected, TensorFileError: the upload is refused (message names the reason).
    """
    a = item.slot.assignment
    if meta.job != a.job or int(meta.round) != int(a.round):
        raise UpdateRejected(f"update is for job {meta.job!r} round {meta.round}, the work was job {a.job!r} round {a.round}")
    if int(meta.client_id) != item.client_id:
        raise UpdateRejected(f"update says client {meta.client_id}, the work was given to client {item.client_id}")
    if item.kind == "evaluate":
        sums = {}
        for t in a.tasks:
            if t not in meta.eval:
                raise UpdateRejected(f"evaluation lacks task {t!r}")
            e = meta.eval[t]
            if not (math.isfinite(e.loss_sum) and math.isfinite(e.metric_sum) and e.n >= 0):
                raise UpdateRejected(f"evaluation of task {t!r} is not finite")
            sums[t] = {"loss_sum": float(e.loss_sum), "metric_sum": float(e.metric_sum), "n": int(e.n)}
        return {"client_id": item.client_id, "job": a.job, "sums": sums}
    if path is None:
        raise UpdateRejected("the update carries no model")
    f = SafetensorsFile(path, max_bytes=max_update_bytes)
    expected = item.model.spec
    exp_names = [n for n, _, _ in expected]
    got = {n: (dt, shape) for n, dt, shape in f.spec()}
    missing = [n for n in exp_names if n not in got]
    extra = [n for n in got if n not in set(exp_names)]
    if missing or extra:
        raise UpdateRejected(f"tensor names differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for n, dt, shape in expected:
        gdt, gshape = got[n]
        if tuple(gshape) != tuple(shape):
            raise UpdateRejected(f"tensor {n!r} has shape {tuple(gshape)}, the model has {tuple(shape)}")
        if gdt != dt:
            raise UpdateRejected(f"tensor {n!r} has dtype {gdt}, the model has {dt}")
    bad = check_finite(f)
    if bad is not None:
        raise UpdateRejected(f"tensor {bad!r} holds NaN or Inf")
    d = device
    n = int(meta.n_samples)
    if n < 0 or (d is not None and d.n_train and n > d.n_train * max(1, a.config.local_epochs)):
        raise UpdateRejected(f"n_samples {n} is outside 0..{d.n_train if d else '?'}")
    loss = {k: float(v) for k, v in meta.train_loss.items()}
    if set(loss) != set(a.tasks):
        raise UpdateRejected(f"train losses are for tasks {sorted(loss)}, the work has {list(a.tasks)}")
    if n > 0 and not all(math.isfinite(v) for v in loss.values()):
        raise UpdateRejected("a train loss is NaN or Inf")
    aff = None
    if meta.affinity_n:
        k = int(meta.affinity_n)
        if k != len(a.tasks) or len(meta.affinity) != k * k:
            raise UpdateRejected(f"affinity matrix is {k}x{k} with {len(meta.affinity)} values, the work has {len(a.tasks)} tasks")
        aff = np.asarray(meta.affinity, dtype=np.float64).reshape(k, k)
        if not np.isfinite(aff).all():
            raise UpdateRejected("the affinity matrix holds NaN or Inf")
    try:
        energy = json.loads(meta.energy_json) if meta.energy_json else {}
    except json.JSONDecodeError:
        raise UpdateRejected("energy_json is not JSON") from None
    if not isinstance(energy, dict):
        raise UpdateRejected("energy_json is not an object")
    energy["total_j"] = float(meta.energy_j) if meta.HasField("energy_j") else None
    if not math.isfinite(meta.device_s) or meta.device_s < 0:
        raise UpdateRejected(f"device_s {meta.device_s} is not a duration")
    f.release()
    return ClientUpdate(
        client_id=item.client_id, job=a.job, round=int(a.round), tasks=tuple(a.tasks), state=MappedState(path, f),
        n_samples=n, train_loss=loss, affinity=aff, affinity_steps=int(meta.affinity_steps),
        device_s=float(meta.device_s), energy=energy, stopped_by=meta.stopped_by or None,
        peak_memory_bytes=int(meta.peak_memory_bytes) or None,
    )

