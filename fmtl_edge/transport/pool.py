"""The remote client pool: the coordinator's :class:`~fmtl_edge.coordinator.ClientPool` over device agents.

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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import os
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.client import derive_seed
from fmtl_edge.coordinator import ClientPool, RoundFailed, refusal
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.transport.tensors import (
    MappedState,
    SafetensorsFile,
    TensorFileError,
    check_finite,
    write_state,
)

log = logging.getLogger("fmtl_edge.transport.pool")

_malloc_trim: Any = None


def _page_out(state: Mapping[str, Any]) -> None:
    """Drop from RAM the pages of the shared file mappings behind ``state``'s arrays (the global vector
    from :meth:`RemoteClientPool.global_vector_buffer`); their contents stay in the file. Arrays in
    ordinary memory are left alone."""
    seen: set[int] = set()
    for v in state.values():
        b = v
        while isinstance(b, np.ndarray):
            b = b.base
        if isinstance(b, memoryview):  # np.frombuffer(mmap)
            b = b.obj
        if isinstance(b, mmap.mmap) and id(b) not in seen:
            seen.add(id(b))
            try:
                b.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # no madvise on this platform
                pass


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    The 2 MiB chunk buffers of K concurrent download/upload streams (``bytes`` from ``read()``,
    protobuf and gRPC copies, allocated on many threads) are served from glibc's per-thread arenas,
    and glibc keeps their pages after they are freed: measured on the 500 MB, K = 8 bench, 0.3–0.6
    model sizes of freed arena memory were still resident while the round's updates were being
    aggregated. The pool calls this before it hands an update to the aggregation and at the end of a
    round, so that memory is not stacked on the accumulator, the global vector and the mapped update.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
            _malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class PoolClosed(RuntimeError):
    """The pool was closed (server stopping) while a round was running."""


class RegistrationRefused(Exception):
    """A device may not join (``code`` is the gRPC status name to answer with)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RoundPolicy:
    """How a round over remote devices waits, replaces and retries.

    Attributes:
        deadline_s: seconds a round waits for its updates (None: no deadline, wait for every slot).
        min_updates: fewest updates that let a round end at its deadline.
        max_attempts: devices tried per slot (the sampled one plus replacements).
        dispatch_wait_s: how long a sampled device that is offline or busy is waited for before its
            slot goes to a replacement; also how long a slot waits for any free device.
        deadline_retries: extensions of the deadline (sending missing slots to other devices)
            before the round fails.
        heartbeat_timeout_s: a device silent this long is offline and its work fails.
    """

    deadline_s: float | None = None
    min_updates: int = 1
    max_attempts: int = 3
    dispatch_wait_s: float = 10.0
    deadline_retries: int = 2
    heartbeat_timeout_s: float = 10.0


@dataclass
class Device:
    """One known device (an agent holding one client of the partition)."""

    client_id: int
    name: str                       # identity of its bearer token
    tasks: dict[str, int]           # task → training samples held
    n_train: int
    n_test: int
    data: dict[str, Any]            # what it announced about its data (DataInfo)
    info: dict[str, Any]            # what it announced about itself (DeviceInfo)
    registered_at: float = 0.0
    last_seen: float = 0.0          # monotonic clock
    last_seen_wall: float = 0.0     # epoch seconds (status)
    session_id: str | None = None
    state: str = "offline"          # offline | idle | assigned | downloading | training | uploading
    queue: deque = field(default_factory=deque)
    current: "WorkItem | None" = None
    executions: int = 0
    rejected: int = 0
    failures: int = 0
    last_energy_j: float | None = None
    last_device_s: float | None = None
    last_job: str = ""

    def online(self, now: float, timeout_s: float) -> bool:
        return self.session_id is not None and now - self.last_seen <= timeout_s

    def idle(self) -> bool:
        return self.current is None and not self.queue

    def to_status(self, now: float, timeout_s: float) -> dict[str, Any]:
        return {
            "client_id": self.client_id, "device": self.name, "online": self.online(now, timeout_s),
            "state": self.state if self.online(now, timeout_s) else "offline",
            "work": self.current.work_id if self.current else None, "tasks": sorted(self.tasks),
            "train_samples": self.n_train, "last_seen_s_ago": (now - self.last_seen) if self.last_seen else None,
            "last_seen_unix_s": self.last_seen_wall or None,
            "executions": self.executions, "rejected": self.rejected, "failures": self.failures,
            "last_energy_j": self.last_energy_j, "last_device_s": self.last_device_s, "last_job": self.last_job,
            "hostname": self.info.get("hostname"), "profile": self.info.get("profile_name"),
            "meter": self.info.get("meter"),
        }


