"""Coordination overhead of fmtl-server over loopback, beside the raw transfer time, and its peak RSS.

For each model size (default 10 MB and 500 MB) this starts a real ``fmtl-server serve`` process and
K (default 8) ``fmtl-edge join`` agent processes that echo the model back instead of training
(``--inject-fault echo``), and runs an all-in-one job of R rounds with all K devices per round. In
the same run it measures the *raw transfer*: the same bytes (K downloads and K uploads of the model,
concurrently, in the same 2 MiB chunks over the same gRPC service definition) between a bare
servicer and K bare client processes that neither write files, hash, validate, aggregate nor
checkpoint. It prints, per size:

- per-round wall time of the real system (from results.json) and the raw transfer time;
- coordination overhead = round time − raw transfer time, and the ratio round / raw;
- the server's peak RSS (``wait4`` ru_maxrss), its RSS before the model existed, and both against
  the model size and K × model size (target: peak ≤ 3 model sizes above the baseline).

Run: ``python bench/coordination.py [--sizes-mb 10,500] [--agents 8] [--rounds 3]`` (needs ~3 × K ×
size of free disk in --work-dir; the 500 MB case moves 8 GB per round through loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import ROOT, pythonpath


def width_for(size_mb: float) -> tuple[int, int]:
    """Backbone width giving a digits multi-task model of about ``size_mb`` MB (float32); (width, bytes)."""
    import torch

    from fmtl_edge.data import load_dataset
    from fmtl_edge.models import ModelSpec, MultiTaskModel

    tasks = load_dataset("digits", n_clients=2, max_samples=100).tasks

    def nbytes(w: int) -> int:
        with torch.device("meta"):
            m = MultiTaskModel(ModelSpec((1, 8, 8), width=w), tasks)
        return sum(t.numel() * t.element_size() for t in m.state_dict().values() if t.is_floating_point())

    lo, hi = 1, 8192
    target = size_mb * 1e6
    while lo < hi:
        mid = (lo + hi) // 2
        if nbytes(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo, nbytes(lo)


# -- raw transfer: a bare servicer and bare clients -------------------------------------------------------
def raw_transfer(model_file: Path, k: int, chunk: int, work: Path) -> float:
    """Seconds for K concurrent clients to download ``model_file`` and upload as many bytes back."""
    import grpc
    from concurrent import futures

    from fmtl_edge.transport import fmtl_edge_pb2 as pb
    from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
    from fmtl_edge.transport.service import GRPC_OPTIONS, free_port
    from fmtl_edge.transport.tensors import iter_chunks

    class Bare(pb_grpc.CoordinatorServicer):
        def DownloadModel(self, request, context):
            for off, data, total in iter_chunks(model_file, chunk):
                yield pb.Chunk(offset=off, data=data, total_bytes=total)

        def UploadUpdate(self, request_iterator, context):
            n = 0
            for m in request_iterator:
                n += len(m.chunk.data)
            return pb.UploadReply(accepted=True, reason=str(n))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 * k + 8), options=GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(Bare(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    barrier = Path(tempfile.mkdtemp(prefix="raw-", dir=work))
    procs = [subprocess.Popen([sys.executable, __file__, "--raw-client", f"127.0.0.1:{port}",
                               str(model_file.stat().st_size), str(chunk), str(barrier / str(i))],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": pythonpath()})
             for i in range(k)]
    # every client has done one untimed transfer (warm connection and HTTP/2 windows, like a running
    # agent's); then all start the timed one together
    while len(list(barrier.glob("*.ready"))) < k:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a raw client failed")
        time.sleep(0.05)
    (barrier / "go").touch()
    spans = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    server.stop(0)
    return max(s["end"] for s in spans) - min(s["start"] for s in spans)


def raw_client(addr: str, size: int, chunk: int, ready: str) -> None:
    import grpc

    from fmtl_edge.transport import fmtl_edge_pb2 as pb
    from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
    from fmtl_edge.transport.service import GRPC_OPTIONS

    ch = grpc.insecure_channel(addr, options=GRPC_OPTIONS)
    grpc.channel_ready_future(ch).result(timeout=30)
    stub = pb_grpc.CoordinatorStub(ch)
    buf = os.urandom(chunk)
    tail = buf[: size % chunk]

    def up():
        yield pb.UploadMessage(meta=pb.UpdateMeta())
        for off in range(0, size, chunk):
            yield pb.UploadMessage(chunk=pb.Chunk(offset=off, data=buf if size - off >= chunk else tail))

    def transfer():
        got = sum(len(c.data) for c in stub.DownloadModel(pb.DownloadRequest()))
        assert got == size
        stub.UploadUpdate(up())

    transfer()  # warm-up
    Path(ready + ".ready").touch()
    go = Path(ready).parent / "go"
    while not go.exists():
        time.sleep(0.005)
    t0 = time.time()
    transfer()
    print(json.dumps({"start": t0, "end": time.time()}))



def _rss(pid: int, field: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- the real system ----------------------------------------------------------------------------------------
def run_system(size_mb: float, k: int, rounds: int, work: Path) -> dict:
    from fmtl_edge.transport.service import free_port
    from fmtl_server.auth import add_token

    width, model_bytes = width_for(size_mb)
    work.mkdir(parents=True, exist_ok=True)
    # one token per device: a token serves one client (fmtl-server binds a token to its device)
    tokens = {c: add_token(work / "tokens.txt", f"bench-{size_mb:g}-{c}") for c in range(k)}
    (work / "job.toml").write_text(f"""
