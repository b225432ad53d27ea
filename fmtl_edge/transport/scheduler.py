"""The round scheduler of the remote pool: slots, dispatch, replacement, deadlines, ``min_updates``."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.seeding import derive_seed
from fmtl_edge.plan import RoundFailed
from fmtl_edge.pool import refusal
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.transport.model_files import ModelFile, ModelFiles, WriteFailed, release_free_heap
from fmtl_edge.transport.registry import Device, PoolClosed, Registry
from fmtl_edge.transport.status import PoolCounters, RoundInfo
from fmtl_edge.transport.uploads import release_update
from fmtl_edge.transport.validation import norm_outliers
from fmtl_edge.transport.work import Slot, WorkBook, WorkItem

__all__ = ["RoundPolicy", "Scheduler", "Slot", "WorkItem"]

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



class Scheduler:
    """Rounds over the devices: one slot per sampled client, dispatched to the device holding it or a
    replacement, its updates yielded in slot order (see :mod:`fmtl_edge.transport.pool`).

    Args:
        cv: the pool's condition (guards devices, work items and slots).
        policy: how rounds wait, replace and retry.
        seed: the run seed (replacement draws).
        registry: the devices.
        work: the work book.
        files: where the round's model files are written.
        counters: ``replacements`` and ``rounds_extended``.
        timing: the round's timing.
        on_round_start: ``(job, round, tasks, clients)`` before a round's work is handed out; what it
            raises is logged, never raised.
        norm_multiple: the round's relative norm bound
            (:func:`~fmtl_edge.transport.validation.norm_outliers`; None or 0: off). When set, a
            parallel round of 3 or more training slots yields its first update once every slot is done
            (the uploads wait as files on disk, so the server's memory stays O(P)).
    """

    def __init__(self, cv: threading.Condition, policy: RoundPolicy, seed: int, registry: Registry, work: WorkBook,
                 files: ModelFiles, counters: PoolCounters, timing: RoundInfo,
                 on_round_start: Callable[[str, int, Sequence[str], Sequence[int]], None] | None = None,
                 norm_multiple: float | None = None):
        self._cv = cv
        self.policy = policy
        self.seed = seed
        self.registry = registry
        self.work = work
        self.files = files
        self.counters = counters
        self.timing = timing
        self.on_round_start = on_round_start
        self.norm_multiple = norm_multiple

    # -- work items (lock held) --------------------------------------------------------------------------
    def _cancel(self, item: WorkItem, reason: str) -> None:
        if self.work.cancel(item, reason):
            self.registry.unqueue(item)

    def _issue(self, slot: Slot, d: Device, model: ModelFile, deadline_s: float | None) -> WorkItem:
        item = self.work.new(slot, d.client_id, model, deadline_s)
        self.registry.enqueue(d, item)
        self._cv.notify_all()
        return item

    def _dispatch(self, slots: Sequence[Slot], models: Mapping[int, ModelFile], used: set[int],
                  job: str, rnd: int, deadline_s: float | None) -> None:
        now = time.monotonic()
        pol = self.policy
        for slot in slots:
            if slot.done or slot.item is not None:
                continue
            model = models[slot.index]
            if not slot.tried:
                d = self.registry.get(slot.sampled)
                if d is not None and self.registry.ready(d, now):
                    self._issue(slot, d, model, deadline_s)
                    used.add(d.client_id)
                    continue
                if not slot.replaceable or now - slot.waiting_since < pol.dispatch_wait_s:
                    if not slot.replaceable and now - slot.waiting_since >= pol.dispatch_wait_s:
                        slot.failed = f"client {slot.sampled} is offline or busy"
                        slot.done = True
                    continue
            if not slot.replaceable:
                continue
            # a replacement holds the tasks the sampled client holds (its task group, seed 000)
            orig = self.registry.get(slot.sampled)
            tasks = [t for t in slot.assignment.tasks if orig is None or orig.tasks.get(t, 0) > 0] or slot.assignment.tasks
            cands = self.registry.candidates(now, used, tasks)
            if not cands:
                if now - slot.waiting_since >= pol.dispatch_wait_s * max(1, pol.max_attempts):
                    slot.failed = "no online idle device to take the slot"
                    slot.done = True
                continue
            rng = np.random.default_rng(derive_seed(self.seed, job, rnd, "replace", slot.index, len(slot.tried)))
            c = int(cands[int(rng.integers(len(cands)))])
            log.info("job %s round %d: client %d replaces client %d", job, rnd, c,
                     slot.tried[-1] if slot.tried else slot.sampled)
            self.counters.add("replacements")
            self._issue(slot, self.registry.get(c), model, deadline_s)
            used.add(c)

    def _judge_norms(self, slots: Sequence[Slot], job: str, rnd: int) -> list[Device]:
        """Refuse the updates of ``slots`` farther from the global model than the round's relative
        bound allows (their slots yield refusals); returns the devices whose records changed. *(lock
        held)*"""
        kept = [s for s in slots if isinstance(s.result, ClientUpdate) and s.update_norm is not None]
        norms = {s.index: s.update_norm for s in kept}
        weights = {s.index: float(s.result.n_samples) for s in kept}
        changed = []
        for i, reason in norm_outliers(norms, self.norm_multiple, weights).items():
            s = slots[i]
            release_update(s.result)
            s.result = None
            s.failed = f"update rejected: {reason}"
            cid = s.tried[-1] if s.tried else s.sampled
            d = self.registry.get(cid)
            name = d.name if d is not None else f"client {cid}"
            self.counters.add("updates_rejected")
            self.counters.count_refusal(name, "UploadUpdate", reason)
            log.warning("refused UploadUpdate from %s: rejected update of client %d for job %s round %d: %s", name,
                        cid, job, rnd, reason)
            if d is not None:
                d.rejected += 1
                changed.append(d)
        return changed

    # -- a round --------------------------------------------------------------------------------------
    def write_models(self, slots: Sequence[Slot], tag: Callable[[Slot], str]) -> dict[int, ModelFile]:
        """One model file per distinct assignment state of ``slots`` (slot index → file), named by
        ``tag(slot)``.

        Raises:
            OSError: a file cannot be written (a full disk); the files written before it are removed.
        """
        files: dict[int, ModelFile] = {}
        by_state: dict[int, ModelFile] = {}
        try:
            for s in slots:
                key = id(s.assignment.state)
                if key not in by_state:
                    by_state[key] = self.files.write(s.assignment.state, tag(s))
                files[s.index] = by_state[key]
        except OSError:
            self.files.remove(by_state.values())
            raise
        return files

    def execute_many(self, work: Sequence[tuple[int, Assignment]], replaceable: bool = True) -> Iterator[ClientUpdate]:
        """Run one round's assignments on the devices; yield validated updates in slot order.

        ``replaceable = False``: a slot is served by the device holding its client or not at all (a
        failed, offline or busy device yields a refusal; no replacement).

        Raises:
            WriteFailed: the round model cannot be written (a full disk): a failed round.
            RoundFailed, PoolClosed: see :meth:`run_slots`.
        """
        if not work:
            return
        slots = [Slot(i, int(cid), a, replaceable=replaceable, waiting_since=time.monotonic())
                 for i, (cid, a) in enumerate(work)]
        job, rnd = work[0][1].job, work[0][1].round
        if self.on_round_start is not None:
            tasks = list(dict.fromkeys(t for _, a in work for t in a.tasks))
            try:
                self.on_round_start(job, rnd, tasks, [int(c) for c, _ in work])
            except Exception:  # a log line must not fail the round
                log.exception("on_round_start failed")
        t0 = time.monotonic()
        try:
            files = self.write_models(slots, lambda s: f"{job}-r{rnd}")
        except OSError as e:  # a full disk fails the round (retried from the last checkpoint), not the server
            log.error("job %s round %d: could not write the round model in %s: %s", job, rnd, self.files.models_dir, e)
            raise WriteFailed(job, rnd, "the round model", e, self.files.models_dir) from None
        for m in {id(s.assignment.state): s.assignment.state for s in slots}.values():
            self.files.page_out(m)  # written to the model file: the global vector need not stay in RAM meanwhile
        yield from self.run_slots(slots, files, job, rnd, model_write_s=time.monotonic() - t0)

    def execute_in_turn(self, client_id: int, a: Assignment) -> Iterator[ClientUpdate]:
        """One visit of a sequential round (a ring node): only the device holding ``client_id`` may
        serve it. A ring node is a client: another device training its own client in that slot
        would train out of turn (perhaps twice in the round, as each visit is its own call) and
        break the ring order; a failed node is skipped by the coordinator instead."""
        yield from self.execute_many([(client_id, a)], replaceable=False)

    def run_slots(self, slots: list[Slot], files: dict[int, ModelFile], job: str, rnd: int,
                  model_write_s: float = 0.0, policy: RoundPolicy | None = None) -> Iterator[Any]:
        """Dispatch ``slots`` and yield their results in slot order (a refusal for a train slot
        without update); ``policy`` overrides the pool's deadline and ``min_updates`` (evaluation).

        Raises:
            PoolClosed: the server is stopping.
            RoundFailed: the deadline passed with fewer than ``min_updates`` results, more often
                than ``deadline_retries``.
        """
        pol = policy or self.policy
        # the relative norm bound needs the round's every update before the first is aggregated
        gated = bool(self.norm_multiple) and len(slots) >= 3 and all(s.kind == "train" for s in slots)
        judged = False
        used: set[int] = set()
        t0 = time.monotonic()
        deadline = None if pol.deadline_s is None else t0 + pol.deadline_s
        extensions = 0
        next_out = 0
        got = 0
        self.timing.start(job, rnd, len(slots), model_write_s)
        try:
            while True:
                out = None
                changed: list[Device] = []
                with self._cv:
                    if self.registry.closed:
                        raise PoolClosed("the server is stopping")
                    now = time.monotonic()
                    self.registry.reap(now)
                    self._dispatch(slots, files, used, job, rnd,
                                   None if deadline is None else max(0.0, deadline - now))
                    if gated and not judged and all(s.done for s in slots):
                        changed = self._judge_norms(slots, job, rnd)
                        judged = True
                    if next_out < len(slots) and slots[next_out].done and (judged or not gated):
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
                                        self._cancel(s.item, "the round ended at its deadline")
                                    s.failed = "cancelled at the deadline"
                                    s.done = True
                            log.info("job %s round %d: deadline reached with %d updates", job, rnd, have)
                            continue
                        if extensions >= pol.deadline_retries:
                            for s in slots:
                                if s.item is not None:
                                    self._cancel(s.item, "the round failed")
                                s.done = True
                            raise RoundFailed(job, rnd, have, pol.min_updates,
                                              f"deadline passed {extensions + 1} times")
                        extensions += 1
                        self.counters.add("rounds_extended")
                        log.warning("job %s round %d: %d of %d updates at the deadline; sending the missing "
                                    "slots to other devices (retry %d)", job, rnd, have, pol.min_updates, extensions)
                        for s in slots:
                            if not s.done and s.replaceable:
                                # the slow or missing device's slot goes to another device now
                                if s.item is not None:
                                    self._cancel(s.item, "the round's deadline passed; reassigned")
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
                for d in changed:
                    self.registry.changed(d)
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
                        self.timing.add_consumer(time.monotonic() - t_y)
                        release_update(res)
        finally:
            with self._cv:
                for s in slots:
                    if s.item is not None:
                        self._cancel(s.item, "the round is over")
                    if isinstance(s.result, ClientUpdate):
                        release_update(s.result)
                        s.result = None
                    # work items outlive the round (to answer late devices): they must not keep the
                    # round's global model alive
                    s.assignment = replace(s.assignment, state={})
                self.work.prune()
            self.files.remove(files.values())
            release_free_heap()
