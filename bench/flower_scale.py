"""Scale: many simulated clients on Flower's simulation engine vs fmtl-edge's in-process pool.

Both engines run the same fmtl-edge code (:func:`fmtl_edge.runner.run_methods`:
the coordinator, FedAvg strategy, streaming aggregation, evaluation) on the ``synthetic`` data set
(8x8 inputs, two tasks, ``--train``/``--test`` samples per client generated from (seed, client)):

- ``inprocess``: :class:`~fmtl_edge.simulated_pool.InProcessClientPool` over a
  :class:`~fmtl_edge.data.base.FederatedDataset` holding every client's data in the driver;
- ``flower``: :class:`~fmtl_edge.flower.pool.FlowerGridPool` inside a ServerApp run by
  ``flwr.simulation.run_simulation`` (Flower's Simulation Runtime with its Ray backend: the same
  engine ``flwr run`` starts on a local SuperLink); each ClientApp generates only its own client's
  data, in the Ray actor that runs it; the driver holds none.

Each engine runs in its own subprocess, so each driver's peak RSS (``getrusage``) is its own. No
lease and no meter on either side (``lease = "none"``, ``meter = "null"``): this measures the
engines, not the device. Both train with ``--cpus-per-client`` torch threads per client (Ray sets an
actor's threads to its CPUs; the in-process engine is set to the same). Printed per engine: per-round wall seconds (round 0 apart: it includes
Flower's actor start-up), the mean of the later rounds, and the driver's peak RSS.

Run:  ``python bench/flower_scale.py [--clients 1000] [-K 100] [--rounds 4] [--json out.json]``
Also: ``python bench/flower_scale.py compare RUN_A RUN_B``: the largest absolute difference of the
final model tensors (``models/<method>/<task>.safetensors``) and the total test losses of two
``results.json`` folders (e.g. ``flwr run`` vs ``fmtl-edge simulate``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import ROOT


def run_config(args) -> dict:
    return {"dataset": "synthetic", "methods": "all-in-one", "clients": args.clients,
            "clients-per-round": args.k, "rounds": args.rounds, "seed": 0, "width": args.width,
            "meter": "null", "lease": "none", "synthetic-train": args.train, "synthetic-test": args.test,
            "round-timeout-s": 1800.0, "nodes-wait-s": 600.0}


def one_engine(args) -> dict:
    """Run one engine in this process; returns its figures."""
    from fmtl_edge.flower.server_app import peak_rss_bytes

    rc = run_config(args)
    t0 = time.perf_counter()
    if args.engine == "inprocess":
        import torch

        from fmtl_edge.client import warm_up
        from fmtl_edge.flower.data import SYNTHETIC_SHAPE, SYNTHETIC_TASKS, simulation_config, synthetic_dataset
        from fmtl_edge.results import results_document
        from fmtl_edge.runner import prepare_methods, run_methods
        from fmtl_edge.simulated_pool import InProcessClientPool

        torch.set_num_threads(args.cpus_per_client)  # as Ray gives each ClientApp actor
        cfg = simulation_config(rc)
        ds = synthetic_dataset(cfg.seed, args.clients, args.train, args.test)
        warm_up()
        spec = cfg.model_spec(SYNTHETIC_SHAPE)
        from fmtl_edge.runtime.threads import ThreadPolicy

        pool = InProcessClientPool(ds, spec, threads=ThreadPolicy.parse(cfg.threads))  # as the ClientApp
        methods = prepare_methods(cfg, SYNTHETIC_TASKS, spec, pool.eligible, pooled=False)
        doc = results_document(dataset=ds.name, dataset_info=ds.info, tasks=SYNTHETIC_TASKS, clients=ds.n_clients,
                               config=cfg.to_dict(), device={}, engine={"name": "in-process"}, dropout=cfg.dropout)
        results, _ = run_methods(cfg, methods, pool, spec, doc)
    else:
        from flwr.simulation import run_simulation

        from fmtl_edge.flower.client_app import make_client_app

        sink: dict = {}
        run_simulation(_server(rc, sink), make_client_app(rc), num_supernodes=args.clients,
                       backend_config={"client_resources": {"num_cpus": args.cpus_per_client},
                                       "init_args": {"num_cpus": args.cpus}})
        if "results" not in sink:
            raise SystemExit("the Flower simulation ended without results (see its log above)")
        results = sink["results"]
    entry = results["methods"]["all-in-one"]
    rounds = [h["wall_s"] for h in entry["history"]]
    return {"engine": args.engine, "clients": args.clients, "k": args.k, "rounds": len(rounds),
            "round_s": rounds, "later_rounds_mean_s": sum(rounds[1:]) / max(len(rounds) - 1, 1),
            "total_s": time.perf_counter() - t0, "driver_peak_rss_bytes": peak_rss_bytes(),
            "total_test_loss": entry["total_test_loss"], "device_s": entry["device_s"],
            "executions": entry["client_executions"], "engine_info": results.get("engine")}


def _server(rc: dict, sink: dict):
    """The ServerApp, without writing a results folder (the bench keeps the figures only)."""
    from flwr.serverapp import ServerApp

    from fmtl_edge.flower.server_app import serve

    sapp = ServerApp()

    @sapp.main()
    def main(grid, context) -> None:
        results, models, _ = serve(grid, rc, write=False)
        sink.update(results=results)

    return sapp


def compare(a: str, b: str) -> dict:
    """Largest |Δ| of the final model tensors of two result folders, and their total test losses."""
    import numpy as np
    from safetensors.numpy import load_file

    out = {"max_abs_diff": 0.0, "tensors": 0, "methods": {}}
    ra = json.loads((Path(a) / "results.json").read_text())
    rb = json.loads((Path(b) / "results.json").read_text())
    for m in ra["methods"]:
        out["methods"][m] = {"total_test_loss": [ra["methods"][m]["total_test_loss"], rb["methods"][m]["total_test_loss"]]}
        for f in sorted((Path(a) / "models" / m).glob("*.safetensors")):
            ta, tb = load_file(str(f)), load_file(str(Path(b) / "models" / m / f.name))
            if set(ta) != set(tb):
                raise SystemExit(f"{f.name}: the two models have different tensors")
            for k in ta:
                d = float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)))) if ta[k].size else 0.0
                out["max_abs_diff"] = max(out["max_abs_diff"], d)
                out["tensors"] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("-K", dest="k", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--train", type=int, default=64, help="training samples per client")
    p.add_argument("--test", type=int, default=16, help="test samples per client")
    p.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    p.add_argument("--cpus-per-client", type=int, default=1, help="CPUs per ClientApp actor")
    p.add_argument("--engine", choices=("inprocess", "flower"), help="run one engine here (internal)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        print(json.dumps(compare(args.a, args.b), indent=2))
        return 0
    if args.engine:
        print("RESULT " + json.dumps(one_engine(args)), flush=True)
        return 0
    figures = []
    for engine in ("inprocess", "flower"):
        cmd = [sys.executable, __file__, "--engine", engine, "--clients", str(args.clients), "-K", str(args.k),
               "--rounds", str(args.rounds), "--width", str(args.width), "--train", str(args.train),
               "--test", str(args.test), "--cpus", str(args.cpus), "--cpus-per-client", str(args.cpus_per_client)]
        print(f"# {engine}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            return 1
        figures.append(json.loads(line[len("RESULT "):]))
    print(f"\n{args.clients} clients, K = {args.k}, {args.rounds} rounds of all-in-one, synthetic data "
          f"({args.train}+{args.test} samples per client), width {args.width}\n")
    print("| engine | round 0 s | later rounds s (mean) | per round s | driver peak RSS MiB | total test loss | total s |")
    print("|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['engine']} | {f['round_s'][0]:.2f} | {f['later_rounds_mean_s']:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in f['round_s'])} | {f['driver_peak_rss_bytes'] / 2**20:.0f} | "
              f"{f['total_test_loss']:.6f} | {f['total_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
