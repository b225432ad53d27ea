"""Training throughput of one client execution against a plain PyTorch loop, per built-in model family.

    OMP_NUM_THREADS=1 python -m bench.model_throughput            # about 1-2 minutes on one core
    python -m bench.model_throughput --families resnet --samples 512 --image-size 64 --json out.json

For each built-in family (``conv``, ``resnet``, ``mobilenet`` on images ``(3, S, S)`` with UTKFace's
seven tasks; ``mlp`` on 265-D vectors with UCI HAR's three tasks) one synthetic client of N training
samples is trained for one local epoch, batch B, SGD with momentum 0.9 and weight decay 1e-4, two
ways, interleaved, best of ``--repeats`` (more for a short epoch, so that each side runs about
1.5 s: the MLP's epoch takes milliseconds):

- **framework**: :func:`fmtl_edge.client.execute` of an ``sgd`` assignment (the global state in,
  the update out): the memory-budget estimate (as ``simulate`` runs it, with the profile's budget),
  the model built from the state, the client framework around the procedure, the update's state
  copied out. No meter and no lease (those are the runtime's, measured in ``bench/meter_overhead.py``).
- **plain**: the same architecture built once before the clock starts (its initial weights put
  back before each epoch, as every execution starts from the same state), then the textbook loop:
  a seeded permutation cut into batches of B, forward, Σ of the task losses, ``zero_grad``,
  ``backward``, ``optimizer.step`` (a fresh ``torch.optim.SGD`` per epoch, as a round has).

It prints samples/s of both (wall clock), framework / plain (target ≥ 0.9) and the same ratio of
the process's CPU seconds ("CPU ratio"). Both run in one process on the same data, so the ratio
compares like with like; with one intra-op thread the CPU ratio is also blind to the time other
jobs take the core away, which moves the wall-clock ratio by ±0.1 on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench  # noqa: E402,F401  (the installed fmtl-edge where there is one, else the source tree)
import numpy as np  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("conv", "resnet", "mobilenet", "mlp")


def _client(tasks, input_shape, n: int, seed: int = 0):
    from fmtl_edge.data.base import ClientData

    rng = np.random.default_rng(seed)

    def labels(m: int) -> dict[str, np.ndarray]:
        y = {}
        for t in tasks:
            if t.kind == "classification":
                y[t.name] = rng.integers(0, t.out_dim, m).astype(np.int64)
            elif t.kind == "binary":
                y[t.name] = rng.integers(0, 2, m).astype(np.float32)
            elif t.kind == "regression":
                y[t.name] = rng.normal(t.target_mean, t.target_std, m).astype(np.float32)
            else:
                y[t.name] = rng.random((m, t.out_dim, *input_shape[1:]), dtype=np.float32)
        return y

    x = rng.random((n, *input_shape), dtype=np.float32)
    return ClientData(0, x, labels(n), x[:4].copy(), labels(4))


def _plain_epoch(model, data, tasks, batch: int, seed: int) -> None:
    """The textbook loop: one epoch of SGD with momentum on Σ_i L_i."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x_all = torch.from_numpy(data.x_train)
    y_all = {t.name: torch.from_numpy(data.y_train[t.name]) for t in tasks}
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x_all)))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        if len(idx) < 2:
            continue
        out = model(x_all[idx])
        loss = sum(t.loss(out[t.name], y_all[t.name][idx]) for t in tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _best(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Interleaved best-of-``repeats`` (wall seconds, CPU seconds of this process) of each callable."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}


def measure(family: str, samples: int, batch: int, image_size: int, repeats: int) -> dict[str, Any]:
    from fmtl_edge.client import execute
    from fmtl_edge.messages import Assignment, TrainConfig
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import state_to_numpy
    from fmtl_edge.runtime import load_profile

    if family == "mlp":
        from fmtl_edge.data.uci_har import TASKS as tasks

        shape: tuple[int, ...] = (265,)
    else:
        from fmtl_edge.data.utkface import make_tasks

        tasks = make_tasks()
        shape = (3, image_size, image_size)
    spec = ModelSpec(shape, model=family)
    data = _client(tasks, shape, samples)
    state = state_to_numpy(MultiTaskModel(spec, tasks, seed=0).state_dict())
    cfg = TrainConfig(local_epochs=1, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=1e-4)
    budget = 8 << 30  # a Jetson-class memory budget: every execution checks its estimate first
    rounds = iter(range(1 << 30))

    def framework() -> None:
        a = Assignment(job="bench", round=next(rounds), tasks=tasks.names, state=state, lr=0.01, config=cfg)
        execute(data, spec, tasks, a, memory_budget_bytes=budget)

    plain_model = MultiTaskModel(spec, tasks, seed=0)
    start = {k: v.clone() for k, v in plain_model.state_dict().items()}
    seeds = iter(range(1 << 30))

    def plain() -> None:  # every epoch from the same weights, as every execution starts from `state`
        plain_model.load_state_dict(start)
        _plain_epoch(plain_model, data, tasks, batch, next(seeds))

    framework()  # warm-up: lazy imports, allocator, oneDNN primitive caches
    plain()
    once, _ = _best({"framework": framework, "plain": plain}, 1)
    # a short epoch (the MLP's: ms) gets more interleaved repeats, so each side runs >= ~1.5 s
    reps = min(300, max(repeats, int(1.5 / max(min(once.values()), 1e-4))))
    t, c = _best({"framework": framework, "plain": plain}, reps)
    n_params = sum(p.numel() for p in plain_model.parameters())
    return {"family": family, "input_shape": list(shape), "tasks": len(tasks), "params": int(n_params),
            "samples": samples, "batch": batch,
            "framework_samples_per_s": samples / t["framework"], "plain_samples_per_s": samples / t["plain"],
            "framework_s": t["framework"], "plain_s": t["plain"], "ratio": t["plain"] / t["framework"],
            "framework_cpu_s": c["framework"], "plain_cpu_s": c["plain"], "cpu_ratio": c["plain"] / c["framework"],
            "repeats": reps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    ap.add_argument("--samples", type=int, default=256, help="training samples of the client (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--image-size", type=int, default=32, help="S of the (3, S, S) images (default 32)")
    ap.add_argument("--repeats", type=int, default=5, help="best of at least this many interleaved runs (default 5; "
                    "more for short epochs)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}; "
          f"N={args.samples}, B={args.batch}, one epoch, best of {args.repeats}")
    print(f"{'family':<10} {'input':<12} {'params':>9} {'framework/s':>12} {'plain/s':>9} {'ratio':>6} "
          f"{'CPU ratio':>9} {'best of':>8}")
    for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
        if fam not in FAMILIES:
            print(f"unknown family {fam!r}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
        r = measure(fam, args.samples, args.batch, args.image_size, args.repeats)
        rows.append(r)
        shape = "x".join(str(s) for s in r["input_shape"])
        print(f"{fam:<10} {shape:<12} {r['params']:>9,} {r['framework_samples_per_s']:>12.1f} "
              f"{r['plain_samples_per_s']:>9.1f} {r['ratio']:>6.3f} {r['cpu_ratio']:>9.3f} {r['repeats']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                               "threads": torch.get_num_threads()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
