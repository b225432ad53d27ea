"""``fmtl-edge bench-infer``: latency, throughput and energy per inference of an ONNX model.

For each execution provider asked for (default: every local provider onnxruntime has here, e.g.
``CPUExecutionProvider``; ``CUDAExecutionProvider``/``TensorrtExecutionProvider`` with
onnxruntime-gpu) and each batch size, :func:`bench_model` runs ``warmup`` untimed batches, then
``iters`` timed batches of seeded standard-normal float32 input ``(b, *input_shape)`` inside one
energy-meter window (:func:`fmtl_edge.runtime.make_meter`), and reports per batch size:

- ``ms_per_sample_p50``/``_p95``: percentiles over the timed batches of (batch latency ms) / b;
- ``batch_ms_p50``/``_p95``: batch latency in milliseconds;
- ``throughput_per_s``: samples per second over the timed loop (b · iters / loop seconds);
- ``energy_j_per_inference``: the window's joules / (b · iters), with ``energy_source``,
  ``energy_scope`` and ``energy_estimated`` (the CPU-time estimate where no hardware meter reads;
  ``null`` when the meter gives none). The window covers the whole process, not only onnxruntime.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fmtl_edge.deploy import require_onnx


_REMOTE_PROVIDERS = ("AzureExecutionProvider",)


def _input_shape(sess) -> tuple[str, list[int]]:
    inp = sess.get_inputs()[0]
    dims = list(inp.shape)[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"input {inp.name!r} has non-fixed dimensions {inp.shape} beyond the batch axis")
    return inp.name, dims


def bench_model(path: str | Path, batch_sizes: Sequence[int] = (1, 32), *, iters: int = 100, warmup: int = 10,
                providers: Sequence[str] | None = None, meter: str = "auto", threads: int = 0,
                seed: int = 0) -> dict[str, Any]:
    """Benchmark one ONNX model (see the module docstring for the numbers).

    Args:
        path: an ``.onnx`` file whose first input has a dynamic (or matching) batch axis, float32.
        batch_sizes: batch sizes to time. iters, warmup: timed and untimed batches per batch size.
        providers: execution providers (default: all available). meter: ``make_meter`` backend.
        threads: onnxruntime intra-op threads (0: its default).

    Returns:
        ``{"model", "file_bytes", "available_providers", "meter": {...}, "results": [{"provider",
        "batch", "iters", "ms_per_sample_p50", "ms_per_sample_p95", "batch_ms_p50", "batch_ms_p95",
        "throughput_per_s", "energy_j_per_inference", "energy_source", "energy_scope",
        "energy_estimated"}]}``.

    Raises:
        FileNotFoundError: no such file. ValueError: an unavailable provider, bad sizes, or an input
        without a fixed shape. ImportError: the onnx extra is missing. MeterUnavailable: ``meter``.
    """
    require_onnx()
    import onnxruntime as ort

    from fmtl_edge.runtime import make_meter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    if iters < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("iters must be >= 1, warmup >= 0 and batch sizes >= 1")
    available = list(ort.get_available_providers())
    # AzureExecutionProvider calls a remote endpoint (it runs nothing on this device): never by default
    chosen = list(providers) if providers else [p for p in available if p not in _REMOTE_PROVIDERS]
    bad = [p for p in chosen if p not in available]
    if bad:
        raise ValueError(f"execution provider(s) {', '.join(bad)} not available here (have: {', '.join(available)})")
    m = make_meter(meter)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    try:
        for provider in chosen:
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
            name, dims = _input_shape(sess)
            for b in batch_sizes:
                x = rng.standard_normal((b, *dims)).astype(np.float32)
                feed = {name: x}
                for _ in range(warmup):
                    sess.run(None, feed)
                lat = np.empty(iters)
                with m.window(f"{provider}/b{b}") as win:
                    t_loop = time.perf_counter()
                    for i in range(iters):
                        t0 = time.perf_counter()
                        sess.run(None, feed)
                        lat[i] = time.perf_counter() - t0
                    loop_s = time.perf_counter() - t_loop
                meas = win.measurement
                n = b * iters
                rows.append({
                    "provider": provider, "batch": b, "iters": iters,
                    "ms_per_sample_p50": float(np.percentile(lat, 50) * 1e3 / b),
                    "ms_per_sample_p95": float(np.percentile(lat, 95) * 1e3 / b),
                    "batch_ms_p50": float(np.percentile(lat, 50) * 1e3),
                    "batch_ms_p95": float(np.percentile(lat, 95) * 1e3),
                    "throughput_per_s": float(n / loop_s) if loop_s > 0 else None,
                    "energy_j_per_inference": None if meas.total_j is None else float(meas.total_j / n),
                    "energy_source": meas.source, "energy_scope": meas.total_scope,
                    "energy_estimated": bool(meas.estimated),
                })
        info = m.describe()
    finally:
        m.close()
    return {"model": str(path), "file_bytes": path.stat().st_size, "available_providers": available,
            "meter": {"backend": info.get("backend"), "source": info.get("source"),
                      "estimated": info.get("estimated")},
            "results": rows}


def format_bench(res: dict[str, Any]) -> str:
    """The human-readable table of :func:`bench_model`'s result (fits 80 columns)."""
    lines = [f"{res['model']} ({res['file_bytes'] / 1024:.1f} KiB); providers here: "
             f"{', '.join(res['available_providers'])}",
             f"{'provider':<10} {'batch':>5} {'ms/sample p50':>13} {'p95':>8} {'samples/s':>10} {'J/inference':>12}"]
    for r in res["results"]:
        e = r["energy_j_per_inference"]
        energy = "unknown" if e is None else f"{e:.3g}" + (" est." if r["energy_estimated"] else "")
        prov = r["provider"].replace("ExecutionProvider", "")
        lines.append(f"{prov:<10} {r['batch']:>5} {r['ms_per_sample_p50']:>13.4f} {r['ms_per_sample_p95']:>8.4f} "
                     f"{r['throughput_per_s']:>10.0f} {energy:>12}")
    meter = res["meter"]
    lines.append(f"energy: {meter['backend']} meter ({meter['source']})"
                 + (", estimated from CPU time" if meter.get("estimated") else ""))
    return "\n".join(lines)
