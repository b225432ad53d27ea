"""Per-device energy profiles: joules and seconds per sample-pass, per (device, power mode, model).

Every client execution reports its device seconds, its energy (with the meter's source and
``estimated`` flag) and its sample-passes. :class:`EnergyProfiles` keeps, per
``(device, mode, model, kind)``, two running estimates — J per sample-pass and s per sample-pass —
each with its mean, spread and count (Welford's online algorithm; two profiles merge with Chan et
al.'s pairwise update), and predicts a round's cost from them.

``kind`` keeps energy of different nature apart; it is never mixed without saying so:

* ``metered``     a meter measured it (Jetson rails, NVML, RAPL);
* ``estimated``   the ``estimate`` meter's model of CPU energy (``estimated: true``);
* ``model:fleet`` the simulated fleet's model (:mod:`fmtl_edge.fleet`).

Each kind is its own entry. :meth:`EnergyProfiles.predict` uses the first kind of its preference
order that has an estimate (metered first by default) and says which in :attr:`Prediction.source`.

Each observation is one execution's rate (``energy_j / sample_passes``), unweighted: the spread is
the spread between executions. An execution with unknown energy (``None``, e.g. the ``null``
meter) adds to the seconds estimate only. ``to_dict``/``from_dict`` are JSON-ready (for the
server's store and the Flower pool state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

KINDS = ("metered", "estimated", "model:fleet")
DEFAULT_PREFERENCE = ("metered", "estimated", "model:fleet")
UNKNOWN_MODE = "unknown"
FORMAT_VERSION = 1


def source_kind(source: str | None, estimated: bool) -> str:
    """The kind of an energy record: ``model:fleet`` for a fleet source, ``estimated`` when the
    meter says so, else ``metered``."""
    if source and str(source).startswith("model:fleet"):
        return "model:fleet"
    return "estimated" if estimated else "metered"


@dataclass
class Estimate:
    """A running mean and spread (Welford): ``n`` observations, ``mean``, ``m2`` = Σ (x − mean)²."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        """Add one observation (finite; others are ignored)."""
        x = float(x)
        if not math.isfinite(x):
            return
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1); 0 below two observations."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def merged(self, other: "Estimate") -> "Estimate":
        """The estimate of both samples together (Chan, Golub & LeVeque's pairwise update)."""
        if other.n == 0:
            return Estimate(self.n, self.mean, self.m2)
        if self.n == 0:
            return Estimate(other.n, other.mean, other.m2)
        n = self.n + other.n
        d = other.mean - self.mean
        return Estimate(n, self.mean + d * other.n / n, self.m2 + other.m2 + d * d * self.n * other.n / n)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Estimate":
        return cls(int(d["n"]), float(d["mean"]), float(d["m2"]))


@dataclass
class ProfileEntry:
    """One (device, mode, model, kind): J and s per sample-pass, sample-passes seen, the last source."""

    j_per_pass: Estimate = field(default_factory=Estimate)
    s_per_pass: Estimate = field(default_factory=Estimate)
    sample_passes: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"j_per_pass": self.j_per_pass.to_dict(), "s_per_pass": self.s_per_pass.to_dict(),
                "sample_passes": self.sample_passes, "source": self.source}


@dataclass(frozen=True)
class Prediction:
    """A predicted client execution: ``device_s`` (s) and ``energy_j`` (J) for the asked sample-passes,
    the kind of energy it rests on (``source``: metered | estimated | model:fleet), ``n`` energy
    observations, and the per-pass spreads (``energy_std_j``, ``device_std_s`` scaled to the passes)."""

    device_s: float
    energy_j: float
    source: str
    n: int
    energy_std_j: float = 0.0
    device_std_s: float = 0.0


Key = tuple[str, str, str, str]  # (device, mode, model, kind)


