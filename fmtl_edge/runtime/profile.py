"""Device profiles: budgets and meter settings per device, from TOML with defaults per device class.

A profile file::

    name = "nano-07"
    device_class = "jetson-nano"     # defaults come from fmtl_edge/runtime/profiles/jetson-nano.toml

    [budgets]
    memory_bytes = 2147483648        # or memory_gib = 2.0
    round_time_s = 300.0
    round_energy_j = 1500.0

    [meter]
    backend = "auto"                 # auto | jetson | nvml | rapl | estimate | null
    sample_hz = 50.0
    power_w = 1.5                    # estimate backend: W per busy core
    idle_w = 0.0                     # estimate backend: W charged per wall second

    [meter.options]                  # passed to make_meter as keyword arguments
    total_rails = ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]

Keys the file leaves out come from the device class's built-in profile; unknown keys are an error
(a typo must not silently leave a budget unset). ``load_profile(None)`` uses ``$FMTL_EDGE_PROFILE``
when set, else the built-in profile of the detected device class (the device-tree model under the
sysfs root; x86 machines are ``workstation``, anything else ``generic``).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sysfs import Sysfs

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

ENV_PROFILE = "FMTL_EDGE_PROFILE"
PROFILES_DIR = Path(__file__).with_name("profiles")
DEVICE_CLASSES = (
    "jetson-nano",
    "jetson-tx2",
    "jetson-xavier-nx",
    "jetson-agx-xavier",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "workstation",
    "generic",
)
METER_BACKENDS = ("auto", "jetson", "nvml", "rapl", "estimate", "null")


@dataclass
class DeviceProfile:
    name: str
    device_class: str = "generic"
    memory_budget_bytes: int | None = None
    round_time_s: float | None = None
    round_energy_j: float | None = None
    meter: str = "auto"
    power_w: float = 15.0
    idle_w: float = 0.0
    sample_hz: float = 50.0
    meter_options: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the profile came from (file path or builtin:<class>)

    def __post_init__(self) -> None:
        if self.meter not in METER_BACKENDS:
            raise ValueError(f"meter must be one of {METER_BACKENDS}, got {self.meter!r}")
        for k in ("memory_budget_bytes", "round_time_s", "round_energy_j"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ValueError(f"{k} must be > 0 or unset, got {v!r}")
        if self.memory_budget_bytes is not None:
            self.memory_budget_bytes = int(self.memory_budget_bytes)

    def round_budget(self):
        from .budgets import RoundBudget

        return RoundBudget(time_s=self.round_time_s, energy_j=self.round_energy_j)

    def meter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``make_meter(profile.meter, **profile.meter_kwargs())``."""
        kw: dict[str, Any] = {"sample_hz": self.sample_hz, "power_w": self.power_w, "idle_w": self.idle_w}
        kw.update(self.meter_options)
        return kw

    def make_meter(self, **overrides):
        from .factory import make_meter

        kw = self.meter_kwargs()
        kw.update(overrides)
        return make_meter(self.meter, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse(data: dict[str, Any], where: str) -> dict[str, Any]:
    """TOML dict -> DeviceProfile keyword arguments (only the keys present)."""
    out: dict[str, Any] = {}
    data = dict(data)
    for k in ("name", "device_class"):
        if k in data:
            out[k] = str(data.pop(k))
    budgets = dict(data.pop("budgets", {}) or {})
    meter = dict(data.pop("meter", {}) or {})
    if data:
        raise ValueError(f"{where}: unknown top-level keys {sorted(data)} (known: name, device_class, [budgets], [meter])")
    if "memory_bytes" in budgets and "memory_gib" in budgets:
        raise ValueError(f"{where}: give memory_bytes or memory_gib, not both")
    if "memory_bytes" in budgets:
        out["memory_budget_bytes"] = int(budgets.pop("memory_bytes"))
    if "memory_gib" in budgets:
        out["memory_budget_bytes"] = int(float(budgets.pop("memory_gib")) * 2**30)
    for k in ("round_time_s", "round_energy_j"):
        if k in budgets:
            out[k] = float(budgets.pop(k))
    if budgets:
        raise ValueError(
            f"{where}: unknown [budgets] keys {sorted(budgets)} "
            "(known: memory_bytes, memory_gib, round_time_s, round_energy_j)"
        )
    if "backend" in meter:
        out["meter"] = str(meter.pop("backend"))
    for k in ("sample_hz", "power_w", "idle_w"):
        if k in meter:
            out[k] = float(meter.pop(k))
    if "options" in meter:
        out["meter_options"] = dict(meter.pop("options"))
    if meter:
        raise ValueError(
            f"{where}: unknown [meter] keys {sorted(meter)} (known: backend, sample_hz, power_w, idle_w, [meter.options])"
        )
    return out


def _load_toml(path: Path) -> dict[str, Any]:
    if _toml is None:  # pragma: no cover
        raise ImportError("reading TOML profiles on Python 3.10 needs the 'tomli' package")
    with open(path, "rb") as f:
        return _toml.load(f)


def builtin_profile(device_class: str) -> DeviceProfile:
    path = PROFILES_DIR / f"{device_class}.toml"
    if not path.is_file():
        raise ValueError(f"no built-in profile for device class {device_class!r} (known: {', '.join(DEVICE_CLASSES)})")
    kw = _parse(_load_toml(path), str(path))
    kw.setdefault("name", device_class)
    kw["device_class"] = device_class
    return DeviceProfile(**kw, source=f"builtin:{device_class}")


def device_model(sysfs: Sysfs | None = None) -> str | None:
    """The device-tree model string ("NVIDIA Jetson Nano Developer Kit"), or None (x86 has none)."""
    sysfs = sysfs or Sysfs()
    for p in ("/sys/firmware/devicetree/base/model", "/proc/device-tree/model"):
        s = sysfs.try_read_text(p)
        if s:
            return s
    return None


def detect_device_class(sysfs: Sysfs | None = None) -> str:
    sysfs = sysfs or Sysfs()
    model = (device_model(sysfs) or "").lower()
    if "jetson" in model or sysfs.exists("/etc/nv_tegra_release"):
        if "orin" in model:
            return "jetson-agx-orin" if "agx" in model else "jetson-orin-nano"
        if "xavier" in model:
            return "jetson-agx-xavier" if "agx" in model else "jetson-xavier-nx"
        if "tx2" in model or "quill" in model:
            return "jetson-tx2"
        if "nano" in model:
            return "jetson-nano"
        return "generic"
    if platform.machine().lower() in ("x86_64", "amd64", "i686"):
        return "workstation"
    return "generic"


def load_profile(path: str | os.PathLike | None = None, *, sysfs_root: str | None = None) -> DeviceProfile:
    """A :class:`DeviceProfile` from a TOML file, a device-class name, or (None) the detected device.

    ``path`` may be a file path or the name of a built-in class (``"jetson-nano"``). With None,
    ``$FMTL_EDGE_PROFILE`` is used when set, else the built-in profile of the detected class.
    """
    if path is None:
        env = os.environ.get(ENV_PROFILE)
        if env:
            path = env
        else:
            return builtin_profile(detect_device_class(Sysfs(sysfs_root)))
    p = Path(path)
    if not p.is_file():
        if str(path) in DEVICE_CLASSES:
            return builtin_profile(str(path))
        raise FileNotFoundError(f"device profile {str(path)!r} is neither a file nor a device class ({', '.join(DEVICE_CLASSES)})")
    kw = _parse(_load_toml(p), str(p))
    cls = kw.get("device_class") or detect_device_class(Sysfs(sysfs_root))
    base = builtin_profile(cls) if cls in DEVICE_CLASSES else DeviceProfile(name=cls, device_class=cls)
    merged = asdict(base)
    merged.update(kw)
    merged["name"] = kw.get("name", p.stem)
    merged["source"] = str(p)
    return DeviceProfile(**merged)
