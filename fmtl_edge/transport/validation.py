"""Validation of every upload before it touches the aggregate (docs/design.md §5).

One function, :func:`validate_upload`, used by every upload path: a training update (its
safetensors file and metadata) or an evaluation reply. It raises :class:`UpdateRejected` (a
``ValueError``) naming the field and what is wrong.

Rules (:class:`Limits` holds the settings):

- the work's job, round and client; tensor names, dtypes and shapes equal to the model's; the file
  parsed as strictly as the ``safetensors`` package (:class:`~fmtl_edge.transport.tensors.SafetensorsFile`);
- no NaN/Inf, and the update's distance to the global model bounded (norm-bounded FedAvg):
  ``‖w − w_global‖₂ ≤ max_update_norm_ratio · max(‖w_global‖₂, 1)``; the distance is kept on the
  work item (``update_norm``) for the round's relative bound, :func:`norm_outliers`: once every
  update of a round (3 or more) is in, one farther than ``max_update_norm_multiple`` × the round's
  median distance × its data share (1–4) is refused;
- ``n_samples`` (the aggregation weight) in ``0..`` the training samples registered for the client
  (held fixed from its first registration), then capped (:func:`weight_cap`) at
  ``max_samples_ratio`` × the low median of the training-sample counts registered by the job's
  devices, and at ``max_client_samples`` when set;
- train losses, seconds, joules, peak memory and affinity steps finite and ``≥ 0``;
- evaluation: per task ``0 ≤ n ≤`` the registered test samples (0 registered: ``n = 0``) and
  ``≤ max_samples_ratio`` × the low median of the registered test-sample counts, ``loss_sum ≥ 0``,
  ``metric_sum ≥ 0`` and, for accuracy tasks (classification, binary), ``metric_sum ≤ n``.
"""

from __future__ import annotations

