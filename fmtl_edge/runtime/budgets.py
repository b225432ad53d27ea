"""Device budgets: memory (before and during a job), per-round time and energy.

A violation is a structured :class:`BudgetExceeded` (kind, needed, limit, unit) that the coordinator
can serialise (:meth:`BudgetExceeded.to_dict` / :meth:`BudgetExceeded.from_dict`) and act upon; it is
never a crash of the device agent. Per-round time/energy budgets are not errors: local training asks
:meth:`RoundBudget.exhausted` after each batch, stops when it says ``"time"`` or ``"energy"``, and
reports the samples it actually used.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Any, Sequence

_UNITS = {"memory": "bytes", "time": "s", "energy": "J"}


class BudgetExceeded(RuntimeError):
    """A job needs more than a device budget allows.

    Attributes: ``kind`` ("memory" | "time" | "energy"), ``needed`` and ``limit`` (in ``unit``:
    bytes, s or J), ``message``.
    """

    def __init__(self, kind: str, needed: float, limit: float, message: str | None = None) -> None:
        if kind not in _UNITS:
            raise ValueError(f"kind must be one of {tuple(_UNITS)}, got {kind!r}")
        self.kind = kind
        self.needed = needed
        self.limit = limit
        self.unit = _UNITS[kind]
        if message is None:
            message = f"{kind} budget exceeded: needs {_fmt(needed, self.unit)}, limit {_fmt(limit, self.unit)}"
        self.message = message
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": "BudgetExceeded",
            "kind": self.kind,
            "needed": self.needed,
            "limit": self.limit,
            "unit": self.unit,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BudgetExceeded":
        return cls(d["kind"], d["needed"], d["limit"], d.get("message"))

    def __reduce__(self):  # picklable across multiprocessing boundaries
        return (BudgetExceeded, (self.kind, self.needed, self.limit, self.message))


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB ({int(v)} bytes)"
    return f"{v:.3g} {unit}"


@dataclass(frozen=True)
class RoundBudget:
    """Per-round limits of local training; None = unlimited.

    ``exhausted(elapsed_s, energy_j)`` returns ``"time"`` or ``"energy"`` once a limit is reached
    (``>=``), else None. An unknown energy (``None``, e.g. the ``null`` meter) never exhausts the
    energy budget -- check :attr:`energy_checkable` against the meter to know whether it is enforced.
    """

    time_s: float | None = None
    energy_j: float | None = None

    def __post_init__(self) -> None:
        for name in ("time_s", "energy_j"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number or None, got {v!r}")

    def exhausted(self, elapsed_s: float, energy_j: float | None) -> str | None:
        if self.time_s is not None and elapsed_s >= self.time_s:
            return "time"
        if self.energy_j is not None and energy_j is not None and energy_j >= self.energy_j:
            return "energy"
        return None

    @property
    def unlimited(self) -> bool:
        return self.time_s is None and self.energy_j is None

    def error(self, kind: str, elapsed_s: float, energy_j: float | None) -> BudgetExceeded:
        """A :class:`BudgetExceeded` describing an ``exhausted`` result (for logs / reports)."""
        if kind == "time":
            return BudgetExceeded("time", elapsed_s, self.time_s or 0.0)
        return BudgetExceeded("energy", energy_j if energy_j is not None else float("nan"), self.energy_j or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"time_s": self.time_s, "energy_j": self.energy_j}

    @classmethod
    def from_profile(cls, profile) -> "RoundBudget":
        return cls(time_s=profile.round_time_s, energy_j=profile.round_energy_j)


# ---- memory ------------------------------------------------------------------------------------


def _memory_limit(profile_or_limit) -> int | None:
    if profile_or_limit is None:
        return None
    if isinstance(profile_or_limit, (int, float)):
        return int(profile_or_limit)
    return getattr(profile_or_limit, "memory_budget_bytes", None)


def check_memory(needed_bytes: int, profile_or_limit) -> None:
    """Raise ``BudgetExceeded("memory")`` if ``needed_bytes`` exceeds the profile's memory budget.

    ``profile_or_limit`` is a :class:`~fmtl_edge.runtime.profile.DeviceProfile`, a byte count, or
    None (no limit).
    """
    limit = _memory_limit(profile_or_limit)
    if limit is not None and needed_bytes > limit:
        name = getattr(profile_or_limit, "name", None)
        where = f" of device profile {name!r}" if name else ""
        raise BudgetExceeded(
            "memory",
            int(needed_bytes),
            int(limit),
            f"job needs an estimated {_fmt(needed_bytes, 'bytes')}, over the memory budget{where} "
            f"of {_fmt(limit, 'bytes')}",
        )


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int | None:
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def rss_peak_bytes() -> int:
    """Peak RSS of this process: VmHWM from /proc/self/status, else ``ru_maxrss``."""
    kib = _read_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class PeakMemoryWatcher:
    """Watches the peak memory of a job: ``with PeakMemoryWatcher(device) as w: ...; w.peak_bytes``.

    * CUDA device (``"cuda"``, ``"cuda:1"``, a ``torch.device``): ``torch.cuda.max_memory_allocated``
      after ``reset_peak_memory_stats`` at entry (tensors only; not the CUDA context).
    * CPU: the process's peak RSS. At entry the kernel's peak (VmHWM) is reset through
      ``/proc/self/clear_refs`` where allowed, so the peak is the job's; where it is not
      (``peak_reset=False``) the peak is the process's since its start. ``baseline_bytes`` is the RSS
      at entry, ``job_peak_bytes`` = peak − baseline (what the job added).

    ``limit_bytes`` (or a profile's ``memory_budget_bytes``) makes :meth:`check` -- call it once per
    batch, it is cheap -- raise ``BudgetExceeded("memory")`` while the job runs.
    """

    def __init__(self, device: Any = "cpu", limit_bytes: int | None = None, profile=None) -> None:
        self.device = device
        self.limit_bytes = limit_bytes if limit_bytes is not None else _memory_limit(profile)
        self.peak_bytes: int | None = None
        self.baseline_bytes: int = 0
        self.peak_reset = False
        self._cuda_index: int | None = None
        dev = str(device)
        if dev.startswith("cuda"):
            import torch

            d = torch.device(device)
            self._cuda_index = d.index if d.index is not None else torch.cuda.current_device()

    @property
    def is_cuda(self) -> bool:
        return self._cuda_index is not None

    def _current_peak(self) -> int:
        if self.is_cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self._cuda_index))
        return rss_peak_bytes()

    def __enter__(self) -> "PeakMemoryWatcher":
        if self.is_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self._cuda_index)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self._cuda_index))
            self.peak_reset = True
        else:
            self.baseline_bytes = current_rss_bytes() or 0
            self.peak_reset = _reset_rss_peak()
        self.peak_bytes = None
        return self

    def check(self) -> int:
        """Current peak bytes; raises ``BudgetExceeded("memory")`` when over ``limit_bytes``."""
        peak = self._current_peak()
        if self.limit_bytes is not None and peak > self.limit_bytes:
            raise BudgetExceeded(
                "memory",
                peak,
                self.limit_bytes,
                f"peak memory {_fmt(peak, 'bytes')} on {self.device} went over the budget "
                f"of {_fmt(self.limit_bytes, 'bytes')}",
            )
        return peak

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self._current_peak()

    @property
    def job_peak_bytes(self) -> int | None:
        if self.peak_bytes is None:
            return None
        return max(0, self.peak_bytes - self.baseline_bytes)


def watch_peak_memory(device: Any = "cpu", limit_bytes: int | None = None, profile=None) -> PeakMemoryWatcher:
    """Alias of :class:`PeakMemoryWatcher` reading well in a ``with`` statement."""
    return PeakMemoryWatcher(device, limit_bytes=limit_bytes, profile=profile)


# ---- job memory estimate -----------------------------------------------------------------------

_OPTIMIZER_STATES = {
    "sgd": 0,  # plain SGD keeps nothing
    "sgd_momentum": 1,  # momentum buffer
    "adagrad": 1,
    "rmsprop": 1,
    "adam": 2,  # exp_avg, exp_avg_sq
    "adamw": 2,
}


def _tensors_in(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        out = []
        for o in obj:
            out.extend(_tensors_in(o))
        return out
    return []


def _activation_bytes(model, run) -> tuple[int, int]:
    """(sum, largest) of the output bytes of the leaf modules during ``run()`` (one forward pass of
    ``model``): the sum is what autograd keeps for the backward pass, to first order."""
    total = 0
    largest = 0

    def hook(mod, inputs, output):
        nonlocal total, largest
        ins = {id(t) for t in _tensors_in(inputs)}
        for t in _tensors_in(output):
            if id(t) in ins:  # in-place op (ReLU(inplace=True)): no new storage
                continue
            b = t.numel() * t.element_size()
            total += b
            largest = max(largest, b)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total, largest


def estimate_job_memory_bytes(
    model,
    sample_input_shape: Sequence[int],
    batch_size: int,
    optimizer: str = "sgd_momentum",
    *,
    dtype=None,
) -> int:
    """Memory one training step needs: parameters + buffers + gradients + optimizer state +
    activations of one batch (+ the input batch and 2 × the largest activation, the gradients that
    coexist in the backward pass).

    * Gradients and optimizer state count trainable parameters only (``requires_grad``); optimizer
      state per parameter: ``sgd`` 0, ``sgd_momentum`` 1, ``adam``/``adamw`` 2, ``adagrad``/
      ``rmsprop`` 1 copies.
    * Activations are measured, not guessed: forward hooks on every leaf module add up the output
      bytes of one forward pass of a ``(batch_size, *sample_input_shape)`` batch. The pass runs on
      the ``meta`` device through ``torch.func.functional_call`` (no memory, no change to the model:
      BatchNorm statistics untouched); if the model does not support meta tensors, a real batch of
      one sample runs under ``no_grad`` on a copy of the state and is scaled by ``batch_size``.
    * Not included: the CUDA context, allocator caching, library workspaces (cuDNN / oneDNN) and
      the data loader's batches beyond the one in use: leave headroom for them in the profile's
      ``memory_bytes``. On CPU, measured peak RSS of a real step is typically 1.5-2.5 × this estimate
      minus the parameters (RSS also counts library code and allocator slack).
    """
    import torch

    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    dtype = dtype or torch.float32
    shape = (int(batch_size), *[int(s) for s in sample_input_shape])

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    grad_bytes = trainable
    opt_bytes = _OPTIMIZER_STATES[optimizer] * trainable

    act: tuple[int, int] | None = None
    try:
        from torch.func import functional_call

        state = {n: torch.empty_like(t, device="meta") for n, t in model.named_parameters()}
        state.update({n: torch.empty_like(t, device="meta") for n, t in model.named_buffers()})
        x = torch.empty(shape, dtype=dtype, device="meta")

        act = _activation_bytes(model, lambda: functional_call(model, state, (x,)))
    except Exception:
        act = None
    if act is None:
        was_training = model.training
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            with torch.no_grad():
                dev = next(iter(model.parameters()), torch.empty(0)).device
                x1 = torch.zeros((1, *shape[1:]), dtype=dtype, device=dev)
                a1, l1 = _activation_bytes(model, lambda: model(x1))
                act = (a1 * int(batch_size), l1 * int(batch_size))
        finally:
            model.load_state_dict(saved)
            model.train(was_training)
    input_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    act_bytes, largest = act
    # during backward the gradients w.r.t. the largest layer's output and input exist at once
    backward_transient = 2 * largest
    return int(param_bytes + buffer_bytes + grad_bytes + opt_bytes + act_bytes + backward_transient + input_bytes)
