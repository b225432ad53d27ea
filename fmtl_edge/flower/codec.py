"""fmtl-edge's messages as Flower records, and back (no I/O here).

A Flower :class:`~flwr.app.Message` carries a :class:`~flwr.app.RecordDict`; fmtl-edge puts in it:

- ``"fmtl.state"``: an :class:`~flwr.app.ArrayRecord`, tensor name → :class:`~flwr.app.Array`
  (``stype="numpy.ndarray"``: NumPy's ``.npy`` bytes written with ``allow_pickle=False``, so dtype,
  shape and every bit are kept; never pickle). Server → client: the global state of the
  assignment (every tensor of the model, model order). Client → server: the uploaded tensors only
  (never the personal or frozen ones, see :meth:`Assignment.uploaded_names`).
- ``"fmtl.assignment"`` / ``"fmtl.update"`` / ``"fmtl.eval"`` / ``"fmtl.info"``: a
  :class:`~flwr.app.ConfigRecord` with one ``"json"`` string: the other fields of the
  :class:`~fmtl_edge.messages.Assignment` (+ the :class:`~fmtl_edge.models.ModelSpec`), of the
  :class:`~fmtl_edge.messages.ClientUpdate` (affinity as nested lists of float64: JSON keeps every
  bit of a double), the evaluation sums, or a client's description (its tasks and sample counts).

- ``"fmtl.client"``: a :class:`~flwr.app.ConfigRecord` ``{"client_id": k}``: the client the
  receiving node serves in this run (the ServerApp maps the run's clients to nodes, see
  :func:`fmtl_edge.flower.pool.choose_nodes`); absent in the first ``query`` (``identify``), which
  asks a node only for its ``partition-id``.

Flower message types used: ``train`` (one client execution), ``evaluate`` (test sums of a global or
personalised model) and ``query`` (the client's description, sent once at the start).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig
from fmtl_edge.models import ModelSpec

STATE = "fmtl.state"
ASSIGNMENT = "fmtl.assignment"
UPDATE = "fmtl.update"
EVAL = "fmtl.eval"
INFO = "fmtl.info"
CLIENT = "fmtl.client"


def _json_record(obj: Any):
    from flwr.app import ConfigRecord

    return ConfigRecord({"json": json.dumps(obj, sort_keys=True, default=_default)})


def _default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return str(o)


def _read_json(content, name: str) -> Any:
    """The JSON of record ``name`` of a RecordDict.

    Raises:
        ValueError: the record is missing or not JSON.
    """
    rec = content.config_records.get(name)
    if rec is None or "json" not in rec:
        raise ValueError(f"the message has no {name!r} record (not an fmtl-edge message?)")
    try:
        return json.loads(str(rec["json"]))
    except json.JSONDecodeError as e:
        raise ValueError(f"record {name!r} is not JSON ({e})") from None


def state_to_record(state: Mapping[str, Any]):
    """``name → array`` as an :class:`~flwr.app.ArrayRecord` (names in order; arrays copied into
    ``.npy`` bytes as they are: float32 stays float32, int64 stays int64, 0-d stays 0-d)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({str(k): Array(np.asarray(v)) for k, v in state.items()})


def state_from_record(rec) -> dict[str, np.ndarray]:
    """An :class:`~flwr.app.ArrayRecord` as ``name → np.ndarray`` (dtype and shape as sent).

    Raises:
        TypeError: an array is not of the NumPy serialisation type.
    """
    return {k: np.asarray(a.numpy()) for k, a in rec.items()}


# -- assignment (server → client) ----------------------------------------------------------------
def assignment_to_dict(a: Assignment, spec: ModelSpec) -> dict[str, Any]:
    """The fields of ``a`` except its state, and the model spec, JSON-ready."""
    c = a.config
    return {
        "job": a.job, "round": int(a.round), "tasks": list(a.tasks), "lr": float(a.lr),
        "config": {"local_epochs": c.local_epochs, "batch_size": c.batch_size, "lr": c.lr, "momentum": c.momentum,
                   "weight_decay": c.weight_decay, "affinity_every": c.affinity_every,
                   "affinity_divide_by_lr": c.affinity_divide_by_lr, "device": c.device},
        "measure_affinity": bool(a.measure_affinity), "seed": int(a.seed), "time_budget_s": a.time_budget_s,
        "energy_budget_j": a.energy_budget_j, "procedure": a.procedure, "method_config": dict(a.method_config),
        "state_key": a.state_key, "personal": list(a.personal), "frozen": list(a.frozen),
        "personalised": bool(a.personalised), "power_mode": a.power_mode,
        "model": spec.to_dict(),
    }


def client_record(client_id: int):
    """The ``"fmtl.client"`` record: the client the receiving node serves in this run."""
    from flwr.app import ConfigRecord

    return ConfigRecord({"client_id": int(client_id)})


