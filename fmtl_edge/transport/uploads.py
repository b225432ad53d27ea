"""Received uploads of the remote pool: where they land, acceptance and refusal."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from fmtl_edge.messages import ClientUpdate
from fmtl_edge.transport.scheduler import WorkItem
from fmtl_edge.transport.tensors import TensorFileError
from fmtl_edge.transport.validation import validate_upload

log = logging.getLogger("fmtl_edge.transport.pool")


class UploadsMixin:
    """Upload acceptance (part of :class:`~fmtl_edge.transport.pool.RemoteClientPool`)."""

    def incoming_path(self, work_id: str) -> Path:
        """A fresh file name for one upload stream of ``work_id`` (streams never share a file)."""
        return self.work_dir / "incoming" / f"{work_id}-{secrets.token_hex(6)}.safetensors"

    def finish_upload(self, item: WorkItem, meta, path: Path | None) -> tuple[bool, str]:
        """Validate an uploaded update and hand it to its slot. Returns (accepted, reason)."""
        with self._cv:
            if item.status != "running":  # the round ended (or gave the slot away) while it was uploading
                if path is not None:
                    path.unlink(missing_ok=True)
                d = self._devices.get(item.client_id)
                if d is not None and d.current is item:
                    d.current = None
                    d.state = "idle"
                self._cv.notify_all()
                return False, self.why_not(item.work_id)
        t_v = time.monotonic()
        try:
            result = validate_upload(item, meta, path, self.limits, self._devices.get(item.client_id))
        except (TensorFileError, ValueError, KeyError) as e:
            return False, self.reject_upload(item, str(e), path)
        except Exception as e:  # noqa: BLE001 - whatever breaks validation refuses the upload, never the call
            log.exception("validation of work %s failed unexpectedly", item.work_id)
            return False, self.reject_upload(item, f"the server could not validate the update ({type(e).__name__}: {e})",
                                             path)
        finally:
            ri = self.round_info
            if ri.get("_t0") is not None:
                ri["validate_s"] = ri.get("validate_s", 0.0) + time.monotonic() - t_v
        with self._cv:
            d = self._devices.get(item.client_id)
            if d is not None and d.current is item:
                d.current = None
                d.state = "idle"
            if item.status != "running" or item.slot.item is not item:
                late = item.reason or "the round no longer needs it"
                if isinstance(result, ClientUpdate):
                    self._release(result)
                self._cv.notify_all()
                return False, f"update arrived too late: {late}"
            item.status = "done"
            item.slot.item = None
            item.slot.result = result
            item.slot.done = True
            self.counters["updates_accepted"] += 1
            ri = self.round_info
            if ri.get("_t0") is not None:
                since = time.monotonic() - ri["_t0"]
                ri["first_update_s"] = since if ri.get("first_update_s") is None else ri["first_update_s"]
                ri["last_update_s"] = since
            if d is not None:
                d.executions += 1
                d.last_job = f"{item.slot.assignment.job}/r{item.slot.assignment.round}"
                if isinstance(result, ClientUpdate):
                    d.last_device_s = float(result.device_s)
                    j = result.energy.get("total_j")
                    d.last_energy_j = None if j is None else float(j)
            self._cv.notify_all()
        if d is not None:
            self._changed(d)
        return True, ""

    def reject_upload(self, item: WorkItem, reason: str, path: Path | None = None) -> str:
        """Refuse an update (the slot goes to another device); returns the reason for the device."""
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        with self._cv:
            self.counters["updates_rejected"] += 1
            d = self._devices.get(item.client_id)
            if d is not None:
                d.rejected += 1
                if d.current is item:
                    d.current = None
                    d.state = "idle"
            a = item.slot.assignment
            log.warning("refused UploadUpdate from %s: rejected update of client %d for job %s round %d: %s",
                        d.name if d else "?",
                        item.client_id, a.job, a.round, reason)
            self.count_refusal(d.name if d else f"client {item.client_id}", "UploadUpdate", reason)
            self._fail_item(item, f"update rejected: {reason}")
            self._cv.notify_all()
        if d is not None:
            self._changed(d)
        return reason

