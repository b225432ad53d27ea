"""Overall progress of a job over devices: rounds done of the rounds planned, and an ETA.

The rounds planned are the sum of the methods' :meth:`~fmtl_edge.methods.base.Method.planned_rounds`
(every job of every method); the ETA extrapolates this server session's wall seconds per completed
round (waiting for devices, training, transfers and aggregation included; the final evaluations
are not counted).
"""

from __future__ import annotations

import time
from typing import Any, Callable


class Progress:
    """Rounds done over every method's jobs, and when the last one should end. Only committed rounds
    count (a failed round retried is counted once).

    Args:
        planned: rounds planned over all methods (≥ 0).
        clock: monotonic seconds (tests).
        wall: epoch seconds (tests).
    """

    def __init__(self, planned: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.planned = max(0, int(planned))
        self.session_rounds = 0
        self._done: dict[str, int] = {}
        self._clock = clock
        self._wall = wall
        self._t0 = clock()

    @property
    def done(self) -> int:
        return sum(self._done.values())

    def resumed(self, method: str, rounds: int) -> None:
        """``method`` has ``rounds`` committed rounds (a resumed job, or a round retried from its last
        checkpoint): set, not added."""
        self._done[method] = max(0, int(rounds))

    def round_done(self, method: str) -> None:
        """A round of ``method`` was committed."""
        self._done[method] = self._done.get(method, 0) + 1
        self.session_rounds += 1

    def eta_s(self, pending: int = 0) -> float | None:
        """Seconds until the last planned round ends, counting ``pending`` rounds done but not yet
        committed (None: no round done in this session yet)."""
        rounds = self.session_rounds + pending
        if rounds == 0:
            return None
        per = (self._clock() - self._t0) / rounds
        return max(0, self.planned - self.done - pending) * per

    def as_dict(self, pending: int = 0) -> dict[str, Any]:
        """``rounds_done``, ``rounds_planned``, ``percent``, ``eta_s``, ``eta_unix_s`` (None: unknown yet)."""
        eta = self.eta_s(pending)
        done = self.done + pending
        return {"rounds_done": done, "rounds_planned": self.planned,
                "percent": round(100.0 * done / self.planned, 1) if self.planned else None,
                "eta_s": None if eta is None else round(eta, 1),
                "eta_unix_s": None if eta is None else round(self._wall() + eta, 1)}

    def text(self, pending: int = 0) -> str:
        """``12/40 rounds (30%), ETA 14:32 (in 3 min)`` (the ETA once a round of this session is done)."""
        d = self.as_dict(pending)
        out = f"{d['rounds_done']}/{d['rounds_planned']} rounds"
        if d["percent"] is not None:
            out += f" ({d['percent']:.0f}%)"
        if d["eta_s"] is not None and d["rounds_done"] < d["rounds_planned"]:
            out += f", ETA {time.strftime('%H:%M', time.localtime(d['eta_unix_s']))} (in {_duration(d['eta_s'])})"
        return out


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
