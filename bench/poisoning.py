"""One poisoning device out of 8 against FedAvg, norm-bounded FedAvg and the coordinate-wise median.

Each case starts a real ``fmtl-server serve`` process and 8 ``fmtl-edge join`` agents (one client of
the ``digits`` partition each) on loopback, and runs an all-in-one job with every device in every
round (K = 8). In the attacked cases one agent (client ``--attacker``) runs ``--inject-fault
poison:SCALE``: it trains honestly, then uploads ``global + SCALE * (trained - global)`` (a scaled
sign-flip "model replacement"; finite values, so only the norm bound or a robust aggregator can stop
it). Cases, measured one after the other in the same run:

- ``clean``: no attacker, FedAvg (the reference);
- ``fedavg``: attacker, FedAvg with both norm bounds off (``max_update_norm_ratio = 1e30``,
  ``max_update_norm_multiple = 0``);
- ``bounded``: attacker, FedAvg with the server's default bounds: the static one at ``--ratio``
  (default 10 x |global|) and the round's relative one at ``--multiple`` (default 4 x the round's
  median update distance);
- ``bounded-tight``: attacker, FedAvg with the static bound at ``--tight-ratio`` (default 0.5) and
  the relative one off;
- ``median``: attacker, ``aggregator = "median"`` (default bounds).

Printed per case (from results.json): final total test loss, the rounds in which the attacker's
update was refused (``history[].refused``), the server's rejected-update counter, the sum of
device seconds (for a job that fails: the rounds it completed, from the server's log, and why), and
from the attacker's log its honest step ``|trained - global| / max(|global|, 1)`` (min-max over
rounds), which |SCALE| multiplies before the norm bound compares it with the ratio.

Run: ``python bench/poisoning.py [--rounds 10] [--scale -10] [--cases clean,fedavg,bounded,median]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT, pythonpath

K = 8
CASES = ("clean", "fedavg", "bounded", "bounded-tight", "median")



def case_settings(case: str, ratio: float, tight: float, multiple: float) -> tuple[bool, str, float, float]:
    """(attacker present, aggregator, max_update_norm_ratio, max_update_norm_multiple) of a case."""
    return {"clean": (False, "fedavg", ratio, multiple), "fedavg": (True, "fedavg", 1e30, 0.0),
            "bounded": (True, "fedavg", ratio, multiple), "bounded-tight": (True, "fedavg", tight, 0.0),
            "median": (True, "median", ratio, multiple)}[case]


def run_case(case: str, work: Path, args) -> dict:
    from fmtl_edge.transport.service import free_port
    from fmtl_server.auth import add_token

    attacked, aggregator, ratio, multiple = case_settings(case, args.ratio, args.tight_ratio, args.multiple)
    work.mkdir(parents=True, exist_ok=True)
    tokens = {c: add_token(work / "tokens.txt", f"dev-{c}") for c in range(K)}
    (work / "job.toml").write_text(f"""
