"""Jetson power modes (nvpmodel): read them, query the current one, switch only when allowed, restore.

A Jetson's power modes are defined in ``/etc/nvpmodel.conf``::

    < POWER_MODEL ID=0 NAME=MAXN >
    CPU_ONLINE CORE_0 1
    GPU MAX_FREQ -1
    ...
    < POWER_MODEL ID=1 NAME=MODE_15W >
    ...
    < PM_CONFIG DEFAULT=2 >

Each ``POWER_MODEL`` block is followed by ``PARAM ARG VALUE`` lines (CPU cores online, clock caps in
kHz/Hz, ``-1`` = uncapped, TPC power-gating masks); ``PM_CONFIG DEFAULT`` names the boot mode. The
file is read through the redirectable sysfs root (:mod:`fmtl_edge.runtime.sysfs`,
``FMTL_EDGE_SYSFS_ROOT``), like the power rails.

The current mode comes from ``nvpmodel -q`` (output ``NV Power Mode: MAXN`` then the id on the next
line) or from ``/var/lib/nvpmodel/status`` (``pmode:0002 ...``). The command is ``nvpmodel`` on the
PATH, or the one named by ``FMTL_EDGE_NVPMODEL`` (a path or a command line: tests point it at a fake
script). On a redirected sysfs root the real ``nvpmodel`` is never run (it would describe the host,
not the fake tree); only ``FMTL_EDGE_NVPMODEL`` is.

Switching (``nvpmodel -m ID``) changes the whole board's clocks, so it happens only through a
:class:`PowerModeControl` made with ``allow=True`` (``fmtl-edge join --allow-power-mode``,
``fmtl-edge profile-modes --allow-power-mode``); otherwise :meth:`PowerModeControl.set` raises
:class:`PowerModeNotAllowed`. :meth:`PowerModeControl.guard` returns a :class:`PowerModeGuard` that
restores the original mode when it is left, also after Ctrl-C (SIGINT) and SIGTERM, with ``atexit``
as a backstop.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from .sysfs import Sysfs

ENV_NVPMODEL = "FMTL_EDGE_NVPMODEL"
CONF_PATH = "/etc/nvpmodel.conf"
STATUS_PATH = "/var/lib/nvpmodel/status"
ALLOW_FLAG = "--allow-power-mode"

_MODEL_RE = re.compile(r"^<\s*POWER_MODEL\s+ID=(-?\d+)\s+NAME=([^\s>]+)\s*>\s*$")
_SECTION_RE = re.compile(r"^<\s*([A-Z_]+)\b(.*)>\s*$")
_DEFAULT_RE = re.compile(r"DEFAULT=(-?\d+)")
_QUERY_NAME_RE = re.compile(r"NV Power Mode:\s*(\S+)")
_STATUS_RE = re.compile(r"pmode:\s*(\d+)")


class PowerModeError(RuntimeError):
    """A power mode cannot be read or set (no nvpmodel, an unknown mode, the command failed)."""


class PowerModeNotAllowed(PowerModeError):
    """Switching the power mode was not allowed (the process was not started with ``--allow-power-mode``)."""


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel power mode.

    Attributes:
        id: the nvpmodel id (``nvpmodel -m ID``).
        name: its name (``MAXN``, ``MODE_15W``, ``25W``...): what energy records carry.
        settings: the block's ``(PARAM, ARG, VALUE)`` lines in file order (clock caps in the units of
            the sysfs file they write: kHz for CPU, Hz for GPU/EMC; ``-1`` = uncapped).
    """

    id: int
    name: str
    settings: tuple[tuple[str, str, str], ...] = ()

    def setting(self, param: str, arg: str) -> str | None:
        """The value of ``PARAM ARG`` in this mode, or None when the block does not set it."""
        for p, a, v in self.settings:
            if p == param and a == arg:
                return v
        return None

    @property
    def cpu_cores_online(self) -> int | None:
        """CPU cores the mode keeps online (``CPU_ONLINE CORE_n 1`` lines), None when unset."""
        cores = [v for p, _a, v in self.settings if p == "CPU_ONLINE"]
        return sum(1 for v in cores if v.strip() == "1") if cores else None

    @property
    def gpu_max_freq_hz(self) -> int | None:
        """The GPU clock cap in Hz; None when uncapped (``-1``) or unset."""
        v = self.setting("GPU", "MAX_FREQ")
        try:
            hz = int(v) if v is not None else -1
        except ValueError:
            return None
        return hz if hz > 0 else None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "cpu_cores_online": self.cpu_cores_online,
                "gpu_max_freq_hz": self.gpu_max_freq_hz}


