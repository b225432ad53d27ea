"""``fmtl-edge export`` and ``fmtl-edge bench-infer`` (registered into the main CLI by :func:`register`).

Both import onnx/onnxruntime only when run, so the commands are listed (and say which extra to
install) even where the ``onnx`` extra is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

EXPORT_HELP = """\
Export a finished run's models to ONNX: one file per task model (backbone + head) under
RUN_DIR/onnx/<method>/<task>.onnx, and one shared-backbone model per group of tasks trained together
(MAS splits, all-in-one) with one output per task, RUN_DIR/onnx/<method>/group-<g>.onnx. The batch axis
is dynamic; input/output names, shapes and units are in each file's metadata. Every file is checked
against the PyTorch model with onnxruntime on fixed inputs: a max abs difference above --tolerance
(1e-4) removes it and fails the export (exit 1). Without --onnx, lists the run's models.

Personalised methods (layered with personal layers, ditto, local) keep one model per client,
models/<method>/clients/<id>.safetensors: --clients all (or --clients 0,3,7) exports those instead,
RUN_DIR/onnx/<method>/clients/<id>.onnx, one output per task the client holds. A single client model
file (what `fmtl-edge join --save-model DIR` writes on a device) is exported by naming the file.

examples:
  fmtl-edge export runs/latest --onnx
  fmtl-edge export runs/utk --method mas-2 --onnx --opset 18
  fmtl-edge export runs/har-pfl --method layered --onnx --clients all
  fmtl-edge export models/layered/clients/3.safetensors --onnx --out onnx/
