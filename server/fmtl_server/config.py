"""``job.toml``: the job (``[job]``) and the server's settings (``[server]``).

``[job]`` takes the keys of ``fmtl-edge simulate`` (``dataset``, ``clients``, ``max_samples``,
``methods``, ``rounds``, ``r0``, ``clients_per_round``, ``local_epochs``, ``batch_size``, ``lr``, ``seed``,
``width``, ``time_budget_s``, ``energy_budget_j``...) with the same defaults and presets, so a job over
agents trains what ``fmtl-edge simulate`` with the same settings trains, plus the deployment keys
below. Device-side settings (``meter``, ``data_dir``) are not job keys: each agent names its own.

``[server]`` paths are relative to the config file; command-line flags override them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from fmtl_edge.config import ConfigError, SimulationConfig, build_config, read_toml

#: [job] keys of the deployment (the rest are simulate keys)
JOB_KEYS = {
    "max_update_norm_ratio": "update norm bound: an update farther (L2) from the global model than this x max(|global|, 1) "
                             "is refused (default 10)",
    "max_update_norm_multiple": "round-relative norm bound: an update farther from the global model than this x the "
                                "round's median distance is refused, in rounds of 3 or more updates (default 4; 0: off)",
    "max_samples_ratio": "a client's FedAvg weight (and evaluation n) is capped at this x the low median of the "
                         "sample counts the devices registered (default 10; 0: no cap)",
    "max_client_samples": "cap on one update's aggregation weight, in samples (default: none)",
    "name": "job name (results, status)",
    "tasks": "the tasks to train (default: every task of the dataset)",
    "round_deadline_s": "seconds a round waits for its K updates (default: no deadline)",
    "min_updates": "fewest updates a round may end with at its deadline (default 1)",
    "max_attempts": "devices tried per sampled client: the sampled one plus replacements (default 3)",
    "dispatch_wait_s": "wait this long for a sampled device that is offline or busy before replacing it (default 10)",
    "deadline_retries": "deadline extensions with other devices before a round fails (default 2)",
    "wait_for_devices": "devices that must be online before the first round (default: clients, else K)",
    "start_timeout_s": "give up waiting for devices after this long (default: wait forever)",
    "eval_timeout_s": "seconds the final evaluation on the devices may take (default 600)",
    "evaluate": "evaluate the final models on the devices' test splits (default true; false: test losses are null)",
    "retry_wait_s": "pause before a failed round is tried again from the last checkpoint (default 5)",
    "max_round_retries": "failed attempts of one round before the server gives up (default 20)",
}
_DEVICE_SIDE = {"meter": "a device setting: fmtl-edge join --meter or the device profile",
                "data_dir": "a device setting: fmtl-edge join --data-dir", "out": "a [server] setting",
                "dropout": "the simulation's fault injector (fmtl-edge simulate --dropout); devices fail for real here",
                "eval_every": "simulation only for now (fmtl-edge simulate --eval-every); fmtl-server evaluates at the end",
                "classes_per_client": "simulation only (fmtl-edge simulate --classes-per-client); a device's data is "
                                      "what fmtl-edge join holds",
                "fleet": "simulation only (fmtl-edge simulate --fleet): here the devices are real and metered",
                "threads": "a device setting: fmtl-edge join --threads",
                "partition_seed": "a simulation setting (one seed of a study run on its own); give devices the "
                                  "partition with fmtl-edge join --data ...,seed=S"}
SERVER_KEYS = ("listen", "state_dir", "out", "tokens", "tls_cert", "tls_key", "client_ca", "insecure",
               "heartbeat_interval_s", "heartbeat_timeout_s", "chunk_mib", "max_update_mib", "max_workers",
               "upload_first_chunk_s", "upload_idle_s", "max_call_s", "max_streams_per_device", "max_idle_streams")
_SERVER_PATHS = ("state_dir", "out", "tokens", "tls_cert", "tls_key", "client_ca")


@dataclass
class JobConfig:
    """What to train and how rounds over devices behave."""

    name: str
    sim: SimulationConfig
    tasks: tuple[str, ...] | None = None
    round_deadline_s: float | None = None
    min_updates: int = 1
    max_attempts: int = 3
    dispatch_wait_s: float = 10.0
    deadline_retries: int = 2
    wait_for_devices: int | None = None
    start_timeout_s: float | None = None
    eval_timeout_s: float = 600.0
    evaluate: bool = True
    retry_wait_s: float = 5.0
    max_round_retries: int = 20
    max_update_norm_ratio: float = 10.0
    max_update_norm_multiple: float = 4.0
    max_samples_ratio: float = 10.0
    max_client_samples: int | None = None
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def devices_needed(self) -> int:
        if self.wait_for_devices is not None:
            return self.wait_for_devices
        return self.sim.clients or self.sim.clients_per_round

    def fingerprint(self) -> str:
        """SHA-256 of the job's settings: a state folder belongs to one job."""
        return hashlib.sha256(json.dumps(self.table, sort_keys=True, default=str).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sim", "table")}
        d["tasks"] = list(self.tasks) if self.tasks else None
        return d


@dataclass
class ServerConfig:
    listen: str = "0.0.0.0:50051"
    state_dir: str = "fmtl-state"
    out: str = "runs/server"
    tokens: str = "tokens.txt"
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    insecure: bool = False
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    chunk_mib: float = 2.0
    max_update_mib: float = 4096.0
    max_workers: int = 64
    upload_first_chunk_s: float = 30.0     # an upload's metadata and first chunk must come within this
    upload_idle_s: float = 60.0            # later chunks within this of the previous one
    max_call_s: float = 3600.0             # an upload stream ends within this
    max_streams_per_device: int = 2        # model download/upload streams open at once per device
    max_idle_streams: int = 8              # upload streams without data yet, over all devices

    def validate(self) -> None:
        for k in ("upload_first_chunk_s", "upload_idle_s", "max_call_s", "max_streams_per_device", "max_idle_streams"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"[server] {k}", f"must be a number > 0, got {v!r}")
        if not 1.0 <= self.chunk_mib <= 4.0:
            raise ConfigError("[server] chunk_mib", f"must be within 1..4 MiB, got {self.chunk_mib}")
        if not self.heartbeat_timeout_s > self.heartbeat_interval_s > 0:
            raise ConfigError("[server] heartbeat_timeout_s",
                              "must be larger than heartbeat_interval_s (> 0); e.g. interval 2, timeout 10")
        if not self.max_update_mib > 0:
            raise ConfigError("[server] max_update_mib", "must be > 0")
        if self.insecure and (self.tls_cert or self.tls_key):
            raise ConfigError("--insecure", "given together with a TLS certificate; choose one")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise ConfigError("--tls-cert/--tls-key", "TLS needs a certificate and a key (PEM); "
                              "name --insecure to run without TLS (trusted networks and tests only)")
        if self.client_ca and self.insecure:
            raise ConfigError("--client-ca", "client certificates need TLS; drop --insecure")

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mib * (1 << 20))

    @property
    def max_update_bytes(self) -> int:
        return int(self.max_update_mib * (1 << 20))


