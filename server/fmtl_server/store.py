"""Job state in SQLite (WAL) and model checkpoints as safetensors files.

Layout of ``--state-dir``::

    state.db                      SQLite, WAL mode: meta, devices, jobs (plan position), methods (results)
    checkpoints/<method>/<job>.r<round>.safetensors   global model after that round
    work/                         round models and uploads in flight (scratch; emptied at start)

At the end of every round the global model is written to a temporary file, fsync'ed and renamed
(atomic), and only then the job's row (last completed round, the checkpoint's file name, affinity per
round, energy tally, history) is committed; the previous checkpoint is deleted after the commit. A
server killed at any moment therefore finds a consistent last completed round: the plan position is
the finished jobs (a method is a pure function of them) plus that round, and the client sampling and
batch order of every later round are derived from ``(seed, job, round)``, so nothing else is needed to
continue with the same result.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmtl_edge.energy_profile import EnergyProfiles
from fmtl_edge.plan import EnergyTally, Job, RoundCheckpoint, RoundRecord
from fmtl_edge.transport.model_files import WriteFailed
from fmtl_edge.transport.pool import Device
from fmtl_edge.transport.tensors import SafetensorsFile, TensorFileError, check_finite, file_sha256, write_state

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    client_id INTEGER PRIMARY KEY, device TEXT NOT NULL, tasks_json TEXT NOT NULL, n_train INTEGER, n_test INTEGER,
    data_json TEXT, info_json TEXT, registered_unix_s REAL, last_seen_unix_s REAL, executions INTEGER DEFAULT 0,
    rejected INTEGER DEFAULT 0, failures INTEGER DEFAULT 0, last_energy_j REAL, last_device_s REAL, last_job TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    method TEXT NOT NULL, job TEXT NOT NULL, seq INTEGER NOT NULL, job_json TEXT NOT NULL,
    completed_round INTEGER NOT NULL, rounds INTEGER NOT NULL, done INTEGER NOT NULL, checkpoint TEXT NOT NULL,
    affinity_json TEXT NOT NULL, tally_json TEXT NOT NULL, history_json TEXT NOT NULL, wall_s REAL NOT NULL,
    updated_unix_s REAL NOT NULL, PRIMARY KEY (method, job));
CREATE TABLE IF NOT EXISTS methods (method TEXT PRIMARY KEY, seq INTEGER NOT NULL, entry_json TEXT NOT NULL,
    finished_unix_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, t_unix_s REAL, kind TEXT, detail TEXT);
"""


class StateMismatch(RuntimeError):
    """The state folder belongs to another job (its settings changed)."""


class CheckpointCorrupt(RuntimeError):
    """A checkpoint is missing, differs from its stored SHA-256 or holds NaN/Inf (message names the
    file and the fix: ``fmtl-server rollback`` when the previous round is kept)."""


_ROW = ("completed_round", "checkpoint", "checkpoint_sha256", "affinity_json", "tally_json", "history_json", "wall_s")


