"""The Flower ServerApp: every fmtl-edge method of the run config over Flower nodes (``app``).

``[tool.flwr.app.components] serverapp = "fmtl_edge.flower.server_app:app"``. Its ``main(grid,
context)``:

1. builds the :class:`~fmtl_edge.config.SimulationConfig` from the run config
   (:func:`fmtl_edge.flower.data.simulation_config`: the keys of ``simulate``'s TOML file);
2. waits for the nodes (``nodes`` of them, else ``clients``; with neither set, until their count
   settles) and takes those connected then, asks each for its ``partition-id``, chooses which serve the run's ``clients``
   (:func:`~fmtl_edge.flower.pool.choose_nodes`: all, or a sample seeded by the run seed) and asks
   those for their client's description (a ``query`` message): the ServerApp learns the tasks,
   input shape and which tasks each client holds labels for — it never loads client data;
3. runs the methods with fmtl-edge's method runner (:func:`fmtl_edge.runner.run_methods`, the
   code ``simulate`` and ``fmtl-server`` run: strategies, streaming aggregation kernels, MAS
   affinity averaging and exact split search, evaluation) over
   :class:`~fmtl_edge.flower.pool.FlowerGridPool`, committing every round to the resume state
   beside ``out`` (:class:`fmtl_edge.run_state.RunState`; app key ``resume = true`` continues an
   interrupted run with the same settings);
4. writes ``results.json`` and ``models/<method>/<task>.safetensors`` into ``out`` with
   :func:`fmtl_edge.report.write_outputs`: the layout of ``fmtl-edge simulate``, with Flower's
   details under ``engine`` (Flower version, nodes, messages, the driver's peak RSS).

Centralized references (pooled data) cannot run on Flower: the ServerApp refuses them.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from fmtl_edge.flower import require_flwr
from fmtl_edge.plan import RoundRecord
from fmtl_edge.results import results_document
from fmtl_edge.runner import RunHooks, RunSettings, prepare_methods, run_methods
from fmtl_edge.tasks import TaskSet
from fmtl_edge.transport.validation import Limits

from .data import split_run_config, simulation_config, task_from_dict
from .pool import FlowerGridPool, choose_nodes, identify_nodes, query_nodes, wait_for_nodes

require_flwr()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

log = logging.getLogger("fmtl_edge.flower")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``; Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


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
    timeout = float(app["round-timeout-s"])
    wait_n = int(app["nodes"]) or cfg.clients
    nodes = wait_for_nodes(grid, wait_n, float(app["nodes-wait-s"]))
    partitions = identify_nodes(grid, nodes, timeout)
    chosen = choose_nodes(partitions, cfg.clients, cfg.seed)
    infos = query_nodes(grid, chosen, timeout)
    first = next(i for i in infos.values() if "dataset" in i)
    tasks = TaskSet([task_from_dict(t) for t in first["task_specs"]])
    for node, info in infos.items():
        if [t["name"] for t in info["task_specs"]] != list(tasks.names) or info["input_shape"] != first["input_shape"]:
            raise RuntimeError(f"Flower node {node} holds a different data set (tasks {[t['name'] for t in info['task_specs']]}, "
                               f"input {info['input_shape']}) than node {chosen[0]}")
    ids = sorted(int(i["client_id"]) for i in infos.values())
    log.info("%d of %d Flower nodes serve clients %s of %s (%d clients; partition-ids %s)", len(chosen), len(nodes),
             _ranges(ids), first["dataset"], first["n_clients"], _ranges(sorted(partitions[n] for n in chosen.values())))
    spec = cfg.model_spec(first["input_shape"])
    limits = Limits(max_update_norm_ratio=float(app["max-update-norm-ratio"]),
                    max_client_samples=int(app["max-client-samples"]) or None,
                    task_kinds={t.name: t.kind for t in tasks})
    pool = FlowerGridPool(grid, infos, spec, timeout_s=timeout, limits=limits,
                          identify_timeout_s=min(timeout, float(app["nodes-wait-s"])))
    cfg.validate_against(len(tasks), len(pool.client_ids))
    methods = prepare_methods(cfg, tasks, spec, pool.eligible, pooled=False)
    results = results_document(dataset=first["dataset"], dataset_info=first.get("dataset_info", {}), tasks=tasks,
                               clients=int(first["n_clients"]), config=cfg.to_dict(), device=first.get("device", {}),
                               engine={"name": "flower"}, dropout=cfg.dropout)

    def on_round(method, rec: RoundRecord) -> None:
        loss = sum(rec.train_loss.values())
        log.info("%s %s r%d: %d clients, train loss %.4f, %.2f s", method.name, rec.job, rec.round + 1,
                 len(rec.executed), loss, rec.wall_s)

    out, store = None, None
    if write:
        from fmtl_edge.report import check_out_dir, new_run_dir
        from fmtl_edge.run_state import RunState, has_state

        out = Path(cfg.out) if cfg.out else new_run_dir()
        if bool(app["resume"]) and has_state(out):
            store = RunState.open(out, cfg)  # the same settings, or ConfigError
            log.info("resuming %s: %s", out, store.summary())
        else:
            check_out_dir(out, overwrite=bool(app["overwrite"]))
            store = RunState.create(out, cfg, overwrite=bool(app["overwrite"]))
    results, models = run_methods(cfg, methods, pool, spec, results, store=store, hooks=RunHooks(on_round=on_round),
                                  settings=RunSettings(time_budget_s=cfg.time_budget_s, energy_budget_j=cfg.energy_budget_j))
    results["engine"].update({"flwr": flwr.__version__, "nodes": len(nodes),
                              "client_partition_ids": {str(c): partitions[n] for c, n in sorted(chosen.items())},
                              "clients_remapped": [list(r) for r in pool.remapped],
                              "messages": pool.messages_sent, "array_bytes_sent": pool.bytes_sent,
                              "wall_s": time.perf_counter() - t0, "driver_peak_rss_bytes": peak_rss_bytes()})
    if write:
        from fmtl_edge.report import link_latest, write_outputs

        write_outputs(out, results, models, tasks, spec, overwrite=True)
        store.remove()
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
        """Run the methods of the run config over the grid's nodes; write the results. Any
        failure is logged and raised again: Flower then marks the run ``finished:failed``
        (``flwr ls``), since ``flwr run`` itself exits 0 whatever the ServerApp did."""
        _log_to_stderr()
        try:
            results, models, out = serve(grid, {**dict(context.run_config), **over}, write=write)
        except BaseException as e:
            log.error("the fmtl-edge ServerApp failed: %s: %s (the run is finished:failed, see flwr ls)",
                      type(e).__name__, e)
            raise
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


__all__ = ["app", "make_server_app", "serve"]