def _unknown(where: str, key: str, known) -> ConfigError:
    """An unknown key of the job file, with the nearest known one (``difflib``, as
    :mod:`fmtl_edge.config` does for ``simulate``) instead of every key."""
    import difflib

    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return ConfigError(f"{where} {key}", f"unknown key; {hint}docs/deployment.md §2 lists the {where} keys")


def _num(name: str, v: Any, kind: type, lo: float | None = None, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ConfigError(f"[job] {name}", f"must be a {'whole ' if kind is int else ''}number, got {v!r}")
    if not math.isfinite(v) or (lo is not None and v < lo):
        raise ConfigError(f"[job] {name}", f"must be >= {lo}, got {v!r}")
    return kind(v)


def parse_job(table: Mapping[str, Any], name: str = "job") -> JobConfig:
    """The ``[job]`` table → :class:`JobConfig`.

    Raises:
        ConfigError: unknown key, wrong type or impossible value (naming the key).
    """
    table = {k.replace("-", "_"): v for k, v in table.items()}
    from fmtl_edge.methods import method_options

    sim_fields = {f.name for f in fields(SimulationConfig)} - {"method_options"} | set(method_options())
    sim: dict[str, Any] = {}
    for k, v in table.items():
        if k in _DEVICE_SIDE:
            raise ConfigError(f"[job] {k}", f"is {_DEVICE_SIDE[k]}")
        if k in JOB_KEYS:
            continue
        if k not in sim_fields:
            raise _unknown("[job]", k, set(JOB_KEYS) | (sim_fields - set(_DEVICE_SIDE)))
        if isinstance(v, int) and not isinstance(v, bool) and k in ("lr", "momentum", "weight_decay", "alpha",
                                                                      "time_budget_s", "energy_budget_j"):
            v = float(v)
        sim[k] = v
    cfg = build_config(sim)
    job = JobConfig(name=str(table.get("name", name)), sim=cfg, table=dict(table))
    if "tasks" in table:
        t = table["tasks"]
        if isinstance(t, str):
            t = [x.strip() for x in t.split(",") if x.strip()]
        if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
            raise ConfigError("[job] tasks", "must be a non-empty list of task names")
        job.tasks = tuple(t)
    for k, kind, lo, none_ok in (("round_deadline_s", float, 0.001, True), ("min_updates", int, 1, False),
                                 ("max_attempts", int, 1, False), ("dispatch_wait_s", float, 0.0, False),
                                 ("deadline_retries", int, 0, False), ("wait_for_devices", int, 1, True),
                                 ("start_timeout_s", float, 0.0, True), ("eval_timeout_s", float, 1.0, False),
                                 ("retry_wait_s", float, 0.0, False), ("max_round_retries", int, 0, False),
                                 ("max_update_norm_ratio", float, 1e-6, False), ("max_client_samples", int, 1, True),
                                 ("max_update_norm_multiple", float, 0.0, False), ("max_samples_ratio", float, 0.0, False)):
        if k in table:
            setattr(job, k, _num(k, table[k], kind, lo, none_ok))
    if "evaluate" in table:
        if not isinstance(table["evaluate"], bool):
            raise ConfigError("[job] evaluate", f"must be true or false, got {table['evaluate']!r}")
        job.evaluate = table["evaluate"]
    if job.min_updates > cfg.clients_per_round:
        raise ConfigError("[job] min_updates", f"{job.min_updates} is more than K = clients_per_round = {cfg.clients_per_round}")
    if job.wait_for_devices is not None and job.wait_for_devices < cfg.clients_per_round:
        raise ConfigError("[job] wait_for_devices", f"must be at least K = {cfg.clients_per_round}")
    return job


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> tuple[ServerConfig, JobConfig]:
    """Read ``job.toml``; ``overrides`` (flags, None = not given) beat its ``[server]`` table.

    Raises:
        ConfigError: missing file, bad TOML, unknown key or impossible value.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        raw = read_toml(p)
        base = p.resolve().parent
    unknown = sorted(set(raw) - {"job", "server"})
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], ["job", "server"], n=1, cutoff=0.5)
        raise ConfigError("--config", f"unknown table [{unknown[0]}]" + (f"; did you mean [{near[0]}]?" if near else "")
                          + "; a job file has [job] and [server]")
    if "job" not in raw:
        raise ConfigError("--config", "no [job] table (dataset, methods, rounds, clients_per_round, ...)")
    job = parse_job(raw["job"], Path(path).stem if path else "job")
    srv_table = {k.replace("-", "_"): v for k, v in raw.get("server", {}).items()}
    bad = sorted(set(srv_table) - set(SERVER_KEYS))
    if bad:
        raise _unknown("[server]", bad[0], SERVER_KEYS)
    for k in _SERVER_PATHS:
        if isinstance(srv_table.get(k), str) and srv_table[k]:
            srv_table[k] = str(base / srv_table[k])
    for k, v in (overrides or {}).items():
        if v is not None:
            srv_table[k] = v
    try:
        srv = ServerConfig(**srv_table)
    except TypeError as e:
        raise ConfigError("[server]", str(e)) from None
    srv.validate()
    return srv, job


def as_dict(srv: ServerConfig) -> dict[str, Any]:
    return asdict(srv)
