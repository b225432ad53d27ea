"""A :class:`~fmtl_edge.pool.ClientPool` over a Flower :class:`~flwr.serverapp.Grid`.

The coordinator is the same code as in ``simulate`` and ``fmtl-server`` (docs/design.md §1): only the
pool differs. :class:`FlowerGridPool` turns each ``(client, Assignment)`` into a Flower ``train``
or ``evaluate`` :class:`~flwr.app.Message` to the client's node (:mod:`fmtl_edge.flower.codec`),
pushes a round's messages together (:meth:`Grid.push_messages`: Flower's engine runs them, in
parallel where it has the resources), pulls the replies (:meth:`Grid.pull_messages`) and hands
them on **in the plan's order** as soon as the next one is there, so the streaming aggregation
adds them in the same order as the in-process pool does and the driver holds only the replies
that arrive ahead of their turn.

Every reply is checked before it reaches the aggregate (:func:`check_update`: ``fmtl-server``'s
rules, with :mod:`fmtl_edge.transport.validation`'s functions): it must be the echo of its
assignment (job, round, client) and carry no tensor outside :meth:`Assignment.uploaded_names`
(client state — personal layers — and frozen layers never leave a client), every tensor with the
global model's shape and dtype, no NaN/Inf, within the norm bound of the global model, a sample
count within the client's training samples, and finite, non-negative losses, seconds and joules.
A node that does not answer in ``timeout_s``, answers with a Flower error or fails a check is a
structured refusal (``{"kind": "timeout" | "error" | "invalid", "message": ...}``) that the round
goes on without. An evaluation reply is checked the same way (sample counts within the client's
test samples, sums in range); the clients that did not answer are logged and listed
(:attr:`FlowerGridPool.last_evaluation`).

Clients and nodes: a run's ``clients`` are served by as many of the connected nodes
(:func:`choose_nodes`: all of them when there are as many, else a sample seeded by the run seed),
each known by its node config's ``partition-id``. Before every exchange the pool looks for node ids
it has not seen (:meth:`FlowerGridPool.refresh_nodes`): a SuperNode that reconnects (a new node id)
with the ``partition-id`` of one of the run's clients serves that client again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.pool import ClientPool, refusal
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.models import ModelSpec
from fmtl_edge.transport.validation import (Limits, UpdateRejected, check_energy, check_eval_sums,
                                            check_norm_bound, check_resources, check_samples, check_train_losses,
                                            state_distance, state_norm)

from . import codec

log = logging.getLogger("fmtl_edge.flower")


def wait_for_nodes(grid, n: int | None, wait_s: float, settle_s: float = 2.0, poll_s: float = 0.1) -> list[int]:
    """The grid's node ids, once ``n`` have connected (``n`` None: once the count has not changed
    for ``settle_s`` seconds and is at least 1).

    Raises:
        TimeoutError: fewer than ``n`` (or no) nodes after ``wait_s`` seconds.
    """
    end = time.monotonic() + wait_s
    last, since = -1, time.monotonic()
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        if n is not None and len(ids) >= n:
            return ids
        if len(ids) != last:
            last, since = len(ids), time.monotonic()
        elif n is None and ids and time.monotonic() - since >= settle_s:
            return ids
        if time.monotonic() > end:
            want = f"{n}" if n is not None else "at least 1"
            raise TimeoutError(f"{len(ids)} Flower node(s) connected after {wait_s:.0f} s, {want} needed")
        time.sleep(poll_s)


def identify_nodes(grid, node_ids: Sequence[int], timeout_s: float, strict: bool = True) -> dict[int, int]:
    """Ask nodes for their ``partition-id`` (an ``identify`` query: the ClientApp loads no data).
    Returns node id → partition-id.

    Args:
        strict: raise when a node does not answer (False: leave it out).

    Raises:
        RuntimeError: (strict) a node did not answer or answered with an error; two nodes have one
            partition-id.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    msgs = [Message(RecordDict({"fmtl.query": ConfigRecord({"identify": True})}), dst_node_id=int(n),
                    message_type="query") for n in node_ids]
    out: dict[int, int] = {}
    for m in grid.send_and_receive(msgs, timeout=timeout_s):
        src = int(m.metadata.src_node_id)
        if m.has_error():
            if strict:
                raise RuntimeError(f"Flower node {src} could not say its partition-id: {m.error.reason}")
            continue
        pid = codec.decode_info(m.content).get("partition_id")
        if pid is None:
            raise RuntimeError(f"Flower node {src} has no partition-id in its node config")
        out[src] = int(pid)
    missing = sorted(set(int(n) for n in node_ids) - set(out))
    if missing and strict:
        raise RuntimeError(f"Flower node(s) {missing[:5]} did not answer in {timeout_s:.0f} s")
    seen: dict[int, int] = {}
    for node, pid in sorted(out.items()):
        if pid in seen and strict:
            raise RuntimeError(f"Flower nodes {seen[pid]} and {node} both have partition-id {pid}: give every "
                               "SuperNode its own (flower-supernode --node-config 'partition-id=<n>')")
        seen[pid] = node
    return out