import json
import math
import statistics
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
        max_samples_ratio: a client's sample counts (its FedAvg weight, an evaluation's ``n``) are
            bounded by this × the low median of the counts the job's devices registered (None or 0:
            no bound).
        max_update_norm_multiple: a round's relative norm bound: an update farther from the global
            model than this × the round's median distance is refused (None or 0: off).
        median_train_samples, median_test_samples: the low medians of the registered counts (set by
            the pool for each upload; None: unknown, no bound).
        task_kinds: task → kind (``classification`` | ``binary`` | ``regression`` | ``dense``), for
            the range of evaluation metric sums; unknown tasks get only the ``≥ 0`` check.
        max_energy_json_bytes: size limit of the meter's JSON.
    """

    max_update_bytes: int = 8 << 30
    max_update_norm_ratio: float = 10.0
    max_client_samples: int | None = None
    task_kinds: Mapping[str, str] = field(default_factory=dict)
    max_energy_json_bytes: int = 64 << 10
    max_samples_ratio: float | None = 10.0
    max_update_norm_multiple: float | None = 4.0
    median_train_samples: int | None = None
    median_test_samples: int | None = None


_ACCURACY = ("classification", "binary")
_UNITS = ("_j", "_s", "_w", "_bytes", "_joules", "_seconds")


def _figure(name: str, v: float, fix: str = "") -> float:
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise UpdateRejected(f"{name} = {v!r}: must be a finite number >= 0{fix}")
    return v


def samples_bound(median: float | None, ratio: float | None) -> int | None:
    """The most samples one client may count: ``floor(ratio × median)`` (at least 1), where
    ``median`` is the low median of the counts the job's devices registered; None when either is
    unknown or 0 (no bound)."""
    if not ratio or not median:
        return None
    return max(1, math.floor(float(ratio) * float(median)))


def weight_cap(limits: Limits) -> int | None:
    """The cap on one update's FedAvg weight (samples): ``max_samples_ratio`` × the low median of the
    registered training-sample counts, and ``max_client_samples`` when set; None: no cap."""
    caps = [c for c in (samples_bound(limits.median_train_samples, limits.max_samples_ratio),
                        limits.max_client_samples) if c is not None]
    return min(int(c) for c in caps) if caps else None


#: the most a client's data share raises its relative norm bound (:func:`norm_outliers`)
MAX_SHARE = 4.0


def norm_outliers(norms: Mapping[int, float], multiple: float | None, weights: Mapping[int, float] | None = None,
                  min_count: int = 3) -> dict[int, str]:
    """The round's relative norm bound: the updates (key → L2 distance to the global model) farther
    than ``multiple`` × the round's median distance × their data share, with the reason each is
    refused. A client's share is its weight (samples, already capped) over the round's median
    weight, within 1..:data:`MAX_SHARE`: a client with more data takes more local steps and moves
    farther. A median needs ``min_count`` updates or more (with two, neither can be told honest);
    ``multiple`` None or 0: none.

    The median is robust to a minority of attackers: with fewer than half of the updates poisoned it
    lies between two honest distances, and an honest client moves about as far as its peers of as
    much data (the same learning rate over as many batches), while a scaled update moves its scale
    × farther. Measured on the presets' partitions: one round moves digits clients 0.6-1.4 × the
    median distance, UTKFace's Dirichlet partition (client sizes 0.3-2.7 × the median) 0.4-7 ×.
    """
    if not multiple or len(norms) < min_count:
        return {}
    med = statistics.median(norms.values())
    w = weights or {}
    med_w = statistics.median(w.values()) if w else 0.0
    out = {}
    for k, v in norms.items():
        share = min(max(float(w.get(k, 0.0)) / med_w, 1.0), MAX_SHARE) if med_w > 0 else 1.0
        bound = float(multiple) * med * share
        if v > bound:
            out[k] = (f"update norm bound: the update is {v:.3g} away from the global model (L2), above {bound:.3g} = "
                      f"max_update_norm_multiple {multiple:g} x the round's median distance {med:.3g} over {len(norms)} "
                      f"updates" + (f" x its data share {share:.2g}" if share != 1.0 else "")
                      + "; raise [job] max_update_norm_multiple (0: off) if honest updates differ that much")
    return out


def check_figure(name: str, v: float, fix: str = "") -> float:
    """``v`` as a float when it is finite and ``>= 0``.

    Raises:
        UpdateRejected: NaN, Inf or negative (the message names ``name`` and adds ``fix``).
    """
    return _figure(name, v, fix)


def _sq_sum(blocks) -> float:
    """Σ x² in float64 over an iterable of float arrays."""
    s = 0.0
    for b in blocks:
        b = np.asarray(b).astype(np.float64).reshape(-1)
        s += float(b @ b)
    return s


def _distance(pairs) -> float:
    """L2 distance of ``(name, update block, global block)`` pairs, with the NaN/Inf check.

    Raises:
        UpdateRejected: an update block holds NaN or Inf.
    """
    s = 0.0
    for n, u, w in pairs:
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


def model_norm(model) -> float:
    """L2 norm (float64) of the float tensors of a :class:`~fmtl_edge.transport.model_files.ModelFile`,
    computed once from the file in blocks and kept on it."""
    if getattr(model, "l2_norm", None) is None:
        f = SafetensorsFile(model.path)
        model.l2_norm = math.sqrt(sum(_sq_sum(f.read_blocks(n)) for n in f.names
                                      if np.issubdtype(f.entries[n][0], np.floating)))
    return model.l2_norm


def _scan(f: SafetensorsFile, model) -> float:
    """NaN/Inf check and L2 distance to the global model, one pass over both files in blocks."""
    g = SafetensorsFile(model.path)
    return _distance((n, u, w) for n in f.names if np.issubdtype(f.entries[n][0], np.floating)
                     for u, w in zip(f.read_blocks(n), g.read_blocks(n)))


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """L2 norm (float64) of the float tensors of an in-memory state (``name → np.ndarray``)."""
    return math.sqrt(_sq_sum(v for v in state.values() if np.issubdtype(np.asarray(v).dtype, np.floating)))


def state_distance(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> float:
    """L2 distance (float64) between the float tensors of ``update`` and the same tensors of
    ``global_state`` (in-memory ``name → np.ndarray``; the names of ``update`` must be in it).

    Raises:
        UpdateRejected: a tensor of ``update`` holds NaN or Inf.
    """
    return _distance((n, np.asarray(u), np.asarray(global_state[n])) for n, u in update.items()
                     if np.issubdtype(np.asarray(u).dtype, np.floating))


def check_norm_bound(dist: float, global_norm: float, limits: Limits,
                     setting: str = "[job] max_update_norm_ratio") -> None:
    """The norm bound of norm-bounded FedAvg: ``dist ≤ max_update_norm_ratio · max(global_norm, 1)``
    (``setting``: where the user raises the ratio, for the message).

    Raises:
        UpdateRejected: the update moved further (the message gives both figures and the setting).
    """
    bound = limits.max_update_norm_ratio * max(global_norm, 1.0)
    if dist > bound:
        raise UpdateRejected(f"update norm bound: the update is {dist:.3g} away from the global model (L2), above "
                             f"{bound:.3g} = max_update_norm_ratio {limits.max_update_norm_ratio:g} x max(|global| "
                             f"{global_norm:.3g}, 1); raise {setting} if honest updates move that far")


def check_samples(n: int, registered: int | None, client_id: int, limits: Limits) -> int:
    """An update's weight: ``n`` within ``0..registered`` (the training samples known for the
    client; None: unknown), capped by :func:`weight_cap` (``max_samples_ratio`` × the low median of
    the registered counts, when known; ``limits.max_client_samples`` when set).

    Raises:
        UpdateRejected: ``n`` outside the range.
    """
    n = int(n)
    if n < 0 or (registered is not None and n > registered):
        raise UpdateRejected(f"n_samples {n} is outside 0..{registered} (the training samples registered for "
                             f"client {client_id})")
    cap = weight_cap(limits)
    if cap is not None:
        n = min(n, cap)
    return n


def check_train_losses(loss: Mapping[str, float], held, tasks, n: int) -> tuple[str, ...]:
    """The tasks an update trained (``tasks``' order): its train losses must be for tasks the
    client holds (``held``), and finite and ``>= 0`` when it used samples (``n > 0``).

    Raises:
        UpdateRejected: no loss, a loss for another task, or a bad figure.
    """
    held = list(held)
    if not loss or not set(loss) <= set(held):
        raise UpdateRejected(f"train losses are for tasks {sorted(loss)}; this client trains {held} of the work's "
                             f"{list(tasks)} (the tasks it registered labels for)")
    if n > 0:
        for k, v in loss.items():
            _figure(f"train_loss[{k!r}]", v)
    return tuple(t for t in tasks if t in loss)


def check_resources(device_s: float, peak_memory_bytes: int, affinity_steps: int, sample_passes: int,
                    lookahead_passes: int, cpu_s: float | None = None, threads: int | None = 0) -> float | None:
    """An update's resource figures: seconds (device, CPU) finite and ``>= 0``, counts ``>= 0``,
    threads in ``0..4096`` and the lookahead passes within the sample passes (peak memory, threads
    0 = unknown; ``cpu_s`` None = unknown). Returns ``cpu_s`` as a float (or None).

    Raises:
        UpdateRejected: the first bad figure, named.
    """
    if int(affinity_steps) < 0:
        raise UpdateRejected(f"affinity_steps = {affinity_steps}: must be >= 0")
    if int(peak_memory_bytes) < 0:
        raise UpdateRejected(f"peak_memory_bytes = {peak_memory_bytes}: must be >= 0 (0 = unknown)")
    _figure("device_s", device_s)
    cpu = _figure("cpu_s", cpu_s) if cpu_s is not None else None
    if not 0 <= int(threads or 0) <= 4096:
        raise UpdateRejected(f"threads = {threads}: must be in 0..4096 (0 = unknown)")
    for k, v in (("sample_passes", sample_passes), ("lookahead_passes", lookahead_passes)):
        if int(v) < 0:
            raise UpdateRejected(f"{k} = {v}: must be >= 0")
    if int(lookahead_passes) > int(sample_passes):
        raise UpdateRejected(f"lookahead_passes = {lookahead_passes} is above sample_passes = "
                             f"{sample_passes} (which includes it)")
    return cpu


def check_energy(energy: Mapping) -> None:
    """The meter's figures: every float finite, every number whose key carries a unit
    (``_j``, ``_s``, ``_w``, ``_bytes``...) ``>= 0``.

    Raises:
        UpdateRejected: not an object, or a bad figure (named).
    """
    if not isinstance(energy, Mapping):
        raise UpdateRejected("energy_json is not an object")
    for k, v in energy.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UpdateRejected(f"energy_json[{k!r}] = {v!r}: must be finite")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and str(k).endswith(_UNITS) and v < 0:
            raise UpdateRejected(f"energy_json[{k!r}] = {v!r}: must be >= 0")


def check_eval_sums(task: str, n: int, loss_sum: float, metric_sum: float, n_test: int | None,
                    limits: Limits) -> dict:
    """One task's evaluation sums: ``0 ≤ n ≤ n_test`` (the test samples known for the client, 0
    included; None: unknown) and ``≤ max_samples_ratio`` × ``limits.median_test_samples`` when known,
    ``loss_sum ≥ 0`` and ``0 ≤ metric_sum`` (``≤ n`` for accuracy tasks, by ``limits.task_kinds``).
    Returns ``{"loss_sum", "metric_sum", "n"}``.

    Raises:
        UpdateRejected: a figure outside its range (named).
    """
    n = int(n)
    if n < 0 or (n_test is not None and n > n_test):
        raise UpdateRejected(f"evaluation of task {task!r}: n {n} is outside 0..{n_test} (the test samples "
                             "registered for this client)")
    cap = samples_bound(limits.median_test_samples, limits.max_samples_ratio)
    if cap is not None and n > cap:
        raise UpdateRejected(f"evaluation of task {task!r}: n {n} is above {cap} = max_samples_ratio "
                             f"{limits.max_samples_ratio:g} x the median test-sample count registered by the job's "
                             f"devices ({limits.median_test_samples})")
    loss = _figure(f"evaluation of task {task!r}: loss_sum", loss_sum)
    metric = float(metric_sum)
    top = n if limits.task_kinds.get(task) in _ACCURACY else math.inf
    if not (math.isfinite(metric) and 0 <= metric <= top):
        raise UpdateRejected(f"evaluation of task {task!r}: metric_sum {metric!r} is outside 0..{top} for n = {n}")
    return {"loss_sum": loss, "metric_sum": metric, "n": n}


def validate_upload(item, meta, path: Path | None, limits: Limits | int, device=None):
    """Check an upload against its work item; return what the slot receives.

    Args:
        item: the :class:`~fmtl_edge.transport.scheduler.WorkItem` the upload answers.
        meta: its ``UpdateMeta``.
        path: the received safetensors file (None for evaluation work).
        limits: the :class:`Limits` (an int: ``max_update_bytes`` with default limits).
        device: the :class:`~fmtl_edge.transport.registry.Device` that sent it (its registered counts).

    Returns:
        a :class:`ClientUpdate` over the mapped file (train) or ``{client_id, job, sums}`` (evaluate);
        a train update's distance to the global model is set on ``item.update_norm``.

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
        n_test = d.n_test if d is not None else None  # 0 registered: n must be 0
        sums = {}
        for t in held:
            if t not in meta.eval:
                raise UpdateRejected(f"evaluation lacks task {t!r}")
            e = meta.eval[t]
            sums[t] = check_eval_sums(t, e.n, e.loss_sum, e.metric_sum, n_test, lim)
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
    registered = d.n_train if d is not None and d.n_train else None
    n = check_samples(meta.n_samples, registered, item.client_id, lim)
    loss = {k: float(v) for k, v in meta.train_loss.items()}
    trained = check_train_losses(loss, held, a.tasks, n)
    aff = None
    if meta.affinity_n:
        k = int(meta.affinity_n)
        if k != len(trained) or len(meta.affinity) != k * k:
            raise UpdateRejected(f"affinity matrix is {k}x{k} with {len(meta.affinity)} values, the client trained "
                                 f"{len(trained)} tasks")
        aff = np.asarray(meta.affinity, dtype=np.float64).reshape(k, k)
        if not np.isfinite(aff).all():
            raise UpdateRejected("the affinity matrix holds NaN or Inf")
    cpu_s = check_resources(meta.device_s, meta.peak_memory_bytes, meta.affinity_steps, meta.sample_passes,
                            meta.lookahead_passes, cpu_s=meta.cpu_s if meta.HasField("cpu_s") else None,
                            threads=meta.threads)
    if len(meta.energy_json) > lim.max_energy_json_bytes:
        raise UpdateRejected(f"energy_json is {len(meta.energy_json)} bytes, above {lim.max_energy_json_bytes}")
    try:
        energy = json.loads(meta.energy_json) if meta.energy_json else {}
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise UpdateRejected("energy_json is not JSON") from None
    if not isinstance(energy, dict):
        raise UpdateRejected("energy_json is not an object")
    check_energy(energy)
    energy["total_j"] = _figure("energy_j", meta.energy_j, " (leave it unset when unknown)") if meta.HasField("energy_j") else None
    dist = _scan(f, item.model)
    item.update_norm = dist  # for the round's relative bound (norm_outliers)
    check_norm_bound(dist, model_norm(item.model), lim)
    f.release()
    return ClientUpdate(
        client_id=item.client_id, job=a.job, round=int(a.round), tasks=trained, state=MappedState(path, f),
        n_samples=n, train_loss=loss, affinity=aff, affinity_steps=int(meta.affinity_steps),
        device_s=float(meta.device_s), energy=energy, stopped_by=meta.stopped_by or None,
        peak_memory_bytes=int(meta.peak_memory_bytes) or None,
        sample_passes=int(meta.sample_passes), lookahead_passes=int(meta.lookahead_passes),
        cpu_s=cpu_s, threads=int(meta.threads) or None,
    )
