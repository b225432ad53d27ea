"""Jetson INA3221 power rails, integrated by a sampler thread (trapezoid rule, default 50 Hz).

Rails are found by their *label*, never by position:

* JetPack 4 (L4T R32, out-of-tree ``ina3221x`` iio driver)::

      /sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<K>/rail_name_<N>       "POM_5V_IN"
      /sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<K>/in_power<N>_input   milliwatts

* JetPack 5/6 (L4T R35+, upstream ``ina3221`` hwmon driver)::

      /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<K>/in<N>_label   "VDD_IN"   (N = 1..3)
      /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<K>/in<N>_input   millivolts (bus voltage)
      /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<K>/curr<N>_input milliamperes

  power = mV × mA / 10⁶ W. Channels 4-7 of the upstream driver (shunt voltages, summation) are not
  rails and are ignored.

The total (and its scope):

* ``board_input`` -- the input rail ``VDD_IN`` (TX2, Xavier NX, Orin Nano/NX) or ``POM_5V_IN``
  (Nano) when present. Every other rail is then a ``sub_rail`` (downstream of the input) and is
  reported but **never added** to the total.
* ``sum_of_rails`` -- boards without an input rail (AGX Xavier: GPU, CPU, SOC, CV, VDDRQ, SYS5V;
  AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO): the sum of the rails known to be
  top-level (``scope="rail"``), or of the ``total_rails`` option.
* otherwise the total is unknown (None, with a warning) -- never a guess.

A rail labelled ``NC`` (not connected), disabled, or unreadable at start-up is skipped with a
warning. The nvpmodel power mode is named from ``/var/lib/nvpmodel/status`` (or ``nvpmodel -q``) and
``/etc/nvpmodel.conf`` (:mod:`fmtl_edge.runtime.power_modes`): ``Measurement.power_mode`` is its name.
All paths go through the redirectable sysfs root (``FMTL_EDGE_SYSFS_ROOT``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .meter import DomainSpec, MeterUnavailable, SampledMeter
from .sysfs import Sysfs

IIO_GLOB = "/sys/bus/i2c/drivers/ina3221x/*/iio:device*"
HWMON_GLOB = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"

#: Rails that measure the whole board at its power input.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
#: Top-level rails of boards without an input rail; their sum is the ``sum_of_rails`` total.
SUM_OF_RAILS = {
    "jetson-agx-xavier": ("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"),
    "jetson-agx-orin": ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"),
}
_SUMMABLE = {r for rails in SUM_OF_RAILS.values() for r in rails}


@dataclass
class Rail:
    label: str  # rail name as the driver labels it; the domain name (made unique if needed)
    driver: str  # "iio" (JetPack 4) or "hwmon" (JetPack 5/6)
    device: str  # logical path of the iio device / hwmon directory
    channel: int
    role: str = "sub_rail"  # board_input | rail | sub_rail
    in_total: bool = False

    @property
    def files(self) -> list[str]:
        if self.driver == "iio":
            return [f"{self.device}/in_power{self.channel}_input"]
        return [f"{self.device}/in{self.channel}_input", f"{self.device}/curr{self.channel}_input"]

    @property
    def source(self) -> str:
        if self.driver == "iio":
            return f"{self.device}/in_power{self.channel}_input (mW)"
        return f"{self.device}/in{self.channel}_input (mV) x curr{self.channel}_input (mA)"

    def watts(self, values: Sequence[str]) -> float:
        if self.driver == "iio":
            return float(values[0]) / 1e3
        return float(values[0]) * float(values[1]) / 1e6


def _is_nc(label: str) -> bool:
    return label.strip().upper() in ("NC", "N/C", "")


def discover_rails(sysfs: Sysfs) -> tuple[list[Rail], list[str]]:
    """Every labelled, connected INA3221 rail (JetPack 4 iio and JetPack 5/6 hwmon), plus warnings."""
    rails: list[Rail] = []
    warnings: list[str] = []
    for dev in sysfs.glob(IIO_GLOB):
        for name_file in sysfs.glob(f"{dev}/rail_name_*"):
            m = re.search(r"rail_name_(\d+)$", name_file)
            if not m:
                continue
            ch = int(m.group(1))
            label = sysfs.try_read_text(name_file)
            if label is None:
                warnings.append(f"rail {name_file}: label unreadable; skipped")
                continue
            if _is_nc(label):
                warnings.append(f"rail {dev} channel {ch}: labelled {label!r} (not connected); skipped")
                continue
            rails.append(Rail(label, "iio", dev, ch))
    for hw in sysfs.glob(HWMON_GLOB):
        for ch in (1, 2, 3):
            label_file = f"{hw}/in{ch}_label"
            if not sysfs.exists(label_file):
                continue
            label = sysfs.try_read_text(label_file)
            if label is None:
                warnings.append(f"rail {label_file}: label unreadable; skipped")
                continue
            if _is_nc(label):
                warnings.append(f"rail {hw} channel {ch}: labelled {label!r} (not connected); skipped")
                continue
            enable = sysfs.try_read_text(f"{hw}/in{ch}_enable")
            if enable is not None and enable.strip() == "0":
                warnings.append(f"rail {label} ({hw} channel {ch}): channel disabled; skipped")
                continue
            rails.append(Rail(label, "hwmon", hw, ch))
    # make domain names unique (two boards' worth of labels should not collide, but be safe)
    seen: dict[str, int] = {}
    for r in rails:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in rails:
        if seen[r.label] > 1:
            bus = r.device.split("/")[6] if r.device.count("/") >= 6 else r.device
            r.label = f"{r.label}@{bus}"
    return rails, warnings


def classify_rails(rails: list[Rail], total_rails: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """Set each rail's role; return (total_scope, warnings). Sub-rails are never in the total."""
    warnings: list[str] = []
    labels = [r.label for r in rails]
    inputs = [r for r in rails if r.label in INPUT_RAILS]
    if total_rails:
        missing = [t for t in total_rails if t not in labels]
        if missing:
            raise MeterUnavailable("jetson", f"total_rails {missing} not found among rails {labels}")
        if len(total_rails) == 1 and total_rails[0] in INPUT_RAILS:
            scope = "board_input"
        else:
            scope = "sum_of_rails"
        for r in rails:
            r.in_total = r.label in total_rails
            r.role = ("board_input" if scope == "board_input" else "rail") if r.in_total else "sub_rail"
        return scope, warnings
    if inputs:
        if len(inputs) > 1:
            warnings.append(f"several input rails {[r.label for r in inputs]}; total uses {inputs[0].label}")
        for r in rails:
            r.role, r.in_total = "sub_rail", False
        inputs[0].role, inputs[0].in_total = "board_input", True
        return "board_input", warnings
    summable = [r for r in rails if r.label in _SUMMABLE]
    if summable:
        for r in rails:
            if r.label in _SUMMABLE:
                r.role, r.in_total = "rail", True
            else:
                r.role, r.in_total = "sub_rail", False
                warnings.append(f"rail {r.label} is not a known top-level rail; reported, not added to the total")
        return "sum_of_rails", warnings
    for r in rails:
        r.role, r.in_total = "sub_rail", False
    warnings.append(
        f"no input rail ({'/'.join(INPUT_RAILS)}) and no known top-level rails among {labels}: total unknown; "
        "pass total_rails=[...] (profile [meter.options]) to sum explicit rails"
    )
    return "none", warnings


