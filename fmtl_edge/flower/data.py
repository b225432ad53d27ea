"""The Flower apps' configuration and the data of one client, loaded where the client runs.

Run config (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, ``flwr run -c``): every key
of ``fmtl-edge simulate``'s TOML file (``dataset``, ``methods = "mas-2,all-in-one"``, ``rounds``,
``clients-per-round``, ``seed``, ``out``, the methods' options...), with the same defaults and
dataset presets (:func:`fmtl_edge.config.build_config`), plus the apps' own keys
(:data:`APP_KEYS`). Flower's config values are scalars: ``layers`` is given as a JSON string.

Data: a ClientApp serves the client the ServerApp gave its node for the run (each message names
it; the node is known by its ``partition-id``, set by Flower's simulation engine or
``flower-supernode --node-config 'partition-id=3'``). It loads that client's data with
:func:`fmtl_edge.data.load_dataset` (the same partition as ``simulate`` for the same seed: the whole
data set is read and split in the ClientApp's process, and only its client is kept) and keeps it in
a file of the node's data cache (:func:`cache_dir`, keyed by :func:`cache_key`), so the next
message of the run — a new ClientApp process on a SuperNode — reads only its own client's arrays.
For ``dataset = "synthetic"`` it generates its own client's samples from ``(seed, client)`` alone
(O(1) per client: the scale benchmark's data). The ServerApp never loads client data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmtl_edge.config import ConfigError, SimulationConfig
from fmtl_edge.data.base import ClientData, DataError, DataOptions
from fmtl_edge.tasks import Task, TaskSet

log = logging.getLogger("fmtl_edge.flower")

#: the apps' own run-config keys and their defaults (not fields of SimulationConfig); each may be set in
#: ``[tool.flwr.app.config]``, with ``flwr run -c`` or in the ``config`` file; ``""`` leaves it unset
APP_KEYS: dict[str, Any] = {
    "config": "",  # an fmtl-edge TOML config file (as `simulate --config`); its keys lie under the run config's
    "round-timeout-s": 600.0,  # seconds a round waits for its replies (a client not answering is refused)
    "nodes-wait-s": 120.0,  # how long the ServerApp waits for the nodes to connect
    "nodes": 0,  # nodes to wait for before the clients are chosen among them (0: `clients`, then until the count settles)
    "overwrite": True,  # replace an earlier results.json in ``out``
    "resume": False,  # continue the interrupted run of ``out`` (its resume state, same settings)
    "lease": "local",  # the device lease of a ClientApp's executions ("none": no lease); node config "lease" wins
    "max-update-norm-ratio": 10.0,  # norm bound: |w - w_global| <= ratio * max(|w_global|, 1) (as fmtl-server's)
    "max-client-samples": 0,  # cap on one update's aggregation weight (samples; 0: no cap)
    "data-cache": True,  # keep each node's data partition in a file (node config cache-dir), not re-partitioned per message
    "synthetic-train": 32,  # samples per client of dataset "synthetic" (train split)
    "synthetic-test": 8,  # ... (test split)
}

SYNTHETIC = "synthetic"

def _app_value(key: str, value: Any) -> Any:
    """An app key's value in its default's type.

    Raises:
        ConfigError: a value of another type or out of range (naming the key).
    """
    default = APP_KEYS[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(key, f"must be a whole number, got {value!r}")
        v = type(default)(value)
        if key in ("round-timeout-s", "max-update-norm-ratio") and not v > 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")
        if v < 0:
            raise ConfigError(key, f"must be >= 0, got {value!r}")
        return v
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


def _file_app_keys(path: str) -> dict[str, Any]:
    """The app keys of the fmtl-edge TOML file ``path`` (top level or its ``[simulate]`` table).

    Raises:
        ConfigError: the file is missing or not TOML (naming ``config``).
    """
    from fmtl_edge.config import read_toml

    raw = read_toml(path, flag="config")
    if isinstance(raw.get("simulate"), dict):
        raw = {**{k: v for k, v in raw.items() if k != "simulate"}, **raw["simulate"]}
    return {k.replace("_", "-"): v for k, v in raw.items() if k.replace("_", "-") in APP_KEYS and k != "config"}


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(simulation keys, app keys)`` of a Flower run config. An app key is, from lowest to highest:
    its default (:data:`APP_KEYS`), the ``config`` file's value, the run config's (``""``: not set).

    Raises:
        ConfigError: an app key of the wrong type or out of range, or an unreadable ``config`` file.
    """
    given: dict[str, Any] = {}
    sim: dict[str, Any] = {}
    for k, v in run_config.items():
        key = str(k).replace("_", "-")
        if key in APP_KEYS:
            if not (isinstance(v, str) and v == ""):
                given[key] = v
        else:
            sim[str(k)] = v
    app = dict(APP_KEYS)
    if given.get("config"):
        app.update(_file_app_keys(str(given["config"])))
    app.update(given)
    for key in APP_KEYS:
        app[key] = _app_value(key, app[key])
    return sim, app


