"""What a meter window returns: wall time, joules per domain, a total with its scope.

Vocabulary (documented once, used everywhere):

``total_scope`` -- the physical boundary the total covers:
    ``board_input``   the whole board at its power input (Jetson ``VDD_IN`` / ``POM_5V_IN``)
    ``sum_of_rails``  the sum of the module's top-level rails (Jetson boards without an input rail:
                      AGX Xavier, AGX Orin); sub-rails are never part of it
    ``gpu_device``    the GPU(s) as NVML sees them
    ``cpu_package``   the CPU package(s) as RAPL sees them (DRAM is a separate domain, not in it)
    ``none``          no physical boundary: the ``null`` meter (total unknown) and the ``estimate``
                      meter (a model of this process's CPU energy, always ``estimated=True``)

``DomainEnergy.method`` -- ``counter`` (a hardware energy counter, differenced), ``integrated``
(power samples integrated with the trapezoid rule), ``estimated`` (a model, not a measurement).

``DomainEnergy.scope`` -- ``board_input``, ``rail`` (a top-level rail summed into
``sum_of_rails``), ``sub_rail`` (downstream of the board input, never added to a total),
``gpu_device``, ``cpu_package``, ``dram``, ``process_cpu`` (estimate of this process's CPU energy).

Unknown energy is ``None``, never ``0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

TOTAL_SCOPES = ("board_input", "sum_of_rails", "gpu_device", "cpu_package", "none")
METHODS = ("counter", "integrated", "estimated")


@dataclass
class DomainEnergy:
    """Energy of one domain (a rail, a GPU, a CPU package, ...) over one window."""

    domain: str
    joules: float
    method: str  # "counter" | "integrated" | "estimated"
    source: str
    scope: str
    in_total: bool = False  # whether this domain is part of Measurement.total_j

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "joules": self.joules,
            "method": self.method,
            "source": self.source,
            "scope": self.scope,
            "in_total": self.in_total,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DomainEnergy":
        return cls(
            domain=str(d["domain"]),
            joules=float(d["joules"]),
            method=str(d["method"]),
            source=str(d["source"]),
            scope=str(d["scope"]),
            in_total=bool(d.get("in_total", False)),
        )


@dataclass
class Measurement:
    """Time and energy of one window (or of several sequential windows, see :meth:`combine`)."""

    wall_s: float
    total_j: float | None
    total_scope: str = "none"
    estimated: bool = False
    source: str = ""
    domains: list[DomainEnergy] = field(default_factory=list)
    sample_hz: float | None = None
    power_mode: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.total_scope not in TOTAL_SCOPES:
            raise ValueError(f"total_scope must be one of {TOTAL_SCOPES}, got {self.total_scope!r}")

    # -- views ---------------------------------------------------------------------------------
    def domain(self, name: str) -> DomainEnergy | None:
        """The domain called ``name`` (``"VDD_IN"``, ``"package-0"``, ``"gpu:0"``...), or None."""
        for d in self.domains:
            if d.domain == name:
                return d
        return None

    @property
    def mean_power_w(self) -> float | None:
        if self.total_j is None or self.wall_s <= 0:
            return None
        return self.total_j / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (keys: wall_s, total_j, total_scope, estimated, source, domains,
        sample_hz, power_mode, warnings)."""
        return {
            "wall_s": self.wall_s,
            "total_j": self.total_j,
            "total_scope": self.total_scope,
            "estimated": self.estimated,
            "source": self.source,
            "domains": [d.to_dict() for d in self.domains],
            "sample_hz": self.sample_hz,
            "power_mode": self.power_mode,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Measurement":
        return cls(
            wall_s=float(d["wall_s"]),
            total_j=None if d.get("total_j") is None else float(d["total_j"]),
            total_scope=str(d.get("total_scope", "none")),
            estimated=bool(d.get("estimated", False)),
            source=str(d.get("source", "")),
            domains=[DomainEnergy.from_dict(x) for x in d.get("domains", [])],
            sample_hz=None if d.get("sample_hz") is None else float(d["sample_hz"]),
            power_mode=d.get("power_mode"),
            warnings=[str(w) for w in d.get("warnings", [])],
        )

    # -- arithmetic ------------------------------------------------------------------------------
    @staticmethod
    def combine(measurements: Iterable["Measurement"]) -> "Measurement":
        """Sum of sequential windows (e.g. every client execution of one method).

        Wall seconds and joules add; the total is None as soon as one window's total is None;
        ``estimated`` is True if any window was estimated; sources, power modes and warnings are
        merged (distinct values, in order). Domains with the same (domain, method, source, scope)
        add up; a domain missing from some windows is summed over the windows that have it, with a
        warning. Mixed total scopes give ``total_scope="none"`` and a warning (adding a board total
        to a GPU total means nothing physical).
        """
        ms = list(measurements)
        if not ms:
            return Measurement(wall_s=0.0, total_j=None, warnings=["no measurements to combine"])
        warnings: list[str] = []

        def add_warning(w: str) -> None:
            if w not in warnings:
                warnings.append(w)

        wall = sum(m.wall_s for m in ms)
        total: float | None = 0.0
        for m in ms:
            if m.total_j is None:
                total = None
                break
            total += m.total_j  # type: ignore[operator]
        scopes = _distinct(m.total_scope for m in ms)
        if len(scopes) == 1:
            scope = scopes[0]
        else:
            scope = "none"
            add_warning(f"combined windows have different total scopes {scopes}: total_scope set to 'none'")
        keys: list[tuple[str, str, str, str]] = []
        acc: dict[tuple[str, str, str, str], list] = {}
        for m in ms:
            for d in m.domains:
                k = (d.domain, d.method, d.source, d.scope)
                if k not in acc:
                    keys.append(k)
                    acc[k] = [0.0, 0, d.in_total]
                acc[k][0] += d.joules
                acc[k][1] += 1
                acc[k][2] = acc[k][2] and d.in_total
        domains = []
        for k in keys:
            joules, count, in_total = acc[k]
            if count != len(ms):
                add_warning(f"domain {k[0]} present in {count} of {len(ms)} windows; its joules cover only those")
            domains.append(DomainEnergy(k[0], joules, k[1], k[2], k[3], in_total))
        hz = [m.sample_hz for m in ms if m.sample_hz is not None]
        modes = _distinct(m.power_mode for m in ms if m.power_mode is not None)
        for m in ms:
            for w in m.warnings:
                add_warning(w)
        return Measurement(
            wall_s=wall,
            total_j=total,
            total_scope=scope,
            estimated=any(m.estimated for m in ms),
            source="; ".join(_distinct(m.source for m in ms if m.source)),
            domains=domains,
            sample_hz=min(hz) if hz else None,
            power_mode=(modes[0] if len(modes) == 1 else ("mixed: " + ", ".join(modes)) if modes else None),
            warnings=warnings,
        )

    def __add__(self, other: "Measurement") -> "Measurement":
        return Measurement.combine([self, other])


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out
