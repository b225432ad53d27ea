"""A :class:`~fmtl_edge.pool.ClientPool` over a Flower :class:`~flwr.serverapp.Grid`.

The coordinator is the same code as in ``simulate`` and ``fmtl-server`` (docs/design.md §1): only the
pool differs. :class:`FlowerGridPool` turns each ``(client, Assignment)`` into a Flower ``train``
or ``evaluate`` :class:`~flwr.app.Message` to the client's node (:mod:`fmtl_edge.flower.codec`),
pushes a round's messages together (:meth:`Grid.push_messages`: Flower's engine runs them, in
parallel where it has the resources), pulls the replies (:meth:`Grid.pull_messages`) and hands
them on **in the plan's order** as soon as the next one is there, so the streaming aggregation
adds them in the same order as the in-process pool does and the driver holds only the replies
that arrive ahead of their turn.

Every reply is checked before it reaches the aggregate: it must be the echo of its assignment
(job, round, client) and carry no tensor outside :meth:`Assignment.uploaded_names` (client state —
personal layers — and frozen layers never leave a client; the pool refuses an update that carries
one) and every tensor with the global model's shape. A node that does not answer in
``timeout_s``, answers with a Flower error or fails a check is a structured refusal
(``{"kind": "timeout" | "error" | "invalid", "message": ...}``) that the round goes on without.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.pool import ClientPool, refusal
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.models import ModelSpec

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


def query_nodes(grid, node_ids: Sequence[int], timeout_s: float) -> dict[int, dict[str, Any]]:
    """Ask every node for its client's description (a ``query`` message; the first node also
    describes the data set and its device). Returns node id → :func:`~fmtl_edge.flower.data.client_info`.

    Raises:
        RuntimeError: a node did not answer, answered with an error, or two nodes serve one client.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    msgs = [Message(RecordDict({"fmtl.query": ConfigRecord({"with_dataset": i == 0})}), dst_node_id=int(n),
                    message_type="query") for i, n in enumerate(node_ids)]
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    out: dict[int, dict[str, Any]] = {}
    for m in replies:
        src = int(m.metadata.src_node_id)
        if m.has_error():
            raise RuntimeError(f"Flower node {src} could not describe its client: {m.error.reason}")
        out[src] = codec.decode_info(m.content)
    missing = sorted(set(int(n) for n in node_ids) - set(out))
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
        infos: node id → the client's description (:func:`query_nodes`); the client id is the
            node's ``partition-id``.
        spec: the model architecture (sent with every assignment).
        timeout_s: seconds a round waits for its replies after pushing its messages.
        poll_s: seconds between two pulls while no reply has come (Flower's own send_and_receive: 0.1).

    Attributes:
        messages_sent, bytes_sent: ``train``/``evaluate`` messages sent and the bytes of their
            arrays (the round's shared ArrayRecord counted once per message).
    """

    def __init__(self, grid, infos: Mapping[int, Mapping[str, Any]], spec: ModelSpec, timeout_s: float = 600.0,
                 poll_s: float = 0.1):
        self.grid = grid
        self.spec = spec
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self._node: dict[int, int] = {int(i["client_id"]): int(n) for n, i in infos.items()}
        self._tasks: dict[int, set[str]] = {int(i["client_id"]): set(i["tasks"]) for i in infos.values()}
        self.messages_sent = 0
        self.bytes_sent = 0

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._node)

    def node_of(self, client_id: int) -> int:
        """The Flower node id serving ``client_id``."""
        return self._node[int(client_id)]

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        return [c for c in self.client_ids if self._tasks[c] & set(tasks)]

    # -- messages --------------------------------------------------------------------------------
    def _messages(self, work: Sequence[tuple[int, Assignment]], message_type: str):
        from flwr.app import Message

        records: dict[int, Any] = {}  # one ArrayRecord per distinct global state (per round)
        msgs = []
        for cid, a in work:
            rec = records.get(id(a.state))
            if rec is None:
                rec = records[id(a.state)] = codec.state_to_record(a.state)
            msgs.append(Message(codec.encode_assignment(a, self.spec, rec), dst_node_id=self.node_of(cid),
                                message_type=message_type))
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
        why = check_update(cid, a, upd)
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
        for i, reply in self._exchange(work, "train"):
            cid, a = work[i]
            yield self._update(cid, a, reply)

    def execute_in_turn(self, client_id: int, a: Assignment) -> Iterator[ClientUpdate]:
        """One client of a sequential round (a ring visit): its own message, its own reply."""
        yield from self.execute_many([(client_id, a)])

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        out: dict[int, dict[str, dict]] = {}
        requests = list(requests)
        if not requests:
            return out
        for i, reply in self._exchange(requests, "evaluate"):
            cid, a = requests[i]
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                log.warning("client %d did not evaluate job %s: %s", cid, a.job, why)
                continue
            out.setdefault(int(cid), {})[a.job] = codec.decode_eval(reply.content)
        return out


def check_update(cid: int, a: Assignment, upd: ClientUpdate) -> str | None:
    """Why ``upd`` cannot be aggregated for ``(cid, a)``, or None when it can: it must echo the
    assignment, carry only :meth:`Assignment.uploaded_names` (no client state, no frozen tensor)
    with the global model's shapes and dtypes."""
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
    return None
