"""Benchmarks of the native kernels, measured side by side in one run (not timed tests).

    python -m bench.kernels            # full run (P up to 64M; about 10 minutes on 2 cores, needs ~12 GB)
    python -m bench.kernels --quick    # P up to 16M, n up to 16 (about a minute)

Prints, for slice aggregation of K ∈ {4, 32} clients × P ∈ {1M, 64M} parameters (fp32 and fp16 inputs):
the achieved GB/s of ``fmtl_edge.aggregation.weighted_average_slices`` (counting (K·b + 4)·P bytes,
b = input bytes per element: (K+1)·P·4 for fp32; default atomic call, and with ``rollback=False``) next to the memory-copy bandwidth measured in the same
run (the faster of ``np.copyto`` and ``torch.Tensor.copy_``, counting 2·P·4 bytes), and the speed-up
over the plain NumPy way (``np.average(xs, axis=0, weights=w)``) and the PyTorch way
(``torch.stack(xs).mul(w[:, None]).sum(0) / w.sum()``).  Then the streaming Accumulator's peak memory
for K = 32 against the batch form's, and the partition search (exact DP) for n ∈ {9, 12, 16, 20},
x ∈ {2, 3, 4, 5} next to the Python exhaustive enumeration where that is estimated to finish
within a minute.

Memory: client vectors are windows into one shared pool, ``x_k = pool[k·δ : k·δ + P]`` with δ = 8M
elements, so K = 32 clients of P = 64M take 1.3 GB instead of 8 GB while every read still comes from
DRAM (a window is re-read only after K·δ·4 bytes ≫ the last-level cache have streamed past).  The
NumPy/PyTorch baselines stack their inputs; where that would exceed 1.5 GB they run over column
chunks of 4M elements (marked "chunked"), which does not slow them down.  The batch form's peak
memory is measured with K materialised vectors in a subprocess (skipped, with the formula printed,
when less memory is available).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable

import numpy as np

# Side-by-side timings on few cores: keep torch's OpenMP workers from spin-waiting after their
# parallel regions, which would steal the cores from the next measurement.  Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

M = 1 << 20


def _best(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Interleaved best-of-`repeats` wall time of each callable (same conditions for all)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    info["numpy"] = np.__version__
    from fmtl_edge import _kernels

    info["kernel_threads"] = _kernels.default_threads()
    info["cuda_compiled"] = bool(_kernels.cuda_compiled)
    return info


# ------------------------------------------------------------------------------ aggregation ----

def bench_aggregation(Ks, Ps, dtypes, repeats: int, threads: int) -> list[dict[str, Any]]:
    import torch

    from fmtl_edge.aggregation import weighted_average_slices

    torch.set_num_threads(threads)
    rows = []
    for dt_name in dtypes:
        dt = np.dtype(dt_name)
        b = dt.itemsize
        for P in Ps:
            for K in Ks:
                delta = 8 * M if P > 8 * M else 0
                if delta:
                    pool = np.empty(P + K * delta, dtype=dt)
                    _fill(pool)
                    xs = [pool[k * delta:k * delta + P] for k in range(K)]
                else:
                    xs = [np.empty(P, dtype=dt) for _ in range(K)]
                    for x in xs:
                        _fill(x)
                w = np.linspace(1.0, 3.0, K)
                slices = np.array([[0, P]], dtype=np.int64)
                contrib = np.ones((1, K), dtype=bool)
                out = np.zeros(P, np.float32)
                src = np.ones(P, np.float32)
                t_out, t_src = torch.from_numpy(out), torch.from_numpy(src)
                txs = [torch.from_numpy(x) for x in xs]
                tw = torch.tensor(w, dtype=torch.float32)
                chunk = P if K * P * 4 <= 1.5 * 2**30 else 4 * M

                def np_way():
                    for c0 in range(0, P, chunk):
                        out[c0:c0 + chunk] = np.average([x[c0:c0 + chunk] for x in xs], axis=0, weights=w)

                def torch_way():
                    for c0 in range(0, P, chunk):
                        s = torch.stack([t[c0:c0 + chunk] for t in txs]).float()
                        t_out[c0:c0 + chunk] = s.mul(tw[:, None]).sum(0) / tw.sum()

                def ours():
                    weighted_average_slices(out, xs, w, slices, contrib, n_threads=threads)

                def ours_nr():
                    weighted_average_slices(out, xs, w, slices, contrib, n_threads=threads, rollback=False)

                ours()  # warm-up: grows the rollback scratch once
                t = _best({"copy_torch": lambda: t_out.copy_(t_src), "copy_np": lambda: np.copyto(out, src),
                           "ours": ours, "ours_norollback": ours_nr}, repeats)
                tb = _best({"numpy": np_way, "torch": torch_way}, max(1, repeats // 2))
                moved = (K * b + 4) * P
                copy_gbs = 2 * P * 4 / min(t["copy_np"], t["copy_torch"]) / 1e9
                gbs = moved / t["ours"] / 1e9
                rows.append({
                    "dtype": dt_name, "K": K, "P": P, "ours_s": t["ours"], "ours_gbs": gbs, "copy_gbs": copy_gbs,
                    "copy_np_gbs": 2 * P * 4 / t["copy_np"] / 1e9, "copy_torch_gbs": 2 * P * 4 / t["copy_torch"] / 1e9,
                    "ratio_copy": gbs / copy_gbs, "numpy_s": tb["numpy"], "torch_s": tb["torch"],
                    "norollback_s": t["ours_norollback"], "norollback_gbs": moved / t["ours_norollback"] / 1e9,
                    "vs_numpy": tb["numpy"] / t["ours"], "vs_torch": tb["torch"] / t["ours"],
                    "baseline_chunked": chunk != P,
                })
                r = rows[-1]
                print(f"  {dt_name:8s} K={K:3d} P={P // M:3d}M  ours {r['ours_s'] * 1e3:8.1f} ms {gbs:6.1f} GB/s"
                      f" | copy {copy_gbs:5.1f} GB/s -> {100 * r['ratio_copy']:5.1f} %"
                      f" | no-rollback {r['norollback_gbs']:5.1f} GB/s ({100 * r['norollback_gbs'] / copy_gbs:3.0f} %)"
                      f" | np.average {r['vs_numpy']:6.1f}x  torch {r['vs_torch']:5.1f}x"
                      f"{'  (baselines chunked)' if r['baseline_chunked'] else ''}", flush=True)
                del xs, txs, out, src, t_out, t_src
                if delta:
                    del pool
    return rows


def _fill(a: np.ndarray) -> None:
    """Cheap deterministic non-constant fill (random generation of GBs would dominate the run)."""
    n = a.size
    step = 1 << 20
    base = (np.arange(min(step, n), dtype=np.float32) % 97 - 48) / 16
    for i in range(0, n, step):
        m = min(step, n - i)
        a[i:i + m] = base[:m] + np.float32((i // step) % 5)


# ----------------------------------------------------------------------------------- memory ----

_MEM_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from fmtl_edge.aggregation import Accumulator, weighted_average_slices
    def rss(key):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    mode, K, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    slices = np.array([[0, P]], dtype=np.int64)
    w = np.linspace(1.0, 3.0, K)
    base = rss('VmRSS:')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak-RSS counter (VmHWM)
    out = np.zeros(P, np.float32)
    if mode == 'stream':
        acc = Accumulator(P, slices)
        buf = np.empty(P, np.float32)  # one client vector at a time (as received from the network)
        for k in range(K):
            buf.fill(np.float32(k % 7))
            acc.add(buf, w[k], [True])
        acc.result(out)
    else:
        xs = [np.full(P, np.float32(k % 7)) for k in range(K)]
        weighted_average_slices(out, xs, w, slices, np.ones((1, K), bool))
    print(rss('VmHWM:') - base)
""")


