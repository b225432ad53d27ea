"""The device agent behind ``fmtl-edge join``: registers with the coordinator and runs its work.

The agent opens no port. It registers (device profile, budgets, meter, which client of the data
partition it holds and its per-task sample counts), keeps a heartbeat going on a side thread, and
long-polls for work. Each assignment is run one at a time: the global model is downloaded in chunks,
trained by :func:`fmtl_edge.client.execute` under the device lease (one FL task at a time per device,
across processes), the profile's budgets and the meter window, and the update is streamed back in
chunks with its metadata. When the connection is lost it reconnects with exponential backoff (with
jitter) and registers again; a refused token or a data partition the job cannot use ends it.

An assignment may name a power mode (``Assignment.power_mode``): with ``--allow-power-mode`` the
agent switches to it before training (:mod:`fmtl_edge.runtime.power_modes`) and restores the mode it
found when it exits, also on Ctrl-C; otherwise it trains in the current mode. Either way the
update's energy record names the mode it ran in (and why a requested one was not applied).

Data are named by a spec: ``NAME:client=ID[,clients=N][,seed=S][,max-samples=M][,alpha=A][,image-size=P]``
(the partition must be the one the job uses: same ``clients``, ``seed``, ``max-samples``... as the
job's config; the server checks and says what differs).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from fmtl_edge import __version__
from fmtl_edge.transport import fmtl_edge_pb2 as pb
from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
from fmtl_edge.transport.convert import assignment_from_pb, task_to_pb
from fmtl_edge.transport.service import bearer, channel
from fmtl_edge.transport.tensors import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ChunkSink,
    MappedState,
    SafetensorsFile,
    TensorFileError,
    iter_chunks,
    write_update_file,
)

if TYPE_CHECKING:
    from fmtl_edge.data.base import DataOptions

EXIT_AUTH = 3
EXIT_REFUSED = 2
EXIT_TLS = 2  # a TLS setting that cannot work with this server (the log names the fix)
FAULTS = ("nan", "shape", "delay", "echo", "poison")
POISON_SCALE = -10.0  # default SCALE of the ``poison[:SCALE]`` fault


def poison_state(global_state, trained, scale: float = POISON_SCALE) -> dict[str, np.ndarray]:
    """The ``poison[:SCALE]`` fault's upload: ``global + SCALE * (trained - global)`` for every float
    tensor (a scaled sign-flip "model replacement" attack when SCALE < 0; finite values, so only the
    server's norm bound or a robust aggregator stop it); other tensors are sent as trained.

    Args:
        global_state: name → array of the global model the device received.
        trained: name → array of the device's honest update.
        scale: SCALE (-10 by default).
    """
    out = {}
    for k, t in trained.items():
        t = np.asarray(t)
        g = global_state.get(k)
        if g is None or not np.issubdtype(t.dtype, np.floating):
            out[k] = t
            continue
        g = np.asarray(g, dtype=np.float64)
        out[k] = (g + float(scale) * (np.asarray(t, dtype=np.float64) - g)).astype(t.dtype)
    return out


def _l2(state, ref=None) -> float:
    s = 0.0
    for k, v in state.items():
        if np.issubdtype(np.asarray(v).dtype, np.floating):
            d = np.asarray(v, dtype=np.float64) - (0.0 if ref is None else np.asarray(ref[k], dtype=np.float64))
            s += float(np.vdot(d, d))
    return float(np.sqrt(s))


@dataclass
class DataSpec:
    """Which data a device holds: client ``client_id`` of ``dataset`` split into ``n_clients``."""

    dataset: str
    client_id: int
    n_clients: int | None = None
    seed: int = 0
    alpha: float | None = None
    max_samples: int | None = None
    image_size: int | None = None
    data_dir: str | None = None
    task_groups: int | None = None

    _KEYS = {"client": "client_id", "clients": "n_clients", "seed": "seed", "alpha": "alpha",
             "task-groups": "task_groups", "task_groups": "task_groups",
             "max-samples": "max_samples", "max_samples": "max_samples", "image-size": "image_size",
             "image_size": "image_size", "dir": "data_dir", "data-dir": "data_dir"}

    @classmethod
    def parse(cls, text: str, data_dir: str | None = None) -> "DataSpec":
        """Parse ``digits:client=3,clients=8,seed=0``.

        Raises:
            ValueError: no ``client=``, unknown key or bad value (the message shows the form).
        """
        form = "NAME:client=ID[,clients=N][,seed=S][,max-samples=M][,alpha=A][,image-size=P][,task-groups=G]"
        name, _, rest = text.partition(":")
        if not name.strip():
            raise ValueError(f"--data {text!r}: expected {form}")
        kw: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = part.partition("=")
            if not eq or k.strip() not in cls._KEYS:
                raise ValueError(f"--data {text!r}: unknown or malformed {part!r}; expected {form}")
            field_name = cls._KEYS[k.strip()]
            try:
                kw[field_name] = float(v) if field_name == "alpha" else (v if field_name == "data_dir" else int(v))
            except ValueError:
                raise ValueError(f"--data {text!r}: {k}={v!r} is not a number") from None
        if "client_id" not in kw:
            raise ValueError(f"--data {text!r}: name the client this device holds (client=ID); expected {form}")
        if data_dir is not None:
            kw["data_dir"] = data_dir
        return cls(dataset=name.strip(), **kw)

    def options(self) -> DataOptions:
        """The data set's loading options (:class:`~fmtl_edge.data.base.DataOptions`)."""
        from fmtl_edge.data.base import DataOptions

        return DataOptions(data_dir=self.data_dir, n_clients=self.n_clients, seed=self.seed, alpha=self.alpha,
                           image_size=self.image_size, max_samples=self.max_samples, task_groups=self.task_groups)

    def load(self):
        """(ClientData, FederatedDataset) of this client.

        Raises:
            fmtl_edge.data.DataError: missing data or a client id outside the partition.
        """
        from fmtl_edge.data import load_dataset
        from fmtl_edge.data.base import DataError

        ds = load_dataset(self.dataset, self.options())
        by_id = {c.client_id: c for c in ds.clients}
        if self.client_id not in by_id:
            raise DataError(f"client {self.client_id} is not in the {ds.n_clients}-client partition of "
                            f"{ds.name} (client ids 0..{ds.n_clients - 1})")
        return by_id[self.client_id], ds


@dataclass
class AgentOptions:
    """Settings of one agent (``fmtl-edge join`` flags)."""

    server: str
    token: str
    data: DataSpec
    profile: str | None = None
    meter: str | None = None
    device: str | None = None
    lease: str = "local"
    lease_wait_s: float = 5.0
    runtime_dir: str | None = None
    insecure: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    work_dir: str | None = None
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    poll_wait_s: float = 20.0
    fault: str | None = None          # testing only: nan | shape | delay:S | echo | poison[:SCALE]
    max_works: int | None = None      # testing only: exit after this many work items
    threads: str = "auto"             # intra-op threads per execution: N or auto (runtime.threads)
    allow_power_mode: bool = False    # switch to an assignment's power mode (nvpmodel -m), restored on exit
    save_model: str | None = None     # write this client's personalised models here (join --save-model DIR)


class Agent:
    """One device agent. ``run()`` blocks until ``stop`` is set, a fatal refusal, or ``max_works``.

    Args:
        opts: the settings.
        log: ``(str) -> None`` for progress lines (default: stderr).
    """

    def __init__(self, opts: AgentOptions, log: Callable[[str], None] | None = None):
        self.opts = opts
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.stop = threading.Event()
        self.state = "idle"
        self.work_id = ""
        self.cancelled: set[str] = set()
        self.session_lost = threading.Event()
        self.works_done = 0
        self.session_id = ""
        self.client = None
        self.dataset = None
        self.meter = None
        self.profile = None
        self.chunk_bytes = DEFAULT_CHUNK_BYTES
        self.work_dir = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="fmtl-agent-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._state_store = None
        self._checked_models: set = set()
        self.power = None  # runtime.power_modes.PowerModeControl, made by prepare()
        self._power_guard = None  # held while run() runs with --allow-power-mode
        if opts.fault is not None and opts.fault.split(":")[0] not in FAULTS:
            raise ValueError(f"unknown fault {opts.fault!r}; known: {FAULTS}")
        if opts.fault is not None and opts.fault.startswith("poison:"):
            try:
                float(opts.fault.partition(":")[2])
            except ValueError:
                raise ValueError(f"fault {opts.fault!r}: expected poison[:SCALE] with SCALE a number") from None

    def log(self, msg: str) -> None:
        cid = self.opts.data.client_id
        self._log(f"{time.strftime('%H:%M:%S')} [agent client {cid}] {msg}")

    # -- setup ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the data, the device profile and the meter (before connecting).

        Raises:
            DataError, ValueError, FileNotFoundError: bad data spec, profile or meter.
        """
        from fmtl_edge.runtime import load_profile, make_meter
        from fmtl_edge.runtime.power_modes import PowerModeControl, PowerModeError
        from fmtl_edge.runtime.threads import ThreadPolicy

        self.threads = ThreadPolicy.parse(self.opts.threads)
        self.client, self.dataset = self.opts.data.load()
        self.profile = load_profile(self.opts.profile)
        if self.opts.meter:
            self.meter = make_meter(self.opts.meter, **self.profile.meter_kwargs())
        else:
            self.meter = self.profile.make_meter()
        self.log(f"{self.dataset.name}: client {self.client.client_id} of {self.dataset.n_clients}, "
                 f"{self.client.n_train} training samples, tasks {', '.join(self.dataset.tasks.names)}; "
                 f"profile {self.profile.name}, meter {self.meter.source}")
        self.power = PowerModeControl(allow=self.opts.allow_power_mode, log=self.log)
        try:
            conf = self.power.conf
        except PowerModeError as e:
            self.log(f"power modes: {e}")
            conf = None
        if conf is not None:
            now = self.power.current()
            self.log(f"power modes {', '.join(conf.names)}; current {now.name if now else 'unknown'}; switching "
                     + ("allowed (the original mode is restored on exit)" if self.opts.allow_power_mode
                        else "not allowed (start with --allow-power-mode)"))
        elif self.opts.allow_power_mode:
            self.log("--allow-power-mode: this device has no nvpmodel power modes; it trains as it is")

    def register_request(self) -> pb.RegisterRequest:
        import json

        from fmtl_edge.loss_weights import client_label_stats

        p, ds, c, spec = self.profile, self.dataset, self.client, self.opts.data
        data = pb.DataInfo(
            dataset=ds.name, client_id=c.client_id, n_clients=ds.n_clients, seed=spec.seed,
            alpha=spec.alpha or 0.0, max_samples=spec.max_samples or 0, image_size=spec.image_size or 0,
            input_shape=[int(s) for s in ds.input_shape],
            tasks=[task_to_pb(t, c.n_train, c.n_test) for t in ds.tasks],
            info_json=json.dumps(ds.info, default=str),
            label_stats_json=json.dumps(client_label_stats(c.y_train, ds.tasks)),
        )
        dev = pb.DeviceInfo(
            hostname=socket.gethostname(), agent_version=__version__, profile_name=p.name,
            device_class=p.device_class, memory_budget_bytes=p.memory_budget_bytes or 0,
            round_time_s=p.round_time_s or 0.0, round_energy_j=p.round_energy_j or 0.0,
            meter=f"{self.meter.backend}:{self.meter.source}" if hasattr(self.meter, "backend") else str(self.meter.source),
            torch_device=self.opts.device or "", pid=os.getpid(),
        )
        modes = self.power.modes() if self.power is not None and self.power.available else []
        if modes:
            now = self.power.current()
            dev.power_modes.extend(m.name for m in modes)
            dev.power_mode = now.name if now is not None else ""
            dev.power_mode_allowed = bool(self.opts.allow_power_mode)
        return pb.RegisterRequest(device=dev, data=data)

    # -- power modes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def power_session(self) -> Iterator[None]:
        """Holds the power-mode guard while the agent runs (with ``--allow-power-mode`` on a device
        with power modes): the mode the agent found is restored when it exits, also on Ctrl-C and
        SIGTERM (the guard chains the handlers installed before, e.g. ``join``'s stop handler)."""
        from fmtl_edge.runtime.power_modes import PowerModeError

        if self.power is None or not self.power.allow or not self.power.available:
            yield
            return
        try:
            guard = self.power.guard().__enter__()
        except PowerModeError as e:
            self.log(f"power modes: {e}; assignments' power modes will not be applied")
            yield
            return
        self._power_guard = guard
        try:
            yield
        finally:
            self._power_guard = None
            guard.close()
            if guard.restore_error:
                self.log(f"power mode NOT restored: {guard.restore_error}")
            elif guard.original is not None:
                self.log(f"power mode {guard.original.name} in effect (as found at start)")

    def apply_power_mode(self, requested: str | None) -> str | None:
        """Switch to an assignment's ``power_mode`` when allowed; returns None when it is in effect
        (or none was asked for), else why not (the execution then trains in the current mode and the
        reason goes to its energy record's warnings)."""
        from fmtl_edge.runtime.power_modes import PowerModeError

        if not requested:
            return None
        if self._power_guard is None:
            if not self.opts.allow_power_mode:
                why = "the agent runs without --allow-power-mode"
            else:
                why = "this device has no switchable power modes"
            return f"power mode {requested} requested but not applied: {why}"
        try:
            self._power_guard.set(requested)
        except PowerModeError as e:
            return f"power mode {requested} requested but not applied: {e}"
        finally:
            if self.meter is not None:
                self.meter.refresh_power_mode()
        return None

    def note_power_mode(self, energy: dict, why_not: str | None) -> None:
        """Make an execution's energy record name the mode it ran in (from nvpmodel when the meter
        does not read it) and carry ``why_not`` (a requested mode that was not applied)."""
        if energy.get("power_mode") is None and self.power is not None:
            try:
                now = self.power.current()
            except Exception:  # informative only
                now = None
            if now is not None:
                energy["power_mode"] = now.name
        if why_not:
            energy.setdefault("warnings", []).append(why_not)

    # -- main loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped (see the class docstring); with ``--allow-power-mode`` inside
        :meth:`power_session`."""
        if self.client is None:
            self.prepare()
        with self.power_session():
            return self._serve()

    def _serve(self) -> int:
        import grpc

        o = self.opts
        md = bearer(o.token)
        backoff = o.min_backoff_s
        lost_since = None
        last_note = 0.0
        waiting = None  # why the server went away, when it said so (job complete, stopping): no error to log
        while not self.stop.is_set():
            ch = channel(o.server, insecure=o.insecure, ca=o.ca, cert=o.cert, key=o.key, server_name=o.server_name)
            hb_stop = threading.Event()
            hb = None
            closed = False
            try:
                stub = pb_grpc.CoordinatorStub(ch)
                req = self.register_request()
                if self.session_id:  # reconnecting: this agent may replace its own live session
                    req.resume_session_id = self.session_id
                reg = stub.Register(req, timeout=30, metadata=md)
                self.session_id = reg.session_id
                backoff = o.min_backoff_s
                lost_since = None
                self.session_lost.clear()
                chunk = int(reg.chunk_bytes or DEFAULT_CHUNK_BYTES)
                self.chunk_bytes = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, chunk))
                waiting = None
                self.log(f"registered with {o.server} ({reg.message}; session {reg.session_id[:8]})")
                hb = threading.Thread(target=self._heartbeat, args=(stub, reg.session_id, reg.heartbeat_interval_s or 2.0,
                                                                  hb_stop), daemon=True, name="fmtl-heartbeat")
                hb.start()
                while not self.stop.is_set() and not self.session_lost.is_set():
                    t_poll = time.monotonic()
                    r = stub.PullWork(pb.PullWorkRequest(session_id=reg.session_id, wait_s=o.poll_wait_s),
                                      timeout=o.poll_wait_s + 15, metadata=md)
                    if r.job_complete or r.closing:
                        waiting = "its next job" if r.job_complete else "it to come back"
                        self.log(f"{'the job is complete' if r.job_complete else 'the server is stopping'}: "
                                 f"{r.message or o.server}; waiting for {waiting}")
                        closed = True
                        break
                    if r.reregister:
                        self.log("the server does not know this session (restarted?): registering again")
                        break
                    if r.has_work:
                        self._run_work(stub, reg.session_id, r.work)
                        self.works_done += 1
                        if o.max_works is not None and self.works_done >= o.max_works:
                            self.log(f"done {self.works_done} work items: exiting (--max-works)")
                            return 0
                    elif time.monotonic() - t_poll < min(1.0, o.poll_wait_s / 2):
                        self.stop.wait(1.0)  # answered at once (a busy server): do not poll in a tight loop
            except grpc.RpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self.log(f"refused by the server: {e.details()} ({code.name})")
                    return EXIT_AUTH
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    self.log(f"registration refused: {e.details()}")
                    return EXIT_REFUSED
                mistake = tls_mistake(e.details() or "", o) if code == grpc.StatusCode.UNAVAILABLE else None
                if mistake:
                    self.log(f"cannot connect to {o.server}: {mistake}")
                    return EXIT_TLS
                delay = backoff * (0.5 + random.random())  # jitter: two refused agents do not retry in step
                now = time.monotonic()
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    self.log(f"registration refused: {e.details()}; retrying in {delay:.1f} s")
                    self.stop.wait(delay)
                    backoff = min(o.max_backoff_s, backoff * 2)
                    continue
                if waiting is not None:
                    pass  # the server said it was going away: waiting for it is not an error
                elif lost_since is None or now - last_note > 30:
                    since = "" if lost_since is None else f" for {now - lost_since:.0f} s"
                    self.log(f"no connection to {o.server}{since} ({code.name}: {e.details()}); "
                             f"retrying with backoff up to {o.max_backoff_s:.0f} s")
                    last_note = now
                    lost_since = lost_since or now
                self.stop.wait(delay)
                backoff = min(o.max_backoff_s, backoff * 2)
            finally:
                hb_stop.set()
                if hb is not None:
                    hb.join(timeout=5)
                ch.close()
                self.state, self.work_id = "idle", ""
            if closed:  # give the server time to go (or the next job time to start) before registering again
                backoff = o.max_backoff_s
                self.stop.wait(backoff * (0.5 + random.random()))
        return 0

    def _heartbeat(self, stub, session_id: str, interval_s: float, stop: threading.Event) -> None:
        import grpc

        md = bearer(self.opts.token)
        while not stop.wait(interval_s):
            try:
                r = stub.Heartbeat(pb.HeartbeatRequest(session_id=session_id, state=self.state, work_id=self.work_id),
                                   timeout=max(2.0, 2 * interval_s), metadata=md)
            except grpc.RpcError:
                continue
            if not r.ok:
                self.session_lost.set()
            for w in r.cancel_work_ids:
                if w == self.work_id and w not in self.cancelled:
                    self.log(f"work {w} cancelled by the server")
                self.cancelled.add(w)

    # -- one work item --------------------------------------------------------------------------------
    def _run_work(self, stub, session_id: str, w: pb.Work) -> None:
        import grpc

        md = bearer(self.opts.token)
        self.work_id = w.work_id
        what = f"evaluate {w.job}" if w.kind == "evaluate" else f"train {w.job} round {w.round + 1}"
        path = self.work_dir / f"model-{w.work_id}.safetensors"
        upath = self.work_dir / f"update-{w.work_id}.safetensors"
        try:
            self.state = "downloading"
            t0 = time.perf_counter()

            def download():
                sink = ChunkSink(path, int(w.model_bytes), None, w.model_sha256 or None)
                try:
                    for ch in stub.DownloadModel(pb.DownloadRequest(session_id=session_id, work_id=w.work_id),
                                                 metadata=md, timeout=transfer_timeout_s(int(w.model_bytes))):
                        sink.write(int(ch.offset), ch.data)
                    sink.finish()
                except BaseException:
                    sink.abort()
                    raise

            self._when_not_busy(download, w.work_id, f"{what}: download")
            dl_s = time.perf_counter() - t0
            self.log(f"{what}: model {w.model_bytes / 1e6:.1f} MB downloaded in {dl_s:.2f} s")
            model_file = SafetensorsFile(path)
            if w.kind == "evaluate":
                try:
                    meta = self._evaluate(w, model_file)
                except Exception as e:  # reported like a training failure: the agent keeps running
                    self.log(f"{what}: cannot run it (error): {e}")
                    stub.ReportFailure(pb.FailureReport(session_id=session_id, work_id=w.work_id, kind="error",
                                                        reason=str(e)), timeout=30, metadata=md)
                    return
                finally:
                    model_file.release()
                meta.session_id, meta.work_id = session_id, w.work_id
                self.state = "uploading"
                reply = stub.UploadUpdate(iter([pb.UploadMessage(meta=meta)]), timeout=60, metadata=md)
                self.log(f"{what}: evaluation {'accepted' if reply.accepted else 'rejected: ' + reply.reason}")
                return
            self.state = "training"
            try:
                meta = self._train(w, model_file, upath)
            except Exception as e:  # a structured failure the server can act on
                kind = _failure_kind(e)
                self.log(f"{what}: cannot run it ({kind}): {e}")
                stub.ReportFailure(pb.FailureReport(session_id=session_id, work_id=w.work_id, kind=kind, reason=str(e)),
                                   timeout=30, metadata=md)
                return
            finally:
                model_file.release()
            if w.work_id in self.cancelled:
                self.log(f"{what}: cancelled by the server; update not sent")
                return
            meta.session_id, meta.work_id = session_id, w.work_id
            self.state = "uploading"
            t1 = time.perf_counter()

            def messages():
                yield pb.UploadMessage(meta=meta)
                for off, data, total in iter_chunks(upath, self.chunk_bytes):
                    yield pb.UploadMessage(chunk=pb.Chunk(offset=off, data=data, total_bytes=total))

            reply = self._when_not_busy(
                lambda: stub.UploadUpdate(messages(), metadata=md, timeout=transfer_timeout_s(int(meta.total_bytes))),
                w.work_id, f"{what}: upload")
            up_s = time.perf_counter() - t1
            if reply.accepted:
                self.log(f"{what}: update accepted ({meta.total_bytes / 1e6:.1f} MB in {up_s:.2f} s, "
                         f"{meta.n_samples} samples, {meta.device_s:.2f} s on device)")
            else:
                self.log(f"{what}: update REJECTED by the server: {reply.reason}")
        except TensorFileError as e:
            self.log(f"{what}: bad model download: {e}")
            try:
                stub.ReportFailure(pb.FailureReport(session_id=session_id, work_id=w.work_id, kind="error",
                                                    reason=f"download: {e}"), timeout=30, metadata=md)
            except grpc.RpcError:
                pass
        finally:
            for p in (path, upath):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            self.state, self.work_id = "idle", ""

    def _when_not_busy(self, call: Callable[[], Any], work_id: str, what: str, tries: int = 6) -> Any:
        """``call()``, tried again with jittered backoff (0.5 s doubling to 8 s) while the server answers
        ``RESOURCE_EXHAUSTED`` (its workers or idle-stream places are taken) and the work is not
        cancelled; any other error, or the last refusal, is raised."""
        import grpc

        for attempt in range(tries):
            try:
                return call()
            except grpc.RpcError as e:
                if (e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == tries - 1
                        or work_id in self.cancelled or self.stop.is_set()):
                    raise
                wait = min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
                self.log(f"{what}: the server is busy ({e.details()}); trying again in {wait:.1f} s")
                self.stop.wait(wait)

    def _train(self, w: pb.Work, model_file: SafetensorsFile, upath: Path) -> pb.UpdateMeta:
        from fmtl_edge.client import execute
        from fmtl_edge.messages import ClientUpdate
        from fmtl_edge.runtime import DeviceLease

        fault, _, arg = (self.opts.fault or "").partition(":")
        order = model_file.names
        spec = self.job_model(w, model_file)
        p = self.profile
        if fault == "echo":  # benchmarks: no training, send the model back
            t0 = time.perf_counter()
            state = MappedState(model_file.path, model_file)
            upd = ClientUpdate(self.client.client_id, w.job, w.round, tuple(w.tasks), state, self.client.n_train,
                               {t: 0.0 for t in w.tasks}, None, 0, 0.0,
                               {"total_j": None, "source": "none", "total_scope": "none", "estimated": False})
            size, sha = write_update_file(upath, upd.state, order)
            upd.device_s = time.perf_counter() - t0
            return self._meta(upd, size, sha)
        a = assignment_from_pb(w, model_file.load(), device=self.opts.device,
                               time_budget_s=p.round_time_s, energy_budget_j=p.round_energy_j)
        why_not = self.apply_power_mode(a.power_mode)
        if why_not:
            self.log(f"train {w.job} round {w.round + 1}: {why_not}")
        lease = DeviceLease(self.opts.lease, self.opts.runtime_dir, timeout_s=self.opts.lease_wait_s,
                            owner=f"fmtl-edge join client {self.client.client_id}")
        # (raises BudgetExceeded before training when the job's memory estimate is over the profile's budget)
        upd = execute(self.client, spec, self.dataset.tasks, a, self.meter, lease, p.memory_budget_bytes,
                      self.state_store, self.threads)
        self.note_power_mode(upd.energy, why_not)
        if fault == "nan":
            k = next(n for n, v in upd.state.items() if np.issubdtype(v.dtype, np.floating))
            upd.state[k] = upd.state[k].copy()
            upd.state[k].reshape(-1)[0] = np.nan
        elif fault == "shape":
            k = next(n for n, v in upd.state.items() if np.issubdtype(v.dtype, np.floating) and v.ndim >= 1)
            v = upd.state[k]
            upd.state[k] = np.zeros((v.shape[0] + 1, *v.shape[1:]), dtype=v.dtype)
        elif fault == "poison":
            scale = float(arg) if arg else POISON_SCALE
            g = model_file.load()
            honest = _l2(upd.state, g)
            gn = _l2({k: g[k] for k in upd.state if k in g})
            upd.state = poison_state(g, upd.state, scale)
            self.log(f"fault injection: poison x{scale:g}: |trained - global| {honest:.4g} = "
                     f"{honest / max(gn, 1.0):.4g} x max(|global| {gn:.4g}, 1); upload {abs(scale) * honest:.4g} away")
        elif fault == "delay":
            self.log(f"fault injection: waiting {float(arg or 5):.1f} s before the upload")
            end = time.monotonic() + float(arg or 5)
            while time.monotonic() < end and not self.stop.is_set():
                time.sleep(0.05)
        size, sha = write_update_file(upath, upd.state, order)
        return self._meta(upd, size, sha)

    def _meta(self, upd, size: int, sha: str) -> pb.UpdateMeta:
        import json

        meta = pb.UpdateMeta(job=upd.job, round=int(upd.round), client_id=int(upd.client_id), n_samples=int(upd.n_samples),
                             train_loss={k: float(v) for k, v in upd.train_loss.items()},
                             affinity_steps=int(upd.affinity_steps), device_s=float(upd.device_s),
                             energy_json=json.dumps(upd.energy, default=str), stopped_by=upd.stopped_by or "",
                             peak_memory_bytes=int(upd.peak_memory_bytes or 0), total_bytes=int(size), sha256=sha,
                             sample_passes=int(upd.sample_passes), lookahead_passes=int(upd.lookahead_passes),
                             threads=int(upd.threads or 0))
        if upd.cpu_s is not None:
            meta.cpu_s = float(upd.cpu_s)
        if upd.affinity is not None:
            aff = np.asarray(upd.affinity, dtype=np.float64)
            meta.affinity_n = aff.shape[0]
            meta.affinity.extend(aff.reshape(-1).tolist())
        j = upd.energy.get("total_j")
        if j is not None:
            meta.energy_j = float(j)
        return meta

    @property
    def state_store(self):
        """This device's client state (personal layers, Ditto's p_k...) in ``<work dir>/state/client-<id>``:
        checksummed, kept across agent restarts with the same ``--work-dir``, never uploaded."""
        if self._state_store is None:
            from fmtl_edge.client_state import FolderStateStore

            self._state_store = FolderStateStore(self.work_dir / "state" / f"client-{self.client.client_id}")
        return self._state_store

    def job_model(self, w: pb.Work, model_file: SafetensorsFile):
        """The job's model spec, once this device has checked that it builds the same network: the
        model this device builds for the work (its factory, family, width, the work's procedure)
        must have the tensor names, shapes and dtypes of the model the server sent (its signature).

        Raises:
            ValueError: another input shape, or the first tensor that differs, named (the work is
                refused and the server told why).
        """
        import json

        from fmtl_edge.models import signature_difference, signature_digest, state_signature
        from fmtl_edge.procedures import get_procedure
        from fmtl_edge.transport.convert import spec_from_pb

        spec = spec_from_pb(w.model)
        if tuple(spec.input_shape) != tuple(self.dataset.input_shape):
            raise ValueError(f"the job's model takes inputs {spec.input_shape}, this device's data are {self.dataset.input_shape}")
        key = (w.model.SerializeToString(deterministic=True), tuple(w.tasks), w.procedure, w.method_config_json)
        if key not in self._checked_models:
            config = json.loads(w.method_config_json) if w.method_config_json else {}
            own = state_signature(get_procedure(w.procedure or "sgd").model(
                spec, self.dataset.tasks.subset(tuple(w.tasks)), config).state_dict())
            if w.model.signature and signature_digest(own) != w.model.signature:
                theirs = sorted((n, tuple(int(v) for v in shape), dt) for n, dt, shape in model_file.spec())
                why = signature_difference(theirs, own) or "the signatures differ"
                raise ValueError(f"this device builds another network than the job's (--model {spec.model}, width "
                                 f"{spec.width}): {why}; install the same model factory and version on the device")
            self._checked_models.add(key)
        return spec

    def _evaluate(self, w: pb.Work, model_file: SafetensorsFile) -> pb.UpdateMeta:
        from fmtl_edge.client import evaluate_assignment

        spec = self.job_model(w, model_file)
        a = assignment_from_pb(w, model_file.load(), device=self.opts.device)
        sums = evaluate_assignment(self.client, spec, self.dataset.tasks, a, self.state_store)
        if a.personalised and self.opts.save_model:
            self._save_own_model(a, spec)
        meta = pb.UpdateMeta(job=w.job, round=int(w.round), client_id=self.client.client_id)
        for t, s in sums.items():
            meta.eval[t].CopyFrom(pb.EvalSums(loss_sum=s["loss_sum"], metric_sum=s["metric_sum"], n=s["n"]))
        return meta


    def _save_own_model(self, a, spec) -> Path | None:
        """``--save-model DIR``: write this client's own model of a personalised evaluation (the
        model its figures come from: the final global state, its personal layers, Ditto's p_k) as
        ``DIR/<method>/clients/<id>.safetensors`` (:func:`fmtl_edge.export.save_client_model`).
        A write error is logged, never fatal: the evaluation goes on."""
        from fmtl_edge.client import client_model
        from fmtl_edge.export import save_client_model

        method = (a.state_key or a.job).split("/")[0]
        cid = self.client.client_id
        path = Path(self.opts.save_model) / method / "clients" / f"{cid}.safetensors"
        try:
            state, tasks = client_model(self.client, a, self.state_store)
            save_client_model(path, state, [self.dataset.tasks[t] for t in tasks], spec, method, cid, a.job)
        except (OSError, ValueError) as e:
            self.log(f"--save-model: could not write {path}: {e}")
            return None
        self.log(f"personalised model of {method} ({', '.join(tasks)}) written to {path}")
        return path


def tls_mistake(details: str, opts: AgentOptions, probe: Callable[[str], bool | None] | None = None) -> str | None:
    """The TLS setting that cannot work with the server, and its fix, from an ``UNAVAILABLE`` error's
    details (the handshake failure gRPC reports); None when the error is not one (a server that is
    down or restarting: keep retrying).

    Recognised: the server's certificate is not trusted (no ``--ca`` for a self-signed server, or
    the wrong one), names another host (``--server-name``), the server speaks plaintext while the
    agent uses TLS, and ``--insecure`` against a TLS server (gRPC then says only "Socket closed":
    ``probe(target)`` — default :func:`speaks_tls` — confirms it with a TLS handshake).
    """
    d = details or ""
    host = opts.server.rpartition(":")[0].strip("[]") or opts.server
    if "CERTIFICATE_VERIFY_FAILED" in d:
        why = d.split("CERTIFICATE_VERIFY_FAILED", 1)[1].strip(": ").split(":")[0].strip() or "unknown issuer"
        if opts.ca:
            return (f"the server's TLS certificate does not verify against --ca {opts.ca} ({why}): pass the "
                    "server's own certificate (when self-signed) or the CA that signed it")
        return (f"the server's TLS certificate is not trusted ({why}): pass the server's certificate (when "
                "self-signed) or its CA with --ca FILE")
    if "Hostname Verification" in d or "No match found for server name" in d:
        return (f"the server's TLS certificate does not name {opts.server_name or host!r}: pass --server-name NAME "
                "with a name it holds, or connect to the server by that name")
    if "WRONG_VERSION_NUMBER" in d and not opts.insecure:
        return ("the server does not speak TLS (it runs with --insecure): join with --insecure as well (trusted "
                "networks only), or start the server with --tls-cert/--tls-key")
    if opts.insecure and ("Socket closed" in d or "Connection reset" in d):
        if (probe or speaks_tls)(opts.server):
            return ("the server speaks TLS and this agent runs with --insecure (plaintext): drop --insecure and pass "
                    "the server's certificate or CA with --ca FILE")
    return None


def speaks_tls(target: str, timeout_s: float = 3.0) -> bool | None:
    """Whether ``HOST:PORT`` completes a TLS handshake (the certificate is not checked); None when it
    cannot be reached."""
    import socket as _socket
    import ssl

    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if host.startswith("dns:"):
        host = host.split("/")[-1]
    try:
        port_n = int(port)
    except ValueError:
        return None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with _socket.create_connection((host, port_n), timeout=timeout_s) as sock:
            with ctx.wrap_socket(sock, server_hostname=host or None):
                return True
    except ssl.SSLError:
        return False
    except OSError:
        return None


def transfer_timeout_s(nbytes: int, min_rate_bytes_s: float = 100e3) -> float:
    """Deadline (seconds) of a model download or upload of ``nbytes``: two minutes plus the time at
    ``min_rate_bytes_s`` (a stalled transfer ends instead of holding the device forever)."""
    return 120.0 + max(0, nbytes) / min_rate_bytes_s


def _failure_kind(e: BaseException) -> str:
    name = type(e).__name__
    if name == "DeviceBusy":
        return "busy"
    if name == "BudgetExceeded":
        return "memory" if getattr(e, "kind", "") == "memory" else "budget"
    if name == "DataError":
        return "data"
    return "error"
