"""One client execution: local training of a job's tasks for one round.

:func:`train_round` is what a device runs for an :class:`~fmtl_edge.messages.Assignment`: E local
epochs of SGD (momentum, weight decay, the round's poly-decayed learning rate) on the client's
training data with loss Σ_i L_i over the job's tasks (plus FedProx's proximal term when μ > 0), the
lookahead affinity measurement every ρ batches (:func:`fmtl_edge.affinity.lookahead_affinity`), and
per-round time/energy budgets that end training early. The caller (in-process pool or device agent)
wraps it in the device lease and the meter window; :func:`execute` does both.

Also here: :func:`evaluate`, the test-loss/metric pass used for the final per-task models.
"""

from __future__ import annotations

import time
import zlib
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fmtl_edge.affinity.measure import lookahead_affinity
from fmtl_edge.data.base import ClientData
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import state_to_numpy
from fmtl_edge.tasks import TaskSet


def derive_seed(*parts: Any) -> int:
    """A stable 32-bit seed from strings/ints (independent of Python's hash randomisation)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def build_model(spec: ModelSpec, tasks: TaskSet, state: Mapping[str, np.ndarray] | None, device: str = "cpu") -> MultiTaskModel:
    """A model with ``tasks``' heads, loaded from ``state`` (every tensor of the model required).

    Raises:
        ValueError: ``state`` lacks a tensor of the model or has one of the wrong shape.
    """
    model = MultiTaskModel(spec, tasks)
    if state is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"model state lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        load = {}
        for k, ref in own.items():
            t = torch.as_tensor(np.asarray(state[k]))
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"tensor {k!r}: shape {tuple(t.shape)} but the model has {tuple(ref.shape)}")
            load[k] = t.to(ref.dtype)
        model.load_state_dict(load)
    return model.to(device)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    # A batch of one sample breaks BatchNorm in training mode: fold it into the previous batch.
    if len(out) > 1 and len(out[-1]) < 2:
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    return out


def train_round(
    data: ClientData,
    spec: ModelSpec,
    tasks: TaskSet,
    assignment: Assignment,
    *,
    energy_probe=None,
) -> ClientUpdate:
    """Run one round of local training and return the update (device time and energy are filled in
    by :func:`execute`).

    Args:
        data: the client's data (all tasks of ``assignment.tasks`` must be present).
        spec: model architecture.
        tasks: the dataset's task set (the job's tasks are taken from it by name).
        assignment: job, round, tasks, global state, learning rate and hyper-parameters.
        energy_probe: optional callable returning joules used so far in this execution (for an
            energy budget), e.g. a meter window's ``peek().total_j``.

    Returns:
        :class:`~fmtl_edge.messages.ClientUpdate` with ``device_s``/``energy`` left for the caller.

    Raises:
        ValueError: the client has no training data, or the state does not fit the model.
    """
    cfg = assignment.config
    job_tasks = tasks.subset(assignment.tasks)
    names = list(job_tasks.names)
    if data.n_train < 2:
        raise ValueError(f"client {data.client_id} has {data.n_train} training samples; need at least 2")
    device = torch.device(cfg.device)
    model = build_model(spec, job_tasks, assignment.state, cfg.device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=assignment.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    prox_ref = None
    if cfg.fedprox_mu > 0:
        prox_ref = [p.detach().clone() for p in model.parameters()]

    rng = np.random.default_rng(derive_seed(assignment.seed, assignment.job, assignment.round, data.client_id))
    x_all = torch.from_numpy(np.ascontiguousarray(data.x_train))
    y_all = {n: torch.from_numpy(np.ascontiguousarray(data.y_train[n])) for n in names}

    loss_sums = {n: 0.0 for n in names}
    seen = 0
    used_idx: set[int] | None = set() if (assignment.time_budget_s or assignment.energy_budget_j) else None
    aff_sum = np.zeros((len(names), len(names)))
    aff_steps = 0
    stopped_by = None
    step = 0
    t0 = time.perf_counter()
    for _epoch in range(cfg.local_epochs):
        for idx in _batches(data.n_train, cfg.batch_size, rng):
            it = torch.from_numpy(idx)
            x = x_all[it].to(device, torch.float32)
            ys = {n: y_all[n][it].to(device) for n in names}
            ys = {n: (v.float() if v.is_floating_point() else v) for n, v in ys.items()}
            feats = model.backbone(x)
            outs = model.forward_heads(feats, names)
            losses = {n: job_tasks[n].loss(outs[n], ys[n]) for n in names}
            if assignment.measure_affinity and len(names) > 1 and step % cfg.affinity_every == 0:
                aff_sum += lookahead_affinity(
                    model, x, ys, losses, assignment.lr, cfg.weight_decay, names, cfg.affinity_divide_by_lr
                )
                aff_steps += 1
            total = sum(losses.values())
            if prox_ref is not None:
                total = total + 0.5 * cfg.fedprox_mu * sum(
                    ((p - r) ** 2).sum() for p, r in zip(model.parameters(), prox_ref)
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            b = len(idx)
            for n in names:
                loss_sums[n] += float(losses[n].detach()) * b
            seen += b
            if used_idx is not None:
                used_idx.update(idx.tolist())
            step += 1
            stopped_by = _budget_hit(assignment, time.perf_counter() - t0, energy_probe)
            if stopped_by:
                break
        if stopped_by:
            break

    n_used = data.n_train if used_idx is None else len(used_idx)
    return ClientUpdate(
        client_id=data.client_id,
        job=assignment.job,
        round=assignment.round,
        tasks=tuple(names),
        state=state_to_numpy(model.state_dict()),
        n_samples=int(n_used),
        train_loss={n: loss_sums[n] / max(seen, 1) for n in names},
        affinity=(aff_sum / aff_steps) if aff_steps else None,
        affinity_steps=aff_steps,
        device_s=0.0,
        stopped_by=stopped_by,
    )


def _budget_hit(a: Assignment, elapsed_s: float, energy_probe) -> str | None:
    if a.time_budget_s is not None and elapsed_s >= a.time_budget_s:
        return "time"
    if a.energy_budget_j is not None and energy_probe is not None:
        used = energy_probe()
        if used is not None and used >= a.energy_budget_j:
            return "energy"
    return None


def check_memory_budget(spec: ModelSpec, tasks: TaskSet, assignment: Assignment,
                        memory_budget_bytes: int | None) -> int:
    """Estimate the job's memory need before it starts (parameters, gradients, momentum, activations
    of one batch; :func:`fmtl_edge.runtime.estimate_job_memory_bytes`).

    Returns:
        The estimate in bytes.

    Raises:
        fmtl_edge.runtime.BudgetExceeded: ``kind="memory"`` when over ``memory_budget_bytes``.
    """
    from fmtl_edge.runtime import check_memory, estimate_job_memory_bytes

    model = MultiTaskModel(spec, tasks.subset(assignment.tasks))
    optimizer = "sgd_momentum" if assignment.config.momentum > 0 else "sgd"
    need = estimate_job_memory_bytes(model, spec.input_shape, assignment.config.batch_size, optimizer)
    if memory_budget_bytes is not None:
        check_memory(need, memory_budget_bytes)
    return int(need)


def execute(
    data: ClientData,
    spec: ModelSpec,
    tasks: TaskSet,
    assignment: Assignment,
    meter=None,
    lease=None,
    memory_budget_bytes: int | None = None,
) -> ClientUpdate:
    """:func:`train_round` under a device lease, a memory budget and a meter window.

    Args:
        meter: a :class:`fmtl_edge.runtime.Meter` (None: wall time only, energy unknown).
        lease: a context manager holding the device exclusively (one FL task at a time), e.g.
            :class:`fmtl_edge.runtime.DeviceLease`; None runs without one.
        memory_budget_bytes: refuse the job before it starts when its estimated memory need is over
            this (None: no budget).

    Returns:
        The update with ``device_s`` (measured seconds), ``energy`` (the window's measurement as a
        dict: ``total_j``, ``total_scope``, ``estimated``, ``source``, ``domains``...) and
        ``peak_memory_bytes`` (what the execution added to the process's peak memory).

    Raises:
        fmtl_edge.runtime.BudgetExceeded: the memory estimate is over the budget (nothing ran).
        fmtl_edge.runtime.DeviceBusy: the lease could not be taken.
    """
    from fmtl_edge.runtime import watch_peak_memory

    if memory_budget_bytes is not None:
        check_memory_budget(spec, tasks, assignment, memory_budget_bytes)
    with lease if lease is not None else nullcontext():
        with watch_peak_memory(assignment.config.device) as mem:
            if meter is None:
                t0 = time.perf_counter()
                upd = train_round(data, spec, tasks, assignment)
                upd.device_s = time.perf_counter() - t0
                upd.energy = {"wall_s": upd.device_s, "total_j": None, "estimated": False, "source": "none",
                              "total_scope": "none", "domains": [], "warnings": ["no meter"]}
            else:
                with meter.window(f"client-{data.client_id}/{assignment.job}/round-{assignment.round}") as win:
                    probe = (lambda: win.peek().total_j) if assignment.energy_budget_j is not None else None
                    upd = train_round(data, spec, tasks, assignment, energy_probe=probe)
                m = win.measurement
                upd.device_s = float(m.wall_s)
                upd.energy = m.to_dict()
    upd.peak_memory_bytes = mem.job_peak_bytes
    return upd


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    clients: Sequence[ClientData],
    task_names: Sequence[str],
    split: str = "test",
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Test loss and metric of ``task_names`` over the union of the clients' ``split`` data.

    Returns:
        task → ``{"loss": mean loss, "metric": value, "metric_name": ..., "n": samples}``; the loss is
        averaged over samples (so the union of clients counts each sample once).
    """
    model.eval()
    device = next(model.parameters()).device
    sums = {n: [0.0, 0.0, 0] for n in task_names}
    for c in clients:
        x_np = c.x_test if split == "test" else c.x_train
        ys_np = c.y_test if split == "test" else c.y_train
        for i in range(0, len(x_np), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(x_np[i : i + batch_size])).to(device, torch.float32)
            outs = model(x, task_names)
            for n in task_names:
                y = torch.from_numpy(np.ascontiguousarray(ys_np[n][i : i + batch_size])).to(device)
                task = model.tasks[n]
                sums[n][0] += float(task.loss(outs[n], y, reduction="sum"))
                sums[n][1] += task.metric_sum(outs[n], y)
                sums[n][2] += len(x)
    out = {}
    for n in task_names:
        loss, met, cnt = sums[n]
        task = model.tasks[n]
        out[n] = {
            "loss": loss / cnt if cnt else float("nan"),
            "metric": task.finish_metric(met, cnt),
            "metric_name": task.metric_name,
            "n": cnt,
        }
    return out
