"""The simulated client pool: every client in this process (``fmtl-edge simulate``).

Each client execution runs one after another (a device runs one FL task at a time) under the
machine's device lease, a meter window, the thread policy and the memory budget
(:func:`fmtl_edge.client.execute`); each client keeps its own state (personal layers, Ditto's
model...) in memory across rounds, which :meth:`InProcessClientPool.state_snapshot` hands to a
resumable run. :func:`dropout_faults` is ``--dropout``'s fault injector.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.client import client_model, evaluate_assignment, execute
from fmtl_edge.client_state import MemoryStateStore
from fmtl_edge.data.base import FederatedDataset
from fmtl_edge.messages import Assignment, ClientUpdate
from fmtl_edge.models import ModelSpec
from fmtl_edge.pool import ClientPool, refusal
from fmtl_edge.seeding import derive_seed


class InProcessClientPool(ClientPool):
    """Simulated clients in this process, run one after another (a device runs one task at a time).

    Each client keeps its own state (:class:`~fmtl_edge.client_state.MemoryStateStore`: personal
    layers, Ditto's personal model...) across rounds; :meth:`state_snapshot` and
    :meth:`restore_state` carry it through a resumable run.

    Args:
        dataset: the federated dataset (one :class:`ClientData` per client).
        spec: model architecture.
        meter: a :class:`fmtl_edge.runtime.Meter` wrapping every execution (None: time only).
        lease_factory: ``client_id -> context manager`` holding the device during an execution
            (e.g. ``lambda cid: DeviceLease("local")``); None runs without a lease.
        memory_budget_bytes: refuse an execution whose estimated memory need is over this.
        faults: optional ``(client_id, Assignment) -> str | None``: a fault injector; a returned
            reason makes that execution fail (a refusal) as a lost device would.
        threads: the executions' :class:`~fmtl_edge.runtime.threads.ThreadPolicy` (None: torch's
            threads as they are).
        fleet: a :class:`~fmtl_edge.fleet.Fleet` (``--fleet``): each execution's device seconds and
            joules are its device's modelled cost (:meth:`priced`), deterministic on a loaded machine.
        fleet_model: the fleet's ``[model_rates]`` key of the run's model (None: its default rate).
    """

    def __init__(self, dataset: FederatedDataset, spec: ModelSpec, meter=None,
                 lease_factory: Callable[[int], Any] | None = None,
                 memory_budget_bytes: int | None = None, faults: Callable[[int, Assignment], str | None] | None = None,
                 threads=None, fleet=None, fleet_model: str | None = None):
        self.dataset = dataset
        self.spec = spec
        self.meter = meter
        self.lease_factory = lease_factory
        self.memory_budget_bytes = memory_budget_bytes
        self.faults = faults
        self.threads = threads
        self.fleet = fleet
        self.fleet_model = fleet_model
        self._by_id = {c.client_id: c for c in dataset.clients}
        self._states: dict[int, MemoryStateStore] = {}

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._by_id)

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        return [c for c in self.client_ids if any(t in self._by_id[c].y_train for t in tasks)]

    def train_sizes(self) -> dict[int, int]:
        return {cid: c.n_train for cid, c in self._by_id.items()}

    def label_statistics(self, tasks) -> dict[int, dict[str, dict]]:
        from fmtl_edge.loss_weights import client_label_stats

        return {cid: client_label_stats(c.y_train, tasks) for cid, c in self._by_id.items()}

    def state_store(self, client_id: int) -> MemoryStateStore:
        """Client ``client_id``'s own state (created empty on first use)."""
        return self._states.setdefault(int(client_id), MemoryStateStore())

    def state_snapshot(self) -> dict[int, Any]:
        """Every client's state (copies), for a resumable run."""
        return {c: s.snapshot() for c, s in self._states.items()}

    def restore_state(self, snap: Mapping[int, Any]) -> None:
        """Replace every client's state by a :meth:`state_snapshot`."""
        self._states = {int(c): MemoryStateStore.restore(v) for c, v in snap.items()}

    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        from fmtl_edge.runtime import BudgetExceeded, DeviceBusy

        for cid, a in work:
            reason = self.faults(cid, a) if self.faults is not None else None
            if reason:
                yield refusal(cid, a, {"kind": "fault", "message": reason})
                continue
            lease = self.lease_factory(cid) if self.lease_factory else None
            try:
                upd = execute(self._by_id[cid], self.spec, self.dataset.tasks, a, self.meter, lease,
                              self.memory_budget_bytes, self.state_store(cid), self.threads)
            except (BudgetExceeded, DeviceBusy) as e:
                # A refusal is a structured answer, not a crash: the round goes on without this client.
                yield refusal(cid, a, e.to_dict())
                continue
            yield self.priced(cid, a, upd)

    def priced(self, cid: int, a: Assignment, upd: ClientUpdate) -> ClientUpdate:
        """With a ``--fleet``: the execution's device seconds and joules from the fleet model of
        client ``cid``'s device in the assignment's power mode (its counted sample-passes; energy
        record ``model:fleet``, ``estimated``), this machine's own measurement kept under
        ``energy["host"]``; without a fleet the update as measured."""
        if self.fleet is None:
            return upd
        rec = self.fleet.energy_record(cid, a.power_mode, upd.sample_passes, self.fleet_model)
        rec["host"] = {"device_s": upd.device_s, "total_j": upd.energy.get("total_j"),
                       "source": upd.energy.get("source"), "estimated": upd.energy.get("estimated")}
        upd.energy = rec
        upd.device_s = float(rec["wall_s"])
        return upd

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        out: dict[int, dict[str, dict]] = {}
        for cid, a in requests:
            sums = evaluate_assignment(self._by_id[cid], self.spec, self.dataset.tasks, a, self.state_store(cid))
            out.setdefault(int(cid), {})[a.job] = sums
        return out

    def client_models(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, tuple[dict[str, np.ndarray], list[str]]]]:
        out: dict[int, dict[str, tuple[dict[str, np.ndarray], list[str]]]] = {}
        for cid, a in requests:
            out.setdefault(int(cid), {})[a.job] = client_model(self._by_id[cid], a, self.state_store(cid))
        return out


def dropout_faults(seed: int, p: float):
    """The ``--dropout`` fault injector of the simulated pool: a client execution fails (as a device
    lost mid-round: its work of the round is lost, no update arrives) with probability ``p``, drawn
    from ``(seed, "dropout", <method>/<job>, round, client)``; None when ``p`` is 0."""
    if not p:
        return None
    def faults(cid: int, a) -> str | None:
        u = np.random.default_rng(derive_seed(seed, "dropout", a.state_key or a.job, a.round, int(cid))).random()
        return f"simulated dropout (p={p:g}): device lost mid-round" if u < p else None

    return faults
