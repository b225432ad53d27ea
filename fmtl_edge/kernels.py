"""Native-kernel status and backend selection helpers (for ``fmtl-edge info`` and tests).

``fmtl_edge._kernels`` is the compiled module (CMake + pybind11, built by ``pip install .``).  It always
has the CPU kernels; the CUDA aggregation kernel is compiled in when a CUDA toolkit was found at
build time (``cuda_compiled``) and is usable when a CUDA device is also present (``cuda_available``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["info", "native", "cuda_available"]


def native() -> Any | None:
    """The compiled module, or None when the package was never built."""
    try:
        from fmtl_edge import _kernels
    except ImportError:
        return None
    return _kernels


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
        return {"native": False}
    return {
        "native": True,
        "version": getattr(k, "__version__", "unknown"),
        "cuda_compiled": bool(k.cuda_compiled),
        "cuda_available": bool(k.cuda_available()),
        "cuda_devices": int(k.cuda_device_count()),
        "cuda_version": str(k.cuda_version()),
        "cpu_threads": int(k.default_threads()),
        "max_tasks": int(k.max_tasks),
        "scratch_bytes": int(k.scratch_bytes()),
    }