def client_of(content) -> int | None:
    """The client id of a message's ``"fmtl.client"`` record (None: the message names none).

    Raises:
        ValueError: the record holds no integer ``client_id``.
    """
    rec = content.config_records.get(CLIENT)
    if rec is None:
        return None
    try:
        return int(rec["client_id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"malformed {CLIENT!r} record {dict(rec)!r}") from None


def encode_assignment(a: Assignment, spec: ModelSpec, state_record=None, client_id: int | None = None):
    """The :class:`~flwr.app.RecordDict` of a ``train`` or ``evaluate`` message.

    Args:
        state_record: an ArrayRecord of ``a.state`` already made (one per round, shared by the
            round's messages); None makes it here.
        client_id: the client the receiving node serves (the ``"fmtl.client"`` record); None: none.
    """
    from flwr.app import RecordDict

    recs = {STATE: state_record if state_record is not None else state_to_record(a.state),
            ASSIGNMENT: _json_record(assignment_to_dict(a, spec))}
    if client_id is not None:
        recs[CLIENT] = client_record(client_id)
    return RecordDict(recs)


def decode_assignment(content) -> tuple[Assignment, ModelSpec]:
    """A ``train``/``evaluate`` message's :class:`Assignment` (with its global state) and model spec.

    Raises:
        ValueError: a record is missing or malformed.
    """
    d = _read_json(content, ASSIGNMENT)
    rec = content.array_records.get(STATE)
    if rec is None:
        raise ValueError(f"the message has no {STATE!r} array record")
    try:
        cfg = TrainConfig(**d["config"])
        m = d["model"]
        spec = ModelSpec.from_dict(m)
        a = Assignment(job=str(d["job"]), round=int(d["round"]), tasks=tuple(d["tasks"]), state=state_from_record(rec),
                       lr=float(d["lr"]), config=cfg, measure_affinity=bool(d["measure_affinity"]), seed=int(d["seed"]),
                       time_budget_s=d.get("time_budget_s"), energy_budget_j=d.get("energy_budget_j"),
                       procedure=str(d.get("procedure", "sgd")), method_config=dict(d.get("method_config") or {}),
                       state_key=str(d.get("state_key", "")), personal=tuple(d.get("personal", ())),
                       frozen=tuple(d.get("frozen", ())), personalised=bool(d.get("personalised", False)),
                       power_mode=d.get("power_mode") or None)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed {ASSIGNMENT!r} record ({type(e).__name__}: {e})") from None
    return a, spec


# -- update (client → server) --------------------------------------------------------------------
def encode_update(u: ClientUpdate):
    """The reply of a ``train`` message: the uploaded state and every other field of ``u``."""
    from flwr.app import RecordDict

    meta = {
        "client_id": int(u.client_id), "job": u.job, "round": int(u.round), "tasks": list(u.tasks),
        "n_samples": int(u.n_samples), "train_loss": {k: float(v) for k, v in u.train_loss.items()},
        "affinity": None if u.affinity is None else np.asarray(u.affinity, dtype=np.float64).tolist(),
        "affinity_steps": int(u.affinity_steps), "device_s": float(u.device_s), "energy": dict(u.energy or {}),
        "stopped_by": u.stopped_by, "peak_memory_bytes": u.peak_memory_bytes, "error": u.error,
        "sample_passes": int(u.sample_passes), "lookahead_passes": int(u.lookahead_passes),
        "cpu_s": None if u.cpu_s is None else float(u.cpu_s), "threads": None if u.threads is None else int(u.threads),
    }
    return RecordDict({STATE: state_to_record(u.state), UPDATE: _json_record(meta)})


def decode_update(content) -> ClientUpdate:
    """The :class:`ClientUpdate` of a ``train`` reply (``affinity`` float64 ``(n, n)`` or None).

    Raises:
        ValueError: a record is missing or malformed.
    """
    d = _read_json(content, UPDATE)
    rec = content.array_records.get(STATE)
    try:
        aff = d.get("affinity")
        return ClientUpdate(
            client_id=int(d["client_id"]), job=str(d["job"]), round=int(d["round"]), tasks=tuple(d["tasks"]),
            state={} if rec is None else state_from_record(rec), n_samples=int(d["n_samples"]),
            train_loss={k: float(v) for k, v in d["train_loss"].items()},
            affinity=None if aff is None else np.asarray(aff, dtype=np.float64), affinity_steps=int(d["affinity_steps"]),
            device_s=float(d["device_s"]), energy=dict(d.get("energy") or {}), stopped_by=d.get("stopped_by"),
            peak_memory_bytes=d.get("peak_memory_bytes"), error=d.get("error"),
            sample_passes=int(d.get("sample_passes", 0)), lookahead_passes=int(d.get("lookahead_passes", 0)),
            cpu_s=None if d.get("cpu_s") is None else float(d["cpu_s"]),
            threads=None if d.get("threads") is None else int(d["threads"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed {UPDATE!r} record ({type(e).__name__}: {e})") from None


# -- evaluation sums and client descriptions -----------------------------------------------------
def encode_eval(sums: Mapping[str, Mapping[str, float]]):
    """The reply of an ``evaluate`` message: task → ``{"loss_sum", "metric_sum", "n"}``."""
    from flwr.app import RecordDict

    return RecordDict({EVAL: _json_record({t: {"loss_sum": float(s["loss_sum"]), "metric_sum": float(s["metric_sum"]),
                                                "n": int(s["n"])} for t, s in sums.items()})})


def decode_eval(content) -> dict[str, dict[str, float]]:
    """Raises ValueError: the record is missing or not JSON."""
    return _read_json(content, EVAL)


def encode_info(info: Mapping[str, Any]):
    """The reply of a ``query`` message (see :func:`fmtl_edge.flower.data.client_info`)."""
    from flwr.app import RecordDict

    return RecordDict({INFO: _json_record(dict(info))})


def decode_info(content) -> dict[str, Any]:
    """Raises ValueError: the record is missing or not JSON."""
    return _read_json(content, INFO)
