"""A simulated device fleet: device time and energy of client executions from a model, not a meter.

``--fleet FILE.toml|NAME`` describes device kinds (``NAME`` is a file shipped in
``fmtl_edge/fleets/``, e.g. ``orin-mix``)::

    name = "orin-mix"
    sample_passes_per_s = 1000.0        # sample-passes per second of a device at speed 1.0
    [model_rates]                       # optional: model key -> sample-passes/s at speed 1.0
    "utkface" = 400.0

    [[kind]]
    name = "orin-nano-8gb"
    count = 8                           # devices of this kind
    idle_w = 3.0                        # W of a device at rest
    default_mode = "25W"                # the mode it is in when nobody switches (--power-mode keep)
    round_energy_j = 30.0               # energy budget per round, per device (omit: none)
    run_energy_j = 600.0                # energy budget per run, per device (omit: none)
      [[kind.mode]]
      name = "15W"                      # the nvpmodel name
      speed = 0.349                     # relative throughput (1.0 = sample_passes_per_s)
      watts = 9.93                      # W under training load in this mode

The kinds expand, in file order, to N devices (``count`` each); client ``k`` runs on device
``k mod N``.

The model (deterministic, whatever load the simulating machine is under):

* ``device_s = sample_passes / (speed × rate)`` with ``rate`` the model's ``[model_rates]`` entry or
  ``sample_passes_per_s``;
* ``energy_j = watts × device_s`` — ``watts`` is the whole board under training load in that mode
  (idle power included), so a client execution's joules are the board's joules while it trains;
* a device that finishes before the round's slowest one idles; :meth:`Fleet.idle_energy_j` prices
  that wait at ``idle_w`` for callers that report it, separately (it is in no client's energy).

Results are labelled with :data:`FLEET_SOURCE` (``model:fleet``): never presented as measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fmtl_edge.config import ConfigError

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

FLEETS_DIR = Path(__file__).with_name("fleets")
FLEET_SOURCE = "model:fleet"
FLAG = "--fleet"


@dataclass(frozen=True)
class FleetMode:
    """One power mode of a device kind: ``watts`` (W under training load) and ``speed`` (relative
    throughput; sample-passes/s = speed × the fleet's rate)."""

    name: str
    watts: float
    speed: float

    def j_per_unit(self) -> float:
        """Joules per unit of work (``watts / speed``): the mode's energy per sample up to the rate."""
        return self.watts / self.speed


@dataclass(frozen=True)
class DeviceKind:
    """A kind of device of the fleet file (see the module docstring)."""

    name: str
    modes: tuple[FleetMode, ...]  # slowest first
    idle_w: float
    default_mode: str
    count: int = 1
    round_energy_j: float | None = None
    run_energy_j: float | None = None

    def mode(self, name: str) -> FleetMode:
        """The mode called ``name``.

        Raises:
            KeyError: no such mode (lists the kind's modes).
        """
        for m in self.modes:
            if m.name == name:
                return m
        raise KeyError(f"device kind {self.name!r} has no power mode {name!r}; modes: "
                       f"{', '.join(m.name for m in self.modes)}")


@dataclass(frozen=True)
class Device:
    """One device of the fleet: ``index`` in 0..N-1, ``name`` ``<kind>-<k>`` (k-th of its kind)."""

    index: int
    name: str
    kind: DeviceKind

    @property
    def modes(self) -> tuple[FleetMode, ...]:
        """The kind's modes, slowest first (ties: file order)."""
        return self.kind.modes

    @property
    def mode_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.kind.modes)

    @property
    def max_mode(self) -> FleetMode:
        """The fastest mode (the last of :attr:`modes`): what ``--power-mode max`` picks."""
        return self.kind.modes[-1]

    @property
    def default_mode(self) -> FleetMode:
        return self.kind.mode(self.kind.default_mode)

    def mode(self, name: str) -> FleetMode:
        return self.kind.mode(name)

    @property
    def idle_w(self) -> float:
        return self.kind.idle_w

    @property
    def round_energy_j(self) -> float | None:
        return self.kind.round_energy_j

    @property
    def run_energy_j(self) -> float | None:
        return self.kind.run_energy_j


