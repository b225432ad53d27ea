"""Received uploads of the remote pool: where they land, acceptance and refusal.

An upload is checked by :func:`~fmtl_edge.transport.validation.validate_upload` before its slot
takes it; a refused upload fails its work item (the slot goes to another device) and is counted
against the device.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmtl_edge.messages import ClientUpdate
from fmtl_edge.transport.registry import Registry
from fmtl_edge.transport.status import PoolCounters, RoundInfo
from fmtl_edge.transport.tensors import MappedState, TensorFileError
from fmtl_edge.transport.validation import Limits, validate_upload
from fmtl_edge.transport.work import WorkBook, WorkItem

log = logging.getLogger("fmtl_edge.transport.pool")


def release_update(res: Any) -> None:
    """Unmap and delete the file behind an update (a :class:`ClientUpdate` over a mapped upload);
    anything else is left alone."""
    if isinstance(res, ClientUpdate) and isinstance(res.state, MappedState):
        res.state.release()
        try:
            res.state.file.path.unlink()
        except FileNotFoundError:
            pass


class Uploads:
    """Incoming update files and their acceptance.

    Args:
        cv: the pool's condition (guards devices, work items and slots).
        incoming_dir: where upload streams write (emptied here).
        registry: the devices (an accepted or refused upload frees its device).
        work: the work book.
        counters: ``updates_accepted`` / ``updates_rejected`` and refusals per device.
        limits: the :class:`~fmtl_edge.transport.validation.Limits` uploads are checked against.
        timing: the round's timing (validation seconds, first and last update).
    """

    def __init__(self, cv: threading.Condition, incoming_dir: Path, registry: Registry, work: WorkBook,
                 counters: PoolCounters, limits: Limits, timing: RoundInfo):
        self._cv = cv
        self.incoming_dir = Path(incoming_dir)
        shutil.rmtree(self.incoming_dir, ignore_errors=True)
        self.incoming_dir.mkdir(parents=True)
        self.registry = registry
        self.work = work
        self.counters = counters
        self.limits = limits
        self.timing = timing

    def path(self, work_id: str) -> Path:
        """A fresh file name for one upload stream of ``work_id`` (streams never share a file)."""
        return self.incoming_dir / f"{work_id}-{secrets.token_hex(6)}.safetensors"

    def finish(self, item: WorkItem, meta, path: Path | None) -> tuple[bool, str]:
        """Validate an uploaded update and hand it to its slot. Returns (accepted, reason)."""
        with self._cv:
            if item.status != "running":  # the round ended (or gave the slot away) while it was uploading
                if path is not None:
                    path.unlink(missing_ok=True)
                self.registry.release(item)
                self._cv.notify_all()
                return False, self.work.why_not(item.work_id)
            device = self.registry.get(item.client_id)
            train_median, test_median = self.registry.median_samples()
        limits = replace(self.limits, median_train_samples=train_median, median_test_samples=test_median)
        t_v = time.monotonic()
        try:
            result = validate_upload(item, meta, path, limits, device)
        except Exception as e:  # noqa: BLE001 - whatever breaks validation refuses the upload, never the call
            with self._cv:
                late = self._late(item)
            if late is not None:
                # another stream answered the work or the round ended meanwhile (its model file may be
                # gone already): a late upload, not a broken one
                if path is not None:
                    path.unlink(missing_ok=True)
                with self._cv:
                    self.registry.release(item)
                    self._cv.notify_all()
                log.info("late upload of work %s refused: %s", item.work_id, late)
                return False, late
            if isinstance(e, (TensorFileError, ValueError, KeyError)):
                return False, self.reject(item, str(e), path)
            log.exception("validation of work %s failed unexpectedly", item.work_id)
            return False, self.reject(item, f"the server could not validate the update ({type(e).__name__}: {e})",
                                      path)
        finally:
            self.timing.add_validation(time.monotonic() - t_v)
        with self._cv:
            d = self.registry.release(item)
            late = self._late(item)
            if late is not None:
                release_update(result)
                self._cv.notify_all()
                return False, late
            item.status = "done"
            item.slot.item = None
            item.slot.result = result
            item.slot.update_norm = item.update_norm
            item.slot.done = True
            self.counters.add("updates_accepted")
            self.timing.update_arrived()
            if d is not None:
                d.executions += 1
                d.last_job = f"{item.slot.assignment.job}/r{item.slot.assignment.round}"
                if isinstance(result, ClientUpdate):
                    d.last_device_s = float(result.device_s)
                    j = result.energy.get("total_j")
                    d.last_energy_j = None if j is None else float(j)
            self._cv.notify_all()
        if d is not None:
            self.registry.changed(d)
        return True, ""

    @staticmethod
    def _late(item: WorkItem) -> str | None:
        """Why ``item`` takes no upload any more (None: it still does). *(lock held)*"""
        if item.status == "running" and item.slot.item is item:
            return None
        if item.status == "done":
            return f"update arrived too late: work {item.work_id} was already answered"
        return f"update arrived too late: {item.reason or 'the round no longer needs it'}"

    def reject(self, item: WorkItem, reason: str, path: Path | None = None) -> str:
        """Refuse an update (the slot goes to another device); returns the reason for the device."""
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        with self._cv:
            self.counters.add("updates_rejected")
            d = self.registry.release(item)
            if d is not None:
                d.rejected += 1
            a = item.slot.assignment
            log.warning("refused UploadUpdate from %s: rejected update of client %d for job %s round %d: %s",
                        d.name if d else "?",
                        item.client_id, a.job, a.round, reason)
            self.counters.count_refusal(d.name if d else f"client {item.client_id}", "UploadUpdate", reason)
            self.work.fail(item, f"update rejected: {reason}")
            self._cv.notify_all()
        if d is not None:
            self.registry.changed(d)
        return reason
