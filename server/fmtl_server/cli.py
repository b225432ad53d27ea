"""The ``fmtl-server`` command line: ``serve``, ``status``, ``token``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXIT_USAGE = 2

SERVE_HELP = """\
Run a federated multi-task job over devices that join with `fmtl-edge join`: the same methods and
plans as `fmtl-edge simulate` (listed below), with K devices per round,
updates aggregated as they arrive (streaming, about three model sizes of memory), rounds ending at K
updates or at the deadline, failed devices replaced. State (plan position, rounds, affinities,
device registry) goes to SQLite and model checkpoints to safetensors files in --state-dir at every
round end: after a crash, run the same command again and the job resumes from its last completed
round. Results: results.json and per-task models in --out, in the simulation's layout.

job.toml:
  [job]                      # fmtl-edge simulate's keys + deployment keys
  dataset = "digits"         # what the devices hold (checked at registration)
  clients = 4                # partition size
  methods = ["mas-2"]
  rounds = 10
  r0 = 3
  clients_per_round = 2
  round_deadline_s = 120     # optional; min_updates, max_attempts, dispatch_wait_s, wait_for_devices...
  [server]
  listen = "0.0.0.0:50051"
  tokens = "tokens.txt"      # from `fmtl-server token add NAME`
  tls_cert = "server.crt"
  tls_key = "server.key"
  state_dir = "fmtl-state"
  out = "runs/server"

examples:
  fmtl-server token add jetson-1 --tokens tokens.txt
  fmtl-server serve --config job.toml
  fmtl-server serve --config job.toml --listen 127.0.0.1:50051 --insecure   # loopback tests only
