"""The resumable state of a ``fmtl-edge simulate`` run (``--resume``).

While a run trains, its progress is kept in a hidden folder beside ``--out``
(``<parent>/.<out name>.resume/``), committed at the end of every round:

    state.json                 format, config fingerprint, finished methods (their results.json
                               entries), the running method's job checkpoints and client-state files
    f<seq>.safetensors         tensors referenced by state.json: a finished method's final models
                               (and its clients' own models, for a personalised method),
                               a job's global model after its last completed round, one client's
                               own state (personal layers, Ditto's model...) for the running method

Tensor files get a new name on every write and are fsync'ed before ``state.json`` (written to a
temporary file, fsync'ed, renamed) references them; files no longer referenced are deleted after the
commit. A run killed at any moment (SIGINT, SIGKILL, power) therefore finds a consistent last
completed round. Client sampling and batch order derive from ``(seed, job, round, client)``, so the
resumed run ends with the same weights, losses and splits as an uninterrupted one. Nothing is pickled.

On success the outputs are written as usual and this folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmtl_edge.config import ConfigError

FORMAT = "fmtl-edge/simulate-resume/1"
STATE = "state.json"
#: config keys that do not change what is trained (left out of the fingerprint)
UNFINGERPRINTED = ("out", "lease_wait_s")


def state_dir(out: str | Path) -> Path:
    """The resume folder of ``--out``: ``<parent>/.<name>.resume``."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def has_state(out: str | Path) -> bool:
    """True when an interrupted run of ``--out`` left its state."""
    return (state_dir(out) / STATE).is_file()


