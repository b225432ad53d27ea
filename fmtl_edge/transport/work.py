"""Work of the remote pool: a round's slots and the work items handed to devices (the work book).

A *slot* is one sampled client's place in a round (its assignment, the devices tried, its result);
a *work item* is one attempt at a slot by one device. The :class:`WorkBook` keeps every item by id
after its round, so that a late heartbeat or upload is answered with what became of it.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fmtl_edge.messages import Assignment

if TYPE_CHECKING:
    from fmtl_edge.transport.model_files import ModelFile
    from fmtl_edge.transport.scheduler import RoundPolicy
    from fmtl_edge.transport.status import PoolCounters


@dataclass
class Slot:
    index: int
    sampled: int
    assignment: Assignment
    kind: str = "train"
    replaceable: bool = True
    tried: list[int] = field(default_factory=list)
    item: "WorkItem | None" = None
    result: Any = None               # ClientUpdate (train) or eval dict (evaluate)
    update_norm: float | None = None  # the result's L2 distance to the global model (train)
    failed: str | None = None        # why the slot gave up
    waiting_since: float = 0.0
    done: bool = False


@dataclass
class WorkItem:
    work_id: str
    kind: str
    client_id: int
    slot: Slot
    model: "ModelFile"
    deadline_s: float | None
    status: str = "queued"           # queued | running | done | failed | cancelled
    issued_at: float = 0.0
    reason: str = ""
    update_norm: float | None = None  # set by validation: the upload's L2 distance to the global model


class WorkBook:
    """Every work item handed out, by work id.

    Args:
        cv: the pool's condition; the methods marked *(lock held)* are called holding it, and every
            change is announced with ``cv.notify_all()``.
        server_id: prefix of the work ids (a restarted server's ids differ).
        policy: the pool's :class:`~fmtl_edge.transport.scheduler.RoundPolicy` (``max_attempts``).
        counters: the pool's :class:`~fmtl_edge.transport.status.PoolCounters` (``failures``).
    """

    def __init__(self, cv: threading.Condition, server_id: str, policy: "RoundPolicy", counters: "PoolCounters"):
        self._cv = cv
        self.server_id = server_id
        self.policy = policy
        self.counters = counters
        self._items: dict[str, WorkItem] = {}
        self._ids = itertools.count()

    def get(self, work_id: str) -> WorkItem | None:
        """The item ``work_id`` (None: unknown or pruned). *(lock held)*"""
        return self._items.get(work_id)

    def new(self, slot: Slot, client_id: int, model: "ModelFile", deadline_s: float | None) -> WorkItem:
        """A fresh item for ``slot`` on ``client_id``'s device (the slot now waits for it). *(lock held)*"""
        wid = f"{self.server_id}-{next(self._ids)}"
        item = WorkItem(wid, slot.kind, client_id, slot, model, deadline_s)
        self._items[wid] = item
        slot.item = item
        slot.tried.append(client_id)
        return item

    def fail(self, item: WorkItem, reason: str) -> None:
        """The item failed (device failure, silence, refused update): its slot waits for a
        replacement, or gives up when it may not be replaced or ran out of attempts. *(lock held)*"""
        if item.status in ("done", "failed", "cancelled"):
            return
        item.status = "failed"
        item.reason = reason
        self.counters.add("failures")
        slot = item.slot
        if slot.item is item:
            slot.item = None
            slot.waiting_since = time.monotonic()
            if not slot.replaceable or len(slot.tried) >= self.policy.max_attempts:
                slot.failed = reason
                slot.done = True
        self._cv.notify_all()

    def cancel(self, item: WorkItem, reason: str) -> bool:
        """The round no longer needs the item; False when it had ended already. The caller takes it
        out of its device's queue. *(lock held)*"""
        if item.status in ("done", "failed", "cancelled"):
            return False
        item.status = "cancelled"
        item.reason = reason
        if item.slot.item is item:
            item.slot.item = None
        return True

    def prune(self, keep: int = 20000) -> None:
        """Forget the oldest finished items beyond ``keep``. *(lock held)*"""
        if len(self._items) <= keep:
            return
        for wid in list(self._items)[: len(self._items) - keep // 2]:
            if self._items[wid].status not in ("queued", "running"):
                del self._items[wid]

    def why_not(self, work_id: str) -> str:
        """Why work ``work_id`` takes no upload (for the device's log)."""
        with self._cv:
            item = self._items.get(work_id)
            if item is None:
                return f"unknown work {work_id!r} (the server restarted?)"
            if item.status == "cancelled":
                return f"update arrived too late: {item.reason}"
            if item.status == "failed":
                return f"work {work_id} was given up: {item.reason}"
            if item.status == "done":
                return f"work {work_id} was already answered"
            return f"work {work_id} is not this session's"
