"""The Flower ClientApp: fmtl-edge's client procedures on a Flower node (``app``).

Components (``[tool.flwr.app.components] clientapp = "fmtl_edge.flower.client_app:app"``):

- ``query``: the client's description (:func:`fmtl_edge.flower.data.client_info`).
- ``train``: decode the :class:`~fmtl_edge.messages.Assignment`, run
  :func:`fmtl_edge.client.execute` on this node's own client — under the device lease, the memory
  budget, the round's time/energy budgets (the assignment's, tightened by the node's device
  profile) and a meter window — and reply with the update: uploaded tensors, samples used, train
  loss, affinity, ``device_s`` and ``energy`` (joules with the meter's ``source``/scope). A lease or
  budget refusal is a structured refusal in the reply (``error``), not a Flower error.
- ``evaluate``: test-split sums of the global model, or of the client's own model (personalised).

Client state (personal layers, Ditto's p_k, a ring node's head) is kept in Flower's
``Context.state`` (:class:`ContextStateStore`), or in a folder when the node config names one
(``state-dir``: :class:`~fmtl_edge.client_state.FolderStateStore` under
``<state-dir>/client-<id>``, checksummed); it is never put in a reply.

Node config (``flower-supernode --node-config``: space-separated ``key=value`` pairs whose values
are TOML, so strings are quoted: ``--node-config 'partition-id=3 state-dir="/var/lib/fmtl"
lease="gpu0"'``): ``partition-id`` (the node's identity: set by the simulation engine; the
ServerApp maps the run's clients to nodes by it and names the client in every message), optional
``state-dir``, ``cache-dir`` (the data cache, :func:`fmtl_edge.flower.data.cache_dir`), ``lease``
(the device id of the lease, default ``local``; ``none`` runs without one) and ``profile`` (a
device profile file or class, default the detected one).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from fmtl_edge.client_state import KEEP_VERSIONS, ClientStateStore, FolderStateStore
from fmtl_edge.flower import require_flwr

from . import codec
from .data import LocalData, cache_dir, client_info, local_data, simulation_config, split_run_config

require_flwr()

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

log = logging.getLogger("fmtl_edge.flower")

#: prefix of the Context.state records that hold client state (``fmtl-state:<key>:r<round>``)
STATE_PREFIX = "fmtl-state:"
INDEX = "fmtl-state-index"


class ContextStateStore(ClientStateStore):
    """Client state in a Flower ``Context.state`` (:class:`~flwr.app.RecordDict`): one
    :class:`~flwr.app.ArrayRecord` per version (``fmtl-state:<key>:r<round>``) and a
    :class:`~flwr.app.ConfigRecord` index ``key → rounds``. The newest :data:`KEEP_VERSIONS` of each
    key are kept. Flower keeps the Context on the node (in simulation: with the engine), never in a
    message."""

    def __init__(self, state) -> None:
        self.state = state

    def _index(self) -> dict[str, list[int]]:
        rec = self.state.config_records.get(INDEX)
        return {k: [int(r) for r in v] for k, v in (rec or {}).items()}

    def _write_index(self, idx: Mapping[str, list[int]]) -> None:
        self.state[INDEX] = ConfigRecord({k: [int(r) for r in v] for k, v in idx.items()})

    @staticmethod
    def _name(key: str, r: int) -> str:
        return f"{STATE_PREFIX}{key}:r{int(r)}"

    def load(self, key: str, before_round: int) -> dict[str, np.ndarray] | None:
        for r in sorted(self._index().get(key, ()), reverse=True):
            if r < before_round:
                rec = self.state.array_records.get(self._name(key, r))
                if rec is not None:
                    return {k: np.array(v, copy=True) for k, v in codec.state_from_record(rec).items()}
        return None

    def save(self, key: str, round_idx: int, tensors: Mapping[str, np.ndarray]) -> None:
        idx = self._index()
        rounds = sorted(set(idx.get(key, [])) | {int(round_idx)})
        for r in rounds[:-KEEP_VERSIONS]:
            name = self._name(key, r)
            if name in self.state.array_records:
                del self.state[name]
        idx[key] = rounds[-KEEP_VERSIONS:]
        self.state[self._name(key, round_idx)] = codec.state_to_record(tensors)
        self._write_index(idx)

    def keys(self) -> list[str]:
        return sorted(k for k, v in self._index().items() if v)


@functools.lru_cache(maxsize=1)
def _warm_up() -> None:
    """Import what the first optimizer imports lazily (~1 s) once per process, before the first
    execution's meter window (as ``simulate`` does), so it is not billed as device time."""
    from fmtl_edge.client import warm_up

    warm_up()


@functools.lru_cache(maxsize=4)
def _config(items: tuple):
    """The run config's SimulationConfig, built once per process and run config."""
    return simulation_config(dict(items))


@functools.lru_cache(maxsize=4)
def _runtime(profile: str | None, meter: str | None, lease_wait_s: float):
    """The node's meter and device profile, made once per process."""
    from fmtl_edge.runtime import load_profile, make_meter

    prof = load_profile(profile)
    m = prof.make_meter() if meter is None else make_meter(meter, **prof.meter_kwargs())
    return m, prof


