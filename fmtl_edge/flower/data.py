"""The Flower apps' configuration and the data of one client, loaded where the client runs.

Run config (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, ``flwr run -c``): every key
of ``fmtl-edge simulate``'s TOML file (``dataset``, ``methods = "mas-2,all-in-one"``, ``rounds``,
``clients-per-round``, ``seed``, ``out``, the methods' options...), with the same defaults and
dataset presets (:func:`fmtl_edge.config.build_config`), plus the apps' own keys
(:data:`APP_KEYS`). Flower's config values are scalars: ``layers`` is given as a JSON string.

Data: a ClientApp serves the client whose id is its node's ``partition-id`` (set by Flower's
simulation engine, or ``flower-supernode --node-config "partition-id=3"``). It loads its data with
:func:`fmtl_edge.data.load_dataset` (the same partition as ``simulate`` for the same seed: the whole
data set is read and split in the ClientApp's process, cached there, and only its client is used)
or, for ``dataset = "synthetic"``, generates its own client's samples from ``(seed, partition-id)``
alone (O(1) per client: the scale benchmark's data). The ServerApp never loads client data.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from fmtl_edge.config import ConfigError, SimulationConfig
from fmtl_edge.data.base import ClientData, DataError
from fmtl_edge.tasks import Task, TaskSet

#: the apps' own run-config keys and their defaults (not fields of SimulationConfig)
APP_KEYS: dict[str, Any] = {
    "config": "",  # an fmtl-edge TOML config file (as `simulate --config`); its keys lie under the run config's
    "round-timeout-s": 600.0,  # seconds a round waits for its replies (a client not answering is refused)
    "nodes-wait-s": 120.0,  # how long the ServerApp waits for the nodes to connect
    "overwrite": True,  # replace an earlier results.json in ``out``
    "resume": False,  # continue the interrupted run of ``out`` (its resume state, same settings)
    "lease": "local",  # the device lease of a ClientApp's executions ("none": no lease); node config "lease" wins
    "synthetic-train": 32,  # samples per client of dataset "synthetic" (train split)
    "synthetic-test": 8,  # ... (test split)
}

SYNTHETIC = "synthetic"


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(simulation keys, app keys)`` of a Flower run config (app keys with their defaults)."""
    app = dict(APP_KEYS)
    sim: dict[str, Any] = {}
    for k, v in run_config.items():
        key = str(k).replace("_", "-")
        if key in APP_KEYS:
            app[key] = v
        else:
            sim[str(k)] = v
    return sim, app


def simulation_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    """The :class:`SimulationConfig` of a Flower run config: defaults < dataset preset < the TOML
    file named by ``config`` (as ``simulate --config``) < the run config's keys (named as in that
    file, ``-`` or ``_``; ``""`` leaves an optional setting unset, as Flower's config has no null).

    Raises:
        ConfigError: an unknown key (named, with the nearest known one), a wrong type or an
            impossible value (as ``simulate`` refuses it).
    """
    from fmtl_edge.config import _FIELDS, _coerce, build_config
    from fmtl_edge.methods import method_options

    sim, app = split_run_config(run_config)
    opts = method_options()
    flags: dict[str, Any] = {"method_options": {}}
    for key, value in sim.items():
        name = key.replace("-", "_")
        if name in opts:
            flags["method_options"][name] = value
            continue
        if name not in _FIELDS or name == "method_options":
            import difflib

            known = sorted([*(k.replace("_", "-") for k in [*_FIELDS, *opts] if k != "method_options"), *APP_KEYS])
            near = difflib.get_close_matches(key.replace("_", "-"), known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"run config: {key}", f"unknown key; {hint}known keys: {', '.join(known)}")
        if value == "" and _FIELDS[name].default is None:
            continue  # Flower's config has no null: "" leaves an optional setting unset
        if name == "layers" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError("layers", f"give the layer types as a JSON object string ({e})") from None
        flags[name] = _coerce(name, value)
    if flags.get("dataset") == SYNTHETIC and flags.get("clients") is None:
        raise ConfigError("clients", "dataset 'synthetic' needs clients = N (the number of simulated clients)")
    return build_config(flags, str(app["config"]) or None)


@dataclass
class LocalData:
    """What a ClientApp holds: its own client's data and the data set's description.

    Attributes:
        client: the client's :class:`ClientData` (train/test split), ``client_id`` = partition-id.
        tasks: the data set's task set.
        input_shape: per-sample input shape.
        name: data set name; ``info``: its provenance (``results.json``'s ``dataset_info``).
        n_clients: clients of the data set (partition-ids ``0 .. n_clients - 1``).
    """

    client: ClientData
    tasks: TaskSet
    input_shape: tuple[int, ...]
    name: str
    n_clients: int
    info: dict[str, Any] = field(default_factory=dict)


def _data_key(cfg: SimulationConfig, app: Mapping[str, Any]) -> tuple:
    return (cfg.dataset, cfg.data_dir, cfg.clients, cfg.seed, cfg.alpha, cfg.image_size, cfg.max_samples,
            cfg.task_groups, cfg.classes_per_client, int(app["synthetic-train"]), int(app["synthetic-test"]))


@functools.lru_cache(maxsize=2)
def _load_partitioned(key: tuple):
    """The data set of ``key`` split over its clients, loaded once per process (a ClientApp's)."""
    from fmtl_edge.data import load_dataset

    name, data_dir, clients, seed, alpha, image_size, max_samples, task_groups, cpc, _, _ = key
    return load_dataset(name, data_dir=data_dir, n_clients=clients, seed=seed, alpha=alpha, image_size=image_size,
                        max_samples=max_samples, task_groups=task_groups, classes_per_client=cpc)


