"""The Flower ServerApp: every fmtl-edge method of the run config over Flower nodes (``app``).

``[tool.flwr.app.components] serverapp = "fmtl_edge.flower.server_app:app"``. Its ``main(grid,
context)``:

1. builds the :class:`~fmtl_edge.config.SimulationConfig` from the run config
   (:func:`fmtl_edge.flower.data.simulation_config`: the keys of ``simulate``'s TOML file);
2. waits for the nodes (``clients`` of them when the run config sets it) and asks each for its
   client's description (a ``query`` message): the ServerApp learns the tasks, input shape and
   which tasks each client holds labels for — it never loads client data;
3. runs each method's plan with fmtl-edge's :class:`~fmtl_edge.coordinator.Coordinator`
   (strategies, streaming aggregation kernels, MAS affinity averaging and exact split search:
   all unchanged) over :class:`~fmtl_edge.flower.pool.FlowerGridPool`, then evaluates the final
   models through the same pool (:func:`fmtl_edge.evaluation.evaluate_method`);
4. writes ``results.json`` and ``models/<method>/<task>.safetensors`` into ``out`` with
   :func:`fmtl_edge.report.write_outputs`: the layout of ``fmtl-edge simulate``, plus an
   ``engine`` entry (Flower version, nodes, messages, the driver's peak RSS).

Centralized references (pooled data) cannot run on Flower: the ServerApp refuses them.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fmtl_edge.config import ConfigError, SimulationConfig
from fmtl_edge.coordinator import Coordinator, RoundRecord
from fmtl_edge.flower import require_flwr
from fmtl_edge.models import ModelSpec
from fmtl_edge.tasks import TaskSet

from .data import split_run_config, simulation_config, task_from_dict
from .pool import FlowerGridPool, query_nodes, wait_for_nodes

require_flwr()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

log = logging.getLogger("fmtl_edge.flower")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``; Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def run_methods_on_pool(cfg: SimulationConfig, pool, tasks: TaskSet, input_shape, meta: Mapping[str, Any],
                        on_round: Callable[[Any, RoundRecord], None] | None = None
                        ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Every method of ``cfg.methods`` over ``pool`` (any :class:`~fmtl_edge.coordinator.ClientPool`
    whose clients hold their own data): :func:`fmtl_edge.simulation.run_methods`'s loop (with its
    ``eval-every`` curves and merge-phase comparison) without the in-process pool and without resume.

    Args:
        tasks, input_shape: the data set's task set and per-sample input shape.
        meta: ``dataset``, ``dataset_info``, ``clients`` (count), ``device`` (the nodes' profile
            and meter) for ``results.json``.
        on_round: ``(method, RoundRecord)`` after every round.

    Returns:
        ``(results, models)`` as :func:`fmtl_edge.simulation.run_methods`.

    Raises:
        ConfigError, ValueError: a bad setting, a centralized (pooled-data) method, or a sampling
            the pool cannot serve (before anything trains).
    """
    from fmtl_edge.evaluation import evaluate_method
    from fmtl_edge.simulation import (CurveRecorder, build_methods, compare_merge_phase, final_states, method_entry,
                                      train_config, versions)
    from fmtl_edge.strategy import RoundContext

    n_clients = len(pool.client_ids)
    cfg.validate_against(len(tasks), n_clients)
    spec = cfg.model_spec(input_shape)
    methods = build_methods(cfg, tasks, spec)
    for m in methods:
        if m.pooled_data:
            raise ConfigError("--methods", f"{m.name} trains on pooled data (a centralized reference) and cannot run "
                              "on Flower nodes; run it with fmtl-edge simulate")
        for job in m.next_jobs({}):
            m.strategy(job).configure_train(RoundContext(job, 0, cfg.seed, cfg.clients_per_round, pool.eligible))
    train = train_config(cfg)
    results: dict[str, Any] = {
        "dataset": meta["dataset"], "dataset_info": meta.get("dataset_info", {}), "tasks": list(tasks.names),
        "task_kinds": {t.name: t.kind for t in tasks}, "clients": int(meta.get("clients", n_clients)),
        "config": cfg.to_dict(), "versions": versions(), "dropout": cfg.dropout,
        "device": dict(meta.get("device") or {}), "methods": {},
    }
    models: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for method in methods:
        coord = Coordinator(pool, spec, tasks, train, min(cfg.clients_per_round, n_clients), cfg.seed,
                            on_round=(lambda rec, m=method: on_round(m, rec)) if on_round else None,
                            time_budget_s=cfg.time_budget_s, energy_budget_j=cfg.energy_budget_j)
        curve = CurveRecorder(cfg.eval_every) if cfg.eval_every and method.global_model else None
        if curve is not None:  # --eval-every: the test-loss curve, evaluated through the same pool
            coord.on_round_end = lambda ck, c=coord, rec=curve: rec.record(c, ck)
        t0 = time.perf_counter()
        done = coord.run_method(method)
        wall = time.perf_counter() - t0
        evaluation = evaluate_method(method, done, coord)
        results["methods"][method.name] = method_entry(method, done, evaluation, cfg.rounds, wall, spec,
                                                       train.batch_size, curve=None if curve is None else curve.points)
        if method.global_model:
            models[method.name] = final_states(method, done)
    compare_merge_phase(results)
    return results, models


