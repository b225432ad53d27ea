"""The ``estimate`` backend: CPU seconds × a power model. Always ``estimated=True``.

Model (one domain, ``cpu``, scope ``process_cpu``, method ``estimated``)::

    E = power_w × cpu_s + idle_w × wall_s

``cpu_s`` is the CPU time of this process, all threads, user + system (``time.process_time()``), plus -- by
default -- the CPU time of child processes that have been waited for (so ``fmtl-edge meter -- CMD``
counts the command, and DataLoader workers are counted once reaped). ``power_w`` is the power of one
busy core (default :data:`DEFAULT_POWER_W` = 15 W, a desktop/laptop x86 core under load; device
profiles set ~1.5-3 W for Jetson ARM cores); ``idle_w`` (default 0) charges the window's wall time,
e.g. a share of the board's idle power. The total has no physical scope: ``total_scope="none"``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .meter import DomainSpec, Meter
from .sysfs import Sysfs

DEFAULT_POWER_W = 15.0
DEFAULT_IDLE_W = 0.0


def process_cpu_seconds(include_children: bool = True) -> float:
    """User + system CPU seconds of this process (all threads), plus reaped children if asked."""
    s = time.process_time()  # ns resolution (os.times() ticks at 10 ms)
    if include_children:
        t = os.times()
        s += t.children_user + t.children_system
    return s


class EstimateMeter(Meter):
    backend = "estimate"
    total_scope = "none"
    estimated = True

    def __init__(
        self,
        *,
        power_w: float = DEFAULT_POWER_W,
        idle_w: float = DEFAULT_IDLE_W,
        include_children: bool = True,
        cpu_clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.monotonic,
        sysfs_root: str | None = None,
        sync_cuda: bool = True,
    ) -> None:
        super().__init__(sync_cuda=sync_cuda)
        if power_w < 0 or idle_w < 0:
            raise ValueError("power_w and idle_w must be >= 0")
        self.power_w = float(power_w)
        self.idle_w = float(idle_w)
        self.include_children = include_children
        self._cpu_clock = cpu_clock or (lambda: process_cpu_seconds(self.include_children))
        self._wall_clock = wall_clock
        self._cpu0 = self._cpu_clock()
        self._wall0 = wall_clock()
        self._sysfs = Sysfs(sysfs_root)

    @property
    def source(self) -> str:
        s = f"estimate:cpu_time*{self.power_w:g}W"
        if self.idle_w:
            s += f"+wall*{self.idle_w:g}W"
        return s

    def domain_specs(self) -> list[DomainSpec]:
        return [DomainSpec("cpu", "estimated", self.source, "process_cpu", True)]

    def _read(self) -> dict[str, float]:
        cpu = self._cpu_clock() - self._cpu0
        wall = self._wall_clock() - self._wall0
        return {"cpu": self.power_w * cpu + self.idle_w * wall}

    def _read_power_mode(self) -> str | None:
        return cpu_governor(self._sysfs)


def cpu_governor(sysfs: Sysfs) -> str | None:
    """``governor=<name>`` of cpu0's cpufreq, or None (informative power mode on non-Jetson hosts)."""
    g = sysfs.try_read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return f"governor={g}" if g else None
