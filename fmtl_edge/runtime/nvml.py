"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Per GPU, chosen by a real read at start-up:

* ``counter`` -- ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta and
  newer), differenced at the window edges;
* ``integrated`` -- ``nvmlDeviceGetPowerUsage`` (mW) sampled by a thread (default 50 Hz) and
  integrated with the trapezoid rule, on older GPUs where the counter is not supported.

A read that fails or returns exactly 0 at start-up counts as "not supported": on Tegra (Jetson),
NVML initialises but cannot read energy or power, and such a GPU must never be reported as 0 J
(the ``jetson`` meter measures those boards). The GPUs are those of ``gpu_indices`` (NVML indices),
else those named by ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUIDs), else all. Window edges
call ``torch.cuda.synchronize`` when torch has initialised CUDA, so queued kernels are counted in the
window that launched them. Total: the sum over the GPUs, ``total_scope="gpu_device"``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .meter import DomainSpec, MeterUnavailable, SampledMeter
from .sysfs import Sysfs


def _import_pynvml():
    import pynvml  # nvidia-ml-py

    return pynvml


@dataclass
class _Gpu:
    index: int | str
    handle: Any
    name: str
    mode: str  # counter | integrated
    counter0_mj: int = 0

    @property
    def domain(self) -> str:
        return f"gpu:{self.index}"


def _decode(s) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def _visible_devices() -> list[int | str] | None:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not env.strip():
        return None
    out: list[int | str] = []
    for tok in env.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.isdigit():
            out.append(int(tok))
        elif tok.startswith(("GPU-", "MIG-")):
            out.append(tok)
        else:
            break  # CUDA stops at the first invalid entry
    return out


class NvmlMeter(SampledMeter):
    backend = "nvml"
    total_scope = "gpu_device"

    def __init__(
        self,
        *,
        gpu_indices: Sequence[int | str] | None = None,
        sample_hz: float = 50.0,
        sysfs_root: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sync_cuda: bool = True,
    ) -> None:
        super().__init__(sample_hz=sample_hz, clock=clock, sync_cuda=sync_cuda)
        self.sysfs = Sysfs(sysfs_root)
        self.gpus: list[_Gpu] = []
        self._nvml = None
        self._has_sampled = False
        try:
            nv = _import_pynvml()
        except ImportError as exc:
            raise MeterUnavailable("nvml", f"nvidia-ml-py is not installed (pip install nvidia-ml-py): {exc}") from exc
        tegra = self.sysfs.exists("/etc/nv_tegra_release")
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise MeterUnavailable("nvml", f"nvmlInit failed: {exc}") from exc
        self._nvml = nv
        try:
            count = nv.nvmlDeviceGetCount()
            wanted: Sequence[int | str]
            if gpu_indices is not None:
                wanted = list(gpu_indices)
            else:
                wanted = _visible_devices() or list(range(count))
            reasons: list[str] = []
            for idx in wanted:
                try:
                    h = nv.nvmlDeviceGetHandleByUUID(idx) if isinstance(idx, str) else nv.nvmlDeviceGetHandleByIndex(idx)
                    name = _decode(nv.nvmlDeviceGetName(h))
                except nv.NVMLError as exc:
                    reasons.append(f"gpu {idx}: no handle ({exc})")
                    continue
                mode, why = self._probe_gpu(nv, h)
                if mode is None:
                    reasons.append(f"gpu {idx} ({name}): {why}")
                    continue
                g = _Gpu(idx, h, name, mode)
                if mode == "counter":
                    g.counter0_mj = int(nv.nvmlDeviceGetTotalEnergyConsumption(h))
                self.gpus.append(g)
            for r in reasons:
                self.add_warning(f"nvml: {r}; skipped")
            if not self.gpus:
                why = "; ".join(reasons) or "no GPU visible to NVML"
                if tegra:
                    why = f"Tegra (Jetson) GPU: NVML initialises but cannot read energy or power ({why}); use the jetson meter"
                raise MeterUnavailable("nvml", why)
        except BaseException:
            self.close()
            raise
        self._has_sampled = any(g.mode == "integrated" for g in self.gpus)

    @staticmethod
    def _probe_gpu(nv, h) -> tuple[str | None, str]:
        why = []
        try:
            e = nv.nvmlDeviceGetTotalEnergyConsumption(h)
            if e and e > 0:
                return "counter", ""
            why.append("energy counter reads 0")
        except nv.NVMLError as exc:
            why.append(f"energy counter: {exc}")
        try:
            p = nv.nvmlDeviceGetPowerUsage(h)
            if p and p > 0:
                return "integrated", ""
            why.append("power reads 0")
        except nv.NVMLError as exc:
            why.append(f"power: {exc}")
        return None, ", ".join(why)

    @property
    def sample_hz(self) -> float | None:
        return self._hz if self._has_sampled else None

    @property
    def source(self) -> str:
        parts = []
        for g in self.gpus:
            fn = "nvmlDeviceGetTotalEnergyConsumption" if g.mode == "counter" else "nvmlDeviceGetPowerUsage"
            parts.append(f"{g.index}:{fn}")
        return "nvml:" + ",".join(parts)

    def domain_specs(self) -> list[DomainSpec]:
        out = []
        for g in self.gpus:
            fn = "nvmlDeviceGetTotalEnergyConsumption (mJ)" if g.mode == "counter" else "nvmlDeviceGetPowerUsage (mW)"
            out.append(DomainSpec(g.domain, g.mode, f"nvml gpu {g.index} {g.name}: {fn}", "gpu_device", True))
        return out

    def _read_powers(self) -> dict[str, float | None]:
        nv = self._nvml
        out: dict[str, float | None] = {}
        for g in self.gpus:
            if g.mode != "integrated":
                continue
            try:
                mw = nv.nvmlDeviceGetPowerUsage(g.handle)
                out[g.domain] = mw / 1e3 if mw and mw > 0 else None
                if out[g.domain] is None:
                    self._event(f"nvml {g.domain}: power read 0 mW; interval bridged")
            except nv.NVMLError as exc:
                out[g.domain] = None
                self._event(f"nvml {g.domain}: power read failed ({exc}); interval bridged")
        return out

    def _read(self) -> dict[str, float]:
        nv = self._nvml
        out: dict[str, float] = {}
        if self._has_sampled:
            out.update(super()._read())
        for g in self.gpus:
            if g.mode != "counter":
                continue
            try:
                out[g.domain] = (int(nv.nvmlDeviceGetTotalEnergyConsumption(g.handle)) - g.counter0_mj) / 1e3
            except nv.NVMLError as exc:
                self._event(f"nvml {g.domain}: energy counter read failed ({exc})")
        return out

    def probe(self) -> None:
        r = self._read()
        if not r and not self._has_sampled:
            raise MeterUnavailable("nvml", "no energy read succeeded")

    def _start_sampling(self) -> None:
        if self._has_sampled:
            super()._start_sampling()

    def _stop_sampling(self) -> None:
        if self._has_sampled:
            super()._stop_sampling()

    def _read_power_mode(self) -> str | None:
        nv = self._nvml
        parts = []
        for g in self.gpus:
            try:
                parts.append(f"gpu{g.index} power_limit={nv.nvmlDeviceGetEnforcedPowerLimit(g.handle) / 1e3:g}W")
            except Exception:
                pass
        return ", ".join(parts) or None

    def close(self) -> None:
        super().close()
        nv, self._nvml = self._nvml, None
        if nv is not None:
            try:
                nv.nvmlShutdown()
            except Exception:
                pass
