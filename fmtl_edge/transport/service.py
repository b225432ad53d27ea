"""The gRPC endpoint of the coordinator: the servicer over a :class:`RemoteClientPool`, TLS and tokens.

Authentication is a bearer token in the ``authorization`` metadata of every call; the server checks
it with an ``authenticate(token) -> Identity | None`` function (``fmtl-server`` reads a tokens
file). A call without a valid token is answered ``UNAUTHENTICATED`` and logged with its peer. Device
tokens may use the device RPCs; ``GetStatus`` needs an ``admin`` token.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc

from fmtl_edge.transport import fmtl_edge_pb2 as pb
from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
from fmtl_edge.transport.convert import message_to_dict, work_to_pb
from fmtl_edge.transport.pool import RegistrationRefused, RemoteClientPool, release_free_heap
from fmtl_edge.transport.tensors import MAX_CHUNK_BYTES, ChunkSink, TensorFileError, iter_chunks

log = logging.getLogger("fmtl_edge.transport.service")

#: an idle upload stream (no data yet) this old may be closed to make room for a new upload
IDLE_GRACE_S = 1.0
#: message size limit on both sides: a 4 MiB chunk plus its envelope
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Identity:
    """Who a bearer token belongs to: a device name, its role (``device`` or ``admin``) and the client
    ids of the partition it may serve (None: any one client not bound to another device)."""

    name: str
    role: str = "device"
    clients: frozenset[int] | None = None


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Answers the device agents on behalf of a :class:`RemoteClientPool`.

    Every call runs on a worker of the gRPC server's thread pool, and model streams and long polls
    hold theirs for long. So that heartbeats (and the other short calls) are answered whatever the
    transfers do, :func:`start_server` keeps ``reserve_workers`` of its ``max_workers`` for them
    (:meth:`set_workers`): past the rest, a long poll answers at once and a model stream is refused
    (``RESOURCE_EXHAUSTED``, the agent retries). Besides, a device holds at most
    ``max_streams_per_device`` model streams, and the server keeps at most ``max_idle_streams``
    upload streams that have not yet sent data: a new upload closes the oldest one idle for
    ``IDLE_GRACE_S`` or more (an honest upload sends its data at once), else it is refused.

    Args:
        pool: the pool the coordinator runs rounds on.
        authenticate: ``token -> Identity | None``.
        heartbeat_interval_s: what devices are told to use.
        status: ``() -> dict`` for ``GetStatus`` (defaults to the pool's status).
        upload_first_chunk_s, upload_idle_s, max_call_s: an upload's metadata and first chunk must each
            come within ``upload_first_chunk_s`` seconds, later chunks within ``upload_idle_s``, the
            whole call within ``max_call_s``.
        max_streams_per_device: model streams (downloads and uploads) open at once per device.
        max_idle_streams: upload streams waiting for their first data at once, over all devices.
    """

    def __init__(self, pool: RemoteClientPool, authenticate: Callable[[str], Identity | None],
                 heartbeat_interval_s: float = 2.0, status: Callable[[], dict[str, Any]] | None = None,
                 upload_first_chunk_s: float = 30.0, upload_idle_s: float = 60.0, max_call_s: float = 3600.0,
                 max_streams_per_device: int = 2, max_idle_streams: int = 8):
        self.pool = pool
        self.authenticate = authenticate
        self.heartbeat_interval_s = heartbeat_interval_s
        self.status_fn = status or pool.status
        self.refused = 0
        self.upload_first_chunk_s = float(upload_first_chunk_s)
        self.upload_idle_s = float(upload_idle_s)
        self.max_call_s = float(max_call_s)
        self.max_streams_per_device = int(max_streams_per_device)
        self.max_idle_streams = int(max_idle_streams)
        self.max_workers: int | None = None      # set by start_server (set_workers)
        self.max_held: int | None = None         # workers that streams and long polls may hold (None: no bound)
        self._streams: dict[str, int] = {}
        self._held = 0                           # model streams and long polls in progress
        self._idle: dict[object, tuple[float, Any, str]] = {}  # upload streams without data yet: opened, call, device
        self._streams_lock = threading.Lock()
        self._watchdog = _Watchdog()

    def set_workers(self, max_workers: int, reserve_workers: int | None = None) -> None:
        """The server's thread pool has ``max_workers`` workers; keep ``reserve_workers`` (default
        ``max(2, max_workers // 8)``) of them free of streams and long polls, for heartbeats."""
        reserve = max(2, max_workers // 8) if reserve_workers is None else int(reserve_workers)
        self.max_workers = int(max_workers)
        self.max_held = max(1, int(max_workers) - reserve)

    # -- stream limits -----------------------------------------------------------------------------------
    def _open_stream(self, who: Identity, rpc: str, context, idle_key: object | None = None) -> None:
        """Count a model stream of ``who``; abort RESOURCE_EXHAUSTED beyond ``max_streams_per_device``
        or the workers kept for short calls. An upload (``idle_key`` given) counts as idle until
        :meth:`_active`; when ``max_idle_streams`` are idle, the oldest one idle for at least
        ``IDLE_GRACE_S`` is closed to make room (an honest upload sends its data at once), else
        this one is refused."""
        victim = None
        with self._streams_lock:
            n = self._streams.get(who.name, 0)
            now = time.monotonic()
            if n >= self.max_streams_per_device:
                reason = (f"device {who.name!r} already has {n} model streams open (max_streams_per_device = "
                          f"{self.max_streams_per_device}); finish or cancel them first")
            elif self.max_held is not None and self._held >= self.max_held:
                reason = (f"the server is busy: {self._held} model streams and long polls hold its workers "
                          f"({self.max_workers - self.max_held} of max_workers = {self.max_workers} are kept for "
                          "heartbeats); retry shortly")
            elif (idle_key is not None and len(self._idle) >= self.max_idle_streams
                  and (not self._idle or now - next(iter(self._idle.values()))[0] < IDLE_GRACE_S)):
                reason = (f"the server has {len(self._idle)} upload streams that have sent no data yet "
                          f"(max_idle_streams = {self.max_idle_streams}); retry shortly")
            else:
                if idle_key is not None and len(self._idle) >= self.max_idle_streams:
                    vkey = next(iter(self._idle))
                    victim = (vkey, *self._idle.pop(vkey))
                self._streams[who.name] = n + 1
                self._held += 1
                if idle_key is not None:
                    self._idle[idle_key] = (now, context, who.name)
                reason = None
        if victim is not None:
            vkey, opened, vctx, vname = victim
            why = (f"idle upload stream closed after {time.monotonic() - opened:.1f} s without data: "
                   f"max_idle_streams = {self.max_idle_streams} streams were idle and another upload needed a place")
            log.warning("refused UploadUpdate from %s: %s", vname, why)
            self.pool.stats.count_refusal(vname, "UploadUpdate", why)
            self._watchdog.cut(vkey, vctx)
        if reason is None:
            return
        log.warning("refused %s from %s: %s", rpc, who.name, reason)
        self.pool.stats.count_refusal(who.name, rpc, reason)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

    def _active(self, idle_key: object) -> None:
        """An upload stream sent data (or needs none): it no longer counts as idle."""
        with self._streams_lock:
            self._idle.pop(idle_key, None)

    def _close_stream(self, who: Identity, idle_key: object | None = None) -> None:
        with self._streams_lock:
            if idle_key is not None:
                self._idle.pop(idle_key, None)
            self._streams[who.name] = max(0, self._streams.get(who.name, 1) - 1)
            self._held = max(0, self._held - 1)

    def _hold_poll(self) -> bool:
        """Count a long poll; False when the workers kept for short calls would be needed (the poll
        then answers at once)."""
        with self._streams_lock:
            if self.max_held is not None and self._held >= self.max_held:
                return False
            self._held += 1
            return True

    def _release_poll(self) -> None:
        with self._streams_lock:
            self._held = max(0, self._held - 1)

    def _arm(self, key: object, context, who: Identity, wait_s: float, started: float, why: str) -> None:
        """Cancel the call unless it makes progress within ``wait_s`` (and ends within ``max_call_s``)."""
        end = min(time.monotonic() + wait_s, started + self.max_call_s)
        if end == started + self.max_call_s:
            why = f"the call ran past max_call_s = {self.max_call_s:g} s"

        def expire(why=why):
            log.warning("refused UploadUpdate from %s: %s; stream closed", who.name, why)
            self.pool.stats.count_refusal(who.name, "UploadUpdate", why)

        self._watchdog.arm(key, end, context, expire)

    # -- auth --------------------------------------------------------------------------------------------
    def _who(self, context: grpc.ServicerContext, rpc: str, admin: bool = False) -> Identity:
        """The caller's identity, or the call is aborted (UNAUTHENTICATED / PERMISSION_DENIED) and logged
        with ``rpc``'s name."""
        token = ""
        for k, v in context.invocation_metadata() or ():
            if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
                token = v[len("Bearer "):].strip()
        ident = self.authenticate(token) if token else None
        if ident is None:
            self.refused += 1
            broken = getattr(self.authenticate, "error", None)  # a tokens file that fails closed says why
            if broken:
                log.warning("refused %s from %s: %s; every token is refused until it is fixed", rpc,
                            context.peer(), broken)
                self.pool.stats.count_refusal("(no valid token)", rpc, broken)
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "the server cannot check tokens now (its tokens file is unusable); ask its operator")
            log.warning("refused %s from %s: %s bearer token", rpc, context.peer(),
                        "invalid" if token else "missing")
            self.pool.stats.count_refusal("(no valid token)", rpc, f"{'invalid' if token else 'missing'} bearer token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required (fmtl-edge join --token)")
        if admin and ident.role != "admin":
            log.warning("refused %s from %s (%s): admin role needed", rpc, context.peer(), ident.name)
            self.pool.stats.count_refusal(ident.name, rpc, "admin role needed")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin token")
        return ident

    # -- RPCs ----------------------------------------------------------------------------------------------
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        who = self._who(context, "Register")
        data = request.data
        tasks = {t.name: int(t.train_samples) for t in data.tasks}
        n_train = max(tasks.values(), default=0)
        n_test = max((int(t.test_samples) for t in data.tasks), default=0)
        try:
            d = self.pool.registry.register(who.name, int(data.client_id), tasks, n_train, n_test, message_to_dict(data),
                                   message_to_dict(request.device), allowed_clients=who.clients,
                                   resume_session_id=request.resume_session_id or None)
        except RegistrationRefused as e:
            (log.info if e.code == "UNAVAILABLE" else log.warning)(
                "refused Register from %s (client %d): %s", who.name, data.client_id, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        return pb.RegisterReply(session_id=d.session_id, server_id=self.pool.server_id,
                                heartbeat_interval_s=self.heartbeat_interval_s,
                                heartbeat_timeout_s=self.pool.policy.heartbeat_timeout_s,
                                chunk_bytes=self.pool.chunk_bytes, max_update_bytes=self.pool.max_update_bytes,
                                message=f"registered as client {d.client_id}")

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        who = self._who(context, "Heartbeat")
        ok, cancel = self.pool.registry.heartbeat(request.session_id, who.name, request.state, request.work_id)
        return pb.HeartbeatReply(ok=ok, cancel_work_ids=cancel)

    def PullWork(self, request: pb.PullWorkRequest, context) -> pb.PullWorkReply:
        who = self._who(context, "PullWork")
        wait = request.wait_s if request.wait_s > 0 else 20.0
        # do not hold the thread past the client's own deadline
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, max(0.0, remaining - 1.0))
        held = self._hold_poll()
        try:
            item = self.pool.registry.pull(request.session_id, who.name, wait if held else 0.0)
        finally:
            if held:
                self._release_poll()
        if item == "reregister":
            return pb.PullWorkReply(reregister=True, message="unknown session: register again")
        if item is None:
            reg = self.pool.registry
            if reg.closed:  # the job is over or the server stops: the device is told, not left to guess
                return pb.PullWorkReply(has_work=False, closing=True, job_complete=reg.job_complete,
                                        message=reg.closing_reason)
            return pb.PullWorkReply(has_work=False)
        a = item.slot.assignment
        return pb.PullWorkReply(has_work=True, work=work_to_pb(item.work_id, item.kind, a, self.pool.model_info,
                                                               item.model.size_bytes, item.model.sha256,
                                                               item.deadline_s))

    def DownloadModel(self, request: pb.DownloadRequest, context):
        who = self._who(context, "DownloadModel")
        item = self.pool.registry.item_for(request.session_id, who.name, request.work_id)
        if item is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no running work {request.work_id!r} for this session (cancelled?)")
        self._open_stream(who, "DownloadModel", context)
        try:
            for off, data, total in iter_chunks(item.model.path, self.pool.chunk_bytes, int(request.offset)):
                yield pb.Chunk(offset=off, data=data, total_bytes=total)
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, "the round is over; the model is gone")
        except ValueError as e:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        finally:
            self._close_stream(who)

    def UploadUpdate(self, request_iterator, context) -> pb.UploadReply:
        """One upload stream: metadata, then chunks. At most ``max_streams_per_device`` streams per
        device; the metadata and the first chunk must each come within ``upload_first_chunk_s``,
        later chunks within ``upload_idle_s``, the whole call within ``max_call_s``, or the server
        cancels the call (counted as a refusal)."""
        who = self._who(context, "UploadUpdate")
        key = object()
        self._open_stream(who, "UploadUpdate", context, idle_key=key)
        try:
            return self._upload(who, request_iterator, context, key)
        finally:
            self._watchdog.disarm(key)
            self._close_stream(who, key)

    def _upload(self, who: Identity, request_iterator, context, key: object) -> pb.UploadReply:
        started = time.monotonic()
        first_s = self.upload_first_chunk_s
        self._arm(key, context, who, first_s, started,
                  f"no metadata within {first_s:g} s of opening the upload (upload_first_chunk_s)")
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("body") != "meta":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of an upload must be its metadata")
        meta = first.meta
        item = self.pool.registry.item_for(meta.session_id, who.name, meta.work_id)
        if item is None:  # answering ends the call; the chunks are not read
            return pb.UploadReply(accepted=False, reason=self.pool.work.why_not(meta.work_id))
        path = None
        if item.kind != "train" or int(meta.total_bytes) <= 0:
            self._active(key)  # no data to wait for
        if item.kind == "train":
            path = self.pool.uploads.path(item.work_id)
            try:
                sink = ChunkSink(path, int(meta.total_bytes), self.pool.max_update_bytes, meta.sha256 or None)
            except TensorFileError as e:
                return pb.UploadReply(accepted=False, reason=self.pool.uploads.reject(item, str(e)))
            try:
                if int(meta.total_bytes) > 0:
                    self._arm(key, context, who, first_s, started,
                              f"no data within {first_s:g} s of the metadata (upload_first_chunk_s)")
                for msg in request_iterator:
                    if msg.WhichOneof("body") != "chunk":
                        raise TensorFileError("metadata sent twice in one upload")
                    sink.write(int(msg.chunk.offset), msg.chunk.data)
                    self._active(key)
                    self._arm(key, context, who, self.upload_idle_s, started,
                              f"no data for {self.upload_idle_s:g} s (upload_idle_s)")
                if self._watchdog.expired(key):
                    # the server cancelled this stream (a bound passed): drop its bytes; the work item
                    # stays the device's (its heartbeat and the round's deadline decide about it)
                    sink.abort()
                    return pb.UploadReply(accepted=False, reason="the server closed this upload stream (too slow)")
                self._watchdog.disarm(key)
                sink.finish()
            except TensorFileError as e:
                sink.abort()
                return pb.UploadReply(accepted=False, reason=self.pool.uploads.reject(item, str(e)))
            except BaseException:
                sink.abort()  # the stream broke or was cancelled: the heartbeat timeout frees the slot
                if self._watchdog.expired(key):
                    return pb.UploadReply(accepted=False, reason="the server closed this upload stream (too slow)")
                raise
            release_free_heap()  # this stream's freed chunk buffers, before the update can be aggregated
        ok, reason = self.pool.uploads.finish(item, meta, path)
        return pb.UploadReply(accepted=ok, reason=reason)

    def ReportFailure(self, request: pb.FailureReport, context) -> pb.Ack:
        who = self._who(context, "ReportFailure")
        ok = self.pool.registry.report_failure(request.session_id, who.name, request.work_id, request.kind, request.reason)
        return pb.Ack(ok=ok, message="" if ok else "unknown work or session")

    def GetStatus(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        self._who(context, "GetStatus", admin=True)
        return pb.StatusReply(json=json.dumps(self.status_fn(), default=str))


class _Watchdog:
    """Cancels calls past their deadline: one daemon thread for every armed stream."""

    def __init__(self):
        self._cv = threading.Condition()
        self._armed: dict[object, tuple[float, Any, Callable[[], None]]] = {}
        self._expired: dict[object, str] = {}
        self._thread: threading.Thread | None = None

    def arm(self, key: object, deadline: float, context, on_expire: Callable[[], None]) -> None:
        with self._cv:
            self._armed[key] = (deadline, context, on_expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="fmtl-rpc-watchdog")
                self._thread.start()
            self._cv.notify()

    def disarm(self, key: object) -> None:
        with self._cv:
            self._armed.pop(key, None)
            self._expired.pop(key, None)

    def cut(self, key: object, context) -> None:
        """Cancel the call of ``key`` now (it was armed or not); :meth:`expired` then says so."""
        with self._cv:
            self._armed.pop(key, None)
            self._expired[key] = "cancelled"
        context.cancel()

    def expired(self, key: object) -> str | None:
        """Why the call of ``key`` was cancelled (None: it was not)."""
        with self._cv:
            return self._expired.get(key)

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                due = [(k, v) for k, v in self._armed.items() if v[0] <= now]
                for k, _ in due:
                    del self._armed[k]
                    self._expired[k] = "cancelled"
                nxt = min((v[0] for v in self._armed.values()), default=now + 1.0)
                if not due:
                    self._cv.wait(max(0.01, min(1.0, nxt - now)))
            for _, (_, context, on_expire) in due:
                try:
                    on_expire()
                finally:
                    context.cancel()


@dataclass
class TLSConfig:
    """Server TLS: certificate and key (PEM); ``client_ca`` set = client certificates required."""

    cert: str | Path
    key: str | Path
    client_ca: str | Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)


def start_server(servicer: CoordinatorServicer, listen: str, tls: TLSConfig | None, max_workers: int = 64) -> tuple[grpc.Server, int]:
    """Start the gRPC server on ``listen`` (``HOST:PORT``; port 0 picks one) with ``max_workers``
    threads, some kept for short calls (:meth:`CoordinatorServicer.set_workers`). ``tls=None`` is
    plaintext.

    Returns:
        (server, bound port)

    Raises:
        RuntimeError: the address cannot be bound (in use, bad host).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fmtl-rpc"),
                         options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    if isinstance(servicer, CoordinatorServicer):
        servicer.set_workers(max_workers)
    try:
        port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {listen}: {e}") from None
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen} (address in use or not available)")
    server.start()
    return server, port


def channel(target: str, *, insecure: bool = False, ca: str | Path | None = None, cert: str | Path | None = None,
            key: str | Path | None = None, server_name: str | None = None) -> grpc.Channel:
    """A client channel to the coordinator: TLS (``ca`` = the server's CA or self-signed certificate;
    ``cert``/``key`` = client certificate) unless ``insecure``."""
    opts = list(GRPC_OPTIONS)
    if insecure:
        return grpc.insecure_channel(target, options=opts)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(target, creds, options=opts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