def choose_nodes(partitions: Mapping[int, int], clients: int | None, seed: int) -> dict[int, int]:
    """Which node serves which client of a run: client id → node id.

    The nodes are ordered by ``partition-id``. With ``clients`` equal to the number of nodes (or
    None) every node serves, client ``i`` on the ``i``-th node (on Flower's simulation engine: the
    node with partition-id ``i``). With fewer clients, ``clients`` partition-ids are drawn without
    replacement by ``random.Random(derive_seed(seed, "flower-nodes"))`` from the sorted
    partition-ids, sorted again, and client ``i`` is the ``i``-th drawn: the same seed and the same
    nodes give the same choice.

    Raises:
        ConfigError: more clients than nodes (naming ``clients`` and the fix).
    """
    import random

    from fmtl_edge.client import derive_seed
    from fmtl_edge.config import ConfigError

    by_pid = {pid: node for node, pid in partitions.items()}
    pids = sorted(by_pid)
    k = len(pids) if clients is None else int(clients)
    if k > len(pids):
        raise ConfigError("clients", f"{k} clients but {len(pids)} Flower node(s) connected: start more SuperNodes "
                                     f"or set clients <= {len(pids)}")
    if k < len(pids):
        pids = sorted(random.Random(derive_seed(seed, "flower-nodes")).sample(pids, k))
    return {i: by_pid[pid] for i, pid in enumerate(pids)}