@dataclass(frozen=True)
class NvpmodelConf:
    """The modes of an ``nvpmodel.conf``, in file order, and its boot default (``PM_CONFIG DEFAULT``)."""

    modes: tuple[PowerMode, ...]
    default_id: int | None = None
    source: str = CONF_PATH

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modes]

    def by_id(self, mode_id: int) -> PowerMode | None:
        return next((m for m in self.modes if m.id == int(mode_id)), None)

    def by_name(self, name: str) -> PowerMode | None:
        return next((m for m in self.modes if m.name == name), None)

    def find(self, mode: str | int | PowerMode) -> PowerMode:
        """The mode named ``mode`` (a name, an id, or a digit string that is not a name).

        Raises:
            PowerModeError: no such mode (lists the known ones).
        """
        if isinstance(mode, PowerMode):
            mode = mode.name
        hit = None
        if isinstance(mode, str):
            hit = self.by_name(mode)
            if hit is None and mode.strip().lstrip("-").isdigit():
                hit = self.by_id(int(mode))
        else:
            hit = self.by_id(int(mode))
        if hit is None:
            known = ", ".join(f"{m.name} (id {m.id})" for m in self.modes)
            raise PowerModeError(f"power mode {mode!r} is not in {self.source}; known: {known}")
        return hit

    @property
    def default(self) -> PowerMode | None:
        return None if self.default_id is None else self.by_id(self.default_id)


def parse_nvpmodel_conf(text: str, source: str = CONF_PATH) -> NvpmodelConf:
    """Parse the text of an ``nvpmodel.conf``.

    ``PARAM`` definition sections are skipped; each ``POWER_MODEL`` block collects its setting
    lines until the next section; ``#`` starts a comment.

    Raises:
        PowerModeError: no ``POWER_MODEL`` section, or two modes with the same id or name.
    """
    modes: list[PowerMode] = []
    default_id: int | None = None
    cur: tuple[int, str] | None = None
    settings: list[tuple[str, str, str]] = []

    def flush() -> None:
        if cur is not None:
            modes.append(PowerMode(cur[0], cur[1], tuple(settings)))

    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("<"):
            flush()
            cur, settings = None, []
            m = _MODEL_RE.match(line)
            if m:
                cur = (int(m.group(1)), m.group(2))
                continue
            s = _SECTION_RE.match(line)
            if s and s.group(1) == "PM_CONFIG":
                d = _DEFAULT_RE.search(s.group(2))
                if d:
                    default_id = int(d.group(1))
            continue
        if cur is not None:
            parts = line.split()
            if len(parts) >= 3:
                settings.append((parts[0], parts[1], " ".join(parts[2:])))
    flush()
    if not modes:
        raise PowerModeError(f"{source}: no '< POWER_MODEL ID=.. NAME=.. >' section")
    for attr in ("id", "name"):
        seen: set = set()
        for m in modes:
            v = getattr(m, attr)
            if v in seen:
                raise PowerModeError(f"{source}: two power modes with {attr} {v!r}")
            seen.add(v)
    return NvpmodelConf(tuple(modes), default_id, source)


def read_nvpmodel_conf(sysfs: Sysfs | None = None) -> NvpmodelConf | None:
    """The device's ``/etc/nvpmodel.conf`` under the sysfs root, or None when there is none.

    Raises:
        PowerModeError: the file exists but has no mode (see :func:`parse_nvpmodel_conf`).
    """
    sysfs = sysfs or Sysfs()
    text = sysfs.try_read_text(CONF_PATH)
    if text is None:
        return None
    return parse_nvpmodel_conf(text, CONF_PATH)


