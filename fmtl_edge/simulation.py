"""``fmtl-edge simulate``'s engine: every method over the same simulated client pool and data.

:func:`run_simulation` builds what is the simulation's own — the in-process client pool (each
execution under this machine's device lease, a meter window and the thread policy; ``--dropout``
faults), a pooled-data pool for the non-FL references, the device profile's budgets — and hands
the rest to the method runner (:func:`fmtl_edge.runner.run_methods`), the same code ``fmtl-server``
and the Flower ServerApp run. :func:`run_seeds` runs it once per ``--seeds`` seed. Nothing here
writes files (:mod:`fmtl_edge.report` does).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from fmtl_edge.config import SimulationConfig
from fmtl_edge.data.base import FederatedDataset
from fmtl_edge.results import combine_seeds, results_document
from fmtl_edge.runner import RunHooks, RunSettings, prepare_methods, run_methods
from fmtl_edge.simulated_pool import InProcessClientPool, dropout_faults
from fmtl_edge.verdict import chance_accuracies

if TYPE_CHECKING:
    from fmtl_edge.run_state import RunState

log = logging.getLogger(__name__)


def make_runtime(cfg: SimulationConfig):
    """The meter, the per-execution lease factory and the device profile of the simulated pool.

    The profile (``--profile``: a TOML file or a device class such as ``jetson-orin-nano``; default:
    the detected device class) gives the memory budget, the per-round time/energy budgets unless
    flags set them, and the meter unless ``--meter`` names one.
    """
    from fmtl_edge.runtime import DeviceLease, load_profile, make_meter

    profile = load_profile(cfg.profile)
    meter = profile.make_meter() if cfg.meter is None else make_meter(cfg.meter, **profile.meter_kwargs())

    def lease(_cid: int):
        # All simulated clients share this machine: one FL task at a time on it.
        # A wait over 2 s is logged with the holder's pid; after --lease-wait-s it fails (DeviceBusy).
        return DeviceLease("local", timeout_s=cfg.lease_wait_s, owner="fmtl-edge simulate")

    return meter, lease, profile


def dataset_eligible(dataset: FederatedDataset):
    """``tasks -> clients holding labels for any of them`` of ``dataset`` (before any pool exists)."""
    def eligible(tasks):
        return [c.client_id for c in dataset.clients if any(t in c.y_train for t in tasks)]

    return eligible


def run_simulation(cfg: SimulationConfig, dataset: FederatedDataset, *, hooks: RunHooks | None = None,
                   run_state: "RunState | None" = None) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Run every method of ``cfg.methods`` on ``dataset`` over simulated clients.

    Args:
        hooks: progress and logging callbacks (:class:`fmtl_edge.runner.RunHooks`).
        run_state: a :class:`fmtl_edge.run_state.RunState` (``--resume``): every round is committed
            to it, and methods it holds as finished are not run again (their entry and models are
            taken from it); the method that was running continues from its finished jobs and the
            running job's last completed round, with the clients' own state restored.

    Returns:
        (results, models): ``results`` in the ``results.json`` layout (:mod:`fmtl_edge.results`),
        ``models[method][task]`` the final state of that task's model (backbone + its head).

    Raises:
        ConfigError, ValueError: invalid method names or settings (before any training).
    """
    from fmtl_edge.client import warm_up
    from fmtl_edge.runtime.threads import ThreadPolicy

    cfg.validate_against(len(dataset.tasks), dataset.n_clients)
    spec = cfg.model_spec(dataset.input_shape)
    methods = prepare_methods(cfg, dataset.tasks, spec, dataset_eligible(dataset), pooled=True)
    if not any(len(c.x_test) for c in dataset.clients):
        log.warning("%s: no client has test samples: every test loss will be empty (null in results.json) "
                    "and the methods cannot be compared", dataset.name)
    meter, lease, profile = make_runtime(cfg)
    warm_up()
    threads = ThreadPolicy.parse(cfg.threads)
    fleet = None
    if cfg.fleet is not None:
        from fmtl_edge.fleet import Fleet

        fleet = Fleet.load(cfg.fleet)
    pool = InProcessClientPool(dataset, spec, meter, lease, profile.memory_budget_bytes,
                               faults=dropout_faults(cfg.seed, cfg.dropout), threads=threads, fleet=fleet)
    results = results_document(
        dataset=dataset.name, dataset_info=dataset.info, tasks=dataset.tasks, clients=dataset.n_clients,
        config=cfg.to_dict(), dropout=cfg.dropout, engine={"name": "simulate"},
        chance_accuracy=chance_accuracies(dataset.tasks, dataset.clients),
        device={"profile": profile.name, "profile_source": profile.source, "device_class": profile.device_class,
                "meter": type(meter).__name__, "memory_budget_bytes": profile.memory_budget_bytes,
                "threads": threads.describe()})
    settings = RunSettings(
        time_budget_s=cfg.time_budget_s if cfg.time_budget_s is not None else profile.round_time_s,
        energy_budget_j=cfg.energy_budget_j if cfg.energy_budget_j is not None else profile.round_energy_j,
        fleet=fleet)
    return run_methods(cfg, methods, pool, spec, results, store=run_state, hooks=hooks, settings=settings,
                       pooled_pool=lambda: InProcessClientPool(dataset.pooled(), spec, meter, lease,
                                                               profile.memory_budget_bytes, threads=threads,
                                                               fleet=fleet))


def run_seeds(cfg: SimulationConfig, dataset: FederatedDataset, hooks: RunHooks | None = None):
    """``cfg.seeds``: :func:`run_simulation` once per seed on the same ``dataset`` (the partition of
    ``cfg.seed``), each run with ``seed = s`` (model init, client sampling, batch order, dropout).

    Returns:
        ``(results, models)``: :func:`fmtl_edge.results.combine_seeds` of the runs; the first
        seed's models. Not resumable (no run state).
    """
    seeds = tuple(cfg.seeds or (cfg.seed,))
    runs = []
    for s in seeds:
        log.info("seed %d (%d of %d)", s, len(runs) + 1, len(seeds))
        runs.append(run_simulation(dataclasses.replace(cfg, seed=int(s), seeds=None, partition_seed=cfg.data_seed),
                                   dataset, hooks=hooks))
    return combine_seeds([r for r, _ in runs], seeds, cfg.data_seed, cfg.to_dict(), cfg.paired_with), runs[0][1]