#: the tasks of the ``synthetic`` data set (8x8 one-channel inputs, like digits)
SYNTHETIC_TASKS = TaskSet([
    Task("cls", "classification", 4, description="which of 4 fixed random projections of x is largest"),
    Task("bright", "binary", 1, description="mean pixel of x above 0.5"),
])
SYNTHETIC_SHAPE = (1, 8, 8)


def synthetic_client(seed: int, client_id: int, n_train: int = 32, n_test: int = 8) -> ClientData:
    """Client ``client_id``'s samples of the ``synthetic`` data set, from ``(seed, client_id)`` only.

    Returns:
        :class:`ClientData`: x float32 ``(n, 1, 8, 8)`` in [0, 1); ``cls`` int64 ``(n,)`` in [0, 4)
        (argmax of a projection fixed by ``seed``, the same for every client); ``bright`` float32
        ``(n,)`` in {0, 1}. Each client's brightness is shifted by its own offset (non-IID).

    Raises:
        DataError: ``n_train < 2`` or ``n_test < 0``.
    """
    from fmtl_edge.seeding import derive_seed

    if n_train < 2 or n_test < 0:
        raise DataError(f"synthetic-train must be >= 2 and synthetic-test >= 0, got {n_train}, {n_test}")
    proj = np.random.default_rng(derive_seed(seed, "synthetic", "projection")).normal(size=(64, 4)).astype(np.float32)
    rng = np.random.default_rng(derive_seed(seed, "synthetic", int(client_id)))
    shift = rng.uniform(-0.2, 0.2)
    n = n_train + n_test
    x = np.clip(rng.random((n, *SYNTHETIC_SHAPE), dtype=np.float32) + np.float32(shift), 0.0, 1.0).astype(np.float32)
    flat = x.reshape(n, -1)
    y = {"cls": np.argmax((flat - 0.5) @ proj, axis=1).astype(np.int64),
         "bright": (flat.mean(axis=1) > 0.5).astype(np.float32)}
    return ClientData(int(client_id), x[:n_train], {k: v[:n_train] for k, v in y.items()},
                      x[n_train:], {k: v[n_train:] for k, v in y.items()})


def synthetic_dataset(seed: int, n_clients: int, n_train: int = 32, n_test: int = 8):
    """Every client of the ``synthetic`` data set in one :class:`FederatedDataset` (what the
    in-process pool needs; the ClientApp generates only its own client)."""
    from fmtl_edge.data.base import FederatedDataset

    clients = [synthetic_client(seed, c, n_train, n_test) for c in range(n_clients)]
    return FederatedDataset(SYNTHETIC, SYNTHETIC_TASKS, clients, SYNTHETIC_SHAPE, synthetic_info(seed, n_clients, n_train, n_test))


def synthetic_info(seed: int, n_clients: int, n_train: int, n_test: int) -> dict[str, Any]:
    return {"source": "generated per client from (seed, client id)", "seed": seed, "clients": n_clients,
            "train_per_client": n_train, "test_per_client": n_test}


def local_data(cfg: SimulationConfig, app: Mapping[str, Any], partition_id: int) -> LocalData:
    """The data of client ``partition_id`` (see the module docstring for where it comes from).

    Raises:
        DataError: ``partition_id`` is not a client of the data set, or the data cannot be loaded.
    """
    pid = int(partition_id)
    if cfg.dataset == SYNTHETIC:
        n = int(cfg.clients or 0)
        if not 0 <= pid < n:
            raise DataError(f"partition-id {pid} is not one of the {n} clients of the synthetic data set")
        tr, te = int(app["synthetic-train"]), int(app["synthetic-test"])
        return LocalData(synthetic_client(cfg.seed, pid, tr, te), SYNTHETIC_TASKS, SYNTHETIC_SHAPE, SYNTHETIC, n,
                         synthetic_info(cfg.seed, n, tr, te))
    ds = _load_partitioned(_data_key(cfg, app))
    if not 0 <= pid < ds.n_clients:
        raise DataError(f"partition-id {pid} is not one of the {ds.n_clients} clients of {ds.name} (set clients = N "
                        "in the run config to the number of SuperNodes)")
    return LocalData(ds.clients[pid], ds.tasks, tuple(ds.input_shape), ds.name, ds.n_clients, dict(ds.info))


def task_to_dict(t: Task) -> dict[str, Any]:
    return {"name": t.name, "kind": t.kind, "out_dim": t.out_dim, "target_mean": t.target_mean,
            "target_std": t.target_std, "units": t.units, "description": t.description}


def task_from_dict(d: Mapping[str, Any]) -> Task:
    """Raises ValueError: an invalid task."""
    return Task(str(d["name"]), d["kind"], int(d["out_dim"]), float(d["target_mean"]), float(d["target_std"]),
                str(d.get("units", "")), str(d.get("description", "")))


def client_info(data: LocalData, profile=None, meter=None, with_dataset: bool = False) -> dict[str, Any]:
    """A client's description for the ServerApp (the reply to ``query``): its id, the tasks it holds
    labels for, its sample counts, the data set's tasks and input shape; with ``with_dataset`` also
    the data set's name, client count and provenance, and the node's device profile and meter."""
    c = data.client
    out: dict[str, Any] = {"client_id": int(c.client_id), "tasks": list(c.task_names), "n_train": c.n_train,
                           "n_test": c.n_test, "input_shape": list(data.input_shape),
                           "task_specs": [task_to_dict(t) for t in data.tasks], "n_clients": data.n_clients}
    if with_dataset:
        out["dataset"] = data.name
        out["dataset_info"] = data.info
        if profile is not None:
            out["device"] = {"profile": profile.name, "profile_source": profile.source,
                             "device_class": profile.device_class, "meter": type(meter).__name__,
                             "memory_budget_bytes": profile.memory_budget_bytes}
    return out
