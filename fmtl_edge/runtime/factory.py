"""``make_meter``: pick a backend by name, or ("auto") the best one that passes a real read."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from .meter import Meter, MeterUnavailable, NullMeter

# name -> (module, class); modules are imported lazily so a broken backend never breaks the others
_BACKENDS: dict[str, tuple[str, str]] = {
    "jetson": ("fmtl_edge.runtime.jetson", "JetsonMeter"),
    "nvml": ("fmtl_edge.runtime.nvml", "NvmlMeter"),
    "rapl": ("fmtl_edge.runtime.rapl", "RaplMeter"),
    "estimate": ("fmtl_edge.runtime.estimate", "EstimateMeter"),
    "null": ("fmtl_edge.runtime.meter", "NullMeter"),
}
BACKENDS = tuple(_BACKENDS)
# Board-level input power beats a GPU-only counter, which beats a CPU-package counter.
AUTO_ORDER = ("jetson", "nvml", "rapl")


@dataclass
class ProbeResult:
    backend: str
    ok: bool
    reason: str  # why not, or a one-line description of what works

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "ok": self.ok, "reason": self.reason}


def backend_class(name: str) -> type[Meter]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown meter backend {name!r} (known: auto, {', '.join(_BACKENDS)})")
    mod, cls = _BACKENDS[name]
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as exc:
        raise MeterUnavailable(name, f"backend module cannot be imported: {exc}") from exc


def _accepted(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _known_options() -> set[str]:
    # options every profile passes, known even while a backend module fails to import
    known = {"order", "sample_hz", "sysfs_root", "sync_cuda", "power_w", "idle_w"}
    for name in _BACKENDS:
        try:
            known |= _accepted(backend_class(name))
        except MeterUnavailable:
            pass
    return known


def _build(name: str, options: dict[str, Any]) -> Meter:
    cls = backend_class(name)
    acc = _accepted(cls)
    meter = cls(**{k: v for k, v in options.items() if k in acc})
    try:
        meter.probe()
    except MeterUnavailable:
        meter.close()
        raise
    except Exception as exc:
        meter.close()
        raise MeterUnavailable(name, f"probe read failed: {type(exc).__name__}: {exc}") from exc
    return meter


def make_meter(backend: str = "auto", **options: Any) -> Meter:
    """A working meter.

    ``backend``: ``"auto"`` (try ``jetson``, ``nvml``, ``rapl`` in that order -- each must pass a real
    read -- and fall back to ``estimate``), or one of ``jetson``, ``nvml``, ``rapl``, ``estimate``,
    ``null`` (raises :class:`MeterUnavailable` with the reason when it cannot measure here).

    ``options`` go to the backend(s) that accept them (``sample_hz``, ``sysfs_root``, ``sync_cuda``,
    ``power_w``/``idle_w``/``include_children`` for estimate, ``total_rails`` for jetson,
    ``gpu_indices`` for nvml, ...); options that no backend knows raise TypeError. For ``auto``,
    ``order=("rapl", "nvml")`` changes the probing order. The chosen meter has ``probe_log``: one
    :class:`ProbeResult` per backend tried.
    """
    unknown = set(options) - _known_options()
    if unknown:
        raise TypeError(f"unknown meter options {sorted(unknown)}")
    order = tuple(options.pop("order", AUTO_ORDER))
    if backend != "auto":
        meter = _build(backend, options)
        meter.probe_log = [ProbeResult(backend, True, meter.source)]  # type: ignore[attr-defined]
        return meter
    log: list[ProbeResult] = []
    for name in order:
        try:
            meter = _build(name, options)
        except MeterUnavailable as exc:
            log.append(ProbeResult(name, False, exc.reason))
            continue
        log.append(ProbeResult(name, True, meter.source))
        meter.probe_log = log  # type: ignore[attr-defined]
        return meter
    meter = _build("estimate", options)
    log.append(ProbeResult("estimate", True, meter.source))
    meter.probe_log = log  # type: ignore[attr-defined]
    if order:
        meter.add_warning(
            "auto: no hardware energy meter works here ("
            + ", ".join(r.backend for r in log if not r.ok)
            + " unavailable: see `fmtl-edge info` or meter.probe_log); using the CPU-time estimate"
        )
    return meter


def probe_all(**options: Any) -> list[ProbeResult]:
    """Try every backend once (for ``fmtl-edge info``); never raises."""
    out = []
    for name in _BACKENDS:
        try:
            m = _build(name, dict(options))
        except MeterUnavailable as exc:
            out.append(ProbeResult(name, False, exc.reason))
        except Exception as exc:  # a backend bug must not break `info`
            out.append(ProbeResult(name, False, f"{type(exc).__name__}: {exc}"))
        else:
            out.append(ProbeResult(name, True, m.source))
            m.close()
    return out


__all__ = ["make_meter", "probe_all", "ProbeResult", "BACKENDS", "AUTO_ORDER", "NullMeter"]
