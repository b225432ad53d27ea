"""The remote client pool: the coordinator's :class:`~fmtl_edge.pool.ClientPool` over device agents.

The gRPC service (:mod:`fmtl_edge.transport.service`) feeds this pool with registrations,
heartbeats, pulls and uploads; the coordinator calls :meth:`RemoteClientPool.execute_many` exactly as
it calls the in-process pool. Every agent announces which client of the data partition it holds, so
the coordinator samples the same client ids per round as ``fmtl-edge simulate`` does for the same
seed, and a round over agents aggregates the same updates in the same order (slot order = sampled
client order), whichever device finishes first.

Per round (:class:`RoundPolicy`):

- every sampled client gets a *slot*; a slot is sent to the device holding that client when it is
  online and idle (one task at a time per device), waited for up to ``dispatch_wait_s`` otherwise,
  then handed to a replacement: another online, idle device holding the round's tasks that has not
  served this round, chosen by a seeded draw over ``(seed, job, round, slot, attempt)``;
- a device that fails (reports a failure, goes silent past the heartbeat timeout, or sends an
  update that fails validation) loses its slot, which goes to a replacement (``max_attempts`` per
  slot);
- the round ends when every slot has an update or has failed, or at ``deadline_s`` if at least
  ``min_updates`` updates are in (late work is cancelled); with fewer, the missing slots are sent to
  other devices and the deadline is extended, ``deadline_retries`` times;
- updates are validated (job and round, tensor names, shapes and dtypes, NaN/Inf, size, the static
  norm bound) before they are yielded, and yielded in slot order; in a round of 3 or more slots,
  once every slot is done, after the round's relative norm bound
  (:func:`~fmtl_edge.transport.validation.norm_outliers`). The uploads are memory-mapped files, so
  the server holds one of them at a time.

The pool is a thin :class:`~fmtl_edge.pool.ClientPool` over small objects, each with its own state
and given what it needs when it is made (they share the pool's one condition, which guards the
devices, work items and slots that a round and the gRPC threads both touch):

- :class:`~fmtl_edge.transport.registry.Registry` (``pool.registry``): devices, sessions, liveness,
  long polls, a token's binding to its client;
- :class:`~fmtl_edge.transport.work.WorkBook` (``pool.work``): slots and work items by id;
- :class:`~fmtl_edge.transport.scheduler.Scheduler` (``pool.scheduler``): dispatch, replacement,
  deadlines, ``min_updates``;
- :class:`~fmtl_edge.transport.uploads.Uploads` (``pool.uploads``): incoming files, acceptance and
  refusal through :mod:`~fmtl_edge.transport.validation`;
- :class:`~fmtl_edge.transport.model_files.ModelFiles` (``pool.files``): round model files, the
  paged-out global vector;
- :mod:`~fmtl_edge.transport.status` (``pool.counters``, ``pool.view``): counters, refusals per
  device, the round's timing; :mod:`~fmtl_edge.transport.evaluation`: evaluation work.

The gRPC servicer (:mod:`fmtl_edge.transport.service`) talks to the registry, the work book and the
uploads; the coordinator and ``fmtl-server`` to this facade.
"""

from __future__ import annotations

import json

import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.pool import ClientPool
from fmtl_edge.transport.evaluation import evaluate_on_devices
from fmtl_edge.transport.model_files import ModelFile, ModelFiles, release_free_heap
from fmtl_edge.transport.registry import Device, PoolClosed, RegistrationRefused, Registry
from fmtl_edge.transport.scheduler import RoundPolicy, Scheduler, Slot, WorkItem
from fmtl_edge.transport.status import PoolCounters, RoundInfo, StatusView
from fmtl_edge.transport.uploads import Uploads
from fmtl_edge.transport.validation import Limits
from fmtl_edge.transport.work import WorkBook

