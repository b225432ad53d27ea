"""Native-kernel status and backend selection helpers (for ``fmtl-edge info`` and tests).

``fmtl_edge._kernels`` is the compiled module (CMake + pybind11, built by ``pip install .``).  It always
has the CPU kernels; the CUDA aggregation kernel is compiled in when a CUDA toolkit was found at
build time (``cuda_compiled``) and is usable when a CUDA device is also present (``cuda_available``).

When the module cannot be imported (a source tree that was never built, a wheel without it) every
kernel falls back to its NumPy/Python reference — the same results, far slower (the split search at
n = 16, x = 4: seconds instead of milliseconds). That is never silent: the first kernel call warns once
(:func:`warn_fallback`, a ``RuntimeWarning`` naming the fix), and ``fmtl-edge info`` and
``results.json`` (``versions.kernels``) record :func:`mode`: ``native`` or ``python-reference``.
``FMTL_REQUIRE_NATIVE=1`` turns the missing module into an ImportError instead.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

__all__ = ["FIX", "info", "native", "cuda_available", "import_error", "mode", "warn_fallback"]

#: How to get the compiled module (printed by the fallback warning and ``fmtl-edge info``).
FIX = ("build the native kernels: `pip install .` (for development: `pip install --no-build-isolation -e .`, "
       "which also copies the module into the source tree)")

_warned = False


def native() -> Any | None:
    """The compiled module, or None when it cannot be imported (no warning; see :func:`warn_fallback`).

    Raises:
        ImportError: the module is missing and ``FMTL_REQUIRE_NATIVE`` is set.
    """
    try:
        from fmtl_edge import _kernels
    except ImportError:
        if os.environ.get("FMTL_REQUIRE_NATIVE"):
            raise
        return None
    return _kernels


def import_error() -> str | None:
    """Why ``fmtl_edge._kernels`` does not import (``"ModuleNotFoundError: ..."``), None when it does."""
    try:
        from fmtl_edge import _kernels  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def mode() -> str:
    """``"native"`` when the compiled kernels are used, ``"python-reference"`` when the slow
    NumPy/Python references stand in for them."""
    return "native" if native() is not None else "python-reference"


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the fmtl_edge package (the user's call)."""
    import sys

    pkg = os.path.dirname(os.path.abspath(__file__))
    level, f = 1, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        level += 1
        f = f.f_back
    return level


def warn_fallback(what: str = "the kernels") -> None:
    """Warn (once per process, ``RuntimeWarning``, attributed to the first caller outside fmtl_edge)
    that ``what`` runs on the Python reference because the compiled module is missing, naming the
    fix. Callers call it only on that path."""
    global _warned
    if _warned:
        return
    _warned = True
    stacklevel = _caller_stacklevel()
    warnings.warn(f"fmtl_edge._kernels is not available ({import_error()}); {what} and every other native "
                  f"kernel run on the slow Python reference. Fix: {FIX}.", RuntimeWarning, stacklevel=stacklevel)


def cuda_available() -> bool:
    """True when the CUDA kernel was compiled in and a CUDA device is usable."""
    k = native()
    return bool(k is not None and k.cuda_compiled and k.cuda_available())


def info() -> dict[str, Any]:
    """Build/runtime facts about the kernels, every value JSON-serialisable.

    Keys: ``native`` (bool), ``version``, ``cuda_compiled`` (CUDA kernel built), ``cuda_available``
    (built and a device usable), ``cuda_devices`` (count), ``cuda_version`` (runtime/driver versions),
    ``cpu_threads`` (worker threads the CPU kernels use; ``FMTL_NUM_THREADS`` overrides),
    ``max_tasks`` (largest n of the subset searches), ``scratch_bytes`` (rollback scratch held).
    """
    k = native()
    if k is None:
        return {"native": False, "mode": "python-reference", "error": import_error(), "fix": FIX}
    return {
        "native": True,
        "mode": "native",
        "version": getattr(k, "__version__", "unknown"),
        "cuda_compiled": bool(k.cuda_compiled),
        "cuda_available": bool(k.cuda_available()),
        "cuda_devices": int(k.cuda_device_count()),
        "cuda_version": str(k.cuda_version()),
        "cpu_threads": int(k.default_threads()),
        "max_tasks": int(k.max_tasks),
        "scratch_bytes": int(k.scratch_bytes()),
    }
