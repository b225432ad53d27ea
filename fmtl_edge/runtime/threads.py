"""The thread policy of client executions: device seconds that measure the work, not idle spinning.

PyTorch's CPU kernels run on an OpenMP thread pool. With OpenMP's default wait policy the pool's
threads spin for a while after every parallel region; on cores shared with anything else (another
job, a camera pipeline, the desktop) they steal those cores and the training step waits for them,
so the same training reports many times the device seconds and CPU-time joules it costs on an idle
device (issue 18: 38× beside two busy processes). fmtl-edge therefore

- sets ``OMP_WAIT_POLICY=PASSIVE`` for its process, unless the user set one, before torch loads
  (:func:`prepare_process`, called when :mod:`fmtl_edge` is imported; OpenMP reads it once, when
  its runtime is loaded with torch);
- runs every client execution with an intra-op thread count chosen per execution
  (:class:`ThreadPolicy`: ``--threads N`` or ``auto``) and one inter-op thread.

``auto`` is a pure function of the model's training FLOPs per batch and the cores this process may
run on (``os.sched_getaffinity``), never of the machine's momentary load, so a given setting is
reproducible: one thread per :data:`FLOPS_PER_THREAD` FLOPs of a batch (forward + backward), at
least 1 and at most the usable cores. Small models (the digits preset: 53 MFLOP per batch; HAR's
MLP: 3 MFLOP) run on one thread, where thread synchronisation costs more than it saves; the UTKFace
preset's model (10 GFLOP per batch) gets every usable core.

Thread counts may change floating-point sums (a reduction split over threads adds in another
order), so runs are bit-reproducible for a given thread setting; ``results.json`` records the
policy (``device.threads``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: training FLOPs of one batch (forward + backward) per intra-op thread under ``--threads auto``.
#: Measured on this project's 2-core x86 machine (``python -m bench.threads --calibrate``, idle):
#: the digits preset's model (53 MFLOP per batch of 32) steps in 9.2 ms on one thread and 11.5 ms
#: on two; the UTKFace preset's (10.2 GFLOP per batch of 64) in 561 ms and 378 ms. A second thread
#: pays from about 0.5-1 GFLOP per batch.
FLOPS_PER_THREAD = 500e6

_PROCESS: dict[str, Any] = {}
_INTEROP_SET: list[bool] = []


def prepare_process() -> dict[str, Any]:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process unless the user tunes OpenMP's waiting
    already (``OMP_WAIT_POLICY`` or GNU OpenMP's ``GOMP_SPINCOUNT`` set: the user's choice wins),
    and record how the policy was obtained. Idempotent.

    Returns:
        ``{"omp_wait_policy": "PASSIVE" | the user's value | "default", "gomp_spincount": the
        user's value or None, "omp_wait_policy_set_by": "fmtl-edge" | "user", "applied": bool}``
        — ``applied`` is False when torch was imported before fmtl-edge, so OpenMP read the
        environment before the policy was set (import fmtl_edge first, or set it yourself).
    """
    if _PROCESS:
        return dict(_PROCESS)
    user = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    if not user:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch_first = "torch" in sys.modules
    _PROCESS.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default").upper(),
                    gomp_spincount=user.get("GOMP_SPINCOUNT"),
                    omp_wait_policy_set_by="user" if user else "fmtl-edge",
                    applied=bool(user) or not torch_first)
    return dict(_PROCESS)


def usable_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that
    is not available), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_threads(flops_per_batch: float | None, cores: int | None = None) -> int:
    """``--threads auto``: ``clamp(floor(flops_per_batch / FLOPS_PER_THREAD), 1, cores)``.

    Args:
        flops_per_batch: training FLOPs of one batch (forward + backward); None (not countable)
            gives every usable core, torch's own default.
        cores: usable cores (default: :func:`usable_cores`).
    """
    cores = usable_cores() if cores is None else max(1, int(cores))
    if flops_per_batch is None:
        return cores
    return int(min(cores, max(1, int(float(flops_per_batch) // FLOPS_PER_THREAD))))


def parse_threads(value: Any) -> int | None:
    """A ``--threads`` value: ``auto`` (None) or a positive int.

    Raises:
        ValueError: anything else (the message names ``--threads`` and the allowed values).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"--threads: expected a positive number of threads or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"--threads: expected a positive number of threads or 'auto', got {value!r}")
    return n


@dataclass(frozen=True)
class ThreadPolicy:
    """How many intra-op threads a client execution uses.

    Attributes:
        threads: a fixed count, or None for ``auto`` (:func:`auto_threads`).
    """

    threads: int | None = None

    @classmethod
    def parse(cls, value: Any) -> "ThreadPolicy":
        """From a ``--threads`` value (``auto`` or N); raises ValueError as :func:`parse_threads`."""
        return cls(parse_threads(value))

    def count(self, flops_per_batch: float | None) -> int:
        """The intra-op thread count for a model of ``flops_per_batch`` training FLOPs per batch."""
        return int(self.threads) if self.threads is not None else auto_threads(flops_per_batch)

    def apply(self, n: int) -> None:
        """Make torch run on ``n`` intra-op threads and one inter-op thread (the inter-op count
        can only be set before torch's first inter-op work; later it stays as it is)."""
        import torch

        if not _INTEROP_SET:
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already started: torch keeps its count
                pass
            _INTEROP_SET.append(True)
        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))

    def describe(self) -> dict[str, Any]:
        """``results.json``'s ``device.threads``: the setting, the usable cores, inter-op threads
        and how the OpenMP wait policy was obtained."""
        import torch

        return {"intra_op": "auto" if self.threads is None else int(self.threads),
                "flops_per_thread": FLOPS_PER_THREAD if self.threads is None else None,
                "usable_cores": usable_cores(), "inter_op": int(torch.get_num_interop_threads()),
                **prepare_process()}
