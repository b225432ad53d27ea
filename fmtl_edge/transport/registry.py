"""Registry and liveness of the remote pool: devices, sessions, heartbeats, long polls, and a token's
binding to the client it serves."""

from __future__ import annotations

import logging
import secrets
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

from fmtl_edge.transport.validation import samples_bound
from fmtl_edge.transport.work import WorkBook, WorkItem

if TYPE_CHECKING:
    from fmtl_edge.transport.scheduler import RoundPolicy
    from fmtl_edge.transport.status import PoolCounters

log = logging.getLogger("fmtl_edge.transport.pool")


class PoolClosed(RuntimeError):
    """The pool was closed (server stopping) while a round was running."""


class RegistrationRefused(Exception):
    """A device may not join (``code`` is the gRPC status name to answer with)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code



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



class Registry:
    """The known devices and their sessions.

    Args:
        cv: the pool's condition (guards devices, work items and slots; notified on every change).
        policy: the pool's :class:`~fmtl_edge.transport.scheduler.RoundPolicy` (``heartbeat_timeout_s``).
        work: the pool's :class:`~fmtl_edge.transport.work.WorkBook` (a lost session fails its items).
        counters: the pool's :class:`~fmtl_edge.transport.status.PoolCounters` (refused registrations).
        validate_registration: ``(Device) -> None`` raising :class:`RegistrationRefused` (the server
            checks the data partition and task definitions against its job).
        on_device_change: ``(Device) -> None`` after a registration or a finished execution (persistence).
        max_samples_ratio: a registration announcing more test samples than this × the low median of
            the other devices' is refused, and one announcing more training samples is warned that its
            FedAvg weight is capped there (None or 0: no bound;
            :func:`~fmtl_edge.transport.validation.samples_bound`).
    """

    def __init__(self, cv: threading.Condition, policy: "RoundPolicy", work: WorkBook, counters: "PoolCounters",
                 validate_registration: Callable[[Device], None] | None = None,
                 on_device_change: Callable[[Device], None] | None = None,
                 max_samples_ratio: float | None = None):
        self._cv = cv
        self.policy = policy
        self.work = work
        self.counters = counters
        self.validate_registration = validate_registration
        self.on_device_change = on_device_change
        self.max_samples_ratio = max_samples_ratio
        self._devices: dict[int, Device] = {}
        self._sessions: dict[str, int] = {}
        self.closed = False
        self.closing_reason = ""
        self.job_complete = False

    # -- the devices --------------------------------------------------------------------------------
    def load(self, devices: Sequence[Device]) -> None:
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
        """Known clients (online or not) whose data holds at least one task of ``tasks``: the population
        the coordinator samples from, the same as the simulation's when every client has joined."""
        with self._cv:
            return sorted(c for c, d in self._devices.items() if any(d.tasks.get(t, 0) > 0 for t in tasks))

    def devices(self) -> list[Device]:
        with self._cv:
            return [self._devices[c] for c in sorted(self._devices)]

    def device_status(self) -> list[dict[str, Any]]:
        """Every device's :meth:`Device.to_status`, by client id."""
        now = time.monotonic()
        with self._cv:
            return [self._devices[c].to_status(now, self.policy.heartbeat_timeout_s) for c in sorted(self._devices)]

    def median_samples(self, exclude: int | None = None) -> tuple[int | None, int | None]:
        """The low medians of the training- and test-sample counts registered by the known devices
        (counts > 0; ``exclude``: leave that client out); None where no device registered one. The
        low median is one device's own count, so with two devices it is the smaller one. *(lock
        held or not)*"""
        with self._cv:
            devs = [d for c, d in self._devices.items() if c != exclude]
            train = [d.n_train for d in devs if d.n_train > 0]
            test = [d.n_test for d in devs if d.n_test > 0]
        return (statistics.median_low(train) if train else None, statistics.median_low(test) if test else None)

    def get(self, client_id: int) -> Device | None:
        """*(lock held)*"""
        return self._devices.get(client_id)

    def candidates(self, now: float, exclude: set[int], tasks: Sequence[str]) -> list[int]:
        """Online idle devices not in ``exclude`` that hold every task of ``tasks``, sorted. *(lock held)*"""
        return sorted(c for c, d in self._devices.items()
                      if c not in exclude and self.ready(d, now) and all(d.tasks.get(t, 0) > 0 for t in tasks))

    def online_count(self) -> int:
        now = time.monotonic()
        with self._cv:
            return sum(d.online(now, self.policy.heartbeat_timeout_s) for d in self._devices.values())

    def ready(self, d: Device, now: float) -> bool:
        """Online and without work. *(lock held)*"""
        return d.online(now, self.policy.heartbeat_timeout_s) and d.idle()

    def wait_for_devices(self, n: int, timeout_s: float | None, stop: threading.Event | None = None,
                         clients: Sequence[int] | None = None) -> bool:
        """Block until ``n`` devices are online (or every one of ``clients``); False on timeout."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while True:
                now = time.monotonic()
                self.reap(now)
                on = [c for c, d in self._devices.items() if d.online(now, self.policy.heartbeat_timeout_s)]
                if clients is not None:
                    if set(clients) <= set(on):
                        return True
                elif len(on) >= n:
                    return True
                if (end is not None and now >= end) or (stop is not None and stop.is_set()) or self.closed:
                    return False
                self._cv.wait(0.2 if end is None else max(0.01, min(0.2, end - now)))

    # -- registration ---------------------------------------------------------------------------------
    def register(self, name: str, client_id: int, tasks: Mapping[str, int], n_train: int, n_test: int,
                 data: Mapping[str, Any], info: Mapping[str, Any], allowed_clients: Collection[int] | None = None,
                 resume_session_id: str | None = None) -> Device:
        """A device joins (or comes back); returns its record with a fresh session id.

        Args:
            allowed_clients: the client ids the caller's token may serve (None: any one client).
            resume_session_id: the session the caller held before (an agent reconnecting).

        Raises:
            RegistrationRefused: the token may not serve this client (``PERMISSION_DENIED``: another
                client of the same token is online, the client is bound to another device, or the
                token's ``clients=`` list lacks it); the client is connected already
                (``ALREADY_EXISTS``: a second agent with the same token and client); the training
                sample count differs from the registered one; ``validate_registration`` refuses; or
                the pool is closed (``UNAVAILABLE``, not counted as a refusal).
        """
        if self.closed:  # the job is over or the server stops: not a refusal of this device
            raise RegistrationRefused("UNAVAILABLE", self.closing_reason or "the server is stopping")
        try:
            return self._register(name, client_id, tasks, n_train, n_test, data, info, allowed_clients,
                                  resume_session_id)
        except RegistrationRefused as e:
            self.counters.add("registrations_refused")
            self.counters.count_refusal(name, "Register", str(e))
            raise

    def _register(self, name, client_id, tasks, n_train, n_test, data, info, allowed_clients, resume_session_id):
        cand = Device(int(client_id), name, {str(k): int(v) for k, v in tasks.items()}, int(n_train), int(n_test),
                      dict(data), dict(info))
        bad = {t: v for t, v in cand.tasks.items() if v < 0}
        if bad or cand.n_test < 0:
            raise RegistrationRefused("INVALID_ARGUMENT", f"negative sample counts: train {bad or cand.tasks}, test "
                                      f"{cand.n_test}")
        train_median, test_median = self.median_samples(exclude=cand.client_id)
        test_cap = samples_bound(test_median, self.max_samples_ratio)
        if test_cap is not None and cand.n_test > test_cap:
            raise RegistrationRefused(
                "FAILED_PRECONDITION",
                f"test_samples {cand.n_test} is more than {test_cap} = max_samples_ratio {self.max_samples_ratio:g} x "
                f"the median test-sample count of the job's other devices ({test_median}); join with the job's "
                "partition (the same --data as the other devices)")
        if self.validate_registration is not None:
            self.validate_registration(cand)
        now = time.monotonic()
        with self._cv:
            self.reap(now)
            old = self._devices.get(cand.client_id)
            timeout = self.policy.heartbeat_timeout_s
            if allowed_clients is not None and cand.client_id not in allowed_clients:
                raise RegistrationRefused(
                    "PERMISSION_DENIED",
                    f"the token of device {name!r} may serve clients {sorted(allowed_clients)}, not client "
                    f"{client_id} (the clients= field of its line in the tokens file)")
            for other in self._devices.values():
                if other.name == name and other.client_id != cand.client_id and other.online(now, timeout):
                    raise RegistrationRefused(
                        "PERMISSION_DENIED",
                        f"device {name!r} already serves client {other.client_id}; a token serves one client at a "
                        "time (give each agent its own token: fmtl-server token add NAME)")
            if old is not None and old.name != name:
                if old.online(now, timeout):
                    raise RegistrationRefused(
                        "ALREADY_EXISTS",
                        f"client {client_id} is held by device {old.name!r}, which is online; each client of the "
                        "partition may join once (check --data client=...)",
                    )
                if allowed_clients is None or cand.client_id not in allowed_clients:
                    raise RegistrationRefused(
                        "PERMISSION_DENIED",
                        f"client {client_id} belongs to device {old.name!r} (offline); another token may not take it "
                        f"over. To move it, list it in the new token's line of the tokens file (clients={client_id})")
            if old is not None and old.n_train and (cand.n_train != old.n_train or cand.tasks != old.tasks):
                # the aggregation weight comes from this count: it is held fixed for the job
                log.warning("refused Register of %s for client %d: train_samples %s, registered %s", name, client_id,
                            cand.tasks, old.tasks)
                raise RegistrationRefused(
                    "FAILED_PRECONDITION",
                    f"client {client_id} was registered with train_samples {old.tasks}; this registration announces "
                    f"{cand.tasks}. The count is held fixed for the job: join with the partition you joined with "
                    "(same --data), or start a new job (new --state-dir)")
            if (old is not None and old.name == name and old.online(now, timeout)
                    and (resume_session_id is None or resume_session_id != old.session_id)):
                host = old.info.get("hostname") or "?"
                raise RegistrationRefused(
                    "ALREADY_EXISTS",
                    f"client {client_id} is already connected from device {name!r} (host {host}, pid "
                    f"{old.info.get('pid') or '?'}); a second agent with the same token and client is refused. If "
                    f"that agent died, this one is accepted once its heartbeat times out ({timeout:g} s)")
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
        weight_cap = samples_bound(train_median, self.max_samples_ratio)
        if weight_cap is not None and cand.n_train > weight_cap:
            log.warning("device %s (client %d) announces %d training samples, more than max_samples_ratio %g x the "
                        "median of the other devices (%d): its FedAvg weight is capped at %d samples", name, client_id,
                        cand.n_train, self.max_samples_ratio, train_median, weight_cap)
        self.changed(cand)
        return cand

    def changed(self, d: Device) -> None:
        """Persist ``d`` (``on_device_change``); a failure is logged, never raised. *(lock not held)*"""
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
            self.work.fail(item, reason)
        d.current = None
        d.queue.clear()

    # -- sessions ---------------------------------------------------------------------------------------
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
                item = self.work.get(work_id)
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
                        self.work.fail(d.current, "the device asked for new work without returning this one")
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
            item = self.work.get(work_id)
            if item is None or item is not d.current or item.status != "running":
                return None
            return item

    def report_failure(self, session_id: str, name: str, work_id: str, kind: str, reason: str) -> bool:
        with self._cv:
            d = self.session(session_id, name)
            item = self.work.get(work_id)
            if d is None or item is None or item.client_id != d.client_id:
                return False
            d.failures += 1
            log.warning("client %d could not run %s (%s): %s", d.client_id, work_id, kind, reason)
            self.work.fail(item, f"{kind}: {reason}")
            if d.current is item:
                d.current = None
                d.state = "idle"
            self._cv.notify_all()
            return True

    # -- the scheduler's and the uploads' side (lock held) -----------------------------------------------
    def enqueue(self, d: Device, item: WorkItem) -> None:
        """Queue ``item`` for ``d`` (its next pull takes it). *(lock held)*"""
        d.queue.append(item)
        d.state = "assigned"

    def unqueue(self, item: WorkItem) -> None:
        """Take a cancelled ``item`` out of its device's queue. *(lock held)*"""
        d = self._devices.get(item.client_id)
        if d is not None and item in d.queue:
            d.queue.remove(item)

    def release(self, item: WorkItem) -> Device | None:
        """``item``'s device (None: unknown), idle again if ``item`` was what it ran. *(lock held)*"""
        d = self._devices.get(item.client_id)
        if d is not None and d.current is item:
            d.current = None
            d.state = "idle"
        return d

    def reap(self, now: float) -> None:
        """Devices silent past the heartbeat timeout go offline; their work fails. *(lock held)*"""
        for d in self._devices.values():
            if d.session_id is not None and not d.online(now, self.policy.heartbeat_timeout_s):
                log.warning("client %d (%s) went silent: offline", d.client_id, d.name)
                self._drop_session(d, "the device went silent (no heartbeat)")

    def close(self, reason: str = "the server is stopping", job_complete: bool = False) -> None:
        """The pool is closing: long polls and waits return, registrations are refused
        (``UNAVAILABLE``); ``reason`` and ``job_complete`` are what the devices are told."""
        with self._cv:
            if not self.closed:  # the first reason stands (a completed job, then the server's shutdown)
                self.closed = True
                self.closing_reason = reason
                self.job_complete = job_complete
            self._cv.notify_all()