def simulation_config(run_config: Mapping[str, Any]) -> SimulationConfig:
    """The :class:`SimulationConfig` of a Flower run config: defaults < dataset preset < the TOML
    file named by ``config`` (as ``simulate --config``; it may hold the app keys too) < the run
    config's keys (named as in that file, ``-`` or ``_``; ``""`` leaves an optional setting unset,
    as Flower's config has no null).

    Raises:
        ConfigError: an unknown key (named, with the nearest known one and where to set it), a
            wrong type or an impossible value (as ``simulate`` refuses it).
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
    return build_config(flags, str(app["config"]) or None, skip=APP_KEYS)


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
    o = cfg.data_options()
    return (cfg.dataset, o.data_dir, o.n_clients, o.seed, o.alpha, o.image_size, o.max_samples,
            o.task_groups, o.classes_per_client, int(app["synthetic-train"]), int(app["synthetic-test"]))


@functools.lru_cache(maxsize=2)
def _load_partitioned(key: tuple[str, DataOptions]):
    """The data set ``key = (name, options)`` split over its clients, loaded once per process (a
    ClientApp's)."""
    from fmtl_edge.data import load_dataset

    return load_dataset(*key)


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


#: environment variable: the folder of the ClientApps' data cache when the node config names none
ENV_CACHE_DIR = "FMTL_EDGE_CACHE_DIR"
#: bump when the cache file layout changes (old files are then not read)
CACHE_FORMAT = 1


def cache_dir(node_config: Mapping[str, Any]) -> Path:
    """The folder of a node's data cache: node config ``cache-dir``, else ``<state-dir>/data-cache``,
    else ``$FMTL_EDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fmtl-edge/flower`` (``~/.cache/...``)."""
    if node_config.get("cache-dir"):
        return Path(str(node_config["cache-dir"])).expanduser()
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser() / "data-cache"
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmtl-edge" / "flower"


def cache_key(cfg: SimulationConfig, app: Mapping[str, Any]) -> dict[str, Any]:
    """What a cached partition depends on: the data settings (data set, folder and its mtime, clients,
    seed, alpha, image size, max samples, task groups, classes per client, synthetic sizes), the
    fmtl-edge version and the cache format. A change of any of them is another cache entry."""
    from fmtl_edge import __version__

    mtime = None
    if cfg.data_dir and Path(cfg.data_dir).exists():
        mtime = Path(cfg.data_dir).stat().st_mtime_ns
    return {"format": CACHE_FORMAT, "fmtl_edge": __version__, "data": list(_data_key(cfg, app)),
            "data_dir_mtime_ns": mtime}


def _cache_file(folder: Path, key: Mapping[str, Any], client_id: int) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return folder / f"{digest}-client-{int(client_id)}.safetensors"


def _write_cache(path: Path, key: Mapping[str, Any], d: "LocalData") -> None:
    """One client's data as a safetensors file (atomic: a temp file renamed), its description in
    the header's metadata."""
    from safetensors.numpy import save_file

    c = d.client
    arrays = {"x_train": c.x_train, "x_test": c.x_test, **{f"y_train/{t}": v for t, v in c.y_train.items()},
              **{f"y_test/{t}": v for t, v in c.y_test.items()}}
    # keep each array's memory layout (the loaders may give NHWC-strided images; torch picks its
    # kernels, and so the float sums, by the strides): saved in memory order, with the axes' order
    perms, flat = {}, {}
    for k, v in arrays.items():
        perm = [int(i) for i in np.argsort([-st for st in v.strides], kind="stable")] if v.ndim else []
        t = v.transpose(perm) if v.ndim else v
        if not t.flags.c_contiguous:
            perm, t = list(range(v.ndim)), v
        perms[k], flat[k] = {"perm": perm, "strides": list(v.strides)}, np.ascontiguousarray(t)
    meta = {"perms": json.dumps(perms), "key": json.dumps(key, sort_keys=True, default=str), "name": d.name, "n_clients": str(d.n_clients),
            "input_shape": json.dumps(list(d.input_shape)), "tasks": json.dumps([task_to_dict(t) for t in d.tasks]),
            "info": json.dumps(d.info, default=str), "order": json.dumps(list(c.y_train))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(flat, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _restore_layout(v: np.ndarray, layout: Mapping[str, Any]) -> np.ndarray:
    """``v`` (saved in memory order) with the axes and strides it had when it was written (the
    strides of size-1 axes included, which numpy would otherwise normalise)."""
    if not v.ndim:
        return v
    v = v.transpose(np.argsort(layout["perm"]))
    strides = tuple(int(x) for x in layout["strides"])
    if v.strides != strides and all(st == s0 for st, s0, n in zip(v.strides, strides, v.shape) if n > 1):
        v = np.lib.stride_tricks.as_strided(v, v.shape, strides)
    return v


def _read_cache(path: Path, key: Mapping[str, Any], client_id: int) -> "LocalData | None":
    """The cached data of ``client_id``, or None when there is none or it was made for other
    settings (or cannot be read: it is then made again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True, default=str):
                return None
            perms = json.loads(meta["perms"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        arrays = {k: _restore_layout(v, perms[k]) for k, v in arrays.items()}
        order = json.loads(meta["order"])
        client = ClientData(int(client_id), arrays["x_train"], {t: arrays[f"y_train/{t}"] for t in order},
                            arrays["x_test"], {t: arrays[f"y_test/{t}"] for t in order})
        tasks = TaskSet([task_from_dict(t) for t in json.loads(meta["tasks"])])
        return LocalData(client, tasks, tuple(json.loads(meta["input_shape"])), meta["name"], int(meta["n_clients"]),
                         json.loads(meta["info"]))
    except Exception as e:  # a torn or foreign file: make it again  # noqa: BLE001
        log.warning("data cache %s unreadable (%s): loading the data again", path, e)
        return None


def local_data(cfg: SimulationConfig, app: Mapping[str, Any], client_id: int,
               cache: str | Path | None = None) -> LocalData:
    """The data of client ``client_id`` (see the module docstring for where it comes from).

    Args:
        cache: a folder for this client's data (:func:`cache_dir`): read from
            ``<cache>/<settings digest>-client-<id>.safetensors`` when it was made for the same
            :func:`cache_key`, else loaded, partitioned and written there. None: no disk cache.

    Raises:
        DataError: ``client_id`` is not a client of the data set, or the data cannot be loaded.
    """
    pid = int(client_id)
    if cfg.dataset == SYNTHETIC:
        n = int(cfg.clients or 0)
        if not 0 <= pid < n:
            raise DataError(f"client {pid} is not one of the {n} clients of the synthetic data set")
        tr, te = int(app["synthetic-train"]), int(app["synthetic-test"])
        return LocalData(synthetic_client(cfg.seed, pid, tr, te), SYNTHETIC_TASKS, SYNTHETIC_SHAPE, SYNTHETIC, n,
                         synthetic_info(cfg.seed, n, tr, te))
    path = key = None
    if cache is not None:
        key = cache_key(cfg, app)
        path = _cache_file(Path(cache), key, pid)
        got = _read_cache(path, key, pid)
        if got is not None:
            return got
    ds = _load_partitioned((cfg.dataset, cfg.data_options()))
    if not 0 <= pid < ds.n_clients:
        raise DataError(f"client {pid} is not one of the {ds.n_clients} clients of {ds.name} (clients = "
                        f"{ds.n_clients} in the run config)")
    d = LocalData(ds.clients[pid], ds.tasks, tuple(ds.input_shape), ds.name, ds.n_clients, dict(ds.info))
    if path is not None:
        try:
            _write_cache(path, key, d)
        except OSError as e:
            log.warning("could not write the data cache %s (%s); the data is loaded again next time", path, e)
    return d


def task_to_dict(t: Task) -> dict[str, Any]:
    return {"name": t.name, "kind": t.kind, "out_dim": t.out_dim, "target_mean": t.target_mean,
            "target_std": t.target_std, "units": t.units, "description": t.description}


def task_from_dict(d: Mapping[str, Any]) -> Task:
    """Raises ValueError: an invalid task."""
    return Task(str(d["name"]), d["kind"], int(d["out_dim"]), float(d["target_mean"]), float(d["target_std"]),
                str(d.get("units", "")), str(d.get("description", "")))


def client_info(data: LocalData, profile=None, meter=None, with_dataset: bool = False,
                partition_id: int | None = None) -> dict[str, Any]:
    """A client's description for the ServerApp (the reply to ``query``): its id, the node's
    ``partition-id``, the tasks it holds labels for, its sample counts, the data set's tasks and
    input shape; with ``with_dataset`` also the data set's name, client count and provenance, and
    the node's device profile and meter."""
    from fmtl_edge.loss_weights import client_label_stats

    c = data.client
    out: dict[str, Any] = {"client_id": int(c.client_id), "partition_id": partition_id,
                           "tasks": list(c.task_names), "n_train": c.n_train,
                           "n_test": c.n_test, "input_shape": list(data.input_shape),
                           "task_specs": [task_to_dict(t) for t in data.tasks], "n_clients": data.n_clients,
                           "label_stats": client_label_stats(c.y_train, data.tasks)}
    if with_dataset:
        out["dataset"] = data.name
        out["dataset_info"] = data.info
        if profile is not None:
            out["device"] = {"profile": profile.name, "profile_source": profile.source,
                             "device_class": profile.device_class, "meter": type(meter).__name__,
                             "memory_budget_bytes": profile.memory_budget_bytes}
    return out