class EnergyProfiles:
    """Energy profiles of a set of devices (see the module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[Key, ProfileEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def observe(self, device: str, mode: str | None, model: str, sample_passes: int, device_s: float,
                energy_j: float | None, source: str, estimated: bool = False) -> bool:
        """Add one client execution.

        Args:
            device: the device id (agent / fleet device name).
            mode: its power mode by name (None: ``unknown``).
            model: the model key (e.g. ``uci-har/mlp-w256``): joules per pass depend on it.
            sample_passes: the execution's sample-passes (forward + backward per sample).
            device_s: its seconds; energy_j: its joules (None: unknown, seconds only).
            source, estimated: the energy record's ``source`` and ``estimated`` (see :func:`source_kind`).

        Returns:
            False when the execution did no sample-pass (nothing to learn), else True.
        """
        if sample_passes <= 0:
            return False
        key = (str(device), str(mode) if mode else UNKNOWN_MODE, str(model), source_kind(source, estimated))
        e = self.entries.setdefault(key, ProfileEntry())
        if device_s is not None and math.isfinite(float(device_s)) and device_s >= 0:
            e.s_per_pass.add(float(device_s) / sample_passes)
        if energy_j is not None and math.isfinite(float(energy_j)) and energy_j >= 0:
            e.j_per_pass.add(float(energy_j) / sample_passes)
        e.sample_passes += int(sample_passes)
        e.source = str(source or "")
        return True

    def observe_record(self, device: str, model: str, sample_passes: int, device_s: float,
                       energy: Mapping[str, Any], mode: str | None = None) -> bool:
        """:meth:`observe` from an energy record (``ClientUpdate.energy``: ``total_j``, ``source``,
        ``estimated``, ``power_mode``); ``mode`` overrides the record's ``power_mode``."""
        return self.observe(device, mode if mode is not None else energy.get("power_mode"), model, sample_passes,
                            device_s, energy.get("total_j"), str(energy.get("source") or ""),
                            bool(energy.get("estimated", False)))

    def entry(self, device: str, mode: str | None, model: str, kind: str) -> ProfileEntry | None:
        return self.entries.get((str(device), str(mode) if mode else UNKNOWN_MODE, str(model), kind))

    def predict(self, device: str, mode: str | None, model: str, sample_passes: int,
                prefer: Iterable[str] = DEFAULT_PREFERENCE) -> Prediction | None:
        """The predicted cost of ``sample_passes`` on ``device`` in ``mode`` for ``model``.

        Uses the first kind of ``prefer`` whose entry has at least one energy observation (default:
        metered, then estimated, then model:fleet); kinds are never averaged together.

        Returns:
            A :class:`Prediction` (``source`` = the kind used), or None when no kind has energy.

        Raises:
            ValueError: an unknown kind in ``prefer``.
        """
        for kind in prefer:
            if kind not in KINDS:
                raise ValueError(f"unknown energy kind {kind!r}; known: {', '.join(KINDS)}")
            e = self.entry(device, mode, model, kind)
            if e is None or e.j_per_pass.n == 0:
                continue
            p = float(sample_passes)
            s = e.s_per_pass
            return Prediction(device_s=s.mean * p, energy_j=e.j_per_pass.mean * p, source=kind, n=e.j_per_pass.n,
                              energy_std_j=e.j_per_pass.std * p, device_std_s=s.std * p)
        return None

    def modes_of(self, device: str, model: str | None = None) -> list[str]:
        """The modes a device has been observed in (sorted)."""
        return sorted({k[1] for k in self.entries if k[0] == device and (model is None or k[2] == model)})

    def merge(self, other: "EnergyProfiles") -> "EnergyProfiles":
        """A new profile set with both sets' observations (entry by entry, kinds kept apart)."""
        out = EnergyProfiles()
        for src in (self, other):
            for k, e in src.entries.items():
                cur = out.entries.get(k)
                if cur is None:
                    out.entries[k] = ProfileEntry(Estimate(**vars(e.j_per_pass)), Estimate(**vars(e.s_per_pass)),
                                                  e.sample_passes, e.source)
                else:
                    out.entries[k] = ProfileEntry(cur.j_per_pass.merged(e.j_per_pass), cur.s_per_pass.merged(e.s_per_pass),
                                                  cur.sample_passes + e.sample_passes, e.source or cur.source)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"version": 1, "entries": [{device, mode, model, kind, j_per_pass, s_per_pass,
        sample_passes, source}, ...]}`` sorted by key."""
        rows = []
        for k in sorted(self.entries):
            d = {"device": k[0], "mode": k[1], "model": k[2], "kind": k[3]}
            d.update(self.entries[k].to_dict())
            rows.append(d)
        return {"version": FORMAT_VERSION, "entries": rows}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EnergyProfiles":
        """The inverse of :meth:`to_dict`.

        Raises:
            ValueError: another format version, an unknown kind or a malformed entry.
        """
        if int(d.get("version", -1)) != FORMAT_VERSION:
            raise ValueError(f"energy profiles: format version {d.get('version')!r}, expected {FORMAT_VERSION}")
        out = cls()
        for row in d.get("entries", []):
            try:
                kind = str(row["kind"])
                if kind not in KINDS:
                    raise ValueError(f"unknown energy kind {kind!r}")
                key = (str(row["device"]), str(row["mode"]), str(row["model"]), kind)
                out.entries[key] = ProfileEntry(Estimate.from_dict(row["j_per_pass"]), Estimate.from_dict(row["s_per_pass"]),
                                                int(row.get("sample_passes", 0)), str(row.get("source", "")))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"energy profiles: malformed entry {row!r} ({exc})") from None
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One line per entry for status displays: device, mode, model, kind, J/pass ± std, s/pass ± std, n."""
        out = []
        for k in sorted(self.entries):
            e = self.entries[k]
            out.append({"device": k[0], "mode": k[1], "model": k[2], "kind": k[3],
                        "j_per_pass": e.j_per_pass.mean if e.j_per_pass.n else None, "j_std": e.j_per_pass.std,
                        "s_per_pass": e.s_per_pass.mean if e.s_per_pass.n else None, "s_std": e.s_per_pass.std,
                        "n": e.j_per_pass.n, "sample_passes": e.sample_passes})
        return out
