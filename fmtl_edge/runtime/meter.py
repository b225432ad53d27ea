"""The meter API shared by every backend: windows (nestable), a sampler thread, trapezoid integration.

A backend only has to say which domains it has (:class:`DomainSpec`) and return, on demand, the
*cumulative* joules of each domain since the meter started (:meth:`Meter._read`). Counter backends
(NVML energy counter, RAPL) read hardware counters; sampled backends (Jetson INA3221, NVML power on
pre-Volta GPUs) integrate power samples with a :class:`TrapezoidIntegrator` fed by a
:class:`Sampler` thread *and* by one extra sample taken at every window edge, so a window's energy
is exact at its edges and not off by up to one sampling period.

The sampler only runs while at least one window is open.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .measurement import DomainEnergy, Measurement


class MeterUnavailable(RuntimeError):
    """A backend cannot measure on this machine; ``reason`` says why (shown by ``fmtl-edge info``)."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} meter unavailable: {reason}")
        self.backend = backend
        self.reason = reason


@dataclass(frozen=True)
class DomainSpec:
    domain: str
    method: str  # counter | integrated | estimated
    source: str
    scope: str
    in_total: bool


@dataclass
class _Window:
    name: str
    t0: float
    e0: dict[str, float]
    event_seq0: int
    samples0: int


class Window:
    """Handle of an open window (what ``with meter.window(name) as win`` gives)."""

    def __init__(self, meter: "Meter", name: str) -> None:
        self._meter = meter
        self.name = name
        self.measurement: Measurement | None = None

    def peek(self) -> Measurement:
        """Time and energy so far, without closing the window (for per-round energy budgets)."""
        if self.measurement is not None:
            return self.measurement
        return self._meter.peek_window(self.name)

    @property
    def closed(self) -> bool:
        return self.measurement is not None


