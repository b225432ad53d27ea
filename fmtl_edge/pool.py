"""The client pool interface: where client executions run, with every hook the runner uses declared.

The coordinator (:mod:`fmtl_edge.coordinator`) and the runner (:mod:`fmtl_edge.runner`) are the
same code in every program; only the pool differs (docs/design.md §1):

- :class:`fmtl_edge.simulated_pool.InProcessClientPool` — simulated clients in this process
  (``fmtl-edge simulate``);
- :class:`fmtl_edge.transport.pool.RemoteClientPool` — device agents over gRPC (``fmtl-server``);
- :class:`fmtl_edge.flower.pool.FlowerGridPool` — Flower nodes through a ServerApp's grid.

A pool answers with :class:`~fmtl_edge.messages.ClientUpdate` s; a client that refuses or cannot
run an assignment answers with :func:`refusal` (an update with ``error`` set, never aggregated).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fmtl_edge.messages import Assignment, ClientUpdate


class ClientPool(ABC):
    """Where client executions run (see the module docstring)."""

    @property
    @abstractmethod
    def client_ids(self) -> list[int]:
        """All client ids of the pool, sorted."""

    def eligible(self, tasks: Sequence[str]) -> list[int]:
        """Clients that hold labels for at least one task of ``tasks``, sorted (default: all)."""
        return list(self.client_ids)

    @abstractmethod
    def execute_many(self, work: Sequence[tuple[int, Assignment]]) -> Iterator[ClientUpdate]:
        """Run the assignments (one per client) of a parallel round, yielding the updates in
        ``work``'s order (so the streaming aggregation adds them in the same order everywhere).
        A pool that can hand a failed client's slot to another device may do so here."""

    def execute_in_turn(self, client_id: int, assignment: Assignment) -> Iterator[ClientUpdate]:
        """One client of a sequential round (a ring visit): that client and no other; a failure is
        a refusal (the ring skips the node). Default: :meth:`execute_many` of the one item."""
        yield from self.execute_many([(client_id, assignment)])

    def evaluate(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, dict]]:
        """Run evaluation assignments: ``client → job → task → {"loss_sum", "metric_sum", "n"}``
        over that client's test split. Clients that did not answer are absent.

        Raises:
            NotImplementedError: a pool that cannot evaluate (a test double).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate")

    def client_models(self, requests: Sequence[tuple[int, Assignment]]) -> dict[int, dict[str, tuple[dict[str, np.ndarray], list[str]]]]:
        """Each client's own (personalised) model for the personalised evaluation ``requests``:
        ``client → job → (state, tasks)`` (:func:`fmtl_edge.client.client_model`: the backbone and
        the heads of the tasks it holds). Default: ``{}`` — the clients keep their models
        (devices write theirs with ``fmtl-edge join --save-model DIR``; a Flower node keeps its own)."""
        return {}

    def label_statistics(self, tasks) -> dict[int, dict[str, dict]] | None:
        """Each client's training-label statistics (:func:`fmtl_edge.loss_weights.client_label_stats`:
        sums the client computes over its own labels; no sample leaves it), for the chance losses
        and ``--loss-weights chance``; None when the pool cannot tell (chance losses then unknown)."""
        return None

    def train_sizes(self) -> dict[int, int] | None:
        """client → its training samples (the energy policy predicts a round's sample-passes from
        them), or None when unknown."""
        return None

    def device_name(self, client_id: int) -> str:
        """The device client ``client_id`` trains on (energy profiles and budgets are per device);
        default ``client-<id>``: one device per client."""
        return f"client-{int(client_id)}"

    def device_modes(self, device: str):
        """The power modes ``device`` reports and may switch to
        (:class:`~fmtl_edge.selection.DeviceModes`), or None (unknown, or switching not allowed)."""
        return None

    def global_vector_buffer(self, n_params: int) -> np.ndarray | None:
        """Storage for the coordinator's flat float32 global vector of ``n_params`` values, or None
        for an ordinary array (the gRPC pool: a file-backed mapping it pages out of RAM while a
        round's updates arrive)."""
        return None

    def state_snapshot(self) -> Mapping[int, Any] | None:
        """Every client's own state (copies) for a resumable run, or None when the clients keep it
        themselves (devices, Flower nodes): nothing to save."""
        return None

    def restore_state(self, snapshot: Mapping[int, Any]) -> None:
        """Put back a :meth:`state_snapshot` (a resumed run).

        Raises:
            ValueError: the pool keeps no client state but the snapshot holds some.
        """
        if snapshot:
            raise ValueError(f"{type(self).__name__} keeps no client state; cannot restore {len(snapshot)} clients'")


def refusal(client_id: int, a: Assignment, error: dict[str, Any]) -> ClientUpdate:
    """The update of a client that refused or could not run an assignment (not aggregated):
    ``error`` is the structured reason (``{"kind": ..., "message": ...}``)."""
    return ClientUpdate(client_id, a.job, a.round, tuple(a.tasks), {}, 0, {}, None, 0, 0.0,
                        {"total_j": 0.0, "source": "none", "total_scope": "none", "estimated": False},
                        error=error)