def latest_interrupted(root: str | Path = "runs") -> Path | None:
    """The ``--out`` of the most recently updated interrupted run under ``root`` (timestamped runs)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(p.stat().st_mtime, p) for p in root.glob(".*.resume/" + STATE)]
    if not found:
        return None
    d = max(found)[1].parent
    return root / d.name[1:-len(".resume")]


def training_config(cfg) -> dict[str, Any]:
    """``cfg.to_dict()`` without the keys that do not change the results (JSON-normalised)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in UNFINGERPRINTED}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def fingerprint(cfg) -> str:
    return hashlib.sha256(json.dumps(training_config(cfg), sort_keys=True).encode()).hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _contiguous(a) -> np.ndarray:
    """``a`` as a C-contiguous array of the same shape (``np.ascontiguousarray`` makes 0-d arrays 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(a.shape)


def _signature(versions: list) -> str:
    """A cheap content signature of one client's state (CRC-32 per tensor): unchanged state is not rewritten."""
    parts = []
    for key, rnd, tensors in versions:
        for name in sorted(tensors):
            a = _contiguous(tensors[name])
            parts.append(f"{key}\0{rnd}\0{name}\0{a.dtype.str}\0{a.shape}\0{zlib.crc32(a.reshape(-1).view(np.uint8))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class RunState:
    """The resume folder of one run (see the module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, out: str | Path, doc: dict[str, Any]):
        self.out = Path(out)
        self.dir = state_dir(out)
        self.doc = doc

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, out: str | Path, cfg, overwrite: bool = False) -> "RunState":
        """A fresh state for ``cfg`` (an earlier one of the same ``--out`` is deleted)."""
        d = state_dir(out)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        now = time.time()
        rs = cls(out, {"format": FORMAT, "fingerprint": fingerprint(cfg), "config": training_config(cfg),
                       "overwrite": bool(overwrite), "created_unix_s": now, "updated_unix_s": now, "seq": 0,
                       "finished": {}, "running": None})
        rs._commit()
        return rs

    @classmethod
    def open(cls, out: str | Path, cfg) -> "RunState":
        """The interrupted run of ``--out``, checked against ``cfg``.

        Raises:
            ConfigError: no state there, an unreadable one, or one started with other settings.
        """
        d = state_dir(out)
        try:
            doc = json.loads((d / STATE).read_text())
        except FileNotFoundError:
            raise ConfigError("--resume", f"no interrupted run of {out} to resume (no {d / STATE})") from None
        except (OSError, ValueError) as e:
            raise ConfigError("--resume", f"{d / STATE} is unreadable ({e}); --overwrite starts again") from None
        if doc.get("format") != FORMAT:
            raise ConfigError("--resume", f"{d} was written by another fmtl-edge version ({doc.get('format')!r}); "
                              "--overwrite starts again")
        if doc.get("fingerprint") != fingerprint(cfg):
            old, new = doc.get("config") or {}, training_config(cfg)
            diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise ConfigError("--resume", f"the interrupted run of {out} was started with other settings "
                              f"({'; '.join(diff) or 'fingerprint differs'}); run it with the same settings, "
                              "or --overwrite to start again")
        return cls(out, doc)

    @property
    def overwrite(self) -> bool:
        """Whether the interrupted run was allowed to replace an earlier result in ``--out``."""
        return bool(self.doc.get("overwrite"))

    def summary(self) -> str:
        """``2 finished methods (a, b); ditto at job all, round 2 of 3`` (what a resume continues from)."""
        fin = list(self.doc["finished"])
        parts = [f"{len(fin)} finished method{'s' if len(fin) != 1 else ''}" + (f" ({', '.join(fin)})" if fin else "")]
        run = self.doc.get("running")
        if run and run["jobs"]:
            last = run["jobs"][-1]
            parts.append(f"{run['method']} at job {last['job']['name']}, round {last['round'] + 1} of {last['job']['rounds']}")
        return "; ".join(parts)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------------
    def _load(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        return load((self.dir / name).read_bytes())

    def finished(self, method: str) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]] | None] | None:
        """``(results entry, task → final state or None)`` of a method that finished, else None."""
        f = self.doc["finished"].get(method)
        if f is None:
            return None
        models = None
        if f.get("models") is not None:
            flat = self._load(f["models"])
            models = {t: {} for t in f["tasks"]}
            for k, a in flat.items():
                i, _, n = k.partition("/")
                models[f["tasks"][int(i)]][n] = a
        return f["entry"], models

    def finished_clients(self, method: str) -> dict[str, tuple[str, dict[str, np.ndarray], list[str]]] | None:
        """The client models (name → ``(job, state, tasks)``) of a finished method, or None."""
        f = self.doc["finished"].get(method)
        if not f or not f.get("client_models"):
            return None
        flat = self._load(f["client_models"])
        out = {c: (job, {}, list(tasks)) for c, job, tasks in f["clients"]}
        names = [c for c, _, _ in f["clients"]]
        for k, a in flat.items():
            i, _, n = k.partition("/")
            out[names[int(i)]][1][n] = a
        return out

    def running(self, method: str):
        """``(checkpoints, client-state snapshot or None)`` of ``method`` if it was the running one:
        the :class:`~fmtl_edge.plan.RoundCheckpoint` of each job it started, in order (the
        last one may be mid-job), and ``client → InProcessClientPool.state_snapshot()`` entry."""
        from fmtl_edge.plan import EnergyTally, Job, RoundCheckpoint, RoundRecord

        run = self.doc.get("running")
        if not run or run["method"] != method:
            return [], None
        ckpts = []
        for j in run["jobs"]:
            ckpts.append(RoundCheckpoint(
                job=Job.from_dict(j["job"]), round=int(j["round"]), state=self._load(j["file"]),
                affinity_per_round={int(r): np.asarray(m, dtype=np.float64) for r, m in j["affinity_per_round"].items()},
                energy=EnergyTally.from_dict(j["energy"]), history=[RoundRecord.from_dict(h) for h in j["history"]],
                wall_s=float(j["wall_s"])))
        snap: dict[int, dict[str, list]] = {}
        for cid, c in run["clients"].items():
            flat = self._load(c["file"])
            versions = [[key, int(rnd), {}] for key, rnd in c["index"]]
            for k, a in flat.items():
                i, _, n = k.partition("/")
                versions[int(i)][2][n] = a
            per_key: dict[str, list] = {}
            for key, rnd, tensors in versions:
                per_key.setdefault(key, []).append((rnd, tensors))
            snap[int(cid)] = per_key
        return ckpts, snap

    # -- writing -------------------------------------------------------------------------------------
    def _new_file(self, tensors: Mapping[str, np.ndarray]) -> str:
        from safetensors.numpy import save

        self.doc["seq"] += 1
        name = f"f{self.doc['seq']:07d}.safetensors"
        _write(self.dir / name, save({k: _contiguous(v) for k, v in tensors.items()}))
        return name

    def _commit(self) -> None:
        """Write state.json atomically, then delete the files it no longer references."""
        self.doc["updated_unix_s"] = time.time()
        tmp = self.dir / (STATE + ".tmp")
        _write(tmp, json.dumps(self.doc, default=_json_default).encode())
        os.replace(tmp, self.dir / STATE)
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        keep = {f[k] for f in self.doc["finished"].values() for k in ("models", "client_models") if f.get(k)}
        run = self.doc.get("running")
        if run:
            keep |= {j["file"] for j in run["jobs"]} | {c["file"] for c in run["clients"].values()}
        for p in self.dir.iterdir():
            if p.name != STATE and p.name not in keep:
                p.unlink(missing_ok=True)

    def curve(self, method: str) -> list[dict[str, Any]] | None:
        """The ``--eval-every`` points committed for ``method`` if it was the running one, else None."""
        run = self.doc.get("running")
        if not run or run["method"] != method:
            return None
        return [dict(p) for p in run.get("curve") or []]

    def save_round(self, method: str, ckpt, pool, curve: list[dict[str, Any]] | None = None) -> None:
        """Commit the end of a round of ``method``: its job checkpoint, the clients' own state
        (``pool.state_snapshot()``, this method's keys; a client's file is rewritten only when its
        state changed) and the ``--eval-every`` points so far (``curve``, JSON-ready dicts).
        ``ckpt.state``'s entries may be views: they are written before returning."""
        run = self.doc.get("running")
        if not run or run["method"] != method:
            run = self.doc["running"] = {"method": method, "jobs": [], "clients": {}}
        if curve is not None:
            run["curve"] = json.loads(json.dumps(list(curve), default=_json_default))
        entry = {"job": ckpt.job.to_dict(), "round": int(ckpt.round), "file": self._new_file(ckpt.state),
                 "affinity_per_round": {str(r): np.asarray(m, dtype=np.float64).tolist()
                                        for r, m in ckpt.affinity_per_round.items()},
                 "energy": ckpt.energy.to_dict(), "history": [h.to_dict() for h in ckpt.history],
                 "wall_s": float(ckpt.wall_s)}
        jobs = [j for j in run["jobs"] if j["job"]["name"] != ckpt.job.name]
        run["jobs"] = jobs + [entry]
        prefix = f"{method}/"
        for cid, per_key in (pool.state_snapshot() or {}).items():
            versions = [(k, int(r), t) for k, v in sorted(per_key.items()) if k.startswith(prefix) for r, t in v]
            if not versions:
                continue
            sig = _signature(versions)
            old = run["clients"].get(str(cid))
            if old is not None and old["sig"] == sig:
                continue
            flat = {f"{i}/{n}": a for i, (_, _, t) in enumerate(versions) for n, a in t.items()}
            run["clients"][str(cid)] = {"file": self._new_file(flat), "sig": sig,
                                        "index": [[k, r] for k, r, _ in versions]}
        self._commit()

    def save_method(self, method: str, entry: Mapping[str, Any],
                    models: Mapping[str, Mapping[str, np.ndarray]] | None, clients: Mapping[str, Any] | None = None) -> None:
        """Commit a finished method: its results entry, final models and its clients' own models
        (``clients``: name → ``(job, state, tasks)``, :func:`fmtl_edge.evaluation.client_models`);
        its round state is dropped."""
        rec: dict[str, Any] = {"entry": json.loads(json.dumps(entry, default=_json_default)), "models": None, "tasks": []}
        if models is not None:
            tasks = list(models)
            rec["tasks"] = tasks
            rec["models"] = self._new_file({f"{i}/{n}": a for i, t in enumerate(tasks) for n, a in models[t].items()})
        if clients:
            names = list(clients)
            rec["clients"] = [[c, clients[c][0], list(clients[c][2])] for c in names]
            rec["client_models"] = self._new_file({f"{i}/{n}": a for i, c in enumerate(names)
                                                   for n, a in clients[c][1].items()})
        self.doc["finished"][method] = rec
        if self.doc.get("running") and self.doc["running"]["method"] == method:
            self.doc["running"] = None
        self._commit()