class Store:
    """Persistence of one job.

    Args:
        state_dir: the folder (created).
        readonly: open for ``fmtl-server status`` (no schema changes, no writes).
    """

    def __init__(self, state_dir: str | Path, readonly: bool = False):
        self.dir = Path(state_dir)
        self.readonly = readonly
        db = self.dir / "state.db"
        if readonly:
            if not db.is_file():
                raise FileNotFoundError(f"no job state in {self.dir} (state.db missing)")
            self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "checkpoints").mkdir(exist_ok=True)
            self.db = sqlite3.connect(str(db), check_same_thread=False, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            for col in ("checkpoint_sha256", "previous_json"):  # state folders from before these columns
                if col not in cols:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- meta ----------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            (key, json.dumps(value, default=str)))

    def claim(self, fingerprint: str, job_name: str) -> bool:
        """Bind the folder to a job; True when it already held this job (a resume).

        Raises:
            StateMismatch: it holds another job.
        """
        old = self.get("job_fingerprint")
        if old is None:
            self.put("job_fingerprint", fingerprint)
            self.put("job_name", job_name)
            self.put("created_unix_s", time.time())
            return False
        if old != fingerprint:
            raise StateMismatch(
                f"{self.dir} holds the state of another job ({self.get('job_name')!r}, different settings); "
                "use a new --state-dir, or delete this one to start over"
            )
        return True

    def event(self, kind: str, detail: Mapping[str, Any] | str) -> None:
        with self._lock:
            self.db.execute("INSERT INTO events(t_unix_s, kind, detail) VALUES(?, ?, ?)",
                            (time.time(), kind, detail if isinstance(detail, str) else json.dumps(detail, default=str)))

    # -- devices ---------------------------------------------------------------------------------------
    def save_device(self, d: Device) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO devices VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(client_id) DO UPDATE SET "
                "device=excluded.device, tasks_json=excluded.tasks_json, n_train=excluded.n_train, n_test=excluded.n_test, "
                "data_json=excluded.data_json, info_json=excluded.info_json, registered_unix_s=excluded.registered_unix_s, "
                "last_seen_unix_s=excluded.last_seen_unix_s, executions=excluded.executions, rejected=excluded.rejected, "
                "failures=excluded.failures, last_energy_j=excluded.last_energy_j, last_device_s=excluded.last_device_s, "
                "last_job=excluded.last_job",
                (d.client_id, d.name, json.dumps(d.tasks), d.n_train, d.n_test, json.dumps(d.data), json.dumps(d.info),
                 d.registered_at, d.last_seen_wall or time.time(), d.executions, d.rejected, d.failures, d.last_energy_j,
                 d.last_device_s, d.last_job),
            )

    def devices(self) -> list[Device]:
        with self._lock:
            rows = self.db.execute("SELECT client_id, device, tasks_json, n_train, n_test, data_json, info_json, "
                                   "registered_unix_s, last_seen_unix_s, executions, rejected, failures, last_energy_j, "
                                   "last_device_s, last_job FROM devices ORDER BY client_id").fetchall()
        out = []
        for r in rows:
            d = Device(int(r[0]), r[1], json.loads(r[2]), int(r[3] or 0), int(r[4] or 0), json.loads(r[5] or "{}"),
                       json.loads(r[6] or "{}"), registered_at=r[7] or 0.0)
            d.last_seen_wall = r[8] or 0.0
            d.executions, d.rejected, d.failures = int(r[9] or 0), int(r[10] or 0), int(r[11] or 0)
            d.last_energy_j, d.last_device_s, d.last_job = r[12], r[13], r[14] or ""
            out.append(d)
        return out

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint(self, method: str, seq: int, ckpt: RoundCheckpoint) -> Path:
        """Persist the end of a round: model file (atomic, its SHA-256 stored with the row), then the
        job's row. While the job runs, the previous round's file and row are kept (what
        :meth:`rollback` returns to); older files are deleted after the commit, and a finished job
        keeps only its last round."""
        safe_m = _safe(method)
        rel = Path("checkpoints") / safe_m / f"{_safe(ckpt.job.name)}.r{ckpt.round:05d}.safetensors"
        path = self.dir / rel
        _, sha = write_state(path, ckpt.state, {"format": "fmtl-edge/checkpoint/1", "method": method,
                                                "job": ckpt.job.name, "round": str(ckpt.round)}, fsync=True)
        job_json = json.dumps(ckpt.job.to_dict())
        aff = json.dumps({str(r): np.asarray(m).tolist() for r, m in ckpt.affinity_per_round.items()})
        hist = json.dumps([r.to_dict() for r in ckpt.history])
        with self._lock:
            old = self.db.execute(f"SELECT {', '.join(_ROW)}, previous_json FROM jobs WHERE method = ? AND job = ?",
                                  (method, ckpt.job.name)).fetchone()
            drop: list[str] = []
            previous = ""
            if old is not None:
                old_prev = json.loads(old[-1]) if old[-1] else None
                if old_prev:
                    drop.append(old_prev["checkpoint"])
                if ckpt.job_done:
                    drop.append(old[1])
                elif old[1] != str(rel):
                    previous = json.dumps(dict(zip(_ROW, old[:-1])))
            self.db.execute(
                "INSERT INTO jobs (method, job, seq, job_json, completed_round, rounds, done, checkpoint, affinity_json, "
                "tally_json, history_json, wall_s, updated_unix_s, checkpoint_sha256, previous_json) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(method, job) DO UPDATE SET "
                "seq=excluded.seq, job_json=excluded.job_json, completed_round=excluded.completed_round, "
                "rounds=excluded.rounds, done=excluded.done, checkpoint=excluded.checkpoint, "
                "affinity_json=excluded.affinity_json, tally_json=excluded.tally_json, history_json=excluded.history_json, "
                "wall_s=excluded.wall_s, updated_unix_s=excluded.updated_unix_s, "
                "checkpoint_sha256=excluded.checkpoint_sha256, previous_json=excluded.previous_json",
                (method, ckpt.job.name, seq, job_json, ckpt.round, ckpt.job.rounds, int(ckpt.job_done), str(rel), aff,
                 json.dumps(ckpt.energy.to_dict()), hist, ckpt.wall_s, time.time(), sha, previous),
            )
        for f in drop:
            if f != str(rel):
                (self.dir / f).unlink(missing_ok=True)
        return path

    def _problem(self, rel: str, sha: str) -> str | None:
        """What is wrong with a checkpoint file (None: present, its SHA-256 as stored, finite)."""
        path = self.dir / rel
        if not path.is_file():
            return "is missing"
        if sha and file_sha256(path) != sha:
            return f"differs from its stored SHA-256 ({sha[:12]}…): the file changed after it was written"
        try:
            bad = check_finite(SafetensorsFile(path))
        except TensorFileError as e:
            return f"is not a valid safetensors file ({e})"
        return None if bad is None else f"holds NaN or Inf (tensor {bad!r})"

    def load_checkpoints(self, method: str) -> list[RoundCheckpoint]:
        """Every job of ``method`` with its last completed round, in execution order (state loaded and
        verified).

        Raises:
            CheckpointCorrupt: a checkpoint file is missing, differs from its stored SHA-256, or holds
                NaN/Inf; the message names the file and the fix.
        """
        with self._lock:
            rows = self.db.execute("SELECT job_json, completed_round, checkpoint, affinity_json, tally_json, history_json, "
                                   "wall_s, checkpoint_sha256, previous_json FROM jobs WHERE method = ? ORDER BY seq",
                                   (method,)).fetchall()
        out = []
        for job_json, rnd, rel, aff, tally, hist, wall, sha, prev in rows:
            j = json.loads(job_json)
            problem = self._problem(rel, sha)
            if problem is not None:
                p = json.loads(prev) if prev else None
                if p and self._problem(p["checkpoint"], p["checkpoint_sha256"]) is None:
                    fix = (f"the previous round {int(p['completed_round']) + 1} is kept and verified: run "
                           f"`fmtl-server rollback --state-dir {self.dir}` to resume from it")
                else:
                    fix = ("no verified earlier round is kept: restore the file from a backup, or start the job over "
                           "with a new --state-dir")
                raise CheckpointCorrupt(f"checkpoint {self.dir / rel} (method {method!r}, job {j['name']!r}, after "
                                        f"round {int(rnd) + 1}) {problem}; refusing to resume from it. Fix: {fix}")
            job = Job.from_dict(j)
            state = SafetensorsFile(self.dir / rel).load()
            out.append(RoundCheckpoint(
                job=job, round=int(rnd), state=state,
                affinity_per_round={int(r): np.asarray(m, dtype=np.float64) for r, m in json.loads(aff).items()},
                energy=EnergyTally.from_dict(json.loads(tally)),
                history=[RoundRecord.from_dict(d) for d in json.loads(hist)], wall_s=float(wall)))
        return out

    def rollback(self) -> list[tuple[str, str, int]]:
        """Every job whose last checkpoint fails verification goes back to its kept previous round
        (when that one verifies); returns ``(method, job, round)`` of each rollback (round 0-based)."""
        done = []
        with self._lock:
            rows = self.db.execute("SELECT method, job, checkpoint, checkpoint_sha256, previous_json FROM jobs").fetchall()
            for method, job, rel, sha, prev in rows:
                p = json.loads(prev) if prev else None
                if self._problem(rel, sha) is None or not p or self._problem(p["checkpoint"], p["checkpoint_sha256"]):
                    continue
                self.db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _ROW)}, done = 0, previous_json = '', "
                                "updated_unix_s = ? WHERE method = ? AND job = ?",
                                (*[p[c] for c in _ROW], time.time(), method, job))
                (self.dir / rel).unlink(missing_ok=True)
                done.append((method, job, int(p["completed_round"])))
        for m, j, r in done:
            self.event("rollback", {"method": m, "job": j, "round": r})
        return done

    def job_names(self, method: str) -> list[str]:
        """The jobs of ``method`` with a checkpoint, in execution order."""
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT job FROM jobs WHERE method = ? ORDER BY seq", (method,))]

    # -- methods -----------------------------------------------------------------------------------------
    def save_method(self, method: str, seq: int, entry: Mapping[str, Any]) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO methods VALUES(?,?,?,?)",
                            (method, seq, json.dumps(entry, default=_json_default), time.time()))

    def method_entry(self, method: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT entry_json FROM methods WHERE method = ?", (method,)).fetchone()
        return None if row is None else json.loads(row[0])

    # -- status ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            jobs = self.db.execute("SELECT method, job, completed_round, rounds, done, wall_s, updated_unix_s, tally_json "
                                   "FROM jobs ORDER BY method, seq").fetchall()
            methods = self.db.execute("SELECT method, finished_unix_s, entry_json FROM methods ORDER BY seq").fetchall()
        out_jobs = []
        for m, j, rnd, rounds, done, wall, upd, tally in jobs:
            t = json.loads(tally)
            out_jobs.append({"method": m, "job": j, "rounds_done": int(rnd) + 1, "rounds": int(rounds), "done": bool(done),
                             "wall_s": wall, "device_s": t.get("device_s"), "energy_j": t.get("total_j"),
                             "updated_unix_s": upd})
        out_methods = []
        for m, fin, entry in methods:
            e = json.loads(entry)
            out_methods.append({"method": m, "finished_unix_s": fin, "total_test_loss": e.get("total_test_loss"),
                                "device_s": e.get("device_s"), "energy_j": e.get("energy_j"), "splits": e.get("splits")})
        devs = [{"client_id": d.client_id, "device": d.name, "executions": d.executions, "rejected": d.rejected,
                 "failures": d.failures, "last_energy_j": d.last_energy_j, "last_device_s": d.last_device_s,
                 "last_job": d.last_job, "last_seen_unix_s": d.last_seen_wall, "train_samples": d.n_train,
                 "hostname": d.info.get("hostname"), "meter": d.info.get("meter")} for d in self.devices()]
        with self._lock:
            fails = self.db.execute("SELECT COUNT(*), MAX(id) FROM events WHERE kind = 'round_failed'").fetchone()
            last = (self.db.execute("SELECT t_unix_s, detail FROM events WHERE id = ?", (fails[1],)).fetchone()
                    if fails[1] is not None else None)
        return {"job": self.get("job_name"), "phase": self.get("phase", "unknown"), "methods_planned": self.get("methods", []),
                "methods_done": out_methods, "jobs": out_jobs, "devices": devs, "results": self.get("results_path"),
                "progress": self.get("progress"), "round_failures": int(fails[0]),
                "last_round_failure": None if last is None else {"t_unix_s": last[0], "detail": last[1]},
                "energy_profiles": EnergyProfiles.from_dict(self.get("energy_profiles")).summary()
                if self.get("energy_profiles") else []}


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


