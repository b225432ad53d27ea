"""Status of the remote pool (what ``GetStatus`` and ``fmtl-server status`` show): counters,
refused calls per device, the running round's timing, and the view that puts them together."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fmtl_edge.transport.registry import Registry

#: the pool's counters, in the order ``status`` shows them
COUNTERS = ("updates_accepted", "updates_rejected", "replacements", "failures", "rounds_extended",
            "registrations_refused")


class PoolCounters:
    """Event counters and refused calls per device (its token's name), with their own lock.

    Attributes:
        values: counter name → count (``updates_accepted``, ``updates_rejected``, ``replacements``,
            ``failures``, ``rounds_extended``, ``registrations_refused``); a live dict.
        refusals: device → ``{"total", "by_rpc": {rpc: count}, "last"}``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, int] = {k: 0 for k in COUNTERS}
        self.refusals: dict[str, dict[str, Any]] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + n

    def count_refusal(self, device: str, rpc: str, reason: str) -> None:
        """Count a refused call of ``device`` (its token's name) to ``rpc`` (shown by ``status``)."""
        with self._lock:
            r = self.refusals.setdefault(device, {"total": 0, "by_rpc": {}, "last": ""})
            r["total"] += 1
            r["by_rpc"][rpc] = r["by_rpc"].get(rpc, 0) + 1
            r["last"] = f"{rpc}: {reason}"[:300]

    def snapshot(self) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """Copies of (counters, refusals by device, sorted)."""
        with self._lock:
            return (dict(self.values),
                    {k: {**v, "by_rpc": dict(v["by_rpc"])} for k, v in sorted(self.refusals.items())})


class RoundInfo:
    """Timing of the running (or last) round over the devices: when its model file was written, its
    first and last update arrived, seconds spent validating and aggregating.

    Attributes:
        values: ``job``, ``round``, ``slots``, ``started_unix_s``, ``model_write_s``, ``first_update_s``,
            ``last_update_s``, ``validate_s`` (sum), ``consumer_s`` (the aggregation's time with the
            updates, sum); keys starting with ``_`` are internal. Replaced at each round's start.
    """

    def __init__(self):
        self.values: dict[str, Any] = {}

    def start(self, job: str, rnd: int, slots: int, model_write_s: float) -> None:
        self.values = {"job": job, "round": rnd, "slots": slots, "started_unix_s": time.time(),
                       "model_write_s": model_write_s, "first_update_s": None, "last_update_s": None,
                       "validate_s": 0.0, "yield_wait_s": 0.0, "_t0": time.monotonic()}

    def add_validation(self, seconds: float) -> None:
        ri = self.values
        if ri.get("_t0") is not None:
            ri["validate_s"] = ri.get("validate_s", 0.0) + seconds

    def add_consumer(self, seconds: float) -> None:
        self.values["consumer_s"] = self.values.get("consumer_s", 0.0) + seconds

    def update_arrived(self) -> None:
        ri = self.values
        if ri.get("_t0") is not None:
            since = time.monotonic() - ri["_t0"]
            ri["first_update_s"] = since if ri.get("first_update_s") is None else ri["first_update_s"]
            ri["last_update_s"] = since

    def view(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if not k.startswith("_")}


class StatusView:
    """The pool's status: devices, counters, refusals and the round's timing.

    Args:
        server_id: this server process's id.
        registry: the devices.
        counters: the counters and refusals.
        timing: the round's timing.
    """

    def __init__(self, server_id: str, registry: "Registry", counters: PoolCounters, timing: RoundInfo):
        self.server_id = server_id
        self.registry = registry
        self.counters = counters
        self.timing = timing

    def status(self) -> dict[str, Any]:
        devices = self.registry.device_status()
        counters, refusals = self.counters.snapshot()
        return {"server_id": self.server_id, "devices": devices, "counters": counters, "refusals": refusals,
                "round": self.timing.view()}
