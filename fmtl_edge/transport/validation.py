"""Validation of every upload before it touches the aggregate (docs/design.md §5).

One function, :func:`validate_upload`, used by every upload path: a training update (its
safetensors file and metadata) or an evaluation reply. It raises :class:`UpdateRejected` (a
``ValueError``) naming the field and what is wrong.

Rules (:class:`Limits` holds the settings):

- the work's job, round and client; tensor names, dtypes and shapes equal to the model's; the file
  parsed as strictly as the ``safetensors`` package (:class:`~fmtl_edge.transport.tensors.SafetensorsFile`);
- no NaN/Inf, and the update's distance to the global model bounded (norm-bounded FedAvg):
  ``‖w − w_global‖₂ ≤ max_update_norm_ratio · max(‖w_global‖₂, 1)``;
- ``n_samples`` (the aggregation weight) in ``0..`` the training samples registered for the client
  (held fixed from its first registration), then capped at ``max_client_samples`` when set;
- train losses, seconds, joules, peak memory and affinity steps finite and ``≥ 0``;
- evaluation: per task ``0 ≤ n ≤`` the registered test samples, ``loss_sum ≥ 0``, ``metric_sum ≥ 0``
  and, for accuracy tasks (classification, binary), ``metric_sum ≤ n``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from fmtl_edge.messages import ClientUpdate
from fmtl_edge.transport.tensors import MappedState, SafetensorsFile


class UpdateRejected(ValueError):
    """An upload that fails validation (the message names the field and what is wrong)."""


@dataclass
class Limits:
    """Settings of :func:`validate_upload`.

    Attributes:
        max_update_bytes: size limit of an update file (bytes).
        max_update_norm_ratio: the norm bound, relative to the global model's L2 norm (floored at 1).
        max_client_samples: cap on one update's weight (samples; None: no cap).
        task_kinds: task → kind (``classification`` | ``binary`` | ``regression`` | ``dense``), for
            the range of evaluation metric sums; unknown tasks get only the ``≥ 0`` check.
        max_energy_json_bytes: size limit of the meter's JSON.
    """

    max_update_bytes: int = 8 << 30
    max_update_norm_ratio: float = 10.0
    max_client_samples: int | None = None
    task_kinds: Mapping[str, str] = field(default_factory=dict)
    max_energy_json_bytes: int = 64 << 10


_ACCURACY = ("classification", "binary")
_UNITS = ("_j", "_s", "_w", "_bytes", "_joules", "_seconds")


def _figure(name: str, v: float, fix: str = "") -> float:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise UpdateRejected(f"{name} = {v!r}: must be a finite number >= 0{fix}")
    return v


def model_norm(model) -> float:
    """L2 norm (float64) of the float tensors of a :class:`~fmtl_edge.transport.model_files.ModelFile`,
    computed once from the file in blocks and kept on it."""
    if getattr(model, "l2_norm", None) is None:
        f = SafetensorsFile(model.path)
        s = 0.0
        for n in f.names:
            if np.issubdtype(f.entries[n][0], np.floating):
                for b in f.read_blocks(n):
                    b = b.astype(np.float64)
                    s += float(b @ b)
        model.l2_norm = math.sqrt(s)
    return model.l2_norm


def _scan(f: SafetensorsFile, model) -> float:
    """NaN/Inf check and L2 distance to the global model, one pass over both files in blocks."""
    g = SafetensorsFile(model.path)
    s = 0.0
    for n in f.names:
        if not np.issubdtype(f.entries[n][0], np.floating):
            continue
        for u, w in zip(f.read_blocks(n), g.read_blocks(n)):
            # one float32 pass (difference and dot); a NaN/Inf in u makes the dot non-finite, and only
            # then is the block looked at again (an overflowing square is redone in float64)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled just below
                d = (u.astype(np.float32, copy=False) - w.astype(np.float32, copy=False)).reshape(-1)
                v = float(np.dot(d, d))
            if not math.isfinite(v):
                if not np.isfinite(u).all():
                    raise UpdateRejected(f"tensor {n!r} holds NaN or Inf")
                d64 = d.astype(np.float64)
                v = float(d64 @ d64)
            s += v
    return math.sqrt(s)


def validate_upload(item, meta, path: Path | None, limits: Limits | int, device=None):
    """Check an upload against its work item; return what the slot receives.

    Args:
        item: the :class:`~fmtl_edge.transport.scheduler.WorkItem` the upload answers.
        meta: its ``UpdateMeta``.
        path: the received safetensors file (None for evaluation work).
        limits: the :class:`Limits` (an int: ``max_update_bytes`` with default limits).
        device: the :class:`~fmtl_edge.transport.registry.Device` that sent it (its registered counts).

    Returns:
        a :class:`ClientUpdate` over the mapped file (train) or ``{client_id, job, sums}`` (evaluate).

    Raises:
        UpdateRejected, TensorFileError: the upload is refused (message names the field and the fix).
    """
    lim = limits if isinstance(limits, Limits) else Limits(max_update_bytes=int(limits))
    a = item.slot.assignment
    d = device
    if meta.job != a.job or int(meta.round) != int(a.round):
        raise UpdateRejected(f"update is for job {meta.job!r} round {meta.round}, the work was job {a.job!r} round {a.round}")
    if int(meta.client_id) != item.client_id:
        raise UpdateRejected(f"update says client {meta.client_id}, the work was given to client {item.client_id}")
    held = [t for t in a.tasks if d is None or not d.tasks or d.tasks.get(t, 0) > 0]
    if item.kind == "evaluate":
        n_test = d.n_test if d is not None and d.n_test else None
        sums = {}
        for t in held:
            if t not in meta.eval:
                raise UpdateRejected(f"evaluation lacks task {t!r}")
            e = meta.eval[t]
            n = int(e.n)
            if n < 0 or (n_test is not None and n > n_test):
                raise UpdateRejected(f"evaluation of task {t!r}: n {n} is outside 0..{n_test} (the test samples "
                                     "registered for this client)")
            loss = _figure(f"evaluation of task {t!r}: loss_sum", e.loss_sum)
            metric = float(e.metric_sum)
            top = n if lim.task_kinds.get(t) in _ACCURACY else math.inf
            if not (math.isfinite(metric) and 0 <= metric <= top):
                raise UpdateRejected(f"evaluation of task {t!r}: metric_sum {metric!r} is outside 0..{top} for n = {n}")
            sums[t] = {"loss_sum": loss, "metric_sum": metric, "n": n}
        return {"client_id": item.client_id, "job": a.job, "sums": sums}
    if path is None:
        raise UpdateRejected("the update carries no model")
    f = SafetensorsFile(path, max_bytes=lim.max_update_bytes)
    stays = set(a.personal) | set(a.frozen)
    got = {n: (dt, shape) for n, dt, shape in f.spec()}
    kept = [n for n in got if n in stays]
    if kept:
        kind = "personal" if kept[0] in set(a.personal) else "frozen (pre-trained)"
        raise UpdateRejected(f"the update carries the {kind} tensor {kept[0]!r}: personal and frozen layers never "
                             "leave the client")
    expected = [(n, dt, shape) for n, dt, shape in item.model.spec if n not in stays]
    exp_names = [n for n, _, _ in expected]
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
    # resource figures first (cheap), then the scan of the tensors
    n = int(meta.n_samples)
    registered = d.n_train if d is not None and d.n_train else None
    if n < 0 or (registered is not None and n > registered):
        raise UpdateRejected(f"n_samples {n} is outside 0..{registered} (the training samples registered for "
                             f"client {item.client_id})")
    if lim.max_client_samples is not None:
        n = min(n, int(lim.max_client_samples))
    loss = {k: float(v) for k, v in meta.train_loss.items()}
    if not loss or not set(loss) <= set(held):
        raise UpdateRejected(f"train losses are for tasks {sorted(loss)}; this client trains {held} of the work's "
                             f"{list(a.tasks)} (the tasks it registered labels for)")
    trained = tuple(t for t in a.tasks if t in loss)
    if n > 0:
        for k, v in loss.items():
            _figure(f"train_loss[{k!r}]", v)
    aff = None
    if meta.affinity_n:
        k = int(meta.affinity_n)
        if k != len(trained) or len(meta.affinity) != k * k:
            raise UpdateRejected(f"affinity matrix is {k}x{k} with {len(meta.affinity)} values, the client trained "
                                 f"{len(trained)} tasks")
        aff = np.asarray(meta.affinity, dtype=np.float64).reshape(k, k)
        if not np.isfinite(aff).all():
            raise UpdateRejected("the affinity matrix holds NaN or Inf")
    if int(meta.affinity_steps) < 0:
        raise UpdateRejected(f"affinity_steps = {meta.affinity_steps}: must be >= 0")
    if int(meta.peak_memory_bytes) < 0:
        raise UpdateRejected(f"peak_memory_bytes = {meta.peak_memory_bytes}: must be >= 0 (0 = unknown)")
    _figure("device_s", meta.device_s)
    cpu_s = _figure("cpu_s", meta.cpu_s) if meta.HasField("cpu_s") else None
    if not 0 <= int(meta.threads) <= 4096:
        raise UpdateRejected(f"threads = {meta.threads}: must be in 0..4096 (0 = unknown)")
    for k in ("sample_passes", "lookahead_passes"):
        if int(getattr(meta, k)) < 0:
            raise UpdateRejected(f"{k} = {getattr(meta, k)}: must be >= 0")
    if int(meta.lookahead_passes) > int(meta.sample_passes):
        raise UpdateRejected(f"lookahead_passes = {meta.lookahead_passes} is above sample_passes = "
                             f"{meta.sample_passes} (which includes it)")
    if len(meta.energy_json) > lim.max_energy_json_bytes:
        raise UpdateRejected(f"energy_json is {len(meta.energy_json)} bytes, above {lim.max_energy_json_bytes}")
    try:
        energy = json.loads(meta.energy_json) if meta.energy_json else {}
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise UpdateRejected("energy_json is not JSON") from None
    if not isinstance(energy, dict):
        raise UpdateRejected("energy_json is not an object")
    for k, v in energy.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UpdateRejected(f"energy_json[{k!r}] = {v!r}: must be finite")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and str(k).endswith(_UNITS) and v < 0:
            raise UpdateRejected(f"energy_json[{k!r}] = {v!r}: must be >= 0")
    energy["total_j"] = _figure("energy_j", meta.energy_j, " (leave it unset when unknown)") if meta.HasField("energy_j") else None
    dist = _scan(f, item.model)
    g = model_norm(item.model)
    bound = lim.max_update_norm_ratio * max(g, 1.0)
    if dist > bound:
        raise UpdateRejected(f"update norm bound: the update is {dist:.3g} away from the global model (L2), above "
                             f"{bound:.3g} = max_update_norm_ratio {lim.max_update_norm_ratio:g} x max(|global| "
                             f"{g:.3g}, 1); raise [job] max_update_norm_ratio if honest updates move that far")
    f.release()
    return ClientUpdate(
        client_id=item.client_id, job=a.job, round=int(a.round), tasks=trained, state=MappedState(path, f),
        n_samples=n, train_loss=loss, affinity=aff, affinity_steps=int(meta.affinity_steps),
        device_s=float(meta.device_s), energy=energy, stopped_by=meta.stopped_by or None,
        peak_memory_bytes=int(meta.peak_memory_bytes) or None,
        sample_passes=int(meta.sample_passes), lookahead_passes=int(meta.lookahead_passes),
        cpu_s=cpu_s, threads=int(meta.threads) or None,
    )