def parse_nvpmodel_query(text: str) -> tuple[str | None, int | None]:
    """``(name, id)`` from the output of ``nvpmodel -q`` (``NV Power Mode: MAXN`` and the id on the
    next line); either is None when the output does not give it."""
    name: str | None = None
    mode_id: int | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _QUERY_NAME_RE.search(line)
        if m:
            name = m.group(1)
            for nxt in lines[i + 1:]:
                nxt = nxt.strip()
                if nxt:
                    if nxt.isdigit():
                        mode_id = int(nxt)
                    break
            break
    return name, mode_id


def nvpmodel_command(sysfs: Sysfs | None = None) -> list[str] | None:
    """The nvpmodel command line: ``$FMTL_EDGE_NVPMODEL`` (split like a shell would), else
    ``nvpmodel`` on the PATH unless the sysfs root is redirected; None when there is none."""
    env = os.environ.get(ENV_NVPMODEL)
    if env:
        return shlex.split(env)
    sysfs = sysfs or Sysfs()
    if sysfs.redirected:
        return None
    exe = shutil.which("nvpmodel")
    return [exe] if exe else None


def _status_mode_id(sysfs: Sysfs) -> int | None:
    status = sysfs.try_read_text(STATUS_PATH)
    m = _STATUS_RE.search(status or "")
    return int(m.group(1)) if m else None


def _run_query(cmd: Sequence[str], timeout_s: float = 10.0) -> tuple[str | None, int | None]:
    try:
        out = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return parse_nvpmodel_query(out)


def query_power_mode(sysfs: Sysfs | None = None, *, prefer: str = "status",
                     command: Sequence[str] | None = None) -> PowerMode | None:
    """The current power mode, named from ``nvpmodel.conf`` when it is there.

    Args:
        prefer: ``status`` reads ``/var/lib/nvpmodel/status`` first (no process started; what the
            meters use every few seconds), ``command`` runs ``nvpmodel -q`` first (authoritative;
            what :class:`PowerModeControl` uses before and after a switch).
        command: the nvpmodel command (default :func:`nvpmodel_command`).

    Returns:
        The mode (``settings`` filled from the conf); a mode known only by id is named
        ``nvpmodel <id>``; None when neither source answers.
    """
    if prefer not in ("status", "command"):
        raise ValueError(f"prefer must be 'status' or 'command', got {prefer!r}")
    sysfs = sysfs or Sysfs()
    cmd = list(command) if command is not None else nvpmodel_command(sysfs)
    try:
        conf = read_nvpmodel_conf(sysfs)
    except PowerModeError:
        conf = None

    def from_status() -> tuple[str | None, int | None]:
        return None, _status_mode_id(sysfs)

    def from_command() -> tuple[str | None, int | None]:
        return _run_query(cmd) if cmd else (None, None)

    order = (from_status, from_command) if prefer == "status" else (from_command, from_status)
    for get in order:
        name, mode_id = get()
        if name is None and mode_id is None:
            continue
        if conf is not None:
            hit = conf.by_id(mode_id) if mode_id is not None else None
            if hit is None and name is not None:
                hit = conf.by_name(name)
            if hit is not None:
                return hit
        if name is not None:
            return PowerMode(-1 if mode_id is None else mode_id, name)
        return PowerMode(int(mode_id), f"nvpmodel {mode_id}")  # type: ignore[arg-type]
    return None