def bench_memory(K: int, P: int, batch: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"K": K, "P": P, "limit_bytes": 3 * P * 4}
    modes = ["stream"] + (["batch"] if batch else [])
    for mode in modes:
        r = subprocess.run([sys.executable, "-c", _MEM_CHILD, mode, str(K), str(P)], capture_output=True, text=True)
        if r.returncode != 0:
            res[f"{mode}_error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc={r.returncode}"
            continue
        res[f"{mode}_peak_bytes"] = int(r.stdout.strip().splitlines()[-1])
    res["batch_formula_bytes"] = (K + 2) * P * 4  # inputs + out + rollback scratch
    return res


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -------------------------------------------------------------------------------- partition ----

def _stirling2(n: int, k: int) -> int:
    return sum((-1) ** j * math.comb(k, j) * (k - j) ** n for j in range(k + 1)) // math.factorial(k)


def bench_partition(ns, xs, budget_s: float = 60.0) -> list[dict[str, Any]]:
    from fmtl_edge.affinity.search import best_partition, best_partition_reference

    rng = np.random.default_rng(0)
    # calibrate the reference's cost per enumerated partition
    S9 = rng.normal(size=(9, 9))
    t = time.perf_counter()
    best_partition_reference(S9, 3)
    per_part = (time.perf_counter() - t) / _stirling2(9, 3)
    rows = []
    for n in ns:
        S = rng.normal(size=(n, n))
        for x in xs:
            reps = 3 if n <= 16 else 1
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                p = best_partition(S, x)
                ts.append(time.perf_counter() - t)
            row: dict[str, Any] = {"n": n, "x": x, "dp_s": min(ts), "score": p.score}
            est = _stirling2(n, x) * per_part
            row["ref_estimate_s"] = est
            if est <= budget_s:
                t = time.perf_counter()
                ref = best_partition_reference(S, x)
                row["ref_s"] = time.perf_counter() - t
                row["agree"] = math.isclose(ref.score, p.score, rel_tol=1e-9, abs_tol=1e-9)
            rows.append(row)
            ref_txt = (f"python {row['ref_s']:9.3f} s ({row['ref_s'] / row['dp_s']:9.0f}x, agree={row['agree']})"
                       if "ref_s" in row else f"python skipped (estimated {est:,.0f} s)")
            print(f"  n={n:2d} x={x}  DP {row['dp_s']:9.4f} s | {ref_txt}", flush=True)
    return rows


# ------------------------------------------------------------------------------------- main ----

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: P up to 16M, n up to 16")
    ap.add_argument("--threads", type=int, default=None, help="kernel and torch threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (best of)")
    ap.add_argument("--skip", action="append", default=[], choices=["aggregation", "memory", "partition"])
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args(argv)

    from fmtl_edge import _kernels

    threads = a.threads or _kernels.default_threads()
    Ps = [1 * M, 16 * M] if a.quick else [1 * M, 64 * M]
    repeats = a.repeats or (3 if a.quick else 5)
    results: dict[str, Any] = {"machine": machine(), "threads": threads, "quick": a.quick}
    print("machine:", json.dumps(results["machine"]))

    if "aggregation" not in a.skip:
        print(f"\n== slice aggregation ({threads} threads; GB/s counts (K*b+4)*P bytes; copy counts 2*P*4) ==")
        results["aggregation"] = bench_aggregation([4, 32], Ps, ["float32", "float16"], repeats, threads)

    if "memory" not in a.skip:
        K, P = 32, Ps[-1]
        need = (K + 3) * P * 4
        batch = _available_bytes() > need + 2 * 2**30
        print(f"\n== peak memory, K={K}, P={P // M}M (limit for streaming: 3*P*4 = {3 * P * 4 / 2**20:.0f} MiB) ==")
        mem = bench_memory(K, P, batch)
        results["memory"] = mem
        s = mem.get("stream_peak_bytes")
        print(f"  streaming Accumulator: {s / 2**20:8.0f} MiB = {s / (P * 4):.2f} x P*4" if s else f"  streaming: {mem}")
        if "batch_peak_bytes" in mem:
            bp = mem["batch_peak_bytes"]
            print(f"  batch call:            {bp / 2**20:8.0f} MiB = {bp / (P * 4):.2f} x P*4")
        else:
            print(f"  batch call: not measured (needs ~{need / 2**30:.1f} GiB free); "
                  f"(K+2)*P*4 = {mem['batch_formula_bytes'] / 2**20:.0f} MiB")

    if "partition" not in a.skip:
        ns = [9, 12, 16] if a.quick else [9, 12, 16, 20]
        print("\n== partition search: exact DP (C++) vs Python exhaustive enumeration ==")
        results["partition"] = bench_partition(ns, [2, 3, 4, 5])

    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
