"""One client execution: local training of a job's tasks for one round, and evaluation.

:func:`train_round` is what a device runs for an :class:`~fmtl_edge.messages.Assignment`: the client
framework (global state + the client's personal layers, frozen layers frozen) around the assignment's
local-training procedure (:mod:`fmtl_edge.procedures`: ``sgd``, ``fedprox``, ``ditto``...). The
caller (in-process pool or device agent) wraps it in the device lease and the meter window;
:func:`execute` does both.

Also here: :func:`evaluate_sums`, the per-client test pass (global or personalised model) whose sums
make both the union test loss of a global model and the personalised figures.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fmtl_edge.client_state import ClientStateStore
from fmtl_edge.data.base import ClientData
from fmtl_edge.layer_names import LAYER_PREFIX
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import state_to_numpy
from fmtl_edge.seeding import derive_seed
from fmtl_edge.tasks import TaskSet


def warm_up() -> None:
    """Import what the first optimizer and ``functional_call`` import lazily (~1 s), so that cost is
    not billed as device time to whichever client execution happens to run first in a process."""
    from torch.func import functional_call

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    lin = torch.nn.Linear(1, 1)
    functional_call(lin, dict(lin.named_parameters()), (torch.zeros(1, 1),))


def build_model(spec: ModelSpec, tasks: TaskSet, state: Mapping[str, np.ndarray] | None, device: str = "cpu",
                model: MultiTaskModel | None = None) -> MultiTaskModel:
    """A model with ``tasks``' heads (or ``model``, a procedure's own architecture), loaded from
    ``state`` (every tensor of the model required).

    Raises:
        ValueError: ``state`` lacks a tensor of the model or has one of the wrong shape.
    """
    model = MultiTaskModel(spec, tasks) if model is None else model
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
            load[k] = t
        if _plain_state_loading(model):
            # what load_state_dict does for modules without load hooks, at a fifth of its cost
            # (bench/model_throughput.py): copy each tensor into the model's own, casting the dtype
            with torch.no_grad():
                for k, ref in own.items():
                    ref.copy_(load[k])
        else:
            model.load_state_dict({k: v.to(own[k].dtype) for k, v in load.items()})
    return model.to(device)


def _plain_state_loading(model: torch.nn.Module) -> bool:
    """Whether loading a full state into ``model`` is a plain copy into its tensors: no module has
    load-state hooks or its own ``_load_from_state_dict`` (BatchNorm's only adds a missing counter)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    plain = (torch.nn.Module._load_from_state_dict, _BatchNorm._load_from_state_dict)
    for m in model.modules():
        if getattr(m, "_load_state_dict_pre_hooks", None) or getattr(m, "_load_state_dict_post_hooks", None):
            return False
        if type(m)._load_from_state_dict not in plain:
            return False
    return True


_reused = threading.local()
_REUSED_PER_THREAD = 2


def _job_model(spec: ModelSpec, job_tasks: TaskSet, proc, method_config: Mapping[str, Any],
               device: str) -> MultiTaskModel:
    """The procedure's model for a job (:meth:`~fmtl_edge.procedures.Procedure.model`), whose
    state :func:`build_model` then overwrites entirely.

    For the built-in families (:data:`fmtl_edge.backbones.FAMILIES`: no state outside their state
    dict) the last two such models of this thread are kept and handed out again, every gradient
    cleared, every parameter trainable and in training mode: building a model costs as much as a
    few training steps of a small one (bench/model_throughput.py). A factory's model is built anew
    each time (it may keep state that loading a state dict does not reset).
    """
    from fmtl_edge.backbones import FAMILIES

    if spec.model not in FAMILIES:
        return proc.model(spec, job_tasks, method_config)
    import json

    key = (spec, job_tasks, proc.name, json.dumps(method_config, sort_keys=True, default=str), str(device))
    cache = getattr(_reused, "models", None)
    if cache is None:
        cache = _reused.models = OrderedDict()
    model = cache.get(key)
    if model is None:
        model = cache[key] = proc.model(spec, job_tasks, method_config)
        while len(cache) > _REUSED_PER_THREAD:
            cache.popitem(last=False)
        return model
    cache.move_to_end(key)
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)
    return model.train()


