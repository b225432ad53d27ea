"""The thread policy of client executions, before and after, idle and beside busy processes.

    python -m bench.threads                 # digits all-in-one (4 rounds) + one UTKFace client execution
    python -m bench.threads --skip utkface  # where ../shared/data is absent
    python -m bench.threads --calibrate     # training-step time per thread count (the auto rule's basis)

Each workload runs as a whole ``fmtl-edge simulate`` command in a subprocess, in four cells measured
in one run: {before, after} × {idle, beside two busy processes}.

- before: what fmtl-edge did until issue 18: torch's default intra-op threads (every usable core)
  and OpenMP's default waiting (GNU OpenMP spins ``GOMP_SPINCOUNT`` = 300,000 times before it
  sleeps; setting it keeps fmtl-edge from choosing the passive policy);
- after: the defaults now: ``--threads auto`` and ``OMP_WAIT_POLICY=PASSIVE``.

The busy processes are plain Python loops (one per usable core), started before and killed after
the cell. Printed per cell: wall seconds of the command, device seconds and CPU seconds of the client
executions (``results.json``), and the ratios busy / idle of the device seconds (target: within 2×
after) and after / before idle (target: not slower). Machine load matters: the load average at the
start is printed; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT, pythonpath

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def shared_data() -> Path:
    env = os.environ.get("FMTL_EDGE_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def workloads(skip: set[str]) -> dict[str, list[str]]:
    out = {}
    if "digits" not in skip:
        out["digits all-in-one, 4 rounds"] = ["--dataset", "digits", "--methods", "all-in-one", "--rounds", "4"]
    utk = shared_data() / "utkface" / "images"
    if "utkface" not in skip:
        if utk.is_dir():
            out["UTKFace, one client execution"] = [
                "--dataset", "utkface", "--data-dir", str(utk), "--max-samples", "4000", "--methods", "all-in-one",
                "--rounds", "1", "--clients-per-round", "1"]
        else:
            print(f"UTKFace: {utk} is absent; skipped")
    return out


def run_cell(args: list[str], setting: str, busy: int, limit_s: float) -> dict:
    """One ``fmtl-edge simulate`` in a subprocess: ``(wall_s, device_s, cpu_s)``."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    extra = []
    if setting == "before":
        env["GOMP_SPINCOUNT"] = "300000"  # GNU OpenMP's default waiting; fmtl-edge then leaves it alone
        extra = ["--threads", str(cores)]
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY.format(limit=limit_s + 30)]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env["FMTL_EDGE_RUNTIME_DIR"] = str(Path(tmp) / "lease")
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "fmtl_edge.cli", "simulate", *args, *extra, "--meter", "estimate",
                                "--no-progress", "--log-level", "warning", "--out", str(Path(tmp) / "out")],
                               env=env, capture_output=True, text=True, timeout=limit_s)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(f"simulate failed ({p.returncode}): {p.stderr[-2000:]}")
            res = json.loads((Path(tmp) / "out" / "results.json").read_text())
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    m = next(iter(res["methods"].values()))
    return {"wall_s": wall, "device_s": m["device_s"], "cpu_s": m.get("cpu_s"),
            "threads": res["device"].get("threads", {}).get("intra_op", "torch default"),
            "test_loss": m["total_test_loss"]}


def calibrate(repeats: int = 5) -> None:
    """Seconds per training step at 1..cores intra-op threads for the built-in presets' models:
    the measurement behind :data:`fmtl_edge.runtime.threads.FLOPS_PER_THREAD`."""
    import torch

    from fmtl_edge.flops import training_flops_per_sample
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.tasks import Task, TaskSet

    cores = len(os.sched_getaffinity(0))
    cls = lambda n, k: Task(n, "classification", k)  # noqa: E731
    cases = {
        "digits (1x8x8, 5 tasks, B=32)": (ModelSpec((1, 8, 8)), TaskSet([cls("digit", 10), Task("parity", "binary"),
                                          Task("ge5", "binary"), Task("reconstruct", "dense", 1),
                                          Task("edges", "dense", 1)]), 32),
        "HAR (265, 1 task, B=32)": (ModelSpec((265,)), TaskSet([cls("activity", 6)]), 32),
        "UTKFace (3x64x64, 7 tasks, B=64)": (ModelSpec((3, 64, 64)), TaskSet(
            [Task("age", "regression"), cls("age_group", 5), Task("gender", "binary"), cls("race", 5),
             Task("autoencode", "dense", 3), Task("edges", "dense", 1), Task("keypoints", "dense", 1)]), 64),
    }
    print(f"{'model':<34} {'MFLOP/batch':>11} " + " ".join(f"{f'{n} thr ms':>9}" for n in range(1, cores + 1)))
    for name, (spec, tasks, b) in cases.items():
        model = MultiTaskModel(spec, tasks, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(b, *spec.input_shape)
        flops = training_flops_per_sample(spec, tasks, b) * b

        def step():
            opt.zero_grad()
            sum(o.float().square().mean() for o in model(x).values()).backward()
            opt.step()

        best = {}
        for _ in range(repeats):
            for n in range(1, cores + 1):
                torch.set_num_threads(n)
                step()
                t = time.perf_counter()
                for _ in range(5):
                    step()
                best[n] = min(best.get(n, 1e9), (time.perf_counter() - t) / 5)
        print(f"{name:<34} {flops / 1e6:>11.1f} " + " ".join(f"{best[n] * 1e3:>9.2f}" for n in range(1, cores + 1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", default="", help="comma list of workloads to skip: digits, utkface")
    ap.add_argument("--limit-s", type=float, default=300.0, help="time limit of one cell (s)")
    ap.add_argument("--calibrate", action="store_true", help="only time training steps per thread count")
    ap.add_argument("--json", help="also write the cells to this file")
    args = ap.parse_args(argv)
    if args.calibrate:
        calibrate()
        return 0
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} usable cores, load average at start {os.getloadavg()[0]:.2f}; busy = {cores} busy processes")
    cells = []
    for name, wl in workloads(set(filter(None, args.skip.split(",")))).items():
        got = {}
        for setting in ("before", "after"):
            for busy in (0, cores):
                got[setting, busy] = r = run_cell(wl, setting, busy, args.limit_s)
                cells.append({"workload": name, "setting": setting, "busy": busy, **r})
        print(f"\n{name}")
        print(f"  {'setting':<8} {'beside':<8} {'threads':>8} {'wall s':>8} {'device s':>9} {'CPU s':>8} {'test loss':>10}")
        for (setting, busy), r in got.items():
            cpu = "—" if r["cpu_s"] is None else f"{r['cpu_s']:.2f}"
            print(f"  {setting:<8} {f'{busy} busy':<8} {str(r['threads']):>8} {r['wall_s']:>8.2f} {r['device_s']:>9.2f} "
                  f"{cpu:>8} {r['test_loss']:>10.4f}")
        for setting in ("before", "after"):
            ratio = got[setting, cores]["device_s"] / got[setting, 0]["device_s"]
            print(f"  {setting}: device s beside {cores} busy / idle = {ratio:.2f}x"
                  + ("  (target <= 2x)" if setting == "after" else ""))
        print(f"  idle device s after / before = {got['after', 0]['device_s'] / got['before', 0]['device_s']:.2f} "
              f"(target <= 1); wall {got['after', 0]['wall_s'] / got['before', 0]['wall_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
