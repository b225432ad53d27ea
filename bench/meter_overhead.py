"""The energy meter's own overhead: CPU of the sampler thread, cost of a window's edges.

    python bench/meter_overhead.py                # fake Nano (JP4 iio) and AGX Orin (JP6 hwmon) trees
    python bench/meter_overhead.py --seconds 10 --hz 50 100
    python bench/meter_overhead.py --real         # also this machine's own meter (auto), if any

For each configuration it opens one window, lets the main thread sleep, and reports the sampler
thread's CPU time (``time.thread_time`` inside the thread) as a percentage of one core, the achieved
sampling rate, and the CPU cost per sample. Target: < 1 % of one core at 50 Hz. The same run also
times a naive sampler (open/read/close every file on every sample) for comparison with the meter's
``pread`` on descriptors kept open.

Fake trees live on a regular file system: a real INA3221 read goes through I²C in the kernel, which
costs more *wall* time per read but mostly not more CPU in this process; run with ``--real`` on a
Jetson for the figure that counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import bench  # noqa: E402,F401  (the installed package, not the checkout)

sys.path.insert(0, str(HERE.parent / "tests"))

from fmtl_edge.runtime import make_meter  # noqa: E402
from fmtl_edge.runtime.jetson import JetsonMeter  # noqa: E402
from fmtl_edge.runtime.meter import Sampler  # noqa: E402


def _sampler_run(meter, seconds: float) -> dict:
    s = meter.sampler
    ticks0, cpu0 = s.ticks, s.cpu_s
    p0 = time.process_time()
    t0 = time.monotonic()
    with meter.window("bench") as win:
        time.sleep(seconds)
    wall = time.monotonic() - t0
    proc = time.process_time() - p0
    ticks = s.ticks - ticks0
    cpu = s.cpu_s - cpu0
    return {
        "wall_s": wall,
        "ticks": ticks,
        "hz": ticks / wall,
        "sampler_cpu_pct": 100.0 * cpu / wall,
        "process_cpu_pct": 100.0 * proc / wall,
        "us_per_sample": 1e6 * cpu / max(1, ticks),
        "energy_j": win.measurement.total_j,
    }


def _naive_run(meter: JetsonMeter, hz: float, seconds: float) -> dict:
    files = [str(meter.sysfs.path(f)) for r in meter.rails for f in r.files]

    def read_all():
        for f in files:
            with open(f) as fh:
                fh.read()

    s = Sampler(read_all, hz)
    s.start()
    t0 = time.monotonic()
    time.sleep(seconds)
    s.stop()
    wall = time.monotonic() - t0
    return {"hz": s.ticks / wall, "sampler_cpu_pct": 100.0 * s.cpu_s / wall, "us_per_sample": 1e6 * s.cpu_s / max(1, s.ticks)}


def _median(rows: list[dict]) -> dict:
    """Per-key median over repeated runs (a shared machine makes single runs noisy)."""
    return {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0] if rows[0][k] is not None}


def _edge_cost(backend: str, n: int, **kw) -> float:
    m = make_meter(backend, **kw)
    t0 = time.perf_counter()
    for i in range(n):
        with m.window(f"w{i}"):
            pass
    dt = time.perf_counter() - t0
    m.close()
    return 1e6 * dt / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="window length per configuration (default 3)")
    ap.add_argument("--hz", type=float, nargs="+", default=[50.0], help="sampling rates (default 50)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is printed (default 3)")
    ap.add_argument("--real", action="store_true", help="also measure this machine's auto meter")
    args = ap.parse_args(argv)

    from runtime_fakes import build_jetson

    try:
        load = "load average %.2f" % os.getloadavg()[0]
    except OSError:
        load = "load unknown"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs ({load}), median of {args.repeat} x "
          f"{args.seconds:g} s per row; threads alive at start: {threading.active_count()}")
    print()
    print(f"{'configuration':<34} {'Hz':>6} {'got Hz':>7} {'sampler CPU':>12} {'µs/sample':>10} {'naive CPU':>10} {'naive µs':>9}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for board, label in (("nano", "fake Nano, JP4 iio (3 rails)"), ("agx-orin", "fake AGX Orin, hwmon (4 rails)")):
            root = Path(tmp) / board
            build_jetson(root, board)
            for hz in args.hz:
                m = JetsonMeter(sysfs_root=str(root), sample_hz=hz)
                runs = [(_sampler_run(m, args.seconds), _naive_run(m, hz, args.seconds)) for _ in range(args.repeat)]
                m.close()
                r = _median([a for a, _ in runs])
                n = _median([b for _, b in runs])
                if hz <= 50:
                    worst = max(worst, r["sampler_cpu_pct"])
                print(f"{label:<34} {hz:6g} {r['hz']:7.1f} {r['sampler_cpu_pct']:11.3f}% {r['us_per_sample']:10.1f} "
                      f"{n['sampler_cpu_pct']:9.3f}% {n['us_per_sample']:9.1f}")
        if args.real:
            m = make_meter("auto")
            if getattr(m, "sampler", None) is not None and m.sample_hz:
                r = _sampler_run(m, args.seconds)
                print(f"{'this machine: ' + m.backend:<34} {m.sample_hz:6g} {r['hz']:7.1f} {r['sampler_cpu_pct']:11.3f}% "
                      f"{r['us_per_sample']:10.1f} {'-':>10} {'-':>9}")
            else:
                print(f"this machine: {m.backend} has no sampler thread (counter/estimate)")
            m.close()
        print()
        print("window edge cost (begin + end of one empty window, includes one edge sample each):")
        root = Path(tmp) / "agx-orin"
        for backend, kw in (("null", {}), ("estimate", {}), ("jetson", {"sysfs_root": str(root)})):
            print(f"  {backend:<9} {_edge_cost(backend, 2000, **kw):8.1f} µs")
    print()
    verdict = "PASS" if worst < 1.0 else "FAIL"
    print(f"sampler CPU at <= 50 Hz, worst case: {worst:.3f} % of one core (target < 1 %): {verdict}")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