"""

BENCH_HELP = """\
Time an ONNX model with onnxruntime: ms per sample (p50/p95) at each batch size, throughput and energy
per inference (from the device's meter: `fmtl-edge info`), for each execution provider present
(CPU here; CUDA/TensorRT with onnxruntime-gpu).

examples:
  fmtl-edge bench-infer runs/latest/onnx/mas-2/digit.onnx
  fmtl-edge bench-infer model.onnx --batch-sizes 1,8,32 --iters 200 --json
"""


def register(subparsers) -> None:
    """Add ``export`` and ``bench-infer`` to an argparse subparsers object."""
    p = subparsers.add_parser("export", help="export a run's task models to ONNX (checked with onnxruntime)",
                              description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a simulate --out folder (e.g. runs/latest), or one client "
                   "model file (.safetensors)")
    p.add_argument("--method", action="append", help="only this method (repeatable; default: all)")
    p.add_argument("--clients", metavar="all|ID,...", help="export the personalised methods' client models "
                   "(each client's own model) of these clients instead of the global task models")
    p.add_argument("--onnx", action="store_true", help="write ONNX files (without it: list the models)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18, the lowest supported)")
    p.add_argument("--tolerance", type=float, default=None, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--out", help="output folder (default RUN_DIR/onnx)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=cmd_export)

    b = subparsers.add_parser("bench-infer", help="latency, throughput and energy per inference of an ONNX model",
                              description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", metavar="MODEL.onnx")
    b.add_argument("--batch-sizes", default="1,32", help="comma list (default 1,32)")
    b.add_argument("--iters", type=int, default=100, help="timed batches per batch size (default 100)")
    b.add_argument("--warmup", type=int, default=10, help="untimed batches first (default 10)")
    b.add_argument("--providers", help="comma list of execution providers (default: all present)")
    b.add_argument("--meter", default="auto", help="energy meter backend (default auto)")
    b.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: its own)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)


def _err(prog: str, msg: str, rc: int = 2) -> int:
    print(f"fmtl-edge {prog}: error: {msg}", file=sys.stderr)
    return rc


def _list_models(run_dir: str) -> int:
    from pathlib import Path

    models = Path(run_dir) / "models"
    files = sorted(models.glob("*/*.safetensors"))
    clients = sorted({f.parent.parent.name: f for f in models.glob("*/clients/*.safetensors")}.items())
    if not files and not clients:
        return _err("export", f"no models under {models}; pass the --out folder of a finished simulate run")
    for f in files:
        print(f"{f.parent.name:<14} {f.stem:<16} {f.stat().st_size / 1024:8.1f} KiB  {f}")
    for method, f in clients:
        n = len(list(f.parent.glob("*.safetensors")))
        print(f"{method:<14} {'clients':<16} {n:>4} client models  {f.parent}")
    print("pass --onnx to write ONNX files" + (" (--clients all|ID,... for the client models)" if clients else ""),
          file=sys.stderr)
    return 0


def _export_one_file(args) -> int:
    """``fmtl-edge export FILE.safetensors --onnx``: one client model file (e.g. a device's own)."""
    from pathlib import Path

    from fmtl_edge.deploy import onnx_export as ox

    src = Path(args.run_dir)
    out = Path(args.out) if args.out else src.parent
    try:
        m = ox.export_client_model(src, out / f"{src.stem}.onnx", opset=args.opset or ox.DEFAULT_OPSET,
                                   tolerance=args.tolerance if args.tolerance is not None else ox.TOLERANCE)
    except ox.ParityError as e:
        return _err("export", str(e), 1)
    except (ImportError, FileNotFoundError, ValueError, OSError) as e:
        return _err("export", f"{src}: {e}")
    print(f"{m.path}: client {m.client} of {m.method}, outputs {', '.join(m.tasks)}, "
          f"{m.weight_bytes / 1024:.1f} KiB of weights, parity max abs diff {m.max_abs_diff:.2e}")
    return 0


def cmd_export(args) -> int:
    if args.run_dir.endswith(".safetensors"):
        if not args.onnx:
            return _err("export", f"{args.run_dir}: pass --onnx to export this model file")
        return _export_one_file(args)
    if not args.onnx:
        return _list_models(args.run_dir)
    from fmtl_edge.deploy import onnx_export as ox

    try:
        rep = ox.export_run(args.run_dir, args.method, opset=args.opset or ox.DEFAULT_OPSET,
                            tolerance=args.tolerance if args.tolerance is not None else ox.TOLERANCE,
                            out_dir=args.out, clients=ox.parse_clients(args.clients))
    except ox.ParityError as e:
        return _err("export", str(e), 1)
    except (ImportError, FileNotFoundError, ValueError) as e:
        return _err("export", str(e))
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0
    print(f"{'method':<12} {'model':<16} {'outputs':>7} {'weights KiB':>11} {'file KiB':>9} {'max |diff|':>10}")
    for m in rep.models:
        name = m.path.stem if m.client is None else f"client {m.client}"
        print(f"{m.method:<12} {name:<16} {len(m.tasks):>7} {m.weight_bytes / 1024:>11.1f} "
              f"{m.file_bytes / 1024:>9.1f} {m.max_abs_diff:>10.2e}")
    for g in rep.groups:
        print(f"{g.method} group {g.group} ({'+'.join(g.tasks)}): one model holds {g.group_weight_bytes / 1024:.1f} KiB "
              f"of weights instead of {g.per_task_weight_bytes / 1024:.1f} KiB as {len(g.tasks)} models "
              f"(saves {g.saved_bytes / 1024:.1f} KiB)")
    for n in rep.notes:
        print(f"note: {n}", file=sys.stderr)
    from pathlib import Path

    out = Path(args.out) if args.out else Path(args.run_dir) / "onnx"
    print(f"{len(rep.models)} ONNX files, parity max abs diff {rep.max_abs_diff:.2e} (tolerance {rep.tolerance:g}), "
          f"opset {rep.opset}: {out}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from fmtl_edge.deploy.bench_infer import bench_model, format_bench
    from fmtl_edge.runtime import MeterUnavailable

    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        return _err("bench-infer", f"--batch-sizes {args.batch_sizes!r}: expected a comma list of whole numbers")
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    try:
        res = bench_model(args.model, sizes, iters=args.iters, warmup=args.warmup, providers=providers,
                          meter=args.meter, threads=args.threads)
    except MeterUnavailable as e:
        return _err("bench-infer", f"--meter: {e}")
    except (ImportError, FileNotFoundError, ValueError) as e:
        return _err("bench-infer", str(e))
    except Exception as e:  # onnxruntime refuses the file (not ONNX, bad graph)
        if type(e).__module__.startswith("onnxruntime"):
            return _err("bench-infer", f"{args.model}: onnxruntime cannot load it: {e}")
        raise
    print(json.dumps(res, indent=2) if args.json else format_bench(res))
    return 0