@dataclass(frozen=True)
class Fleet:
    """A fleet of simulated devices (load it with :meth:`load`)."""

    name: str
    devices: tuple[Device, ...]
    sample_passes_per_s: float
    model_rates: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    description: str = ""

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str | Path) -> "Fleet":
        """The fleet of a TOML file, or of ``NAME`` shipped in ``fmtl_edge/fleets/NAME.toml``.

        Raises:
            ConfigError: (field ``--fleet``) no such file or shipped fleet (lists them), a TOML
                syntax error, or a bad field (named, with the fix).
        """
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_file():
            where = str(p)
        elif (FLEETS_DIR / f"{text}.toml").is_file() and "/" not in text:
            p = FLEETS_DIR / f"{text}.toml"
            where = f"builtin:{text}"
        else:
            raise ConfigError(FLAG, f"{text!r} is neither a TOML file nor a shipped fleet "
                                    f"({', '.join(shipped_fleets()) or 'none'})")
        try:
            with open(p, "rb") as f:
                data = _toml.load(f)
        except _toml.TOMLDecodeError as exc:
            raise ConfigError(FLAG, f"{p}: not valid TOML ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<dict>") -> "Fleet":
        """A fleet from the TOML's dict (see the module docstring for the keys).

        Raises:
            ConfigError: (field ``--fleet``) a missing, unknown or out-of-range key, named with where.
        """
        data = dict(data)
        known = {"name", "description", "sample_passes_per_s", "model_rates", "kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(FLAG, f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        rate = _positive(data.get("sample_passes_per_s"), f"{where}: sample_passes_per_s")
        rates_raw = data.get("model_rates", {}) or {}
        if not isinstance(rates_raw, Mapping):
            raise ConfigError(FLAG, f"{where}: [model_rates] must be a table of model key = sample-passes/s")
        rates = {str(k): _positive(v, f"{where}: model_rates.{k}") for k, v in rates_raw.items()}
        kinds_raw = data.get("kind")
        if not isinstance(kinds_raw, list) or not kinds_raw:
            raise ConfigError(FLAG, f"{where}: no [[kind]] tables: describe at least one device kind")
        kinds = [_kind(k, f"{where}: kind {i}") for i, k in enumerate(kinds_raw)]
        names = [k.name for k in kinds]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(FLAG, f"{where}: device kinds named twice: {dup}")
        devices: list[Device] = []
        for k in kinds:
            for j in range(k.count):
                devices.append(Device(len(devices), f"{k.name}-{j}", k))
        return cls(name=str(data.get("name", Path(where).stem)), devices=tuple(devices), sample_passes_per_s=rate,
                   model_rates=rates, source=where, description=str(data.get("description", "")))

    # -- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.devices)

    @property
    def kinds(self) -> list[DeviceKind]:
        out: list[DeviceKind] = []
        for d in self.devices:
            if d.kind not in out:
                out.append(d.kind)
        return out

    def device_of(self, client_id: int) -> Device:
        """The device client ``client_id`` runs on: device ``client_id mod N``.

        Raises:
            ValueError: a negative client id.
        """
        if int(client_id) < 0:
            raise ValueError(f"client ids are >= 0, got {client_id}")
        return self.devices[int(client_id) % len(self.devices)]

    def device(self, name: str) -> Device:
        """The device called ``name`` (``orin-nano-8gb-3``).

        Raises:
            KeyError: no such device.
        """
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"fleet {self.name!r} has no device {name!r}")

    def rate(self, model: str | None = None) -> float:
        """Sample-passes per second at speed 1.0 for ``model`` (its ``[model_rates]`` entry, else the default)."""
        if model is not None and model in self.model_rates:
            return float(self.model_rates[model])
        return float(self.sample_passes_per_s)

    def cost(self, client_id: int, mode: str | FleetMode | None, sample_passes: int,
             model: str | None = None) -> tuple[float, float]:
        """``(device_s, energy_j)`` of ``sample_passes`` on client ``client_id``'s device in ``mode``.

        ``device_s = passes / (speed × rate)``, ``energy_j = watts × device_s`` (see the module
        docstring); deterministic. ``mode`` None is the device's ``default_mode``.

        Raises:
            KeyError: the device has no such mode.
            ValueError: negative sample-passes.
        """
        if sample_passes < 0:
            raise ValueError(f"sample_passes must be >= 0, got {sample_passes}")
        dev = self.device_of(client_id)
        m = dev.default_mode if mode is None else (mode if isinstance(mode, FleetMode) else dev.mode(mode))
        device_s = float(sample_passes) / (m.speed * self.rate(model))
        return device_s, m.watts * device_s

    def idle_energy_j(self, client_id: int, wait_s: float) -> float:
        """Joules of client ``client_id``'s device idling ``wait_s`` seconds (``idle_w × wait_s``)."""
        return self.device_of(client_id).idle_w * max(0.0, float(wait_s))

    def energy_record(self, client_id: int, mode: str | None, sample_passes: int,
                      model: str | None = None) -> dict[str, Any]:
        """A client execution's energy record (the shape of ``Measurement.to_dict``) from the model:
        ``source`` ``model:fleet``, ``estimated`` True, the mode by name, no domains."""
        dev = self.device_of(client_id)
        name = dev.default_mode.name if mode is None else mode
        device_s, energy_j = self.cost(client_id, name, sample_passes, model)
        return {"wall_s": device_s, "total_j": energy_j, "total_scope": "none", "estimated": True,
                "source": f"{FLEET_SOURCE}:{self.name}", "device": dev.name, "domains": [], "sample_hz": None,
                "power_mode": name, "warnings": []}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for results files and ``describe`` lines)."""
        return {
            "name": self.name, "source": self.source, "description": self.description, "devices": len(self.devices),
            "sample_passes_per_s": self.sample_passes_per_s, "model_rates": dict(self.model_rates),
            "kinds": [{"name": k.name, "count": k.count, "idle_w": k.idle_w, "default_mode": k.default_mode,
                       "round_energy_j": k.round_energy_j, "run_energy_j": k.run_energy_j,
                       "modes": [{"name": m.name, "watts": m.watts, "speed": m.speed} for m in k.modes]}
                      for k in self.kinds],
        }


def shipped_fleets() -> list[str]:
    """Names of the fleets shipped in ``fmtl_edge/fleets/``."""
    return sorted(p.stem for p in FLEETS_DIR.glob("*.toml"))


def _positive(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(FLAG, f"{what} must be a positive number, got {v!r}")
    return float(v)


def _optional_positive(v: Any, what: str) -> float | None:
    return None if v is None else _positive(v, what)


def _kind(raw: Any, where: str) -> DeviceKind:
    if not isinstance(raw, Mapping):
        raise ConfigError(FLAG, f"{where}: must be a table")
    raw = dict(raw)
    known = {"name", "count", "idle_w", "default_mode", "round_energy_j", "run_energy_j", "mode"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(FLAG, f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(FLAG, f"{where}: name = \"...\" is required")
    where = f"{where} ({name})"
    count = raw.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(FLAG, f"{where}: count must be an integer >= 1, got {count!r}")
    idle_w = raw.get("idle_w", 0.0)
    if isinstance(idle_w, bool) or not isinstance(idle_w, (int, float)) or not math.isfinite(idle_w) or idle_w < 0:
        raise ConfigError(FLAG, f"{where}: idle_w must be a number >= 0, got {idle_w!r}")
    modes_raw = raw.get("mode")
    if not isinstance(modes_raw, list) or not modes_raw:
        raise ConfigError(FLAG, f"{where}: no [[kind.mode]] tables: give each power mode a name, speed and watts")
    modes: list[FleetMode] = []
    for j, m in enumerate(modes_raw):
        if not isinstance(m, Mapping) or set(m) - {"name", "speed", "watts"} or not isinstance(m.get("name"), str):
            raise ConfigError(FLAG, f"{where}: mode {j} must have exactly name, speed and watts")
        modes.append(FleetMode(m["name"], _positive(m.get("watts"), f"{where}: mode {m['name']} watts"),
                               _positive(m.get("speed"), f"{where}: mode {m['name']} speed")))
    mnames = [m.name for m in modes]
    if len(set(mnames)) != len(mnames):
        raise ConfigError(FLAG, f"{where}: a power mode is named twice in {mnames}")
    order = sorted(range(len(modes)), key=lambda i: (modes[i].speed, i))
    modes = [modes[i] for i in order]
    default = raw.get("default_mode", modes[-1].name)
    if default not in mnames:
        raise ConfigError(FLAG, f"{where}: default_mode {default!r} is not one of its modes {mnames}")
    return DeviceKind(name=name, modes=tuple(modes), idle_w=float(idle_w), default_mode=str(default), count=count,
                      round_energy_j=_optional_positive(raw.get("round_energy_j"), f"{where}: round_energy_j"),
                      run_energy_j=_optional_positive(raw.get("run_energy_j"), f"{where}: run_energy_j"))
