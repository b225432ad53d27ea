"""RAPL energy counters (Intel, and AMD Zen through the same powercap interface).

Zones under ``/sys/class/powercap/intel-rapl:*``:

* ``intel-rapl:<k>`` named ``package-<k>`` -> domain ``package-<k>``, scope ``cpu_package``, in the
  total (``total_scope="cpu_package"``);
* a subzone named ``dram`` (``intel-rapl:<k>:<j>``, or a top-level zone on some servers) -> domain
  ``dram-<k>``, scope ``dram``, reported but *not* in the total (the package does not include DRAM,
  and ``cpu_package`` must mean what it says);
* ``core`` / ``uncore`` subzones are parts of the package and are skipped; ``psys`` (the whole
  platform, overlapping the packages) and the ``intel-rapl-mmio:*`` mirror of the package counter
  are duplicates and are skipped.

``energy_uj`` wraps at ``max_energy_range_uj``. Every read (the window edges and a sampler thread
that runs while a window is open) adds the wrapped difference to a 64-bit Python accumulator; the
sampler's period is a quarter of the fastest zone's wrap period at its maximum power
(``constraint_0_max_power_uw``, else :data:`ASSUMED_MAX_W`), so no wrap is ever missed.

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694); the probe says how to grant
read access.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .estimate import cpu_governor
from .meter import DomainSpec, Meter, MeterUnavailable, Sampler
from .sysfs import Sysfs, pread_text

POWERCAP = "/sys/class/powercap"
ASSUMED_MAX_W = 500.0  # per zone, when constraint_0_max_power_uw is not readable
MIN_POLL_S = 0.01
MAX_POLL_S = 60.0

PERMISSION_HINT = (
    "since Linux 5.10 (CVE-2020-8694) RAPL energy counters are readable by root only; grant read "
    "access with `sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj /sys/class/powercap/intel-rapl:*:*/energy_uj` "
    "(until reboot; make it permanent with a udev rule or a systemd-tmpfiles 'z' line), or run as root"
)


@dataclass
class _Zone:
    domain: str
    path: str  # logical zone directory
    scope: str  # cpu_package | dram
    in_total: bool
    max_range_uj: int | None
    fd: int | None = None
    last_raw: int | None = None
    acc_uj: int = 0
    last_t: float = 0.0


class RaplMeter(Meter):
    backend = "rapl"
    total_scope = "cpu_package"

    def __init__(
        self,
        *,
        sysfs_root: str | None = None,
        poll_s: float | None = None,
        include_dram: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sync_cuda: bool = True,
    ) -> None:
        super().__init__(sync_cuda=sync_cuda)
        self.sysfs = Sysfs(sysfs_root)
        self._clock = clock
        self._zlock = threading.Lock()
        self.zones: list[_Zone] = []
        self.wraps = 0
        zone_dirs = [z for z in self.sysfs.glob(f"{POWERCAP}/intel-rapl:*") if "mmio" not in z]
        if not zone_dirs:
            raise MeterUnavailable("rapl", f"no RAPL zones under {POWERCAP}/intel-rapl:* (not an Intel/AMD host, the intel_rapl driver is not loaded, or a virtual machine: VMs and most cloud instances expose no RAPL)")
        seen: set[str] = set()
        max_w: list[float] = []
        for zd in zone_dirs:
            m = re.search(r"intel-rapl:(\d+)(?::(\d+))?$", zd)
            if not m:
                continue
            name = self.sysfs.try_read_text(f"{zd}/name") or ""
            pkg = int(m.group(1))
            if name.startswith("package"):
                dom, scope, in_total = name, "cpu_package", True
            elif name == "dram":
                if not include_dram:
                    continue
                dom, scope, in_total = f"dram-{pkg}", "dram", False
            else:
                continue  # core, uncore (parts of the package), psys (platform: overlaps packages)
            if dom in seen:
                self.add_warning(f"RAPL zone {zd} duplicates {dom}; skipped")
                continue
            seen.add(dom)
            rng = None
            try:
                rng = self.sysfs.read_int(f"{zd}/max_energy_range_uj")
            except (OSError, ValueError):
                self.add_warning(f"{zd}/max_energy_range_uj unreadable: a counter wrap would be seen as a reset")
            try:
                pw = self.sysfs.read_int(f"{zd}/constraint_0_max_power_uw") / 1e6
            except (OSError, ValueError):
                pw = 0.0
            max_w.append(pw if pw > 0 else ASSUMED_MAX_W)
            self.zones.append(_Zone(dom, zd, scope, in_total, rng))
        if not any(z.in_total for z in self.zones):
            raise MeterUnavailable("rapl", f"no package-* zone under {POWERCAP}")
        # probe: one real read of every counter
        for z in self.zones:
            f = f"{z.path}/energy_uj"
            try:
                z.last_raw = self.sysfs.read_int(f)
                z.fd = self.sysfs.open_fd(f)
            except PermissionError as exc:
                self.close()
                raise MeterUnavailable("rapl", f"permission denied reading {f} ({exc.strerror}): {PERMISSION_HINT}") from exc
            except (OSError, ValueError) as exc:
                self.close()
                raise MeterUnavailable("rapl", f"cannot read {f}: {exc}") from exc
            z.last_t = clock()
        wrap_s = [z.max_range_uj / 1e6 / w for z, w in zip(self.zones, max_w) if z.max_range_uj]
        self.wrap_period_s = min(wrap_s) if wrap_s else None
        if poll_s is None:
            poll_s = MAX_POLL_S if self.wrap_period_s is None else self.wrap_period_s / 4
        self.poll_s = min(MAX_POLL_S, max(MIN_POLL_S, poll_s))
        self.sampler = Sampler(self._update, 1.0 / self.poll_s, name="fmtl-edge-rapl-wrap")

    @property
    def source(self) -> str:
        pk = [z for z in self.zones if z.in_total]
        return "rapl:" + ",".join(z.path for z in pk)

    def domain_specs(self) -> list[DomainSpec]:
        return [DomainSpec(z.domain, "counter", f"{z.path}/energy_uj", z.scope, z.in_total) for z in self.zones]

    def _update(self) -> None:
        """Read every counter once and accumulate the (wrap-corrected) increase."""
        with self._zlock:
            now = self._clock()
            for z in self.zones:
                try:
                    raw = int(pread_text(z.fd)) if z.fd is not None else self.sysfs.read_int(f"{z.path}/energy_uj")
                except (OSError, ValueError) as exc:
                    self._event(f"RAPL {z.domain}: read failed ({exc})")
                    continue
                prev = z.last_raw
                if prev is not None:
                    if raw >= prev:
                        z.acc_uj += raw - prev
                    elif z.max_range_uj:
                        z.acc_uj += raw + z.max_range_uj - prev
                        self.wraps += 1
                    else:
                        z.acc_uj += raw
                        self._event(f"RAPL {z.domain}: counter decreased with no known range; treated as a reset")
                    if self.wrap_period_s is not None and now - z.last_t > 0.9 * self.wrap_period_s:
                        self._event(
                            f"RAPL {z.domain}: {now - z.last_t:.0f} s between reads, close to the wrap period "
                            f"({self.wrap_period_s:.0f} s); a wrap may have been missed"
                        )
                z.last_raw = raw
                z.last_t = now

    def _read(self) -> dict[str, float]:
        self._update()
        with self._zlock:
            return {z.domain: z.acc_uj / 1e6 for z in self.zones}

    def _start_sampling(self) -> None:
        self.sampler.start()

    def _stop_sampling(self) -> None:
        self.sampler.stop()

    def _read_power_mode(self) -> str | None:
        parts = []
        g = cpu_governor(self.sysfs)
        if g:
            parts.append(g)
        for z in self.zones:
            if z.in_total:
                try:
                    pl1 = self.sysfs.read_int(f"{z.path}/constraint_0_power_limit_uw") / 1e6
                    parts.append(f"{z.domain} PL1={pl1:g}W")
                except (OSError, ValueError):
                    pass
        return ", ".join(parts) or None

    def close(self) -> None:
        super().close()
        if hasattr(self, "sampler"):
            self.sampler.stop()
        for z in self.zones:
            if z.fd is not None:
                try:
                    os.close(z.fd)
                except OSError:
                    pass
                z.fd = None
