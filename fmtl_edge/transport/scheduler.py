"""The round scheduler of the remote pool: slots, work items, dispatch, replacement, deadlines."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.seeding import derive_seed
from fmtl_edge.plan import RoundFailed
from fmtl_edge.pool import refusal
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.transport.model_files import ModelFile, _page_out, release_free_heap
from fmtl_edge.transport.registry import Device, PoolClosed
from fmtl_edge.transport.tensors import MappedState

log = logging.getLogger("fmtl_edge.transport.pool")


@dataclass
class RoundPolicy:
    """How a round over remote devices waits, replaces and retries.

    Attributes:
        deadline_s: seconds a round waits for its updates (None: no deadline, wait for every slot).
        min_updates: fewest updates that let a round end at its deadline.
        max_attempts: devices tried per slot (the sampled one plus replacements).
        dispatch_wait_s: how long a sampled device that is offline or busy is waited for before its
            slot goes to a replacement; also how long a slot waits for any free device.
        deadline_retries: extensions of the deadline (sending missing slots to other devices)
            before the round fails.
        heartbeat_timeout_s: a device silent this long is offline and its work fails.
        eval_timeout_s: seconds an evaluation (final models on the devices' test splits) may take
            (None: ``deadline_s``).
    """

    deadline_s: float | None = None
    min_updates: int = 1
    max_attempts: int = 3
    dispatch_wait_s: float = 10.0
    deadline_retries: int = 2
    heartbeat_timeout_s: float = 10.0
    eval_timeout_s: float | None = None


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
    failed: str | None = None        # why the slot gave up
    waiting_since: float = 0.0
    done: bool = False


@dataclass
class WorkItem:
    work_id: str
    kind: str
    client_id: int
    slot: Slot
    model: ModelFile
    deadline_s: float | None
    status: str = "queued"           # queued | running | done | failed | cancelled
    issued_at: float = 0.0
    reason: str = ""



class SchedulerMixin:
    """Rounds over the devices (part of :class:`~fmtl_edge.transport.pool.RemoteClientPool`)."""

    def _fail_item(self, item: WorkItem, reason: str) -> None:
        if item.status in ("done", "failed", "cancelled"):
            return
        item.status = "failed"
        item.reason = reason
        self.counters["failures"] += 1
        slot = item.slot
        if slot.item is item:
            slot.item = None
            slot.waiting_since = time.monotonic()
            if not slot.replaceable or len(slot.tried) >= self.policy.max_attempts:
                slot.failed = reason
                slot.done = True
        self._cv.notify_all()

    def _cancel_item(self, item: WorkItem, reason: str) -> None:
        if item.status in ("done", "failed", "cancelled"):
            return
        item.status = "cancelled"
        item.reason = reason
        d = self._devices.get(item.client_id)
        if d is not None:
            if item in d.queue:
                d.queue.remove(item)
        if item.slot.item is item:
            item.slot.item = None

    def _prune_items(self, keep: int = 20000) -> None:
        if len(self._items) <= keep:
            return
        for wid in list(self._items)[: len(self._items) - keep // 2]:
            if self._items[wid].status not in ("queued", "running"):
                del self._items[wid]

    def _ready(self, d: Device, now: float) -> bool:
        return d.online(now, self.policy.heartbeat_timeout_s) and d.idle()

    def _issue(self, slot: Slot, d: Device, model: ModelFile, deadline_s: float | None) -> WorkItem:
        wid = f"{self.server_id}-{next(self._ids)}"
        item = WorkItem(wid, slot.kind, d.client_id, slot, model, deadline_s)
        self._items[wid] = item
        d.queue.append(item)
        d.state = "assigned"
        slot.item = item
        slot.tried.append(d.client_id)
        self._cv.notify_all()
        return item

    def _dispatch(self, slots: Sequence[Slot], models: Mapping[int, ModelFile], used: set[int],
                  job: str, rnd: int, deadline_s: float | None) -> None:
        now = time.monotonic()
        for slot in slots:
            if slot.done or slot.item is not None:
                continue
            model = models[slot.index]
            if not slot.tried:
                d = self._devices.get(slot.sampled)
                if d is not None and self._ready(d, now):
                    self._issue(slot, d, model, deadline_s)
                    used.add(d.client_id)
                    continue
                if not slot.replaceable or now - slot.waiting_since < self.policy.dispatch_wait_s:
                    if not slot.replaceable and now - slot.waiting_since >= self.policy.dispatch_wait_s:
                        slot.failed = f"client {slot.sampled} is offline or busy"
                        slot.done = True
                    continue
            if not slot.replaceable:
                continue
            # a replacement holds the tasks the sampled client holds (its task group, seed 000)
            orig = self._devices.get(slot.sampled)
            tasks = [t for t in slot.assignment.tasks if orig is None or orig.tasks.get(t, 0) > 0] or slot.assignment.tasks
            cands = sorted(c for c, d in self._devices.items()
                           if c not in used and self._ready(d, now) and all(d.tasks.get(t, 0) > 0 for t in tasks))
            if not cands:
                if now - slot.waiting_since >= self.policy.dispatch_wait_s * max(1, self.policy.max_attempts):
                    slot.failed = "no online idle device to take the slot"
                    slot.done = True
                continue
            rng = np.random.default_rng(derive_seed(self.seed, job, rnd, "replace", slot.index, len(slot.tried)))
            c = int(cands[int(rng.integers(len(cands)))])
            log.info("job %s round %d: client %d replaces client %d", job, rnd, c,
                     slot.tried[-1] if slot.tried else slot.sampled)
            self.counters["replacements"] += 1
            self._issue(slot, self._devices[c], model, deadline_s)
            used.add(c)

    # -- a round --------------------------------------------------------------------------------------
    def execute_many(self, work: Sequence[tuple[int, Assignment]], replaceable: bool = True) -> Iterator[ClientUpdate]:
        """Run one round's assignments on the devices; yield validated updates in slot order.

        ``replaceable = False``: a slot is served by the device holding its client or not at all (a
        failed, offline or busy device yields a refusal; no replacement)."""
        if not work:
            return
        slots = [Slot(i, int(cid), a, replaceable=replaceable, waiting_since=time.monotonic())
                 for i, (cid, a) in enumerate(work)]
        job, rnd = work[0][1].job, work[0][1].round
        files: dict[int, ModelFile] = {}
        by_state: dict[int, ModelFile] = {}
        t0 = time.monotonic()
        for s in slots:
            key = id(s.assignment.state)
            if key not in by_state:
                by_state[key] = self.write_model(s.assignment.state, f"{job}-r{rnd}")
            files[s.index] = by_state[key]
        for m in {id(s.assignment.state): s.assignment.state for s in slots}.values():
            _page_out(m)  # written to the model file: the global vector need not stay in RAM meanwhile
        yield from self._run_slots(slots, files, job, rnd, model_write_s=time.monotonic() - t0)

    def execute_in_turn(self, client_id: int, a: Assignment) -> Iterator[ClientUpdate]:
        """One visit of a sequential round (a ring node): only the device holding ``client_id`` may
        serve it. A ring node is a client: another device training its own client in that slot
        would train out of turn (perhaps twice in the round, as each visit is its own call) and
        break the ring order; a failed node is skipped by the coordinator instead."""
        yield from self.execute_many([(client_id, a)], replaceable=False)

    def _run_slots(self, slots: list[Slot], files: dict[int, ModelFile], job: str, rnd: int,
                   model_write_s: float = 0.0) -> Iterator[Any]:
        pol = self.policy
        used: set[int] = set()
        t0 = time.monotonic()
        deadline = None if pol.deadline_s is None else t0 + pol.deadline_s
        extensions = 0
        next_out = 0
        got = 0
        self.round_info = {"job": job, "round": rnd, "slots": len(slots), "started_unix_s": time.time(),
                           "model_write_s": model_write_s, "first_update_s": None, "last_update_s": None,
                           "validate_s": 0.0, "yield_wait_s": 0.0, "_t0": t0}
        try:
            while True:
                out = None
                with self._cv:
                    if self.closed:
                        raise PoolClosed("the server is stopping")
                    now = time.monotonic()
                    self._reap(now)
                    self._dispatch(slots, files, used, job, rnd,
                                   None if deadline is None else max(0.0, deadline - now))
                    if next_out < len(slots) and slots[next_out].done:
                        out = slots[next_out]
                        next_out += 1
                    elif next_out >= len(slots):
                        return
                    elif deadline is not None and now >= deadline:
                        have = got + sum(1 for s in slots[next_out:] if s.done and s.result is not None)
                        if have >= pol.min_updates:
                            for s in slots:
                                if not s.done:
                                    if s.item is not None:
                                        self._cancel_item(s.item, "the round ended at its deadline")
                                    s.failed = "cancelled at the deadline"
                                    s.done = True
                            log.info("job %s round %d: deadline reached with %d updates", job, rnd, have)
                            continue
                        if extensions >= pol.deadline_retries:
                            for s in slots:
                                if s.item is not None:
                                    self._cancel_item(s.item, "the round failed")
                                s.done = True
                            raise RoundFailed(job, rnd, have, pol.min_updates,
                                              f"deadline passed {extensions + 1} times")
                        extensions += 1
                        self.counters["rounds_extended"] += 1
                        log.warning("job %s round %d: %d of %d updates at the deadline; sending the missing "
                                    "slots to other devices (retry %d)", job, rnd, have, pol.min_updates, extensions)
                        for s in slots:
                            if not s.done and s.replaceable:
                                # the slow or missing device's slot goes to another device now
                                if s.item is not None:
                                    self._cancel_item(s.item, "the round's deadline passed; reassigned")
                                s.tried = s.tried or [s.sampled]
                                s.waiting_since = now - pol.dispatch_wait_s
                        deadline = now + pol.deadline_s
                        continue
                    else:
                        wait = 0.25
                        if deadline is not None:
                            wait = max(0.01, min(wait, deadline - now))
                        self._cv.wait(wait)
                        continue
                if out.result is None and out.kind == "train":
                    # the simulation's pool answers a refusing client with a refusal: so does this one
                    yield refusal(out.tried[-1] if out.tried else out.sampled, out.assignment,
                                  {"error": "NoUpdate", "message": out.failed or "no update", "sampled": out.sampled,
                                   "tried": list(out.tried)})
                elif out.result is not None:
                    got += 1
                    res = out.result
                    out.result = None
                    if isinstance(res, ClientUpdate):
                        release_free_heap()
                    t_y = time.monotonic()
                    try:
                        yield res
                    finally:
                        self.round_info["consumer_s"] = self.round_info.get("consumer_s", 0.0) + time.monotonic() - t_y
                        self._release(res)
        finally:
            with self._cv:
                for s in slots:
                    if s.item is not None:
                        self._cancel_item(s.item, "the round is over")
                    if isinstance(s.result, ClientUpdate):
                        self._release(s.result)
                        s.result = None
                    # work items outlive the round (to answer late devices): they must not keep the
                    # round's global model alive
                    s.assignment = replace(s.assignment, state={})
                self._prune_items()
            for f in {id(m): m for m in files.values()}.values():
                try:
                    f.path.unlink()
                except FileNotFoundError:
                    pass
            release_free_heap()

    def _release(self, res: Any) -> None:
        if isinstance(res, ClientUpdate) and isinstance(res.state, MappedState):
            res.state.release()
            try:
                res.state.file.path.unlink()
            except FileNotFoundError:
                pass