[job]
name = "poison-{case}"
dataset = "digits"
clients = {K}
max_samples = {args.max_samples}
methods = ["all-in-one"]
rounds = {args.rounds}
clients_per_round = {K}
width = {args.width}
seed = {args.seed}
aggregator = "{aggregator}"
max_update_norm_ratio = {ratio:g}
max_update_norm_multiple = {multiple:g}
dispatch_wait_s = 0.5
max_attempts = 1
max_round_retries = 1
retry_wait_s = 0.5
[server]
state_dir = "state"
out = "out"
tokens = "tokens.txt"
heartbeat_interval_s = 1
heartbeat_timeout_s = 120
""")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": pythonpath(), "FMTL_EDGE_RUNTIME_DIR": str(work / "run"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "fmtl_server", "serve", "--config", str(work / "job.toml"),
                               "--listen", f"127.0.0.1:{port}", "--insecure"], stdout=open(work / "server.log", "w"),
                              stderr=subprocess.STDOUT, env=env, cwd=work)
    agents = []
    for c in range(K):
        fault = ["--inject-fault", f"poison:{args.scale:g}"] if attacked and c == args.attacker else []
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "fmtl_edge.cli", "join", "--server", f"127.0.0.1:{port}", "--insecure",
             f"--token={tokens[c]}", "--data", f"digits:client={c},clients={K},max-samples={args.max_samples}",
             *fault, "--lease", f"poison-{case}-{c}", "--meter", "estimate", "--threads", "1",
             "--max-backoff-s", "1", "--poll-wait-s", "2", "--work-dir", str(work / f"agent{c}")],
            stdout=open(work / f"agent{c}.log", "w"), stderr=subprocess.STDOUT, env=env))
    try:
        rc = server.wait(args.case_timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        rc = server.wait()
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            try:
                a.wait(30)
            except subprocess.TimeoutExpired:
                a.kill()
    wall = time.perf_counter() - t0
    steps = [float(v) for v in re.findall(r"poison x\S+: \|trained - global\| \S+ = (\S+) x",
                                          (work / f"agent{args.attacker}.log").read_text(errors="replace"))]
    row = {"case": case, "attacked": attacked, "aggregator": aggregator, "max_update_norm_ratio": ratio,
           "max_update_norm_multiple": multiple,
           "attacker_honest_step": [min(steps), max(steps)] if steps else None, "wall_s": wall, "server_rc": rc}
    res_path = work / "out" / "results.json"
    if rc != 0 or not res_path.is_file():
        # the job failed (e.g. a poisoned aggregate gave NaN and every later update was refused): figures
        # of the rounds that completed, from the server's round lines
        log = (work / "server.log").read_text(errors="replace")
        done = re.findall(r"all-in-one all round (\d+): clients .*?, device ([0-9.]+) s", log)
        why = re.findall(r"giving up: (.*)", log)
        row.update(total_test_loss=None, test_loss=None, rounds=len(done), device_s=sum(float(d) for _, d in done),
                   refused_rounds=[], updates_rejected=log.count("refused UploadUpdate"),
                   failed=(why[-1] if why else f"server exited {rc}"))
        return row
    res = json.loads(res_path.read_text())
    m = res["methods"]["all-in-one"]
    hist = m["history"]
    refused_rounds = [i + 1 for i, h in enumerate(hist)
                      if any(int(r.get("client_id", -1)) == args.attacker for r in h.get("refused", []))]
    row.update(total_test_loss=m["total_test_loss"], test_loss=m.get("test_loss"), refused_rounds=refused_rounds,
               updates_rejected=res["engine"]["counters"].get("updates_rejected", 0),
               device_s=sum(float(h.get("device_s") or 0.0) for h in hist), rounds=len(hist), failed=None)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--scale", type=float, default=-10.0, help="SCALE of the attacker's poison fault (default -10)")
    ap.add_argument("--ratio", type=float, default=10.0, help="max_update_norm_ratio of the 'bounded' case (default 10)")
    ap.add_argument("--tight-ratio", type=float, default=0.5, help="max_update_norm_ratio of 'bounded-tight' (default 0.5)")
    ap.add_argument("--multiple", type=float, default=4.0,
                    help="max_update_norm_multiple of 'bounded', 'clean' and 'median' (default 4, the server's default)")
    ap.add_argument("--max-samples", type=int, default=800, help="digits samples over all 8 clients (default 800)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacker", type=int, default=K - 1, help="client id of the poisoning device (default 7)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--case-timeout-s", type=float, default=900)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    base = Path(args.work_dir or tempfile.mkdtemp(prefix="fmtl-bench-poison-"))
    print(f"digits, {K} agents (attacker: client {args.attacker}, poison x{args.scale:g}), all-in-one, K={K}, "
          f"{args.rounds} rounds, max-samples {args.max_samples}, width {args.width}; work dir {base}", flush=True)
    rows = []
    for c in cases:
        r = run_case(c, base / c, args)
        rows.append(r)
        what = f"FAILED after {r['rounds']} rounds: {r['failed']}" if r["failed"] else f"total test loss {r['total_test_loss']:.4f}"
        print(f"  {c}: {what} ({r['wall_s']:.0f} s)", flush=True)
    print()
    print("| case | attacker | aggregator | norm ratio | norm multiple | final total test loss "
          "| attacker refused in rounds | updates rejected | device s | attacker honest step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["attacker_honest_step"]
        print(f"| {r['case']} | {'poison x%g' % args.scale if r['attacked'] else '—'} | {r['aggregator']} "
              f"| {r['max_update_norm_ratio']:g} | {r['max_update_norm_multiple']:g} "
              f"| {'job failed after %d rounds (see above)' % r['rounds'] if r['failed'] else '%.4f' % r['total_test_loss']} "
              f"| {', '.join(map(str, r['refused_rounds'])) or 'none'} ({len(r['refused_rounds'])}/{r['rounds']}) "
              f"| {r['updates_rejected']} | {r['device_s']:.1f} "
              f"| {'—' if st is None else f'{st[0]:.3g}–{st[1]:.3g}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