def serve(grid, run_config: Mapping[str, Any], write: bool = True) -> tuple[dict[str, Any], dict, Path | None]:
    """The ServerApp's work for ``run_config`` over ``grid`` (``main`` calls it; tests call it with
    any object with the :class:`~flwr.serverapp.Grid` methods ``get_node_ids``, ``push_messages``,
    ``pull_messages`` and ``send_and_receive``).

    Returns:
        ``(results, models, out folder or None when write is False)``.

    Raises:
        ConfigError: a bad run config; TimeoutError: the nodes did not connect; RuntimeError: a
            node could not describe its client.
    """
    import flwr

    cfg = simulation_config(run_config)
    _, app = split_run_config(run_config)
    t0 = time.perf_counter()
    nodes = wait_for_nodes(grid, cfg.clients, float(app["nodes-wait-s"]))
    infos = query_nodes(grid, nodes, float(app["round-timeout-s"]))
    first = infos[nodes[0]]
    tasks = TaskSet([task_from_dict(t) for t in first["task_specs"]])
    for node, info in infos.items():
        if [t["name"] for t in info["task_specs"]] != list(tasks.names) or info["input_shape"] != first["input_shape"]:
            raise RuntimeError(f"Flower node {node} holds a different data set (tasks {[t['name'] for t in info['task_specs']]}, "
                               f"input {info['input_shape']}) than node {nodes[0]}")
    ids = sorted(int(i["client_id"]) for i in infos.values())
    log.info("%d Flower nodes serve clients %s of %s (%d clients)", len(nodes), _ranges(ids), first["dataset"],
             first["n_clients"])
    spec = cfg.model_spec(first["input_shape"])
    pool = FlowerGridPool(grid, infos, spec, timeout_s=float(app["round-timeout-s"]))
    meta = {"dataset": first["dataset"], "dataset_info": first.get("dataset_info", {}), "clients": int(first["n_clients"]),
            "device": first.get("device", {})}

    def on_round(method, rec: RoundRecord) -> None:
        loss = sum(rec.train_loss.values())
        log.info("%s %s r%d: %d clients, train loss %.4f, %.2f s", method.name, rec.job, rec.round + 1,
                 len(rec.executed), loss, rec.wall_s)

    results, models = run_methods_on_pool(cfg, pool, tasks, first["input_shape"], meta, on_round)
    results["engine"] = {"name": "flower", "flwr": flwr.__version__, "nodes": len(nodes),
                         "messages": pool.messages_sent, "array_bytes_sent": pool.bytes_sent,
                         "wall_s": time.perf_counter() - t0, "driver_peak_rss_bytes": peak_rss_bytes()}
    out = None
    if write:
        from fmtl_edge.report import link_latest, new_run_dir, write_outputs

        out = Path(cfg.out) if cfg.out else new_run_dir()
        write_outputs(out, results, models, tasks, spec, overwrite=bool(app["overwrite"]))
        if not cfg.out:
            link_latest(out)
        log.info("results in %s", out)
    return results, models, out


def _ranges(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return str(ids[:10]) + ("..." if len(ids) > 10 else "")


def make_server_app(run_config: Mapping[str, Any] | None = None, sink: dict | None = None,
                    write: bool = True) -> ServerApp:
    """A ServerApp whose ``main`` runs :func:`serve` over its grid.

    Args:
        run_config: keys laid over ``context.run_config`` (for ``flwr.simulation.run_simulation``,
            which gives the apps no run config); None: the run config of ``flwr run``.
        sink: when given, ``sink["results"]``, ``sink["models"]`` and ``sink["out"]`` receive
            what :func:`serve` returns (the Python simulation API returns nothing).
        write: write ``results.json`` and the models into ``out`` (False: only ``sink``).
    """
    over = dict(run_config or {})
    sapp = ServerApp()

    @sapp.main()
    def main(grid: Grid, context: Context) -> None:
        """Run the methods of the run config over the grid's nodes; write the results."""
        _log_to_stderr()
        results, models, out = serve(grid, {**dict(context.run_config), **over}, write=write)
        if sink is not None:
            sink.update(results=results, models=models, out=out)

    return sapp


def _log_to_stderr() -> None:
    lg = logging.getLogger("fmtl_edge")
    lg.setLevel(logging.INFO)
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s fmtl-edge %(message)s", "%H:%M:%S"))
        lg.addHandler(h)


#: the ServerApp of ``flwr run`` (``fmtl_edge.flower.server_app:app``)
app = make_server_app()


__all__ = ["app", "make_server_app", "run_methods_on_pool", "serve"]