class PowerModeControl:
    """Reads and (when allowed) sets the Jetson power mode through ``nvpmodel``.

    Args:
        allow: whether :meth:`set` may switch modes (``--allow-power-mode``).
        sysfs_root: root of ``/etc/nvpmodel.conf`` and ``/var/lib/nvpmodel/status`` (default
            ``$FMTL_EDGE_SYSFS_ROOT`` or ``/``).
        command: the nvpmodel command line (default :func:`nvpmodel_command`).
        timeout_s: how long one ``nvpmodel -m`` may take before it counts as failed.
        log: ``(str) -> None`` for a line per switch (default: silent).
    """

    def __init__(self, allow: bool = False, *, sysfs_root: str | os.PathLike | None = None,
                 command: Sequence[str] | str | None = None, timeout_s: float = 60.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.allow = bool(allow)
        self.sysfs = Sysfs(sysfs_root)
        if isinstance(command, str):
            command = shlex.split(command)
        self.command = list(command) if command is not None else nvpmodel_command(self.sysfs)
        self.timeout_s = float(timeout_s)
        self._log = log or (lambda _m: None)
        self._conf: NvpmodelConf | None = None
        self._conf_read = False

    @property
    def conf(self) -> NvpmodelConf | None:
        """The parsed ``nvpmodel.conf`` (read once), or None on a machine without one."""
        if not self._conf_read:
            self._conf = read_nvpmodel_conf(self.sysfs)
            self._conf_read = True
        return self._conf

    @property
    def available(self) -> bool:
        """True when the machine has power modes (an ``nvpmodel.conf``) and a command to switch them."""
        try:
            return self.conf is not None and self.command is not None
        except PowerModeError:
            return False

    def modes(self) -> list[PowerMode]:
        """Every mode of ``nvpmodel.conf``, in file order.

        Raises:
            PowerModeError: no ``nvpmodel.conf`` under the sysfs root.
        """
        return list(self._require_conf().modes)

    def _require_conf(self) -> NvpmodelConf:
        conf = self.conf
        if conf is None:
            where = f" under {self.sysfs.root}" if self.sysfs.redirected else ""
            raise PowerModeError(f"no {CONF_PATH}{where}: this device has no nvpmodel power modes")
        return conf

    def resolve(self, mode: str | int | PowerMode) -> PowerMode:
        """The :class:`PowerMode` named by a name or id.

        Raises:
            PowerModeError: no ``nvpmodel.conf``, or no such mode (lists the known ones).
        """
        return self._require_conf().find(mode)

    def current(self) -> PowerMode | None:
        """The current mode (``nvpmodel -q`` first, then the status file), or None when unknown."""
        return query_power_mode(self.sysfs, prefer="command", command=self.command or [])

    def set(self, mode: str | int | PowerMode) -> PowerMode:
        """Switch to ``mode`` (a no-op when it is current) and check that it took.

        Returns:
            The mode now in effect.

        Raises:
            PowerModeNotAllowed: this control was made without ``allow`` (names ``--allow-power-mode``).
            PowerModeError: no nvpmodel, unknown mode, the command failed (non-zero exit, timeout:
                nvpmodel needs root) or the mode did not change (nvpmodel asks for a reboot before
                some mode changes; it is never confirmed from here).
        """
        target = self.resolve(mode)
        if not self.allow:
            raise PowerModeNotAllowed(
                f"switching the power mode to {target.name} is not allowed: start with {ALLOW_FLAG} "
                "(nvpmodel changes the whole board's clocks; it also needs root)")
        return self._switch(target)

    def _switch(self, target: PowerMode) -> PowerMode:
        if not self.command:
            raise PowerModeError(f"no nvpmodel command (not on the PATH; set {ENV_NVPMODEL} to point at it)")
        now = self.current()
        if now is not None and now.id == target.id:
            return now
        cmd = [*self.command, "-m", str(target.id)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PowerModeError(f"`{shlex.join(cmd)}` did not finish within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise PowerModeError(f"cannot run `{shlex.join(cmd)}`: {exc}") from None
        if p.returncode != 0:
            why = (p.stderr or p.stdout or "").strip().splitlines()
            raise PowerModeError(f"`{shlex.join(cmd)}` exited {p.returncode}: {why[-1] if why else 'no output'}"
                                 " (nvpmodel needs root)")
        after = self.current()
        if after is None or after.id != target.id:
            raise PowerModeError(
                f"`{shlex.join(cmd)}` ran but the power mode is {after.name if after else 'unknown'}, "
                f"not {target.name} (nvpmodel may want a reboot for this change; it is never confirmed here)")
        self._log(f"power mode {now.name if now else 'unknown'} -> {after.name}")
        return after

    def guard(self) -> "PowerModeGuard":
        """A context manager that restores the current mode when left (see :class:`PowerModeGuard`)."""
        return PowerModeGuard(self)


_TERMINATING = (signal.SIGINT, signal.SIGTERM)


class PowerModeGuard:
    """Remembers the power mode on entry and puts it back on exit.

    ``with control.guard() as g: g.set("MODE_15W"); ...`` — on leaving the block (normally, by an
    exception, by Ctrl-C's ``KeyboardInterrupt``) the original mode is restored if a switch was
    made. While the guard is held (and it was entered in the main thread) it chains SIGINT and
    SIGTERM: a Python handler that was installed before (e.g. the agent's "stop" handler) is called
    as it was, and the program restores on its way out; where the previous action was the
    default one (terminate), the mode is restored first and the signal is then re-delivered with its
    default action, so the process still dies of it. An ``atexit`` hook restores when the
    interpreter exits with the guard still held. Restoring is idempotent and thread-safe; a restore
    that fails is reported by :attr:`restore_error` (and logged), never raised from a signal handler.

    Raises (on entry):
        PowerModeError: the current mode cannot be read (no way back, so no switch is allowed).
    """

    def __init__(self, control: PowerModeControl) -> None:
        self.control = control
        self.original: PowerMode | None = None
        self.switched = False
        self.restore_error: str | None = None
        self._lock = threading.RLock()
        self._prev: dict[int, object] = {}
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> "PowerModeGuard":
        self.original = self.control.current()
        if self.original is None and self.control.allow:
            raise PowerModeError("the current power mode cannot be read (nvpmodel -q / "
                                 "/var/lib/nvpmodel/status): refusing to switch modes without a way back")
        self._active = True
        atexit.register(self.restore)
        if threading.current_thread() is threading.main_thread():
            for sig in _TERMINATING:
                try:
                    self._prev[sig] = signal.getsignal(sig)
                    signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # pragma: no cover - not the main interpreter
                    self._prev.pop(sig, None)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Restore the mode, put the previous signal handlers back, drop the atexit hook."""
        try:
            self.restore()
        finally:
            for sig, prev in list(self._prev.items()):
                try:
                    if signal.getsignal(sig) == self._on_signal:
                        signal.signal(sig, prev)  # type: ignore[arg-type]
                except (ValueError, OSError, TypeError):  # pragma: no cover
                    pass
            self._prev.clear()
            atexit.unregister(self.restore)
            self._active = False

    def set(self, mode: str | int | PowerMode) -> PowerMode:
        """Switch through the control (:meth:`PowerModeControl.set`) and remember to restore.

        Raises:
            PowerModeNotAllowed, PowerModeError: as :meth:`PowerModeControl.set`; also when the
                guard is not held.
        """
        if not self._active:
            raise PowerModeError("the power-mode guard is not held (use it as a context manager)")
        with self._lock:
            target = self.control.resolve(mode)
            if self.control.allow and self.original is not None and target.id != self.original.id:
                self.switched = True  # before the call: a switch that half-happened is restored too
            return self.control.set(target)

    def restore(self) -> bool:
        """Put the original mode back if a switch was made; True when nothing is left to restore."""
        with self._lock:
            if not self.switched or self.original is None:
                return True
            try:
                self.control._switch(self.original)
            except PowerModeError as exc:
                self.restore_error = str(exc)
                self.control._log(f"could not restore power mode {self.original.name}: {exc}")
                return False
            self.switched = False
            self.restore_error = None
            return True

    def _on_signal(self, signum, frame) -> None:
        prev = self._prev.get(signum, signal.SIG_DFL)
        if prev == signal.SIG_IGN:
            return
        if callable(prev):
            prev(signum, frame)  # may raise (KeyboardInterrupt): leaving the `with` restores
            return
        # the default action terminates the process: restore first, then die of the signal as before
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

