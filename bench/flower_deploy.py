"""Flower's deployment engine on loopback: a SuperLink, SuperNodes and ``flwr run``, as docs/flower.md
gives them, and the per-round overhead of a digits round with and without the node's data cache.

:class:`Deployment` starts exactly the guide's commands (``flower-superlink``, one
``flower-supernode`` per node with its own ``--port`` and a TOML ``--node-config``, ``flwr run
examples/flower-app <connection>`` with the connection in ``$FLWR_HOME/config.toml``), insecure or
with TLS (:func:`make_certificates`: the guide's ``openssl`` commands), and reads a run's status
with ``flwr ls --run-id <id> --format json``. ``tests/test_flower.py`` runs it (marked slow) against
``fmtl-edge simulate``.

The benchmark (``python bench/flower_deploy.py``): one SuperLink and 2 SuperNodes on loopback
(insecure), ``all-in-one`` on digits with 2 clients (K = 2) for ``--rounds`` rounds, once with
``data-cache = false`` (each message's ClientApp process loads and partitions the data set again,
as before issue 23) and once with ``data-cache = true`` (it reads its client's arrays from the
node's cache file), alternately ``--repeats`` times, in one run on the same SuperLink. Per round:
its wall seconds at the ServerApp (``history[r].wall_s``) and its critical path (the slowest
client's device seconds); the overhead is the difference. Round 1 is reported apart (the cache
is written then). ``fmtl-edge simulate`` of the same settings gives the in-process round for scale.

Run:  ``python bench/flower_deploy.py [--rounds 4] [--repeats 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"


#: the guide's certificate commands (run in the certificates' folder, beside san.ext)
OPENSSL = (
    "openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=fmtl-edge-CA -keyout ca.key -out ca.crt",
    "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -extfile san.ext "
    "-out server.pem",
)
#: san.ext: the names the SuperLink is reached by (every address in --superlink / the connection)
SAN = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"


def make_certificates(folder: str | Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost (the ``openssl`` commands of
    docs/flower.md). Returns ``{"ca", "cert", "key"}`` paths.

    Raises:
        FileNotFoundError: no ``openssl`` command; CalledProcessError: openssl failed.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    (d / "san.ext").write_text(SAN)
    for cmd in OPENSSL:
        subprocess.run(cmd.split(), cwd=d, check=True, capture_output=True)
    return {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}


class Deployment:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1, started with the guide's commands.

    Args:
        folder: working folder (``FLWR_HOME``, logs, caches).
        nodes: SuperNodes, partition-ids ``0 .. nodes - 1``.
        port: the SuperLink's ``--port`` (Fleet, Control and Runtime APIs; Flower's default 8000).
        node_port: SuperNode ``i`` serves its Runtime API on ``node_port + i`` (Flower's default
            9094: SuperNodes on one host each need their own).
        certs: :func:`make_certificates`'s paths for TLS; None: ``--insecure``.
        env: extra environment of every process (e.g. ``OMP_NUM_THREADS``).
        node_config: extra node config (TOML values) of every SuperNode; ``{i}`` is replaced by its
            partition-id.

    Use as a context manager; the processes (each in its own session) are stopped on exit.
    """

    def __init__(self, folder: str | Path, nodes: int = 2, port: int = 8000, node_port: int = 9094,
                 certs: dict | None = None, env: dict | None = None, node_config: str = ""):
        self.folder = Path(folder)
        self.nodes, self.port, self.node_port, self.certs = nodes, port, node_port, certs
        self.node_config = node_config
        self.home = self.folder / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.connection = "fmtl-tls" if certs else "fmtl-loopback"

    # -- the guide's commands ---------------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        tls = (["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"])] if self.certs else ["--insecure"])
        return ["flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]

    def supernode_command(self, i: int) -> list[str]:
        tls = ["--root-certificates", str(self.certs["ca"])] if self.certs else ["--insecure"]
        extra = (" " + self.node_config.replace("{i}", str(i))) if self.node_config else ""
        return ["flower-supernode", *tls, "--superlink", f"127.0.0.1:{self.port}", "--port", str(self.node_port + i),
                "--node-config", f"partition-id={i}{extra}"]

    def flower_config(self) -> str:
        """The ``[superlink.<name>]`` connection of ``$FLWR_HOME/config.toml``."""
        lines = ["[superlink]", f'default = "{self.connection}"', "", f"[superlink.{self.connection}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines.append(f'root-certificates = "{self.certs["ca"]}"' if self.certs else "insecure = true")
        return "\n".join(lines) + "\n"

    # -- processes ----------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, wait_s: float = 60.0) -> "Deployment":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(self.flower_config())
        self._start("superlink", self.superlink_command())
        for i in range(self.nodes):
            self._start(f"supernode-{i}", self.supernode_command(i))
        end = time.monotonic() + wait_s
        while time.monotonic() < end:  # the SuperNodes log their node id once registered
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited: see {self.folder}/{dead[0]}.log")
            if all("SuperNode ID" in (self.folder / f"supernode-{i}.log").read_text() for i in range(self.nodes)):
                return self
            time.sleep(0.5)
        raise TimeoutError(f"the SuperNodes did not register in {wait_s:.0f} s: see {self.folder}/supernode-*.log")

    def stop_node(self, i: int) -> None:
        self._stop(f"supernode-{i}")

    def _stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self) -> None:
        for name in [n for n in self.procs if n.startswith("supernode")] + ["superlink"]:
            self._stop(name)

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- flwr -----------------------------------------------------------------------------------------
    def run(self, run_config: str, timeout_s: float = 1800.0, app: Path = APP) -> tuple[int, str | None, str]:
        """``flwr run <app> <connection> --stream -c <run_config>``: ``(exit code, run id, output)``."""
        p = subprocess.run(["flwr", "run", str(app), self.connection, "--stream", "-c", run_config], env=self.env,
                           cwd=self.folder, capture_output=True, text=True, timeout=timeout_s)
        out = p.stdout + p.stderr
        run_id = None
        for line in out.splitlines():
            if "Successfully started run" in line:
                run_id = line.rsplit(" ", 1)[-1].strip()
        return p.returncode, run_id, out

    def status(self, run_id: str, wait_s: float = 60.0) -> dict:
        """``flwr ls <connection> --run-id <id> --format json``'s entry of the run, once finished."""
        end = time.monotonic() + wait_s
        while True:
            p = subprocess.run(["flwr", "ls", self.connection, "--run-id", str(run_id), "--format", "json"],
                               env=self.env, cwd=self.folder, capture_output=True, text=True, timeout=120)
            runs = json.loads(p.stdout).get("runs") or [{}]
            if str(runs[0].get("status", "")).startswith("finished") or time.monotonic() > end:
                return runs[0]
            time.sleep(1.0)


def _rounds(results: dict) -> list[dict]:
    out = []
    for m in results["methods"].values():
        for h in m["history"]:
            out.append({"wall_s": h["wall_s"], "critical_path_s": h["critical_path_s"],
                        "overhead_s": h["wall_s"] - h["critical_path_s"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the two variants")
    ap.add_argument("--port", type=int, default=39300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fmtl-flower-deploy-"))
    env = {"OMP_NUM_THREADS": "1", "FMTL_EDGE_RUNTIME_DIR": str(work / "lease")}
    settings = (f"methods='all-in-one' clients=2 clients-per-round=2 rounds={args.rounds} r0=1 seed=0 "
                "meter='null' lease='none'")
    figures: dict[str, list] = {"data-cache=false": [], "data-cache=true": []}
    with Deployment(work, nodes=2, port=args.port, node_port=args.port + 1, env=env,
                    node_config='cache-dir="' + str(work / "cache") + '-{i}"') as dep:
        for rep in range(args.repeats):
            for variant in figures:
                out = work / f"{variant}-{rep}"
                code, run_id, text = dep.run(f"{settings} {variant} out='{out}'")
                st = dep.status(run_id) if run_id else {}
                if code != 0 or st.get("status") != "finished:completed":
                    print(text[-3000:], file=sys.stderr)
                    raise SystemExit(f"{variant}: flwr run exit {code}, status {st.get('status')}")
                r = json.loads((out / "results.json").read_text())
                figures[variant].append({"rounds": _rounds(r), "run_wall_s": r["engine"]["wall_s"]})
    sim = work / "simulate"
    subprocess.run([sys.executable, "-m", "fmtl_edge.cli", "simulate", "--dataset", "digits", "--methods",
                    "all-in-one", "--clients", "2", "--clients-per-round", "2", "--rounds", str(args.rounds), "--r0",
                    "1", "--seed", "0", "--meter", "null", "--out", str(sim), "--no-progress"],
                   check=True, capture_output=True, env={**os.environ, **env}, cwd=work)
    sim_rounds = _rounds(json.loads((sim / "results.json").read_text()))
    report = {"settings": settings, "nodes": 2, "variants": figures, "simulate_rounds": sim_rounds}
    print(f"digits, all-in-one, 2 SuperNodes (loopback, insecure), {args.rounds} rounds x {args.repeats}:")
    print(f"{'variant':<22} {'round 1 wall s':>15} {'later rounds wall s':>20} {'later overhead s':>17}")
    for variant, runs in [*figures.items(), ("simulate (in-process)", [{"rounds": sim_rounds}])]:
        first = [r["rounds"][0]["wall_s"] for r in runs]
        later = [x for r in runs for x in r["rounds"][1:]]
        report.setdefault("summary", {})[variant] = {
            "round1_wall_s": statistics.mean(first), "later_wall_s": statistics.mean(x["wall_s"] for x in later),
            "later_overhead_s": statistics.mean(x["overhead_s"] for x in later)}
        s = report["summary"][variant]
        print(f"{variant:<22} {s['round1_wall_s']:>15.2f} {s['later_wall_s']:>20.2f} {s['later_overhead_s']:>17.2f}")
    a, b = report["summary"]["data-cache=false"], report["summary"]["data-cache=true"]
    print(f"later-round overhead with the cache / without: {b['later_overhead_s'] / a['later_overhead_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