[job]
name = "bench-{size_mb:g}mb"
dataset = "digits"
clients = {k}
max_samples = {20 * k}
methods = ["all-in-one"]
rounds = {rounds}
clients_per_round = {k}
width = {width}
evaluate = false
[server]
state_dir = "state"
out = "out"
tokens = "tokens.txt"
heartbeat_interval_s = 1
heartbeat_timeout_s = 120
max_workers = {8 * k + 16}
""")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": pythonpath(), "FMTL_EDGE_RUNTIME_DIR": str(work / "run"), "OMP_NUM_THREADS": "1"}
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "fmtl_server", "serve", "--config", str(work / "job.toml"),
                               "--listen", f"127.0.0.1:{port}", "--insecure"], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=work)
    # baseline: the server's RSS while it waits for devices (imports done, no model yet)
    deadline = time.time() + 120
    while "waiting for" not in (work / "server.log").read_text() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    base_rss = _rss(server.pid)
    agents = []
    for c in range(k):
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "fmtl_edge.cli", "join", "--server", f"127.0.0.1:{port}", "--insecure",
             f"--token={tokens[c]}", "--data", f"digits:client={c},clients={k},max-samples={20 * k}", "--inject-fault", "echo",
             "--lease", f"bench-{c}", "--meter", "null", "--threads", "1", "--max-backoff-s", "1",
             "--work-dir", str(work / f"agent{c}")],
            stdout=open(work / f"agent{c}.log", "w"), stderr=subprocess.STDOUT, env=env))
    peak_seen = 0
    while True:  # wait4 (not Popen.poll) so that the server's own rusage is kept
        pid, status, ru = os.wait4(server.pid, os.WNOHANG)
        if pid:
            server.returncode = os.waitstatus_to_exitcode(status)
            break
        peak_seen = max(peak_seen, _rss(server.pid, "VmHWM") or 0)
        time.sleep(0.5)
    peak = max(peak_seen, ru.ru_maxrss * 1024)
    for a in agents:
        a.terminate()
    for a in agents:
        a.wait(30)
    res = json.loads((work / "out" / "results.json").read_text())
    hist = res["methods"]["all-in-one"]["history"]
    return {"size_mb": size_mb, "width": width, "model_bytes": model_bytes, "k": k, "rounds": rounds,
            "round_wall_s": [h["wall_s"] for h in hist], "peak_rss_bytes": peak, "base_rss_bytes": base_rss,
            "server_rc": server.returncode, "breakdown": breakdown(work, k)}


def breakdown(work: Path, k: int) -> dict:
    """Mean per-round phases from the server's timing lines and the agents' logs."""
    import re

    out: dict[str, list[float]] = {}
    for line in (work / "server.log").read_text().splitlines():
        if "timing of" not in line:
            continue
        for name, v in re.findall(r"(model file|first update|last update|validation|aggregation|checkpoint) ([0-9.]+) s", line):
            out.setdefault(name, []).append(float(v))
    for c in range(k):
        text = (work / f"agent{c}.log").read_text()
        out.setdefault("agent download", []).extend(float(v) for v in re.findall(r"downloaded in ([0-9.]+) s", text))
        out.setdefault("agent upload", []).extend(float(v) for v in re.findall(r"MB in ([0-9.]+) s,", text))
        out.setdefault("agent write update", []).extend(float(v) for v in re.findall(r"samples, ([0-9.]+) s on device", text))
    return {k_: sum(v) / len(v) for k_, v in out.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,500")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--raw-client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_client:
        addr, size, chunk, ready = args.raw_client
        raw_client(addr, int(size), int(chunk), ready)
        return 0
    from fmtl_edge.transport.tensors import DEFAULT_CHUNK_BYTES, write_state

    import numpy as np

    base = Path(args.work_dir or tempfile.mkdtemp(prefix="fmtl-bench-coord-"))
    rows = []
    for size in [float(s) for s in args.sizes_mb.split(",")]:
        work = base / f"{size:g}mb"
        sysr = run_system(size, args.agents, args.rounds, work)
        f = work / "raw.safetensors"
        write_state(f, {"w": np.zeros(sysr["model_bytes"] // 4, np.float32)}, fsync=False)
        raw_s = min(raw_transfer(f, args.agents, DEFAULT_CHUNK_BYTES, work) for _ in range(3))  # best of 3
        f.unlink()
        rounds = sysr["round_wall_s"]
        mean_round = sum(rounds) / len(rounds)
        mb = sysr["model_bytes"]
        row = {**sysr, "raw_transfer_s": raw_s, "mean_round_s": mean_round, "overhead_s": mean_round - raw_s,
               "round_over_raw": mean_round / raw_s if raw_s > 0 else None,
               "peak_over_model": sysr["peak_rss_bytes"] / mb,
               "peak_above_base_over_model": (sysr["peak_rss_bytes"] - (sysr["base_rss_bytes"] or 0)) / mb,
               "k_times_model_bytes": args.agents * mb}
        rows.append(row)
        print(f"model {mb / 1e6:.1f} MB (width {sysr['width']}), K={args.agents}, {len(rounds)} rounds: "
              f"round {mean_round:.2f} s (each: {', '.join(f'{r:.2f}' for r in rounds)}), raw transfer "
              f"{raw_s:.2f} s, overhead {mean_round - raw_s:+.2f} s ({mean_round / raw_s:.2f}x raw); server peak RSS "
              f"{sysr['peak_rss_bytes'] / 1e6:.0f} MB = {row['peak_over_model']:.2f} model sizes "
              f"({row['peak_above_base_over_model']:.2f} above the {((sysr['base_rss_bytes'] or 0) / 1e6):.0f} MB "
              f"baseline) vs K x model = {args.agents * mb / 1e6:.0f} MB", flush=True)
        print("  mean per round: " + ", ".join(f"{k_} {v:.2f} s" for k_, v in sysr["breakdown"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
