"""Status of the remote pool (what ``GetStatus`` and ``fmtl-server status`` show)."""

from __future__ import annotations

import time
from typing import Any


class StatusMixin:
    """Status (part of :class:`~fmtl_edge.transport.pool.RemoteClientPool`)."""

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cv:
            return {
                "server_id": self.server_id,
                "devices": [d.to_status(now, self.policy.heartbeat_timeout_s) for d in
                            (self._devices[c] for c in sorted(self._devices))],
                "counters": dict(self.counters),
                "round": {k: v for k, v in self.round_info.items() if not k.startswith("_")},
            }

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
