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
- updates are validated (job and round, tensor names, shapes and dtypes, NaN/Inf, size) before
  they are yielded, and yielded in slot order; the uploads are memory-mapped files, so the
  server holds one of them at a time.

The pool is split by job: :mod:`~fmtl_edge.transport.registry` (devices, sessions, liveness),
:mod:`~fmtl_edge.transport.scheduler` (slots, dispatch, deadlines), :mod:`~fmtl_edge.transport.model_files`
(model files, paging), :mod:`~fmtl_edge.transport.uploads` and :mod:`~fmtl_edge.transport.validation`
(acceptance of uploads), :mod:`~fmtl_edge.transport.evaluation` and :mod:`~fmtl_edge.transport.status`.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from fmtl_edge.pool import ClientPool
from fmtl_edge.transport.evaluation import EvaluationMixin
from fmtl_edge.transport.model_files import ModelFile, ModelFilesMixin, release_free_heap
from fmtl_edge.transport.registry import Device, PoolClosed, RegistrationRefused, RegistryMixin
from fmtl_edge.transport.scheduler import RoundPolicy, SchedulerMixin, Slot, WorkItem
from fmtl_edge.transport.status import StatusMixin
from fmtl_edge.transport.uploads import UploadsMixin
from fmtl_edge.transport.validation import Limits

__all__ = ["Device", "ModelFile", "PoolClosed", "RegistrationRefused", "RemoteClientPool", "RoundPolicy", "Slot",
           "WorkItem", "release_free_heap"]


class RemoteClientPool(RegistryMixin, SchedulerMixin, ModelFilesMixin, UploadsMixin, EvaluationMixin, StatusMixin,
                       ClientPool):
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
    """

    def __init__(self, work_dir: str | Path, policy: RoundPolicy | None = None, seed: int = 0,
                 model_info: Mapping[str, Any] | None = None, max_update_bytes: int = 8 << 30,
                 chunk_bytes: int = 2 << 20,
                 validate_registration: Callable[[Device], None] | None = None,
                 on_device_change: Callable[[Device], None] | None = None,
                 max_update_norm_ratio: float = 10.0, max_client_samples: int | None = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("models", "incoming"):
            shutil.rmtree(self.work_dir / sub, ignore_errors=True)
            (self.work_dir / sub).mkdir()
        self.policy = policy or RoundPolicy()
        self.seed = seed
        self.model_info = dict(model_info or {})
        self.max_update_bytes = int(max_update_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.validate_registration = validate_registration
        self.on_device_change = on_device_change
        self.server_id = secrets.token_hex(4)
        self._cv = threading.Condition()
        self._devices: dict[int, Device] = {}
        self._sessions: dict[str, int] = {}
        self._items: dict[str, WorkItem] = {}
        self._ids = itertools.count()
        self.closed = False
        self.counters = {"updates_accepted": 0, "updates_rejected": 0, "replacements": 0, "failures": 0,
                         "rounds_extended": 0, "registrations_refused": 0}
        self.round_info: dict[str, Any] = {}
        self.refusals: dict[str, dict[str, Any]] = {}   # device name → refused calls (status)
        self.limits = Limits(self.max_update_bytes, float(max_update_norm_ratio), max_client_samples)

    @property
    def task_kinds(self) -> Mapping[str, str]:
        """task → kind, for the range checks of evaluation replies (set by the server)."""
        return self.limits.task_kinds

    @task_kinds.setter
    def task_kinds(self, kinds: Mapping[str, str]) -> None:
        self.limits.task_kinds = dict(kinds)