"""


_METHODS_EPILOG = "(the methods)"


class _ServeHelp(argparse.RawDescriptionHelpFormatter):
    """``serve --help`` with the methods it accepts, from :data:`fmtl_edge.methods.METHODS` (read only
    when the help is printed: importing the methods imports torch)."""

    def add_text(self, text):
        if text is _METHODS_EPILOG:
            from fmtl_edge.methods import METHODS, methods_help

            pooled = ", ".join(c.name for c in METHODS.values() if c.pooled_data)
            text = ("methods ([job] methods = [...]; the same as fmtl-edge simulate's, with their options as [job] "
                    "keys):\n" + methods_help(pooled=False)
                    + (f"\n  ({pooled}: a reference on pooled data, fmtl-edge simulate only)" if pooled else ""))
        super().add_text(text)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run a job over devices that join", description=SERVE_HELP,
                       epilog=_METHODS_EPILOG, formatter_class=_ServeHelp)
    p.add_argument("--config", required=True, help="job.toml ([job] and [server] tables)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:50051)")
    p.add_argument("--state-dir", help="job state folder (SQLite + checkpoints; default fmtl-state)")
    p.add_argument("--out", help="results folder (default runs/server)")
    p.add_argument("--tokens", help="tokens file (default tokens.txt)")
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--client-ca", help="require client certificates signed by this CA (PEM)")
    p.add_argument("--insecure", action="store_const", const=True,
                   help="run without TLS (plaintext; trusted networks and tests only)")
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING (default INFO)")
    p.set_defaults(func=cmd_serve)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="jobs, rounds and devices of a server",
                       description="Show a job's progress and its devices (last energy and time). Reads the state "
                                   "folder directly (works while the server runs or after it stopped), or asks a "
                                   "running server with --server and an admin token (live view: online devices).")
    p.add_argument("--state-dir", default=None, help="the server's state folder (default fmtl-state)")
    p.add_argument("--server", metavar="HOST:PORT", help="ask a running server instead")
    p.add_argument("--token", help="admin token for --server (default $FMTL_EDGE_TOKEN)")
    p.add_argument("--ca", help="server certificate / CA (PEM) for --server")
    p.add_argument("--insecure", action="store_true", help="plaintext connection to --server")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)


def _add_token(sub) -> None:
    p = sub.add_parser("token", help="issue bearer tokens for devices and admins",
                       description="Issue a bearer token: the tokens file keeps only its SHA-256, the token is "
                                   "printed once. Give it to the device (fmtl-edge join --token or FMTL_EDGE_TOKEN). "
                                   "Revoke by deleting the device's line; a running server re-reads the file.")
    tsub = p.add_subparsers(dest="token_cmd", metavar="command")
    a = tsub.add_parser("add", help="create a token for a device name",
                        description="Create a bearer token for NAME (a device, or an admin with --role admin), "
                                    "append its SHA-256 to the tokens file and print the token once: give it to the "
                                    "device (fmtl-edge join --token TOKEN or $FMTL_EDGE_TOKEN). A running server "
                                    "re-reads the file.",
                        epilog="example: fmtl-server token add jetson-1 --tokens tokens.txt")
    a.add_argument("name", help="device name (letters, digits, _ - . @)")
    a.add_argument("--tokens", default="tokens.txt", help="tokens file (default tokens.txt)")
    a.add_argument("--role", default="device", choices=("device", "admin"), help="admin tokens may read status")
    a.set_defaults(func=cmd_token_add)


def _add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="resume from the previous round where a checkpoint is corrupt",
                       description="Every job whose last checkpoint is missing, differs from its stored SHA-256 or "
                                   "holds NaN/Inf goes back to the previous round kept beside it (when that one "
                                   "verifies). Run it with the server stopped, then serve again.")
    p.add_argument("--state-dir", default="fmtl-state", help="the server's state folder (default fmtl-state)")
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    from fmtl_server.store import Store

    if not (Path(args.state_dir) / "state.db").is_file():
        print(f"fmtl-server rollback: error: no job state in {args.state_dir}", file=sys.stderr)
        return EXIT_USAGE
    store = Store(args.state_dir)
    try:
        done = store.rollback()
    finally:
        store.close()
    for m, j, r in done:
        print(f"{m} {j}: back to the checkpoint after round {r + 1}")
    if not done:
        print("nothing to roll back (every last checkpoint verifies, or no earlier round is kept)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fmtl_edge.config import ConfigError

    from fmtl_server.config import load_config
    from fmtl_server.runner import serve

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = {"listen": args.listen, "state_dir": args.state_dir, "out": args.out, "tokens": args.tokens,
                 "tls_cert": args.tls_cert, "tls_key": args.tls_key, "client_ca": args.client_ca,
                 "insecure": args.insecure}
    try:
        srv, job = load_config(args.config, overrides)
        return serve(srv, job)
    except (ConfigError, ValueError) as e:
        print(f"fmtl-server serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"fmtl-server serve: error: {e}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    import os

    if args.server:
        import grpc

        from fmtl_edge.transport import fmtl_edge_pb2 as pb
        from fmtl_edge.transport import fmtl_edge_pb2_grpc as pb_grpc
        from fmtl_edge.transport.service import bearer, channel

        token = args.token or os.environ.get("FMTL_EDGE_TOKEN")
        if not token:
            print("fmtl-server status: error: --server needs an admin token (--token or FMTL_EDGE_TOKEN)", file=sys.stderr)
            return EXIT_USAGE
        try:
            with channel(args.server, insecure=args.insecure, ca=args.ca) as ch:
                reply = pb_grpc.CoordinatorStub(ch).GetStatus(pb.StatusRequest(), timeout=10, metadata=bearer(token))
        except grpc.RpcError as e:
            print(f"fmtl-server status: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        st = json.loads(reply.json)
    else:
        from fmtl_server.store import Store

        state = args.state_dir or "fmtl-state"
        try:
            store = Store(state, readonly=True)
        except FileNotFoundError as e:
            print(f"fmtl-server status: error: {e}; pass --state-dir", file=sys.stderr)
            return EXIT_USAGE
        st = store.status()
        store.close()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    _print_status(st)
    return 0


def _fmt(v, digits=2, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _print_status(st: dict, console=None) -> None:
    """Print a status document (``Store.status()`` or the live ``GetStatus``) as tables that fit the
    console (:class:`fmtl_edge.tables.FitTable`: at 80 columns, in a pipe or a log file, the columns
    split into parts; nothing is cut)."""
    from rich.console import Console

    from fmtl_edge.tables import Col, FitTable

    c = console or Console()
    c.print(f"[bold]job[/] {st.get('job')}  phase: {st.get('phase')}"
            + (f"  results: {st['results']}" if st.get("results") else ""))
    if st.get("counters"):
        c.print("counters: " + ", ".join(f"{k} {v}" for k, v in st["counters"].items())
                + f", refused calls {st.get('refused_calls', 0)}")
    t = FitTable("jobs", [Col("method", "left"), Col("job", "left"), Col("rounds"), Col("done", "left"),
                          Col("device s"), Col("energy J"), Col("wall s")], keep=2)
    for j in st.get("jobs", []):
        t.add_row(j["method"], j["job"], f"{j['rounds_done']}/{j['rounds']}", "yes" if j["done"] else "no",
                  _fmt(j.get("device_s"), 1), _fmt(j.get("energy_j"), 1), _fmt(j.get("wall_s"), 1))
    c.print(t)
    if st.get("methods_done"):
        t = FitTable("finished methods", [Col("method", "left"), Col("total test loss"), Col("device s"),
                                          Col("energy J"), Col("splits", "left", wrap=True)])
        for m in st["methods_done"]:
            t.add_row(m["method"], _fmt(m.get("total_test_loss"), 4), _fmt(m.get("device_s"), 1),
                      _fmt(m.get("energy_j"), 1), " | ".join("+".join(g) for g in (m.get("splits") or [])))
        c.print(t)
    t = FitTable("devices", [Col("client"), Col("device", "left"), Col("state", "left"), Col("runs"), Col("rejected"),
                             Col("failures"), Col("last device s"), Col("last energy J"), Col("last job", "left"),
                             Col("last seen")], keep=2)
    now = time.time()
    for d in st.get("devices", []):
        seen = d.get("last_seen_unix_s")
        state = d.get("state") or ("—")
        t.add_row(str(d["client_id"]), str(d.get("device")), state, str(d.get("executions", 0)), str(d.get("rejected", 0)),
                  str(d.get("failures", 0)), _fmt(d.get("last_device_s")), _fmt(d.get("last_energy_j")),
                  str(d.get("last_job") or "—"), f"{now - seen:.0f} s ago" if seen else "—")
    c.print(t)
    if st.get("refusals"):
        t = FitTable("refused calls per device", [Col("device", "left"), Col("refused"), Col("by RPC", "left", wrap=True),
                                                  Col("last", "left", wrap=True)])
        for name, r in st["refusals"].items():
            t.add_row(name, str(r.get("total", 0)), ", ".join(f"{k} {v}" for k, v in sorted(r.get("by_rpc", {}).items())),
                      str(r.get("last", "")))
        c.print(t)


def cmd_token_add(args: argparse.Namespace) -> int:
    from fmtl_server.auth import TokenError, add_token

    try:
        token = add_token(args.tokens, args.name, args.role)
    except TokenError as e:
        print(f"fmtl-server token add: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    print(f"token for {args.name!r} ({args.role}) added to {args.tokens}; it is not stored, keep it now", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fmtl_server import __version__

    parser = argparse.ArgumentParser(prog="fmtl-server", description="The fmtl-edge coordinator service.",
                                     epilog="Run `fmtl-server <command> --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"fmtl-server {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _add_serve(sub)
    _add_status(sub)
    _add_token(sub)
    _add_rollback(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
