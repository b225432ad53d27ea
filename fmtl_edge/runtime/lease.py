"""One FL task at a time per device: an exclusive lease across processes.

The lease is an ``fcntl.flock`` on ``<runtime_dir>/device-<id>.lock``. The kernel drops a flock
when its file is closed, so the lease is released on normal exit, on an exception and on a crash
(``kill -9``) alike; a stale lock file on disk means nothing. The file is never deleted (deleting
a lock file opens a race in which two processes lock two different inodes). While held it carries
the holder's pid, host, owner label and start time, for the :class:`DeviceBusy` message.

The runtime directory is, in order: the ``runtime_dir`` argument, ``$FMTL_EDGE_RUNTIME_DIR``,
``$XDG_RUNTIME_DIR/fmtl-edge``, ``/tmp/fmtl-edge-<uid>``. Every process that shares a device must
use the same directory. A lease is not re-entrant: a second ``DeviceLease`` on the same device in the
same process is refused too. The lock file descriptor is close-on-exec, so commands started with
exec do not inherit the lease; a ``fork`` child without exec shares it until it exits.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

ENV_RUNTIME_DIR = "FMTL_EDGE_RUNTIME_DIR"

log = logging.getLogger(__name__)


class DeviceBusy(RuntimeError):
    """The device is leased by another FL task (``holder`` describes it when known)."""

    def __init__(self, device_id: str, holder: dict[str, Any] | None, waited_s: float, lock_path: str) -> None:
        self.device_id = device_id
        self.holder = holder or {}
        self.waited_s = waited_s
        self.lock_path = lock_path
        who = ", ".join(f"{k}={v}" for k, v in self.holder.items() if k in ("pid", "host", "owner") and v is not None) or "unknown holder"
        super().__init__(
            f"device {device_id!r} is busy ({who}); waited {waited_s:.2f} s (lock file {lock_path})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": "DeviceBusy",
            "device_id": self.device_id,
            "holder": dict(self.holder),
            "waited_s": self.waited_s,
            "lock_path": self.lock_path,
            "message": str(self),
        }

    def __reduce__(self):
        return (DeviceBusy, (self.device_id, self.holder, self.waited_s, self.lock_path))


def default_runtime_dir() -> Path:
    env = os.environ.get(ENV_RUNTIME_DIR)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "fmtl-edge"
    return Path(f"/tmp/fmtl-edge-{os.getuid()}")


def _safe(device_id: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", device_id).strip("._") or "device"
    return s[:100]


class DeviceLease:
    """Exclusive lease of a device: ``with DeviceLease("jetson-3"): train()``.

    ``timeout_s=0`` refuses at once with :class:`DeviceBusy` when another task holds the device;
    ``timeout_s>0`` waits up to that long (polling every ``poll_s``); ``timeout_s=None`` waits forever.
    A wait longer than ``notify_after_s`` (2 s) is said once, as a logging warning naming the holder's
    pid and owner, or by calling ``on_wait(holder: dict | None, waited_s: float)`` when given.
    """

    def __init__(
        self,
        device_id: str = "local",
        runtime_dir: Path | str | None = None,
        timeout_s: float | None = 0.0,
        *,
        owner: str | None = None,
        poll_s: float = 0.05,
        notify_after_s: float | None = 2.0,
        on_wait=None,
    ) -> None:
        self.device_id = device_id
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        self.timeout_s = timeout_s
        self.owner = owner
        self.poll_s = poll_s
        self.notify_after_s = notify_after_s
        self.on_wait = on_wait
        self.path = self.runtime_dir / f"device-{_safe(device_id)}.lock"
        self._fd: int | None = None
        self.acquired_at: float | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "DeviceLease":
        if self._fd is not None:
            raise RuntimeError(f"lease on {self.device_id!r} already held by this object")
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        t0 = time.monotonic()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        notified = self.notify_after_s is None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                waited = time.monotonic() - t0
                if self.timeout_s is not None and waited >= self.timeout_s:
                    raise DeviceBusy(self.device_id, self._read_holder(), waited, str(self.path))
                if not notified and waited >= self.notify_after_s:
                    notified = True
                    self._notify_wait(waited)
                sleep = self.poll_s
                if self.timeout_s is not None:
                    sleep = min(sleep, max(0.0, self.timeout_s - waited))
                time.sleep(sleep)
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "owner": self.owner,
            "device_id": self.device_id,
            "since_unix": time.time(),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # the holder note is informative only
        self._fd = fd
        self.acquired_at = time.monotonic()
        return self

    def _notify_wait(self, waited: float) -> None:
        holder = self._read_holder()
        if self.on_wait is not None:
            self.on_wait(holder, waited)
            return
        h = holder or {}
        who = f"pid {h.get('pid')}" + (f" ({h['owner']})" if h.get("owner") else "") + (
            f" on {h['host']}" if h.get("host") else "") if h.get("pid") else "another process"
        limit = "forever" if self.timeout_s is None else f"up to {self.timeout_s:g} s"
        log.warning("waiting for device %r: it is leased by %s (lock file %s); waiting %s",
                    self.device_id, who, self.path, limit)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.acquired_at = None

    def __enter__(self) -> "DeviceLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # best effort; the kernel releases the flock at exit anyway
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<DeviceLease {self.device_id!r} held={self.held} path={self.path}>"