def client_tasks(data: ClientData, job_tasks: Sequence[str]) -> list[str]:
    """The tasks of ``job_tasks`` this client holds training labels for, in job order."""
    return [t for t in job_tasks if t in data.y_train]


def make_freezer(frozen: Sequence[str]):
    """A function that freezes the tensors named in ``frozen`` in a model: no gradient for frozen
    parameters, and BatchNorm modules with frozen running statistics kept in eval mode (so training
    moves neither). Call it after every ``model.train()``."""
    frozen = set(frozen)

    def freeze(model: torch.nn.Module) -> None:
        if not frozen:
            return
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and f"{n}.running_mean" in frozen:
                m.eval()

    return freeze


def overlay_personal(state: Mapping[str, np.ndarray], stored: Mapping[str, np.ndarray] | None,
                     personal: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The global ``state`` with the client's own personal layers put in, and the procedure's part of
    the stored client state (without the ``layer:`` entries)."""
    state = dict(state)
    if stored is None:
        return state, None
    own = {k: v for k, v in stored.items() if not k.startswith(LAYER_PREFIX)}
    for n in personal:
        v = stored.get(LAYER_PREFIX + n)
        if v is not None:
            state[n] = v
    return state, (own or None)


def train_round(
    data: ClientData,
    spec: ModelSpec,
    tasks: TaskSet,
    assignment: Assignment,
    *,
    energy_probe=None,
    state_store: ClientStateStore | None = None,
) -> ClientUpdate:
    """Run one round of local training with the assignment's procedure and return the update
    (device time and energy are filled in by :func:`execute`).

    The framework around the procedure: the model gets the global state with the client's personal
    layers overlaid (from ``state_store``, versions written before this round), frozen tensors are
    frozen, the procedure trains (:mod:`fmtl_edge.procedures`), the personal layers and the
    procedure's own state go back into ``state_store``, and the update carries every other tensor.

    Args:
        data: the client's data; it trains the job's tasks it holds labels for.
        spec: model architecture.
        tasks: the dataset's task set (the job's tasks are taken from it by name).
        assignment: job, round, tasks, global state, learning rate, procedure and its settings.
        energy_probe: optional callable returning joules used so far in this execution (for an
            energy budget), e.g. a meter window's ``peek().total_j``.
        state_store: this client's state (None: a stateless client; personal layers then restart
            from the broadcast every round).

    Returns:
        :class:`~fmtl_edge.messages.ClientUpdate` with ``device_s``/``energy`` left for the caller;
        ``tasks`` are the tasks it trained, ``state`` has no personal or frozen tensor.

    Raises:
        ValueError: no training data, none of the job's tasks, an unknown procedure, bad
            ``method_config`` values, or a state that does not fit the model.
    """
    from fmtl_edge.procedures import LocalContext, get_procedure

    cfg = assignment.config
    proc = get_procedure(assignment.procedure)
    mine = client_tasks(data, assignment.tasks)
    if not mine:
        raise ValueError(f"client {data.client_id} holds labels for none of the job's tasks {list(assignment.tasks)}")
    if data.n_train < 2:
        raise ValueError(f"client {data.client_id} has {data.n_train} training samples; need at least 2")
    t0 = time.perf_counter()
    key = assignment.state_key
    stored_all = state_store.load(key, assignment.round) if (state_store is not None and key) else None
    state, stored = overlay_personal(assignment.state, stored_all, assignment.personal)
    job_tasks = tasks.subset(assignment.tasks)
    model = build_model(spec, job_tasks, state, cfg.device, _job_model(spec, job_tasks, proc, assignment.method_config,
                                                                        cfg.device))
    freeze = make_freezer(assignment.frozen)
    freeze(model)
    rng = np.random.default_rng(derive_seed(assignment.seed, assignment.job, assignment.round, data.client_id))

    def job_state(job: str):
        if state_store is None or not key:
            return None
        ns, _, _ = key.rpartition("/")
        return state_store.load(f"{ns}/{job}" if ns else job, 1 << 30)

    ctx = LocalContext(data=data, spec=spec, tasks=tasks.subset(mine), assignment=assignment, model=model,
                       stored=stored, rng=rng, energy_probe=energy_probe, freeze=freeze, t0=t0, job_state=job_state)
    res = proc.train(ctx)
    final = state_to_numpy(model.state_dict())
    if state_store is not None and key and (assignment.personal or res.stored):
        keep = dict(res.stored or {})
        keep.update({LAYER_PREFIX + n: final[n] for n in assignment.personal})
        state_store.save(key, assignment.round, keep)
    return ClientUpdate(
        client_id=data.client_id,
        job=assignment.job,
        round=assignment.round,
        tasks=tuple(t for t in mine if res.tasks is None or t in res.tasks),
        state={n: final[n] for n in assignment.uploaded_names(final)},
        n_samples=res.n_samples,
        train_loss=res.train_loss,
        affinity=res.affinity,
        affinity_steps=res.affinity_steps,
        device_s=0.0,
        stopped_by=res.stopped_by,
        sample_passes=int(res.sample_passes),
        lookahead_passes=int(res.lookahead_passes),
    )


def check_memory_budget(spec: ModelSpec, tasks: TaskSet, assignment: Assignment,
                        memory_budget_bytes: int | None) -> int:
    """Estimate the job's memory need before it starts (parameters, gradients, momentum, activations
    of one batch; :func:`fmtl_edge.runtime.estimate_job_memory_bytes`).

    Returns:
        The estimate in bytes.

    Raises:
        fmtl_edge.runtime.BudgetExceeded: ``kind="memory"`` when over ``memory_budget_bytes``.
    """
    import json

    from fmtl_edge.runtime import check_memory

    optimizer = "sgd_momentum" if assignment.config.momentum > 0 else "sgd"
    need = _memory_need(spec, tasks.subset(assignment.tasks), assignment.procedure,
                        json.dumps(assignment.method_config, sort_keys=True, default=str),
                        int(assignment.config.batch_size), optimizer)
    if memory_budget_bytes is not None:
        check_memory(need, memory_budget_bytes)
    return int(need)


@functools.lru_cache(maxsize=64)
def _memory_need(spec: ModelSpec, job_tasks: TaskSet, procedure: str, method_config_json: str, batch_size: int,
                 optimizer: str) -> int:
    """The estimate of :func:`check_memory_budget`, computed once per (model, tasks, procedure and its
    settings, batch size, optimizer) in a process: it builds the model and traces a forward pass,
    which would otherwise cost every execution about as much as building its model."""
    import json

    from fmtl_edge.procedures import get_procedure
    from fmtl_edge.runtime import estimate_job_memory_bytes

    model = get_procedure(procedure).model(spec, job_tasks, json.loads(method_config_json))
    return int(estimate_job_memory_bytes(model, spec.input_shape, batch_size, optimizer))


def execute(
    data: ClientData,
    spec: ModelSpec,
    tasks: TaskSet,
    assignment: Assignment,
    meter=None,
    lease=None,
    memory_budget_bytes: int | None = None,
    state_store: ClientStateStore | None = None,
    threads=None,
) -> ClientUpdate:
    """:func:`train_round` under a device lease, a memory budget, a thread policy and a meter window.

    Args:
        meter: a :class:`fmtl_edge.runtime.Meter` (None: wall time only, energy unknown).
        lease: a context manager holding the device exclusively (one FL task at a time), e.g.
            :class:`fmtl_edge.runtime.DeviceLease`; None runs without one.
        memory_budget_bytes: refuse the job before it starts when its estimated memory need is over
            this (None: no budget).
        state_store: the client's state (see :func:`train_round`).
        threads: a :class:`fmtl_edge.runtime.threads.ThreadPolicy`: the execution's intra-op
            threads, set before the meter window opens (None: torch's threads as they are).

    Returns:
        The update with ``device_s`` (measured wall seconds), ``cpu_s`` (this process's CPU
        seconds over the same window, all threads: ``cpu_s / device_s`` well below the thread
        count shows the device shared with other work), ``threads`` (the intra-op threads it ran
        on), ``energy`` (the window's measurement as a dict: ``total_j``, ``total_scope``,
        ``estimated``, ``source``, ``domains``...) and ``peak_memory_bytes`` (what the execution
        added to the process's peak memory).

    Raises:
        fmtl_edge.runtime.BudgetExceeded: the memory estimate is over the budget (nothing ran).
        fmtl_edge.runtime.DeviceBusy: the lease could not be taken.
    """
    from fmtl_edge.runtime import watch_peak_memory

    if memory_budget_bytes is not None:
        check_memory_budget(spec, tasks, assignment, memory_budget_bytes)
    n_threads = None
    if threads is not None:
        n_threads = threads.count(batch_flops(spec, tasks, assignment))
        threads.apply(n_threads)
    with lease if lease is not None else nullcontext():
        with watch_peak_memory(assignment.config.device) as mem:
            if meter is None:
                t0, c0 = time.perf_counter(), time.process_time()
                upd = train_round(data, spec, tasks, assignment, state_store=state_store)
                upd.device_s = time.perf_counter() - t0
                upd.cpu_s = time.process_time() - c0
                upd.energy = {"wall_s": upd.device_s, "total_j": None, "estimated": False, "source": "none",
                              "total_scope": "none", "domains": [], "warnings": ["no meter"]}
            else:
                with meter.window(f"client-{data.client_id}/{assignment.job}/round-{assignment.round}") as win:
                    c0 = time.process_time()
                    probe = (lambda: win.peek().total_j) if assignment.energy_budget_j is not None else None
                    upd = train_round(data, spec, tasks, assignment, energy_probe=probe, state_store=state_store)
                    upd.cpu_s = time.process_time() - c0
                m = win.measurement
                upd.device_s = float(m.wall_s)
                upd.energy = m.to_dict()
    upd.peak_memory_bytes = mem.job_peak_bytes
    upd.threads = n_threads if n_threads is not None else torch.get_num_threads()
    return upd


def batch_flops(spec: ModelSpec, tasks: TaskSet, assignment: Assignment) -> float | None:
    """Training FLOPs (forward + backward) of one batch of the assignment's model: the thread
    policy's input (:func:`fmtl_edge.flops.training_flops_per_sample` × batch size; counted once
    per model and batch size per process, outside any meter window). None when not countable."""
    from fmtl_edge.flops import training_flops_per_sample

    batch = int(assignment.config.batch_size)
    per = training_flops_per_sample(spec, tasks.subset(assignment.tasks), batch)
    return None if per is None else per * batch


@torch.no_grad()
def evaluate_sums(model: MultiTaskModel, data: ClientData, task_names: Sequence[str], split: str = "test",
                  batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Per-task loss and metric *sums* of ``model`` over one client's ``split`` data.

    Adding the sums of several clients and finishing them (:func:`finish_sums`) gives the test loss
    over the union of their test splits, each sample counted once (a global model), or the
    test-sample-weighted mean over clients (personalised models).

    Returns:
        task → ``{"loss_sum": float, "metric_sum": float, "n": samples}`` for the tasks of
        ``task_names`` the client holds labels for.
    """
    model.eval()
    device = next(model.parameters()).device
    x_np = data.x_test if split == "test" else data.x_train
    ys_np = data.y_test if split == "test" else data.y_train
    names = [n for n in task_names if n in ys_np]
    out = {n: {"loss_sum": 0.0, "metric_sum": 0.0, "n": 0} for n in names}
    for i in range(0, len(x_np), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(x_np[i : i + batch_size])).to(device, torch.float32)
        outs = model(x, names)
        for n in names:
            y = torch.from_numpy(np.ascontiguousarray(ys_np[n][i : i + batch_size])).to(device)
            task = model.tasks[n]
            out[n]["loss_sum"] += float(task.loss(outs[n], y, reduction="sum"))
            out[n]["metric_sum"] += task.metric_sum(outs[n], y)
            out[n]["n"] += len(x)
    return out


def evaluate_assignment(data: ClientData, spec: ModelSpec, tasks: TaskSet, assignment: Assignment,
                        state_store: ClientStateStore | None = None) -> dict[str, dict[str, float]]:
    """A client's evaluation work: the global model of ``assignment.state`` or, when
    ``assignment.personalised``, the client's own model (its personal layers and its procedure's
    :meth:`~fmtl_edge.procedures.Procedure.personal_state`), on the client's test split.

    Returns:
        task → sums, as :func:`evaluate_sums`.
    """
    from fmtl_edge.procedures import get_procedure

    state = own_model_state(assignment, state_store) if assignment.personalised else assignment.state
    job_tasks = tasks.subset(assignment.tasks)
    model = build_model(spec, job_tasks, state, assignment.config.device,
                        get_procedure(assignment.procedure).model(spec, job_tasks, assignment.method_config))
    return evaluate_sums(model, data, assignment.tasks)


def own_model_state(assignment: Assignment, state_store: ClientStateStore | None) -> Mapping[str, np.ndarray]:
    """The state of a client's own model of ``assignment``'s job — what its personalised evaluation
    runs: the job's final global state with the client's personal layers overlaid (newest stored
    version), then the procedure's :meth:`~fmtl_edge.procedures.Procedure.personal_state` (Ditto:
    p_k). Every tensor of the job's model (all of the job's heads); a client never trained keeps the
    global tensors."""
    from fmtl_edge.procedures import get_procedure

    stored_all = state_store.load(assignment.state_key, 1 << 30) if (state_store is not None and assignment.state_key) else None
    state, stored = overlay_personal(assignment.state, stored_all, assignment.personal)
    return get_procedure(assignment.procedure).personal_state(state, stored)


def client_model(data: ClientData, assignment: Assignment,
                 state_store: ClientStateStore | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """A client's personalised model as it is deployed on that client: :func:`own_model_state` with
    the heads of the job's tasks the client holds labels for (train or test) and the backbone.

    Returns:
        ``(state, tasks)``: name → array (the :class:`~fmtl_edge.models.MultiTaskModel` names of
        those tasks' model), and those tasks in job order (the ones its personalised figures cover).
    """
    from fmtl_edge.partition import select_state

    mine = [t for t in assignment.tasks if t in data.y_train or t in data.y_test]
    state = own_model_state(assignment, state_store)
    return {k: np.asarray(v) for k, v in select_state(state, mine).items()}, mine


def add_sums(total: dict[str, dict[str, float]], sums: Mapping[str, Mapping[str, float]]) -> None:
    """``total += sums`` task by task (in place)."""
    for t, s in sums.items():
        acc = total.setdefault(t, {"loss_sum": 0.0, "metric_sum": 0.0, "n": 0})
        acc["loss_sum"] += float(s["loss_sum"])
        acc["metric_sum"] += float(s["metric_sum"])
        acc["n"] += int(s["n"])


def finish_sums(tasks: TaskSet, sums: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Sums → task → ``{"loss", "metric", "metric_name", "n"}`` (loss per sample; NaN when n = 0)."""
    out = {}
    for t, s in sums.items():
        task = tasks[t]
        n = int(s["n"])
        out[t] = {"loss": s["loss_sum"] / n if n else float("nan"), "metric": task.finish_metric(s["metric_sum"], n),
                  "metric_name": task.metric_name, "n": n}
    return out