@dataclass
class ModelFile:
    path: Path
    size_bytes: int
    sha256: str
    spec: list[tuple[str, str, tuple[int, ...]]]   # (name, dtype name, shape) in file order


@dataclass
class Slot:
    index: int
    sampled: int
    assignment: Assignment
    kind: str = "train"
    replaceable: bool = True
    tried: list[int] = field(default_factory=list)
    item: "WorkItem | None" = None
    result: Any = None               # ClientUpdate (train) or eval dict (evaluate)
    failed: str | None = None        # why the slot gave up
    waiting_since: float = 0.0
    done: bool = False


@dataclass
class WorkItem:
    work_id: str
    kind: str
    client_id: int
    slot: Slot
    model: ModelFile
    deadline_s: float | None
    status: str = "queued"           # queued | running | done | failed | cancelled
    issued_at: float = 0.0
    reason: str = ""


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
    """

    def __init__(self, work_dir: str | Path, policy: RoundPolicy | None = None, seed: int = 0,
                 model_info: Mapping[str, Any] | None = None, max_update_bytes: int = 8 << 30,
                 chunk_bytes: int = 2 << 20,
                 validate_registration: Callable[[Device], None] | None = None,
                 on_device_change: Callable[[Device], None] | None = None):
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
                         "rounds_extended": 0}
        self.round_info: dict[str, Any] = {}

    # -- registry ---------------------------------------------------------------------------------
    def load_registry(self, devices: Sequence[Device]) -> None:
        """Known devices from persistence (offline until they register again)."""
        with self._cv:
            for d in devices:
                d.session_id = None
                d.state = "offline"
                self._devices[d.client_id] = d

    @property
    def client_ids(self) -> list[int]:
        with self._cv:
            return sorted(self._devices)

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        """Known clients (online or not) whose data holds every task of ``tasks``: the population the
        coordinator samples from, the same as the simulation's when every client has joined."""
        with self._cv:
            return sorted(c for c, d in self._devices.items() if all(d.tasks.get(t, 0) > 0 for t in tasks))

    def devices(self) -> list[Device]:
        with self._cv:
            return [self._devices[c] for c in sorted(self._devices)]

    def online_count(self) -> int:
        now = time.monotonic()
        with self._cv:
            return sum(d.online(now, self.policy.heartbeat_timeout_s) for d in self._devices.values())

    def wait_for_devices(self, n: int, timeout_s: float | None, stop: threading.Event | None = None,
                         clients: Sequence[int] | None = None) -> bool:
        """Block until ``n`` devices are online (or every one of ``clients``); False on timeout."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while True:
                now = time.monotonic()
                self._reap(now)
                on = [c for c, d in self._devices.items() if d.online(now, self.policy.heartbeat_timeout_s)]
                if clients is not None:
                    if set(clients) <= set(on):
                        return True
                elif len(on) >= n:
                    return True
                if (end is not None and now >= end) or (stop is not None and stop.is_set()) or self.closed:
                    return False
                self._cv.wait(0.2 if end is None else max(0.01, min(0.2, end - now)))

    def register(self, name: str, client_id: int, tasks: Mapping[str, int], n_train: int, n_test: int,
                 data: Mapping[str, Any], info: Mapping[str, Any]) -> Device:
        """A device joins (or comes back); returns its record with a fresh session id.

        Raises:
            RegistrationRefused: the client is held by another online device, or the server's
                ``validate_registration`` refuses the data.
        """
        cand = Device(int(client_id), name, {str(k): int(v) for k, v in tasks.items()}, int(n_train), int(n_test),
                      dict(data), dict(info))
        if self.validate_registration is not None:
            self.validate_registration(cand)
        now = time.monotonic()
        with self._cv:
            self._reap(now)
            old = self._devices.get(cand.client_id)
            if old is not None and old.online(now, self.policy.heartbeat_timeout_s) and old.name != name:
                raise RegistrationRefused(
                    "ALREADY_EXISTS",
                    f"client {client_id} is held by device {old.name!r}, which is online; each client of the "
                    "partition may join once (check --data client=...)",
                )
            if old is not None:
                self._drop_session(old, "the device registered again (agent restarted)")
                cand.executions, cand.rejected, cand.failures = old.executions, old.rejected, old.failures
                cand.last_energy_j, cand.last_device_s, cand.last_job = old.last_energy_j, old.last_device_s, old.last_job
                cand.registered_at = old.registered_at or time.time()
            else:
                cand.registered_at = time.time()
            cand.session_id = secrets.token_hex(12)
            cand.last_seen = now
            cand.last_seen_wall = time.time()
            cand.state = "idle"
            self._devices[cand.client_id] = cand
            self._sessions[cand.session_id] = cand.client_id
            self._cv.notify_all()
        log.info("device %s registered as client %d (session %s)", name, client_id, cand.session_id[:8])
        self._changed(cand)
        return cand

    def _changed(self, d: Device) -> None:
        if self.on_device_change is not None:
            try:
                self.on_device_change(d)
            except Exception:  # persistence trouble must not break the round
                log.exception("could not persist device %d", d.client_id)

    def _drop_session(self, d: Device, reason: str) -> None:
        if d.session_id is not None:
            self._sessions.pop(d.session_id, None)
        d.session_id = None
        d.state = "offline"
        for item in ([d.current] if d.current else []) + list(d.queue):
            self._fail_item(item, reason)
        d.current = None
        d.queue.clear()

    def session(self, session_id: str, name: str | None = None) -> Device | None:
        """The device of a live session (touching its liveness), or None when unknown/expired."""
        now = time.monotonic()
        with self._cv:
            cid = self._sessions.get(session_id)
            if cid is None:
                return None
            d = self._devices[cid]
            if name is not None and d.name != name:
                return None
            if not d.online(now, self.policy.heartbeat_timeout_s):
                self._drop_session(d, "the device was silent longer than the heartbeat timeout")
                self._cv.notify_all()
                return None
            d.last_seen = now
            d.last_seen_wall = time.time()
            return d

    def heartbeat(self, session_id: str, name: str, state: str, work_id: str) -> tuple[bool, list[str]]:
        """Returns (session ok, work ids the device should drop)."""
        with self._cv:
            d = self.session(session_id, name)
            if d is None:
                return False, []
            if state in ("idle", "downloading", "training", "uploading"):
                d.state = state if (d.current is not None or state == "idle") else "idle"
            cancel = []
            if work_id:
                item = self._items.get(work_id)
                if item is None or item.status not in ("queued", "running") or item.client_id != d.client_id:
                    cancel.append(work_id)
            self._cv.notify_all()
            return True, cancel

    def pull(self, session_id: str, name: str, wait_s: float) -> WorkItem | None | str:
        """Next work item of the device (long poll); ``"reregister"`` when the session is unknown."""
        end = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._cv:
            while True:
                d = self.session(session_id, name)
                if d is None:
                    return "reregister"
                if d.current is not None:
                    # a device pulls only when it has nothing running: what it held is abandoned
                    if d.current.status == "running":
                        self._fail_item(d.current, "the device asked for new work without returning this one")
                    d.current = None
                    d.state = "idle"
                if d.queue:
                    item = d.queue.popleft()
                    item.status = "running"
                    item.issued_at = time.monotonic()
                    d.current = item
                    d.state = "assigned"
                    return item
                now = time.monotonic()
                if now >= end or self.closed:
                    return None
                self._cv.wait(min(1.0, end - now))

    def item_for(self, session_id: str, name: str, work_id: str) -> WorkItem | None:
        """The running work item ``work_id`` of this session's device, or None."""
        with self._cv:
            d = self.session(session_id, name)
            if d is None:
                return None
            item = self._items.get(work_id)
            if item is None or item is not d.current or item.status != "running":
                return None
            return item

    def why_not(self, work_id: str) -> str:
        """Why work ``work_id`` takes no upload (for the device's log)."""
        with self._cv:
            item = self._items.get(work_id)
            if item is None:
                return f"unknown work {work_id!r} (the server restarted?)"
            if item.status == "cancelled":
                return f"update arrived too late: {item.reason}"
            if item.status == "failed":
                return f"work {work_id} was given up: {item.reason}"
            if item.status == "done":
                return f"work {work_id} was already answered"
            return f"work {work_id} is not this session's"

    def report_failure(self, session_id: str, name: str, work_id: str, kind: str, reason: str) -> bool:
        with self._cv:
            d = self.session(session_id, name)
            item = self._items.get(work_id)
            if d is None or item is None or item.client_id != d.client_id:
                return False
            d.failures += 1
            log.warning("client %d could not run %s (%s): %s", d.client_id, work_id, kind, reason)
            self._fail_item(item, f"{kind}: {reason}")
            if d.current is item:
                d.current = None
                d.state = "idle"
            self._cv.notify_all()
            return True

    # -- liveness and item bookkeeping (lock held) ---------------------------------------------------
    def _reap(self, now: float) -> None:
        for d in self._devices.values():
            if d.session_id is not None and not d.online(now, self.policy.heartbeat_timeout_s):
                log.warning("client %d (%s) went silent: offline", d.client_id, d.name)
                self._drop_session(d, "the device went silent (no heartbeat)")

    def _fail_item(self, item: WorkItem, reason: str) -> None:
        if item.status in ("done", "failed", "cancelled"):
            return
        item.status = "failed"
        item.reason = reason
        self.counters["failures"] += 1
        slot = item.slot
        if slot.item is item:
            slot.item = None
            slot.waiting_since = time.monotonic()
            if not slot.replaceable or len(slot.tried) >= self.policy.max_attempts:
                slot.failed = reason
                slot.done = True
        self._cv.notify_all()

    def _cancel_item(self, item: WorkItem, reason: str) -> None:
        if item.status in ("done", "failed", "cancelled"):
            return
        item.status = "cancelled"
        item.reason = reason
        d = self._devices.get(item.client_id)
        if d is not None:
            if item in d.queue:
                d.queue.remove(item)
        if item.slot.item is item:
            item.slot.item = None

    def _prune_items(self, keep: int = 20000) -> None:
        if len(self._items) <= keep:
            return
        for wid in list(self._items)[: len(self._items) - keep // 2]:
            if self._items[wid].status not in ("queued", "running"):
                del self._items[wid]

    def _ready(self, d: Device, now: float) -> bool:
        return d.online(now, self.policy.heartbeat_timeout_s) and d.idle()

    def _issue(self, slot: Slot, d: Device, model: ModelFile, deadline_s: float | None) -> WorkItem:
        wid = f"{self.server_id}-{next(self._ids)}"
        item = WorkItem(wid, slot.kind, d.client_id, slot, model, deadline_s)
        self._items[wid] = item
        d.queue.append(item)
        d.state = "assigned"
        slot.item = item
        slot.tried.append(d.client_id)
        self._cv.notify_all()
        return item

    def _dispatch(self, slots: Sequence[Slot], models: Mapping[int, ModelFile], used: set[int],
                  job: str, rnd: int, deadline_s: float | None) -> None:
        now = time.monotonic()
        for slot in slots:
            if slot.done or slot.item is not None:
                continue
            model = models[slot.index]
            if not slot.tried:
                d = self._devices.get(slot.sampled)
                if d is not None and self._ready(d, now):
                    self._issue(slot, d, model, deadline_s)
                    used.add(d.client_id)
                    continue
                if not slot.replaceable or now - slot.waiting_since < self.policy.dispatch_wait_s:
                    if not slot.replaceable and now - slot.waiting_since >= self.policy.dispatch_wait_s:
                        slot.failed = f"client {slot.sampled} is offline or busy"
                        slot.done = True
                    continue
            if not slot.replaceable:
                continue
            tasks = slot.assignment.tasks
            cands = sorted(c for c, d in self._devices.items()
                           if c not in used and self._ready(d, now) and all(d.tasks.get(t, 0) > 0 for t in tasks))
            if not cands:
                if now - slot.waiting_since >= self.policy.dispatch_wait_s * max(1, self.policy.max_attempts):
                    slot.failed = "no online idle device to take the slot"
                    slot.done = True
                continue
            rng = np.random.default_rng(derive_seed(self.seed, job, rnd, "replace", slot.index, len(slot.tried)))
            c = int(cands[int(rng.integers(len(cands)))])
            log.info("job %s round %d: client %d replaces client %d", job, rnd, c,
                     slot.tried[-1] if slot.tried else slot.sampled)
            self.counters["replacements"] += 1
            self._issue(slot, self._devices[c], model, deadline_s)
            used.add(c)

    # -- model files ----------------------------------------------------------------------------------
    def write_model(self, state: Mapping[str, np.ndarray], tag: str) -> ModelFile:
        """The round's global model as a safetensors file for downloads."""
        path = self.work_dir / "models" / f"{tag}-{secrets.token_hex(4)}.safetensors"
        size, sha = write_state(path, state, {"format": "fmtl-edge/global/1", "tag": tag}, fsync=False)
        spec = [(k, np.asarray(v).dtype.name, tuple(np.asarray(v).shape)) for k, v in state.items()]
        return ModelFile(path, size, sha, spec)

    def global_vector_buffer(self, n: int) -> np.ndarray:
        """The coordinator's global model vector (``n`` float32): a shared mapping of an unlinked scratch
        file in the work directory, so that :meth:`execute_many` can drop its pages from the server's
        RAM while the round's updates are transferred and aggregated (they come back, from the page
        cache or the file, when the aggregate is written into it). Without this the server holds the
        global vector, the accumulator and one mapped update at once: three model sizes."""
        if n <= 0:
            return np.empty(max(n, 0), dtype=np.float32)
        d = self.work_dir / "scratch"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"global-{secrets.token_hex(4)}.f32"
        with open(path, "w+b") as f:
            f.truncate(4 * n)
            mm = mmap.mmap(f.fileno(), 4 * n)
        try:
            path.unlink()  # the mapping keeps the data; the disk space goes with the vector
        except OSError:  # pragma: no cover - platforms that cannot unlink a mapped file
            pass
        return np.frombuffer(mm, dtype=np.float32, count=n)

    # -- a round --------------------------------------------------------------------------------------
    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        """Run one round's assignments on the devices; yield validated updates in slot order."""
        if not work:
            return
        slots = [Slot(i, int(cid), a, waiting_since=time.monotonic()) for i, (cid, a) in enumerate(work)]
        job, rnd = work[0][1].job, work[0][1].round
        files: dict[int, ModelFile] = {}
        by_state: dict[int, ModelFile] = {}
        t0 = time.monotonic()
        for s in slots:
            key = id(s.assignment.state)
            if key not in by_state:
                by_state[key] = self.write_model(s.assignment.state, f"{job}-r{rnd}")
            files[s.index] = by_state[key]
        for m in {id(s.assignment.state): s.assignment.state for s in slots}.values():
            _page_out(m)  # written to the model file: the global vector need not stay in RAM meanwhile
        yield from self._run_slots(slots, files, job, rnd, model_write_s=time.monotonic() - t0)

    def _run_slots(self, slots: list[Slot], files: dict[int, ModelFile], job: str, rnd: int,
                   model_write_s: float = 0.0) -> Iterator[Any]:
        pol = self.policy
        used: set[int] = set()
        t0 = time.monotonic()
        deadline = None if pol.deadline_s is None else t0 + pol.deadline_s
        extensions = 0
        next_out = 0
        got = 0
        self.round_info = {"job": job, "round": rnd, "slots": len(slots), "started_unix_s": time.time(),
                           "model_write_s": model_write_s, "first_update_s": None, "last_update_s": None,
                           "validate_s": 0.0, "yield_wait_s": 0.0, "_t0": t0}
        try:
            while True:
                out = None
                with self._cv:
                    if self.closed:
                        raise PoolClosed("the server is stopping")
                    now = time.monotonic()
                    self._reap(now)
                    self._dispatch(slots, files, used, job, rnd,
                                   None if deadline is None else max(0.0, deadline - now))
                    if next_out < len(slots) and slots[next_out].done:
                        out = slots[next_out]
                        next_out += 1
                    elif next_out >= len(slots):
                        return
                    elif deadline is not None and now >= deadline:
                        have = got + sum(1 for s in slots[next_out:] if s.done and s.result is not None)
                        if have >= pol.min_updates:
                            for s in slots:
                                if not s.done:
                                    if s.item is not None:
                                        self._cancel_item(s.item, "the round ended at its deadline")
                                    s.failed = "cancelled at the deadline"
                                    s.done = True
                            log.info("job %s round %d: deadline reached with %d updates", job, rnd, have)
                            continue
                        if extensions >= pol.deadline_retries:
                            for s in slots:
                                if s.item is not None:
                                    self._cancel_item(s.item, "the round failed")
                                s.done = True
                            raise RoundFailed(job, rnd, have, pol.min_updates,
                                              f"deadline passed {extensions + 1} times")
                        extensions += 1
                        self.counters["rounds_extended"] += 1
                        log.warning("job %s round %d: %d of %d updates at the deadline; sending the missing "
                                    "slots to other devices (retry %d)", job, rnd, have, pol.min_updates, extensions)
                        for s in slots:
                            if not s.done and s.replaceable:
                                # the slow or missing device's slot goes to another device now
                                if s.item is not None:
                                    self._cancel_item(s.item, "the round's deadline passed; reassigned")
                                s.tried = s.tried or [s.sampled]
                                s.waiting_since = now - pol.dispatch_wait_s
                        deadline = now + pol.deadline_s
                        continue
                    else:
                        wait = 0.25
                        if deadline is not None:
                            wait = max(0.01, min(wait, deadline - now))
                        self._cv.wait(wait)
                        continue
                if out.result is None and out.kind == "train":
                    # the simulation's pool answers a refusing client with a refusal: so does this one
                    yield refusal(out.tried[-1] if out.tried else out.sampled, out.assignment,
                                  {"error": "NoUpdate", "message": out.failed or "no update", "sampled": out.sampled,
                                   "tried": list(out.tried)})
                elif out.result is not None:
                    got += 1
                    res = out.result
                    out.result = None
                    if isinstance(res, ClientUpdate):
                        release_free_heap()
                    t_y = time.monotonic()
                    try:
                        yield res
                    finally:
                        self.round_info["consumer_s"] = self.round_info.get("consumer_s", 0.0) + time.monotonic() - t_y
                        self._release(res)
        finally:
            with self._cv:
                for s in slots:
                    if s.item is not None:
                        self._cancel_item(s.item, "the round is over")
                    if isinstance(s.result, ClientUpdate):
                        self._release(s.result)
                        s.result = None
                    # work items outlive the round (to answer late devices): they must not keep the
                    # round's global model alive
                    s.assignment = replace(s.assignment, state={})
                self._prune_items()
            for f in {id(m): m for m in files.values()}.values():
                try:
                    f.path.unlink()
                except FileNotFoundError:
                    pass
            release_free_heap()

    def _release(self, res: Any) -> None:
        if isinstance(res, ClientUpdate) and isinstance(res.state, MappedState):
            res.state.release()
            try:
                res.state.file.path.unlink()
            except FileNotFoundError:
                pass

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, requests: Sequence[tuple[int, Assignment]], timeout_s: float | None = None) -> dict[int, dict]:
        """Run evaluation work (one per ``(client id, assignment)``: the assignment's state is the model
        and its tasks are evaluated on that client's test split). Returns client → ``{task: {loss_sum,
        metric_sum, n}}`` for the clients that answered (offline ones are skipped after
        ``dispatch_wait_s``)."""
        slots = [Slot(i, int(c), a, kind="evaluate", replaceable=False, waiting_since=time.monotonic())
                 for i, (c, a) in enumerate(requests)]
        files: dict[int, ModelFile] = {}
        by_state: dict[int, ModelFile] = {}
        for s in slots:
            key = id(s.assignment.state)
            if key not in by_state:
                by_state[key] = self.write_model(s.assignment.state, f"eval-{s.assignment.job}")
            files[s.index] = by_state[key]
        out: dict[int, dict] = {}
        saved = self.policy
        if timeout_s is not None:
            self.policy = RoundPolicy(**{**saved.__dict__, "deadline_s": timeout_s, "min_updates": 0})
        try:
            for i, res in enumerate(self._run_slots(slots, files, "evaluate", 0)):
                cid = res["client_id"]
                out.setdefault(cid, {}).setdefault(res["job"], {}).update(res["sums"])
        finally:
            self.policy = saved
        return out

    # -- uploads ----------------------------------------------------------------------------------------
    def incoming_path(self, work_id: str) -> Path:
        return self.work_dir / "incoming" / f"{work_id}.safetensors"

    def finish_upload(self, item: WorkItem, meta, path: Path | None) -> tuple[bool, str]:
        """Validate an uploaded update and hand it to its slot. Returns (accepted, reason)."""
        with self._cv:
            if item.status != "running":  # the round ended (or gave the slot away) while it was uploading
                if path is not None:
                    path.unlink(missing_ok=True)
                d = self._devices.get(item.client_id)
                if d is not None and d.current is item:
                    d.current = None
                    d.state = "idle"
                self._cv.notify_all()
                return False, self.why_not(item.work_id)
        t_v = time.monotonic()
        try:
            result = self._validate(item, meta, path)
        except (TensorFileError, ValueError, KeyError) as e:
            return False, self.reject_upload(item, str(e), path)
        finally:
            ri = self.round_info
            if ri.get("_t0") is not None:
                ri["validate_s"] = ri.get("validate_s", 0.0) + time.monotonic() - t_v
        with self._cv:
            d = self._devices.get(item.client_id)
            if d is not None and d.current is item:
                d.current = None
                d.state = "idle"
            if item.status != "running" or item.slot.item is not item:
                late = item.reason or "the round no longer needs it"
                if isinstance(result, ClientUpdate):
                    self._release(result)
                self._cv.notify_all()
                return False, f"update arrived too late: {late}"
            item.status = "done"
            item.slot.item = None
            item.slot.result = result
            item.slot.done = True
            self.counters["updates_accepted"] += 1
            ri = self.round_info
            if ri.get("_t0") is not None:
                since = time.monotonic() - ri["_t0"]
                ri["first_update_s"] = since if ri.get("first_update_s") is None else ri["first_update_s"]
                ri["last_update_s"] = since
            if d is not None:
                d.executions += 1
                d.last_job = f"{item.slot.assignment.job}/r{item.slot.assignment.round}"
                if isinstance(result, ClientUpdate):
                    d.last_device_s = float(result.device_s)
                    j = result.energy.get("total_j")
                    d.last_energy_j = None if j is None else float(j)
            self._cv.notify_all()
        if d is not None:
            self._changed(d)
        return True, ""

    def reject_upload(self, item: WorkItem, reason: str, path: Path | None = None) -> str:
        """Refuse an update (the slot goes to another device); returns the reason for the device."""
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        with self._cv:
            self.counters["updates_rejected"] += 1
            d = self._devices.get(item.client_id)
            if d is not None:
                d.rejected += 1
                if d.current is item:
                    d.current = None
                    d.state = "idle"
            a = item.slot.assignment
            log.warning("rejected update of client %d for job %s round %d: %s", item.client_id, a.job, a.round, reason)
            self._fail_item(item, f"update rejected: {reason}")
            self._cv.notify_all()
        if d is not None:
            self._changed(d)
        return reason

    def _validate(self, item: WorkItem, meta, path: Path | None):
        a = item.slot.assignment
        if meta.job != a.job or int(meta.round) != int(a.round):
            raise ValueError(f"update is for job {meta.job!r} round {meta.round}, the work was job {a.job!r} round {a.round}")
        if int(meta.client_id) != item.client_id:
            raise ValueError(f"update says client {meta.client_id}, the work was given to client {item.client_id}")
        if item.kind == "evaluate":
            sums = {}
            for t in a.tasks:
                if t not in meta.eval:
                    raise ValueError(f"evaluation lacks task {t!r}")
                e = meta.eval[t]
                if not (math.isfinite(e.loss_sum) and math.isfinite(e.metric_sum) and e.n >= 0):
                    raise ValueError(f"evaluation of task {t!r} is not finite")
                sums[t] = {"loss_sum": float(e.loss_sum), "metric_sum": float(e.metric_sum), "n": int(e.n)}
            return {"client_id": item.client_id, "job": a.job, "sums": sums}
        if path is None:
            raise ValueError("the update carries no model")
        f = SafetensorsFile(path, max_bytes=self.max_update_bytes)
        expected = item.model.spec
        exp_names = [n for n, _, _ in expected]
        got = {n: (dt, shape) for n, dt, shape in f.spec()}
        missing = [n for n in exp_names if n not in got]
        extra = [n for n in got if n not in set(exp_names)]
        if missing or extra:
            raise ValueError(f"tensor names differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, dt, shape in expected:
            gdt, gshape = got[n]
            if tuple(gshape) != tuple(shape):
                raise ValueError(f"tensor {n!r} has shape {tuple(gshape)}, the model has {tuple(shape)}")
            if gdt != dt:
                raise ValueError(f"tensor {n!r} has dtype {gdt}, the model has {dt}")
        bad = check_finite(f)
        if bad is not None:
            raise ValueError(f"tensor {bad!r} holds NaN or Inf")
        d = self._devices.get(item.client_id)
        n = int(meta.n_samples)
        if n < 0 or (d is not None and d.n_train and n > d.n_train * max(1, a.config.local_epochs)):
            raise ValueError(f"n_samples {n} is outside 0..{d.n_train if d else '?'}")
        loss = {k: float(v) for k, v in meta.train_loss.items()}
        if set(loss) != set(a.tasks):
            raise ValueError(f"train losses are for tasks {sorted(loss)}, the work has {list(a.tasks)}")
        if n > 0 and not all(math.isfinite(v) for v in loss.values()):
            raise ValueError("a train loss is NaN or Inf")
        aff = None
        if meta.affinity_n:
            k = int(meta.affinity_n)
            if k != len(a.tasks) or len(meta.affinity) != k * k:
                raise ValueError(f"affinity matrix is {k}x{k} with {len(meta.affinity)} values, the work has {len(a.tasks)} tasks")
            aff = np.asarray(meta.affinity, dtype=np.float64).reshape(k, k)
            if not np.isfinite(aff).all():
                raise ValueError("the affinity matrix holds NaN or Inf")
        try:
            energy = json.loads(meta.energy_json) if meta.energy_json else {}
        except json.JSONDecodeError:
            raise ValueError("energy_json is not JSON") from None
        if not isinstance(energy, dict):
            raise ValueError("energy_json is not an object")
        energy["total_j"] = float(meta.energy_j) if meta.HasField("energy_j") else None
        if not math.isfinite(meta.device_s) or meta.device_s < 0:
            raise ValueError(f"device_s {meta.device_s} is not a duration")
        f.release()
        return ClientUpdate(
            client_id=item.client_id, job=a.job, round=int(a.round), tasks=tuple(a.tasks), state=MappedState(path, f),
            n_samples=n, train_loss=loss, affinity=aff, affinity_steps=int(meta.affinity_steps),
            device_s=float(meta.device_s), energy=energy, stopped_by=meta.stopped_by or None,
            peak_memory_bytes=int(meta.peak_memory_bytes) or None,
        )

    # -- status -----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cv:
            return {
                "server_id": self.server_id,
                "devices": [d.to_status(now, self.policy.heartbeat_timeout_s) for d in
                            (self._devices[c] for c in sorted(self._devices))],
                "counters": dict(self.counters),
                "round": {k: v for k, v in self.round_info.items() if not k.startswith("_")},
            }

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