def tegra_release(sysfs: Sysfs) -> str | None:
    """``L4T R35.4.1`` from /etc/nv_tegra_release, or None."""
    text = sysfs.try_read_text("/etc/nv_tegra_release")
    if not text:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"L4T R{m.group(1)}.{m.group(2)}" if m else text.splitlines()[0].lstrip("# ").strip()


def nvpmodel_mode(sysfs: Sysfs, allow_command: bool | None = None) -> str | None:
    """The nvpmodel power mode by name (``MAXN``, ``MODE_15W``, ``15W``), as every energy record
    carries it; ``nvpmodel <id>`` when ``/etc/nvpmodel.conf`` does not name the id; None if unknown.

    Reads ``/var/lib/nvpmodel/status`` first, then ``nvpmodel -q`` (the command from
    ``$FMTL_EDGE_NVPMODEL``, else ``nvpmodel`` on the PATH unless the sysfs root is redirected;
    ``allow_command=False`` never runs it). See :mod:`fmtl_edge.runtime.power_modes`.
    """
    from .power_modes import nvpmodel_command, query_power_mode

    cmd = nvpmodel_command(sysfs) if allow_command is not False else None
    mode = query_power_mode(sysfs, prefer="status", command=cmd or [])
    return None if mode is None else mode.name


