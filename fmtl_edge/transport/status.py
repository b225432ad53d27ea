"""Status of the remote pool (what ``GetStatus`` and ``fmtl-server status`` show)."""

from __future__ import annotations

import time
from typing import Any


class StatusMixin:
    """Status (part of :class:`~fmtl_edge.transport.pool.RemoteClientPool`)."""

    def count_refusal(self, device: str, rpc: str, reason: str) -> None:
        """Count a refused call of ``device`` (its token's name) to ``rpc`` (shown by ``status``)."""
        with self._cv:
            r = self.refusals.setdefault(device, {"total": 0, "by_rpc": {}, "last": ""})
            r["total"] += 1
            r["by_rpc"][rpc] = r["by_rpc"].get(rpc, 0) + 1
            r["last"] = f"{rpc}: {reason}"[:300]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cv:
            return {
                "server_id": self.server_id,
                "devices": [d.to_status(now, self.policy.heartbeat_timeout_s) for d in
                            (self._devices[c] for c in sorted(self._devices))],
                "counters": dict(self.counters),
                "refusals": {k: {**v, "by_rpc": dict(v["by_rpc"])} for k, v in sorted(self.refusals.items())},
                "round": {k: v for k, v in self.round_info.items() if not k.startswith("_")},
            }

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