class MethodCheckpoints:
    """The method runner's checkpoint store (:class:`fmtl_edge.runner.CheckpointStore`) over a
    :class:`Store`: job checkpoints per round, method entries when a method finishes. The clients'
    own state stays on the devices, and a finished method's final models are rebuilt from its
    jobs' last checkpoints.

    Args:
        store: the server's store.
        methods: the job's method names in run order (a method's row keeps its position).
    """

    def __init__(self, store: Store, methods: list[str]):
        self.store = store
        self.methods = list(methods)

    def finished(self, method: str):
        entry = self.store.method_entry(method)
        return None if entry is None else (entry, None)

    def running(self, method: str):
        return self.store.load_checkpoints(method), None

    def curve(self, method: str) -> None:
        return None

    def save_round(self, method: str, ckpt: RoundCheckpoint, pool, curve=None) -> None:
        """Commit the round (:meth:`Store.checkpoint`).

        Raises:
            WriteFailed: the checkpoint or its row cannot be written (a full disk): the round fails and
                the runner's retry policy runs it again from the last committed checkpoint.
        """
        try:
            names = self.store.job_names(method)
            self.store.checkpoint(method, names.index(ckpt.job.name) if ckpt.job.name in names else len(names), ckpt)
        except (OSError, sqlite3.OperationalError) as e:
            raise WriteFailed(ckpt.job.name, ckpt.round, "the checkpoint", e, self.store.dir / "checkpoints") from None

    def save_method(self, method: str, entry: Mapping[str, Any], models) -> None:
        self.store.save_method(method, self.methods.index(method), entry)