class JetsonMeter(SampledMeter):
    """INA3221 rails of a Jetson board, sampled at ``sample_hz`` and integrated (trapezoid)."""

    backend = "jetson"
    estimated = False

    def __init__(
        self,
        *,
        sample_hz: float = 50.0,
        total_rails: Sequence[str] | None = None,
        sysfs_root: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sync_cuda: bool = True,
    ) -> None:
        super().__init__(sample_hz=sample_hz, clock=clock, sync_cuda=sync_cuda)
        self.sysfs = Sysfs(sysfs_root)
        self._fds: dict[str, int] = {}
        rails, warnings = discover_rails(self.sysfs)
        for w in warnings:
            self.add_warning(w)
        if not rails:
            raise MeterUnavailable(
                "jetson",
                f"no INA3221 rails under {IIO_GLOB} (JetPack 4) or {HWMON_GLOB} (JetPack 5/6)"
                + (f" [sysfs root {self.sysfs.root}]" if self.sysfs.redirected else ""),
            )
        # probe: one real read of every rail; unreadable rails are dropped with a warning
        readable: list[Rail] = []
        dropped: list[Rail] = []
        for r in rails:
            try:
                r.watts([self.sysfs.read_text(f) for f in r.files])
                readable.append(r)
            except (OSError, ValueError, IndexError) as exc:
                dropped.append(r)
                self.add_warning(f"rail {r.label} ({r.source}) unreadable at start-up ({exc}); skipped")
        if not readable:
            raise MeterUnavailable("jetson", "INA3221 rails found but none is readable: " + "; ".join(self.warnings))
        scope, cwarn = classify_rails(readable, total_rails)
        if not total_rails and scope != "board_input":
            lost_inputs = [r.label for r in dropped if r.label in INPUT_RAILS]
            if lost_inputs:
                # the board has an input rail we cannot read: the others are sub-rails, never summed
                for r in readable:
                    r.role, r.in_total = "sub_rail", False
                scope = "none"
                cwarn = [f"input rail {lost_inputs[0]} unreadable: total unknown (sub-rails are never summed)"]
        for w in cwarn:
            self.add_warning(w)
        self.rails = readable
        self.total_scope = scope
        self._specs = [DomainSpec(r.label, "integrated", r.source, r.role, r.in_total) for r in readable]
        self.l4t = tegra_release(self.sysfs)
        self._fast: list[tuple[str, list[int], bool]] = []
        try:
            for r in readable:
                for f in r.files:
                    self._fds[f] = self.sysfs.open_fd(f)
                self._fast.append((r.label, [self._fds[f] for f in r.files], r.driver == "iio"))
        except OSError as exc:
            self.close()
            raise MeterUnavailable("jetson", f"cannot open rail files: {exc}") from exc

    @property
    def source(self) -> str:
        total = [r for r in self.rails if r.in_total]
        if self.total_scope == "board_input":
            what = f"{total[0].label}@{total[0].device}"
        elif self.total_scope == "sum_of_rails":
            what = "sum_of_rails(" + "+".join(r.label for r in total) + ")"
        else:
            what = "rails(" + "+".join(r.label for r in self.rails) + "), no total"
        return f"jetson:ina3221-{self.rails[0].driver}:{what}"

    def domain_specs(self) -> list[DomainSpec]:
        return list(self._specs)

    def _read_powers(self) -> dict[str, float | None]:
        # hot path (50 Hz): pread on descriptors kept open, int() straight from the bytes
        out: dict[str, float | None] = {}
        pread = os.pread
        for label, fds, iio in self._fast:
            try:
                if iio:
                    out[label] = int(pread(fds[0], 32, 0)) / 1e3
                else:
                    out[label] = int(pread(fds[0], 32, 0)) * int(pread(fds[1], 32, 0)) / 1e6
            except (OSError, ValueError) as exc:
                out[label] = None
                self._event(f"rail {label}: read failed ({type(exc).__name__}: {exc}); interval bridged")
        return out

    def probe(self) -> None:
        powers = self._read_powers()
        if all(p is None for p in powers.values()):
            raise MeterUnavailable("jetson", "no rail readable")

    def _read_power_mode(self) -> str | None:
        return nvpmodel_mode(self.sysfs)

    def describe(self) -> dict:
        d = super().describe()
        d["l4t"] = self.l4t
        return d

    def close(self) -> None:
        super().close()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