def query_nodes(grid, node_ids, timeout_s: float) -> dict[int, dict[str, Any]]:
    """Ask every node for its client's description (a ``query`` message; the first node also
    describes the data set and its device). Returns node id → :func:`~fmtl_edge.flower.data.client_info`.

    Args:
        node_ids: client id → node id (:func:`choose_nodes`: each message names the node's client),
            or a sequence of node ids (each node describes its partition-id's client).

    Raises:
        RuntimeError: a node did not answer, answered with an error, or two nodes serve one client.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    pairs = (list(node_ids.items()) if isinstance(node_ids, Mapping) else [(None, n) for n in node_ids])
    msgs = []
    for i, (cid, n) in enumerate(pairs):
        recs = {"fmtl.query": ConfigRecord({"with_dataset": i == 0})}
        if cid is not None:
            recs[codec.CLIENT] = codec.client_record(cid)
        msgs.append(Message(RecordDict(recs), dst_node_id=int(n), message_type="query"))
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    out: dict[int, dict[str, Any]] = {}
    for m in replies:
        src = int(m.metadata.src_node_id)
        if m.has_error():
            raise RuntimeError(f"Flower node {src} could not describe its client: {m.error.reason}")
        out[src] = codec.decode_info(m.content)
    missing = sorted(set(int(n) for _, n in pairs) - set(out))
    if missing:
        raise RuntimeError(f"Flower node(s) {missing[:5]} did not answer the query in {timeout_s:.0f} s")
    seen: dict[int, int] = {}
    for node, info in out.items():
        cid = int(info["client_id"])
        if cid in seen:
            raise RuntimeError(f"Flower nodes {seen[cid]} and {node} both serve client (partition-id) {cid}")
        seen[cid] = node
    return out


class FlowerGridPool(ClientPool):
    """Clients on Flower nodes, reached through the ServerApp's :class:`~flwr.serverapp.Grid`.

    Args:
        grid: the ServerApp's grid (``main(grid, context)``).
        infos: node id → the client's description (:func:`query_nodes`): its ``client_id``, its
            node's ``partition_id``, its tasks and sample counts.
        spec: the model architecture (sent with every assignment).
        timeout_s: seconds a round waits for its replies after pushing its messages.
        poll_s: seconds between two pulls while no reply has come (Flower's own send_and_receive: 0.1).
        limits: the update checks' settings (:class:`~fmtl_edge.transport.validation.Limits`:
            norm bound, sample cap, task kinds); None: the defaults.
        identify_timeout_s: how long :meth:`refresh_nodes` waits for a new node's ``partition-id``.

    Attributes:
        messages_sent, bytes_sent: ``train``/``evaluate`` messages sent and the bytes of their
            arrays (the round's shared ArrayRecord counted once per message).
        remapped: ``(client, old node, new node)`` for every client handed to a reconnected node.
        last_evaluation: the last :meth:`evaluate`'s ``{"asked": [clients], "answered": [clients],
            "missing": {client: why}}``.
    """

    def __init__(self, grid, infos: Mapping[int, Mapping[str, Any]], spec: ModelSpec, timeout_s: float = 600.0,
                 poll_s: float = 0.1, limits: Limits | None = None, identify_timeout_s: float = 30.0):
        self.grid = grid
        self.spec = spec
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self.limits = limits if limits is not None else Limits()
        self.identify_timeout_s = float(identify_timeout_s)
        self._node: dict[int, int] = {int(i["client_id"]): int(n) for n, i in infos.items()}
        self._tasks: dict[int, set[str]] = {int(i["client_id"]): set(i["tasks"]) for i in infos.values()}
        self._n_train: dict[int, int | None] = {int(i["client_id"]): i.get("n_train") for i in infos.values()}
        self._n_test: dict[int, int | None] = {int(i["client_id"]): i.get("n_test") for i in infos.values()}
        self._label_stats: dict[int, Any] = {int(i["client_id"]): i.get("label_stats") for i in infos.values()}
        self._by_partition: dict[int, int] = {int(i["partition_id"]): int(i["client_id"]) for i in infos.values()
                                              if i.get("partition_id") is not None}
        self._seen_nodes: set[int] = {int(n) for n in infos}
        self._norms: dict[int, float] = {}
        self.messages_sent = 0
        self.bytes_sent = 0
        self.remapped: list[tuple[int, int, int]] = []
        self.last_evaluation: dict[str, Any] | None = None

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._node)

    def node_of(self, client_id: int) -> int:
        """The Flower node id serving ``client_id``."""
        return self._node[int(client_id)]

    def train_sizes(self) -> dict[int, int] | None:
        if any(v is None for v in self._n_train.values()):
            return None
        return {c: int(n) for c, n in self._n_train.items()}

    def label_statistics(self, tasks) -> dict[int, dict[str, dict]] | None:
        """The clients' label statistics from their ``query`` replies, each checked
        (:func:`fmtl_edge.loss_weights.check_label_stats`; a node's claims are not trusted)."""
        from fmtl_edge.loss_weights import check_label_stats

        out = {}
        for c, stats in self._label_stats.items():
            if stats is None or self._n_train.get(c) is None:
                return None
            check_label_stats(stats, tasks, int(self._n_train[c]), self._dense_values(tasks))
            out[c] = {t: s for t, s in stats.items() if t in tasks.names}
        return out

    def _dense_values(self, tasks) -> dict[str, int]:
        shape = tuple(self.spec.input_shape)
        return {t.name: int(np.prod(shape[1:])) * t.out_dim for t in tasks if t.kind == "dense"}

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        return [c for c in self.client_ids if self._tasks[c] & set(tasks)]

    def refresh_nodes(self) -> list[tuple[int, int, int]]:
        """Hand clients to reconnected nodes: node ids the grid lists and the pool has not seen are
        asked for their ``partition-id`` (once each); a new node with the partition-id of one of
        the run's clients serves that client from now on (the newest node wins). Returns the
        ``(client, old node, new node)`` changes made."""
        ids = {int(i) for i in self.grid.get_node_ids()}
        new = sorted(ids - self._seen_nodes)
        if not new:
            return []
        self._seen_nodes.update(new)
        parts = identify_nodes(self.grid, new, self.identify_timeout_s, strict=False)
        changes = []
        for node, pid in sorted(parts.items()):
            cid = self._by_partition.get(pid)
            if cid is not None and self._node[cid] != node:
                changes.append((cid, self._node[cid], node))
                log.warning("client %d (partition-id %d) is served by Flower node %d from now on (was node %d)",
                            cid, pid, node, self._node[cid])
                self._node[cid] = node
        self.remapped.extend(changes)
        return changes

    # -- messages --------------------------------------------------------------------------------
    def _messages(self, work: Sequence[tuple[int, Assignment]], message_type: str):
        from flwr.app import Message

        records: dict[int, Any] = {}  # one ArrayRecord per distinct global state (per round)
        msgs = []
        for cid, a in work:
            rec = records.get(id(a.state))
            if rec is None:
                rec = records[id(a.state)] = codec.state_to_record(a.state)
            msgs.append(Message(codec.encode_assignment(a, self.spec, rec, client_id=cid),
                                dst_node_id=self.node_of(cid), message_type=message_type))
            self.messages_sent += 1
            self.bytes_sent += int(rec.count_bytes())
        return msgs

    def _exchange(self, work: Sequence[tuple[int, Assignment]], message_type: str) -> Iterator[tuple[int, Any]]:
        """Push every message of ``work`` (:meth:`Grid.push_messages`), then pull the replies
        (:meth:`Grid.pull_messages`, matched by ``reply_to_message_id``) and yield ``(index, reply)``
        in ``work``'s order as soon as the next one in that order is there (None: no reply within
        ``timeout_s`` of the push). Only replies that arrive ahead of their turn are held, so a
        round's updates reach the aggregation while later clients still train.

        Raises:
            RuntimeError: the grid did not accept every message.
        """
        self.refresh_nodes()
        msgs = self._messages(work, message_type)
        ids = [str(i) for i in self.grid.push_messages(msgs)]
        if len(ids) != len(msgs) or len(set(ids)) != len(ids):
            raise RuntimeError(f"the Flower grid accepted {len(set(ids))} of {len(msgs)} messages")
        del msgs
        pending, got = set(ids), {}
        end = time.monotonic() + self.timeout_s
        nxt = 0
        while nxt < len(ids):
            while nxt < len(ids) and ids[nxt] in got:
                yield nxt, got.pop(ids[nxt])
                nxt += 1
            if nxt >= len(ids) or not pending or time.monotonic() > end:
                break
            fresh = 0
            for m in self.grid.pull_messages(set(pending)):
                mid = str(m.metadata.reply_to_message_id)
                if mid in pending:
                    pending.discard(mid)
                    got[mid] = m
                    fresh += 1
            if not fresh:
                time.sleep(self.poll_s)
        for i in range(nxt, len(ids)):
            yield i, got.pop(ids[i], None)

    def _update(self, cid: int, a: Assignment, reply) -> ClientUpdate:
        if reply is None:
            return refusal(cid, a, {"kind": "timeout", "message": f"no reply from Flower node {self.node_of(cid)} "
                                                                  f"in {self.timeout_s:.0f} s"})
        if reply.has_error():
            return refusal(cid, a, {"kind": "error", "message": f"Flower node {self.node_of(cid)}: {reply.error.reason}"})
        try:
            upd = codec.decode_update(reply.content)
        except ValueError as e:
            return refusal(cid, a, {"kind": "invalid", "message": str(e)})
        if upd.error is not None:
            return upd
        norm = self._norms.get(id(a.state))
        if norm is None:
            norm = self._norms[id(a.state)] = state_norm({k: a.state[k] for k in a.uploaded_names(a.state)})
        why = check_update(cid, a, upd, n_train=self._n_train.get(cid), held=self._tasks.get(cid),
                           limits=self.limits, global_norm=norm)
        if why:
            log.warning("refused the update of client %d (%s/%s round %d): %s", cid, a.state_key, a.job, a.round, why)
            return refusal(cid, a, {"kind": "invalid", "message": why})
        return upd

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        """All of ``work`` pushed at once; updates yielded in ``work``'s order (the in-process
        pool's order, so the aggregate is the same bit for bit) as they become available."""
        work = list(work)
        if not work:
            return
        self._norms = {}
        for i, reply in self._exchange(work, "train"):
            cid, a = work[i]
            yield self._update(cid, a, reply)

    def execute_in_turn(self, client_id: int, a: Assignment) -> Iterator[ClientUpdate]:
        """One client of a sequential round (a ring visit): its own message, its own reply."""
        yield from self.execute_many([(client_id, a)])

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        """The test sums of the clients that answered (``client → job → task → sums``), each reply
        checked (:func:`check_eval`); a client that did not answer, answered with an error or
        failed a check is absent, logged, and listed in :attr:`last_evaluation` ``["missing"]``."""
        out: dict[int, dict[str, dict]] = {}
        requests = list(requests)
        asked = sorted({int(c) for c, _ in requests})
        missing: dict[int, str] = {}
        if not requests:
            self.last_evaluation = {"asked": asked, "answered": [], "missing": missing}
            return out
        for i, reply in self._exchange(requests, "evaluate"):
            cid, a = requests[i]
            if reply is None or reply.has_error():
                why = f"no reply in {self.timeout_s:.0f} s" if reply is None else reply.error.reason
                missing[int(cid)] = f"job {a.job}: {why}"
                continue
            try:
                sums = check_eval(codec.decode_eval(reply.content), a, self._tasks.get(int(cid)),
                                  self._n_test.get(int(cid)), self.limits)
            except (ValueError, TypeError, KeyError) as e:
                missing[int(cid)] = f"job {a.job}: refused ({e})"
                continue
            out.setdefault(int(cid), {})[a.job] = sums
        for cid in list(out):
            if cid in missing:  # one of its jobs is missing: the client's figures are not whole
                del out[cid]
        self.last_evaluation = {"asked": asked, "answered": sorted(out), "missing": dict(sorted(missing.items()))}
        if missing:
            log.warning("evaluation reached %d of %d clients; missing %s (their test samples are not counted)",
                        len(out), len(asked), "; ".join(f"client {c}: {w}" for c, w in sorted(missing.items())))
        return out


def check_eval(sums: Mapping[str, Any], a: Assignment, held=None, n_test: int | None = None,
               limits: Limits | None = None) -> dict[str, dict]:
    """An evaluation reply's sums, checked as ``fmtl-server`` checks them
    (:func:`~fmtl_edge.transport.validation.check_eval_sums`): a task of the assignment the client
    holds (``held``; None: any), ``0 ≤ n ≤ n_test``, ``loss_sum ≥ 0`` and ``metric_sum`` in range.

    Raises:
        UpdateRejected: a task outside the assignment, or a figure out of range (named).
    """
    lim = limits if limits is not None else Limits()
    if not isinstance(sums, Mapping):
        raise UpdateRejected("the evaluation reply is not task → sums")
    out = {}
    for t, e in sums.items():
        if t not in a.tasks or (held is not None and t not in held):
            raise UpdateRejected(f"evaluation of task {t!r}, which the job ({list(a.tasks)}) or client does not have")
        out[t] = check_eval_sums(t, e["n"], e["loss_sum"], e["metric_sum"], n_test, lim)
    return out


def check_update(cid: int, a: Assignment, upd: ClientUpdate, n_train: int | None = None, held=None,
                 limits: Limits | None = None, global_norm: float | None = None) -> str | None:
    """Why ``upd`` cannot be aggregated for ``(cid, a)``, or None when it can (``fmtl-server``'s
    rules, :mod:`fmtl_edge.transport.validation`): it must echo the assignment, carry only
    :meth:`Assignment.uploaded_names` (no client state, no frozen tensor) with the global model's
    shapes and dtypes and no NaN/Inf, lie within the norm bound (``‖w − w_global‖₂ ≤
    max_update_norm_ratio · max(‖w_global‖₂, 1)``, over the uploaded tensors), use ``0..n_train``
    samples (capped in place at ``limits.max_client_samples``), and report finite losses, seconds,
    joules and counts ``≥ 0``.

    Args:
        n_train: the client's training samples (its ``query`` reply); None: not checked.
        held: the tasks the client holds labels for; None: the assignment's.
        global_norm: ``‖w_global‖₂`` of the uploaded tensors (computed here when None).
    """
    lim = limits if limits is not None else Limits()
    if int(upd.client_id) != int(cid) or upd.job != a.job or int(upd.round) != int(a.round):
        return (f"the reply is client {upd.client_id} {upd.job!r} round {upd.round}, the assignment client {cid} "
                f"{a.job!r} round {a.round}")
    allowed = set(a.uploaded_names(a.state))
    extra = sorted(set(upd.state) - allowed)
    if extra:
        kept = sorted(set(extra) & (set(a.personal) | set(a.frozen)))
        what = "client state / frozen tensors" if kept else "tensors the model does not have"
        return f"the update carries {what} {extra[:3]}{'...' if len(extra) > 3 else ''}"
    for k, v in upd.state.items():
        g = np.asarray(a.state[k])
        if tuple(np.shape(v)) != tuple(g.shape) or np.asarray(v).dtype != g.dtype:
            return f"tensor {k!r}: {np.asarray(v).dtype}{tuple(np.shape(v))}, the model's is {g.dtype}{tuple(g.shape)}"
    if not set(a.tasks) >= set(upd.tasks):
        return f"the update trained tasks {list(upd.tasks)} outside the job's {list(a.tasks)}"
    try:
        n = check_samples(upd.n_samples, n_train, cid, lim)
        hold = [t for t in a.tasks if held is None or t in held]
        check_train_losses(upd.train_loss, hold, a.tasks, n)
        if upd.affinity is not None and not np.isfinite(np.asarray(upd.affinity, dtype=np.float64)).all():
            raise UpdateRejected("the affinity matrix holds NaN or Inf")
        check_resources(upd.device_s, upd.peak_memory_bytes or 0, upd.affinity_steps, upd.sample_passes,
                        upd.lookahead_passes, cpu_s=upd.cpu_s, threads=upd.threads)
        check_energy(dict(upd.energy or {}))
        norm = global_norm if global_norm is not None else state_norm({k: a.state[k] for k in allowed})
        check_norm_bound(state_distance(upd.state, a.state), norm, lim, setting="the run config's max-update-norm-ratio")
    except UpdateRejected as e:
        return str(e)
    upd.n_samples = n
    return None