__all__ = ["Device", "ModelFile", "PoolClosed", "RegistrationRefused", "RemoteClientPool", "RoundPolicy", "Slot",
           "WorkItem", "release_free_heap"]


class RemoteClientPool(ClientPool):
    """Clients that are device agents connected over gRPC.

    Args:
        work_dir: where round models and received updates are kept (files are removed once used).
        policy: the :class:`RoundPolicy`.
        seed: run seed (replacement draws).
        model_info: ``{"input_shape": [...], "width": w, "depth": d}`` sent with every work item.
        max_update_bytes: uploads above this are refused.
        chunk_bytes: chunk size for downloads and (advised) uploads, 1–4 MiB.
        validate_registration: ``(Device) -> None`` raising :class:`RegistrationRefused` (the server
            checks the data partition and task definitions against its job).
        on_device_change: ``(Device) -> None`` after a registration or a finished execution (persistence).
        max_update_norm_ratio: the update norm bound relative to the global model's norm
            (:class:`~fmtl_edge.transport.validation.Limits`).
        max_client_samples: cap on one update's aggregation weight (None: no cap).
        max_samples_ratio: a client's FedAvg weight and evaluation ``n`` are bounded by this × the low
            median of the counts the job's devices registered (None or 0: no bound; docs/deployment.md).
        max_update_norm_multiple: the round's relative norm bound: an update farther from the global
            model than this × the round's median distance is refused (None or 0: off).
        on_round_start: ``(job, round, tasks, clients)`` before a round's work is handed out (logs).

    Attributes:
        registry, work, scheduler, uploads, files: the parts (see the module docstring).
        stats: the :class:`~fmtl_edge.transport.status.PoolCounters` (``counters`` is its live dict).
    """

    def __init__(self, work_dir: str | Path, policy: RoundPolicy | None = None, seed: int = 0,
                 model_info: Mapping[str, Any] | None = None, max_update_bytes: int = 8 << 30,
                 chunk_bytes: int = 2 << 20,
                 validate_registration: Callable[[Device], None] | None = None,
                 on_device_change: Callable[[Device], None] | None = None,
                 max_update_norm_ratio: float = 10.0, max_client_samples: int | None = None,
                 on_round_start: Callable[[str, int, Sequence[str], Sequence[int]], None] | None = None,
                 max_samples_ratio: float | None = 10.0, max_update_norm_multiple: float | None = 4.0):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy or RoundPolicy()
        self.seed = seed
        self.model_info = dict(model_info or {})
        self.max_update_bytes = int(max_update_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.server_id = secrets.token_hex(4)
        self.limits = Limits(self.max_update_bytes, float(max_update_norm_ratio), max_client_samples,
                             max_samples_ratio=max_samples_ratio, max_update_norm_multiple=max_update_norm_multiple)
        cv = threading.Condition()
        self.stats = PoolCounters()
        self.timing = RoundInfo()
        self.work = WorkBook(cv, self.server_id, self.policy, self.stats)
        self.registry = Registry(cv, self.policy, self.work, self.stats, validate_registration, on_device_change,
                                 max_samples_ratio)
        self.files = ModelFiles(self.work_dir)
        self.uploads = Uploads(cv, self.work_dir / "incoming", self.registry, self.work, self.stats, self.limits,
                               self.timing)
        self.scheduler = Scheduler(cv, self.policy, seed, self.registry, self.work, self.files, self.stats, self.timing,
                                   on_round_start, max_update_norm_multiple)
        self.view = StatusView(self.server_id, self.registry, self.stats, self.timing)

    # -- the ClientPool hooks ------------------------------------------------------------------------
    @property
    def client_ids(self) -> list[int]:
        return self.registry.client_ids

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        return self.registry.eligible(tasks)

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        """One parallel round on the devices (:meth:`Scheduler.execute_many
        <fmtl_edge.transport.scheduler.Scheduler.execute_many>`): validated updates in slot order."""
        return self.scheduler.execute_many(work)

    def execute_in_turn(self, client_id: int, assignment: Assignment) -> Iterator[ClientUpdate]:
        """A ring visit: only the device holding ``client_id`` serves it, a failure is a refusal."""
        return self.scheduler.execute_in_turn(client_id, assignment)

    def evaluate(self, requests: Sequence[tuple[int, Assignment]], timeout_s: float | None = None) -> dict[int, dict]:
        """Evaluation work on the devices (:func:`~fmtl_edge.transport.evaluation.evaluate_on_devices`)."""
        return evaluate_on_devices(self.scheduler, requests, timeout_s)

    def train_sizes(self) -> dict[int, int]:
        return {d.client_id: int(d.n_train) for d in self.registry.devices()}

    def label_statistics(self, tasks) -> dict[int, dict[str, dict]] | None:
        """Each device's label statistics as it registered them (checked at registration,
        :func:`fmtl_edge.loss_weights.check_label_stats`); None when a device did not send them."""
        out = {}
        for d in self.registry.devices():
            raw = d.data.get("label_stats_json")
            if not raw:
                return None
            out[d.client_id] = {t: s for t, s in json.loads(raw).items() if t in tasks.names}
        return out

    def device_name(self, client_id: int) -> str:
        d = self.registry.get(int(client_id))
        return f"client-{int(client_id)}" if d is None else d.name

    def device_modes(self, device: str):
        from fmtl_edge.selection import DeviceModes

        for d in self.registry.devices():
            if d.name == device:
                modes = list(d.info.get("power_modes") or [])
                if modes and d.info.get("power_mode_allowed"):
                    return DeviceModes(device, tuple(modes), modes[0])
        return None

    def global_vector_buffer(self, n_params: int) -> np.ndarray:
        """A file-backed mapping the scheduler pages out of RAM while a round's updates arrive
        (:meth:`ModelFiles.global_vector_buffer <fmtl_edge.transport.model_files.ModelFiles.global_vector_buffer>`)."""
        return self.files.global_vector_buffer(n_params)

    # -- fmtl-server's side ------------------------------------------------------------------------------
    def load_registry(self, devices: Sequence[Device]) -> None:
        """Known devices from persistence (offline until they register again)."""
        self.registry.load(devices)

    def devices(self) -> list[Device]:
        return self.registry.devices()

    def online_count(self) -> int:
        return self.registry.online_count()

    def wait_for_devices(self, n: int, timeout_s: float | None, stop: threading.Event | None = None,
                         clients: Sequence[int] | None = None) -> bool:
        """Block until ``n`` devices are online (or every one of ``clients``); False on timeout."""
        return self.registry.wait_for_devices(n, timeout_s, stop, clients)

    @property
    def counters(self) -> dict[str, int]:
        """Event counters (a live dict; see :class:`~fmtl_edge.transport.status.PoolCounters`)."""
        return self.stats.values

    @property
    def round_info(self) -> dict[str, Any]:
        """The running (or last) round's timing (:class:`~fmtl_edge.transport.status.RoundInfo`)."""
        return self.timing.values

    @property
    def task_kinds(self) -> Mapping[str, str]:
        """task → kind, for the range checks of evaluation replies (set by the server)."""
        return self.limits.task_kinds

    @task_kinds.setter
    def task_kinds(self, kinds: Mapping[str, str]) -> None:
        self.limits.task_kinds = dict(kinds)

    @property
    def closed(self) -> bool:
        return self.registry.closed

    def status(self) -> dict[str, Any]:
        """``server_id``, ``devices``, ``counters``, ``refusals`` and ``round`` (what ``GetStatus`` shows)."""
        return self.view.status()

    def close(self, reason: str = "the server is stopping", job_complete: bool = False) -> None:
        """The server is stopping: long polls return (telling the devices ``reason`` and whether the
        job is complete), a running round raises :class:`PoolClosed`."""
        self.registry.close(reason, job_complete)