class Meter:
    """Base class of every backend. Use :func:`fmtl_edge.runtime.make_meter` to get one."""

    backend = "base"
    total_scope = "none"
    estimated = False

    def __init__(self, *, sync_cuda: bool = True) -> None:
        self.sync_cuda = sync_cuda
        self._lock = threading.RLock()
        self._open: dict[str, _Window] = {}
        self._static_warnings: list[str] = []
        self._events: dict[str, list[int]] = {}  # message -> [last_seq, count]
        self._event_seq = 0
        self._events_lock = threading.Lock()  # separate from _lock: the sampler thread records events
        self._power_mode_cache: tuple[float, str | None] | None = None  # (monotonic time, value)
        self._closed = False

    # -- backend hooks ---------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self.backend

    @property
    def sample_hz(self) -> float | None:
        """Configured sampling rate of an integrating backend, None for counters / estimates."""
        return None

    def domain_specs(self) -> list[DomainSpec]:
        return []

    def _read(self) -> dict[str, float]:
        """Cumulative joules per domain since the meter started (called with the lock held)."""
        return {}

    def _read_power_mode(self) -> str | None:
        return None

    def _start_sampling(self) -> None:
        """Called when the first window opens."""

    def _stop_sampling(self) -> None:
        """Called when the last window closes."""

    def _samples_taken(self) -> int:
        return 0

    def probe(self) -> None:
        """One real read; raises :class:`MeterUnavailable` if the backend cannot measure."""
        self._read()

    # -- shared machinery ------------------------------------------------------------------------
    power_mode_ttl_s = 5.0

    @property
    def power_mode(self) -> str | None:
        """The device's power mode (nvpmodel, GPU power limit, CPU governor), re-read at most every
        :attr:`power_mode_ttl_s` seconds so that a mode change shows up in later windows."""
        now = time.monotonic()
        cached = self._power_mode_cache
        if cached is not None and now - cached[0] < self.power_mode_ttl_s:
            return cached[1]
        try:
            value = self._read_power_mode()
        except Exception:  # a power mode is informative; never fail a measurement for it
            value = None
        self._power_mode_cache = (now, value)
        return value

    def refresh_power_mode(self) -> None:
        """Forget the cached power mode (call after switching modes, so the next window reads it)."""
        self._power_mode_cache = None

    @property
    def warnings(self) -> list[str]:
        """Warnings that hold for every window of this meter (skipped rails, fallbacks...)."""
        return list(self._static_warnings)

    def add_warning(self, message: str) -> None:
        if message not in self._static_warnings:
            self._static_warnings.append(message)

    def _event(self, message: str) -> None:
        """Record a transient problem (a failed read); windows open at that time report it."""
        with self._events_lock:
            self._event_seq += 1
            ev = self._events.get(message)
            if ev is None:
                self._events[message] = [self._event_seq, 1]
            else:
                ev[0] = self._event_seq
                ev[1] += 1

    def _sync_device(self) -> None:
        """``torch.cuda.synchronize`` on every initialised device, so queued kernels are counted."""
        if not self.sync_cuda:
            return
        torch = sys.modules.get("torch")
        if torch is None:
            return
        try:
            if torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    torch.cuda.synchronize(i)
        except Exception as exc:  # pragma: no cover - depends on a CUDA build
            self._event(f"torch.cuda.synchronize failed at a window edge: {exc}")

    def begin_window(self, name: str) -> None:
        """Open a window called ``name`` (names of open windows must be distinct; windows nest)."""
        if self._closed:
            raise RuntimeError("meter is closed")
        self._sync_device()
        with self._lock:
            if name in self._open:
                raise ValueError(f"window {name!r} is already open")
            first = not self._open
            if first:
                self._start_sampling()
            t0 = time.perf_counter()
            try:
                e0 = self._read()
            except Exception:
                if first:
                    self._stop_sampling()
                raise
            self._open[name] = _Window(name, t0, e0, self._event_seq, self._samples_taken())

    def end_window(self, name: str) -> Measurement:
        """Close the window ``name`` and return its :class:`Measurement`."""
        self._sync_device()
        with self._lock:
            if name not in self._open:
                raise KeyError(f"no open window {name!r} (open: {sorted(self._open)})")
            try:
                m = self._measure(self._open[name])
            finally:
                del self._open[name]
                if not self._open:
                    self._stop_sampling()
            return m

    def peek_window(self, name: str) -> Measurement:
        """Measurement of an open window so far (the window stays open)."""
        self._sync_device()
        with self._lock:
            if name not in self._open:
                raise KeyError(f"no open window {name!r}")
            return self._measure(self._open[name])

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[Window]:
        """``with meter.window("client-3/round-2") as win: ...``; then ``win.measurement``.

        The window is closed (and measured) even when the body raises.
        """
        self.begin_window(name)
        win = Window(self, name)
        try:
            yield win
        finally:
            win.measurement = self.end_window(name)

    @property
    def open_windows(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def _measure(self, w: _Window) -> Measurement:
        e1 = self._read()
        wall = time.perf_counter() - w.t0
        warnings = list(self._static_warnings)
        domains: list[DomainEnergy] = []
        total: float | None = 0.0
        any_total = False
        for spec in self.domain_specs():
            a, b = w.e0.get(spec.domain), e1.get(spec.domain)
            if a is None or b is None:
                warnings.append(f"domain {spec.domain}: no reading at a window edge; left out")
                if spec.in_total:
                    total = None
                continue
            j = b - a
            if j < 0:
                warnings.append(f"domain {spec.domain}: counter went backwards ({j:.3f} J); left out")
                if spec.in_total:
                    total = None
                continue
            domains.append(DomainEnergy(spec.domain, j, spec.method, spec.source, spec.scope, spec.in_total))
            if spec.in_total:
                any_total = True
                if total is not None:
                    total += j
        if not any_total:
            total = None
        hz = self.sample_hz
        if hz:
            n = self._samples_taken() - w.samples0
            if wall < 2.0 / hz:
                warnings.append(
                    f"window ({wall * 1e3:.1f} ms) shorter than two sampling periods at {hz:g} Hz: "
                    "energy interpolated between the edge samples only"
                )
            elif wall > 1.0 and n < 0.5 * hz * wall:
                warnings.append(f"sampler fell behind: {n} samples in {wall:.2f} s at a target of {hz:g} Hz")
        with self._events_lock:
            events = [(msg, seq, count) for msg, (seq, count) in self._events.items()]
        for msg, seq, count in events:
            if seq > w.event_seq0:
                warnings.append(msg if count == 1 else f"{msg} ({count} times since the meter started)")
        return Measurement(
            wall_s=wall,
            total_j=total,
            total_scope=self.total_scope,
            estimated=self.estimated,
            source=self.source,
            domains=domains,
            sample_hz=hz,
            power_mode=self.power_mode,
            warnings=warnings,
        )

    def close(self) -> None:
        """Stop the sampler and release the backend (open windows are discarded)."""
        with self._lock:
            if self._open:
                self._open.clear()
                self._stop_sampling()
            self._closed = True

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What ``fmtl-edge info`` prints about this meter."""
        return {
            "backend": self.backend,
            "source": self.source,
            "total_scope": self.total_scope,
            "estimated": self.estimated,
            "sample_hz": self.sample_hz,
            "power_mode": self.power_mode,
            "domains": [
                {"domain": s.domain, "method": s.method, "scope": s.scope, "source": s.source, "in_total": s.in_total}
                for s in self.domain_specs()
            ],
            "warnings": self.warnings,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} source={self.source!r}>"


class NullMeter(Meter):
    """Time only: ``total_j`` is None (never 0) and there are no domains."""

    backend = "null"
    total_scope = "none"

    def __init__(self, *, sync_cuda: bool = True) -> None:
        super().__init__(sync_cuda=sync_cuda)

    @property
    def source(self) -> str:
        return "null:time-only"


# ---- sampling machinery -------------------------------------------------------------------------


class TrapezoidIntegrator:
    """Integrates power samples (W) of several domains into joules with the trapezoid rule.

    ``read_powers()`` returns ``{domain: watts or None}``; ``None`` (a failed read) skips that domain
    for this sample, so the next good sample bridges the gap with one longer trapezoid. ``clock`` is
    injectable (tests drive it by hand). Thread-safe: the sampler thread and the window edges call
    :meth:`sample` concurrently.
    """

    def __init__(
        self,
        read_powers: Callable[[], dict[str, float | None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_powers = read_powers
        self._clock = clock
        self._lock = threading.Lock()
        self._energy: dict[str, float] = {}
        self._last: dict[str, tuple[float, float]] = {}
        self.samples = 0
        self.failures: dict[str, int] = {}

    def sample(self) -> dict[str, float | None]:
        with self._lock:
            t = self._clock()
            powers = self._read_powers()
            for d, p in powers.items():
                if p is None:
                    self.failures[d] = self.failures.get(d, 0) + 1
                    continue
                prev = self._last.get(d)
                if prev is not None:
                    tp, pp = prev
                    self._energy[d] = self._energy.get(d, 0.0) + 0.5 * (p + pp) * (t - tp)
                else:
                    self._energy.setdefault(d, 0.0)
                self._last[d] = (t, p)
            self.samples += 1
            return powers

    def energy(self) -> dict[str, float]:
        """Cumulative joules per domain (only domains with at least one good sample)."""
        with self._lock:
            return dict(self._energy)

    def reset_edges(self) -> None:
        """Forget the last samples (after a pause, so no trapezoid spans the idle gap)."""
        with self._lock:
            self._last.clear()


class Sampler:
    """A daemon thread calling ``fn`` at ``hz`` on an absolute schedule (no drift).

    ``cpu_s`` is the CPU time the thread itself has used (``time.thread_time``), for the overhead
    benchmark. If ``fn`` falls behind by more than a period the schedule skips ahead instead of
    bursting.
    """

    def __init__(self, fn: Callable[[], object], hz: float, name: str = "fmtl-edge-sampler") -> None:
        if hz <= 0:
            raise ValueError("sampler rate must be > 0 Hz")
        self.fn = fn
        self.hz = float(hz)
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_s = 0.0
        self.ticks = 0
        self.errors = 0
        self.last_error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        if t is not threading.current_thread():
            t.join(timeout=5.0)
        self._thread = None

    def _loop(self) -> None:
        c0 = time.thread_time()
        period = 1.0 / self.hz
        next_t = time.monotonic() + period
        try:
            # Event.wait (not time.sleep): stop() takes effect at once, so closing a window never
            # waits for the rest of a sampling period.
            while not self._stop.wait(max(0.0, next_t - time.monotonic())):
                try:
                    self.fn()
                except Exception as exc:  # keep sampling; the backend records the failure
                    self.errors += 1
                    self.last_error = exc
                self.ticks += 1
                next_t += period
                now = time.monotonic()
                if next_t < now - period:
                    next_t = now + period
        finally:
            self.cpu_s += time.thread_time() - c0


class SampledMeter(Meter):
    """Base of integrating backends: a :class:`TrapezoidIntegrator` fed by a :class:`Sampler`."""

    def __init__(
        self,
        *,
        sample_hz: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        sync_cuda: bool = True,
    ) -> None:
        super().__init__(sync_cuda=sync_cuda)
        if sample_hz <= 0:
            raise ValueError("sample_hz must be > 0")
        self._hz = float(sample_hz)
        self.integrator = TrapezoidIntegrator(self._read_powers, clock=clock)
        self.sampler = Sampler(self.integrator.sample, self._hz, name=f"fmtl-edge-{self.backend}-sampler")

    @property
    def sample_hz(self) -> float | None:
        return self._hz

    def _read_powers(self) -> dict[str, float | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self) -> dict[str, float]:
        self.integrator.sample()  # an edge sample: windows are exact at their edges
        return self.integrator.energy()

    def _start_sampling(self) -> None:
        self.integrator.reset_edges()
        self.sampler.start()

    def _stop_sampling(self) -> None:
        self.sampler.stop()

    def _samples_taken(self) -> int:
        return self.integrator.samples