def partition_id(context: Context) -> int:
    """The node's ``partition-id`` (its node config).

    Raises:
        ValueError: the node config has none (the message gives the flag to set it).
    """
    node_config = dict(context.node_config)
    if "partition-id" not in node_config:
        raise ValueError("this Flower node has no partition-id in its node config (flower-supernode "
                         "--node-config 'partition-id=<n>')")
    return int(node_config["partition-id"])


class _Node:
    """What one ClientApp call needs, from its Context: config, own data, runtime, state store.

    Args:
        client_id: the client this node serves in the run (the message's ``"fmtl.client"``
            record); None: the node's ``partition-id``.
    """

    def __init__(self, context: Context, overrides: Mapping | None = None, client_id: int | None = None):
        run_config = {**dict(context.run_config), **dict(overrides or {})}
        node_config = dict(context.node_config)
        self.cfg = _config(tuple(sorted(run_config.items())))
        _, self.app = split_run_config(run_config)
        self.partition_id = partition_id(context)
        cid = self.partition_id if client_id is None else int(client_id)
        cache = cache_dir(node_config) if self.app["data-cache"] else None
        self.data: LocalData = local_data(self.cfg, self.app, cid, cache)
        self.meter, self.profile = _runtime(node_config.get("profile", self.cfg.profile), self.cfg.meter,
                                            float(self.cfg.lease_wait_s))
        self.lease_id = str(node_config.get("lease", self.app["lease"]))
        from fmtl_edge.runtime.threads import ThreadPolicy

        # the node's own setting wins over the run's (a device knows its cores)
        self.threads = ThreadPolicy.parse(node_config.get("threads", self.cfg.threads))
        _warm_up()
        state_dir = node_config.get("state-dir")
        cid = self.data.client.client_id
        self.store: ClientStateStore = (FolderStateStore(Path(str(state_dir)) / f"client-{cid}") if state_dir
                                        else ContextStateStore(context.state))

    def lease(self):
        from fmtl_edge.runtime import DeviceLease

        if self.lease_id == "none":
            return None
        return DeviceLease(self.lease_id, timeout_s=self.cfg.lease_wait_s,
                           owner=f"fmtl-edge Flower ClientApp client {self.data.client.client_id}")

    def tighten(self, a):
        """The assignment with the node profile's per-round budgets where they are tighter."""
        def tight(x, y):
            vals = [v for v in (x, y) if v is not None]
            return min(vals) if vals else None

        a.time_budget_s = tight(a.time_budget_s, self.profile.round_time_s)
        a.energy_budget_j = tight(a.energy_budget_j, self.profile.round_energy_j)
        return a


def make_client_app(run_config: Mapping | None = None) -> ClientApp:
    """A ClientApp with ``query``, ``train`` and ``evaluate`` (see the module docstring).

    Args:
        run_config: run-config keys laid over ``context.run_config`` (for Flower's Python
            simulation API, ``flwr.simulation.run_simulation``, which gives the apps no run
            config); None: the run config of ``flwr run`` as it is.
    """
    over = dict(run_config or {})
    capp = ClientApp()

    @capp.query()
    def query(msg: Message, context: Context) -> Message:
        """``identify``: reply with the node's ``partition-id`` only (no data loaded). Otherwise
        reply with the description of the client the message names (and, when asked, the data
        set's and device's)."""
        q = msg.content.config_records.get("fmtl.query") or {}
        if q.get("identify", False):
            return Message(codec.encode_info({"partition_id": partition_id(context)}), reply_to=msg)
        node = _Node(context, over, codec.client_of(msg.content))
        info = client_info(node.data, node.profile, node.meter, with_dataset=bool(q.get("with_dataset", False)),
                           partition_id=node.partition_id)
        return Message(codec.encode_info(info), reply_to=msg)

    @capp.train()
    def train(msg: Message, context: Context) -> Message:
        """Run the assignment with :func:`fmtl_edge.client.execute`; reply with the update (its
        uploaded tensors only) or a structured refusal (lease busy, budget)."""
        from fmtl_edge.client import execute
        from fmtl_edge.pool import refusal
        from fmtl_edge.runtime import BudgetExceeded, DeviceBusy

        node = _Node(context, over, codec.client_of(msg.content))
        a, spec = codec.decode_assignment(msg.content)
        a = node.tighten(a)
        d = node.data
        try:
            upd = execute(d.client, spec, d.tasks, a, node.meter, node.lease(), node.profile.memory_budget_bytes,
                          node.store, node.threads)
        except (BudgetExceeded, DeviceBusy) as e:
            upd = refusal(d.client.client_id, a, e.to_dict())
        return Message(codec.encode_update(upd), reply_to=msg)

    @capp.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Reply with the test sums of the assignment's model (global, or the client's own)."""
        from fmtl_edge.client import evaluate_assignment

        node = _Node(context, over, codec.client_of(msg.content))
        a, spec = codec.decode_assignment(msg.content)
        sums = evaluate_assignment(node.data.client, spec, node.data.tasks, a, node.store)
        return Message(codec.encode_eval(sums), reply_to=msg)

    return capp


#: the ClientApp of ``flwr run`` (``fmtl_edge.flower.client_app:app``)
app = make_client_app()


__all__ = ["ContextStateStore", "app", "make_client_app", "partition_id"]
