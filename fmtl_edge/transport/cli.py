"""``fmtl-edge join``: run this device as an agent of an ``fmtl-server`` coordinator."""

from __future__ import annotations

import argparse
import os
import signal
import sys

JOIN_HELP = """\
Join a coordinator (fmtl-server serve) as a device: register this device's profile, budgets, meter
and data, then train the assignments it sends, one at a time, under the device lease and the
profile's budgets, and stream each update back. The device opens no port. After a network loss the
agent reconnects with exponential backoff; stop it with Ctrl-C.

Power modes (Jetson): an assignment may ask for a power mode by name (the server's --power-mode
policy). The agent switches to it (nvpmodel -m, root) only with --allow-power-mode, and puts the mode
it found at start back when it exits, also after Ctrl-C or SIGTERM. Every update's energy record names
the mode the device trained in.

Data (--data): which client of which data partition this device holds; the partition must be the
job's (same clients, seed, max-samples...), the server checks it:
  NAME:client=ID[,clients=N][,seed=S][,max-samples=M][,alpha=A][,image-size=P]
  e.g. digits:client=3,clients=4,max-samples=400   utkface:client=7 --data-dir .../utkface/images

Security: the server's TLS certificate is checked against --ca (a self-signed server certificate
is its own CA); --cert/--key present a client certificate when the server requires one. --insecure
(plaintext) must be named explicitly, and the server must run with --insecure too. The token comes
from --token or the FMTL_EDGE_TOKEN environment variable (preferred: not visible in `ps`).

examples:
  fmtl-edge join --server coordinator.lan:50051 --ca server.crt --token $(cat token) \\
      --data utkface:client=3 --data-dir /data/utkface/images --profile jetson-orin-nano
  FMTL_EDGE_TOKEN=... fmtl-edge join --server 127.0.0.1:50051 --insecure --data digits:client=0,clients=4
"""


def register(sub) -> None:
    """Add the ``join`` subcommand to ``fmtl-edge``'s subparsers."""
    p = sub.add_parser("join", help="run this device as an agent of an fmtl-server coordinator",
                       description=JOIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--token", help="this device's bearer token (default: $FMTL_EDGE_TOKEN)")
    p.add_argument("--data", required=True, metavar="SPEC", help="NAME:client=ID[,clients=N][,seed=S]... (see above)")
    p.add_argument("--data-dir", help="folder of the data set (utkface images, uci_har, npz folder)")
    p.add_argument("--profile", help="device profile TOML or a built-in class (jetson-nano, ...; default: detected)")
    p.add_argument("--meter", help="override the profile's meter: auto | estimate | null | nvml | jetson | rapl")
    p.add_argument("--device", help="torch device for training: cpu | cuda (default: the job's)")
    p.add_argument("--lease", default="local", help="lease name shared by every FL process on this device (default local)")
    p.add_argument("--lease-wait-s", type=float, default=5.0, help="wait this long for the device lease, then report busy")
    g = p.add_argument_group("transport security")
    g.add_argument("--ca", help="PEM certificate(s) to trust for the server (its CA or its self-signed certificate)")
    g.add_argument("--cert", help="client certificate (PEM), when the server requires one")
    g.add_argument("--key", help="client private key (PEM)")
    g.add_argument("--server-name", help="name to check in the server certificate (default: the HOST of --server)")
    g.add_argument("--insecure", action="store_true", help="plaintext connection, no TLS (testing on a trusted network only)")
    g = p.add_argument_group("behaviour")
    g.add_argument("--max-backoff-s", type=float, default=30.0, help="longest wait between reconnection attempts (default 30)")
    g.add_argument("--poll-wait-s", type=float, default=20.0, help="long-poll duration when idle (default 20)")
    g.add_argument("--work-dir", help="folder for downloads and uploads in flight (default: a temp folder)")
    g.add_argument("--threads", default="auto", metavar="N|auto",
                   help="intra-op threads of each training execution (default auto: from the model's FLOPs per batch "
                        "and the usable cores; OpenMP waits passively unless OMP_WAIT_POLICY is set)")
    g.add_argument("--allow-power-mode", action="store_true",
                   help="let the server's assignments switch this Jetson's power mode (nvpmodel -m, needs root); "
                        "the mode found at start is restored when the agent exits, also on Ctrl-C. Without it the "
                        "device trains in its current mode and its energy records say so")
    g.add_argument("--save-model", metavar="DIR",
                   help="write this client's own (personalised) model of each personalised method (layered with "
                        "personal layers, ditto, local) when the server evaluates it, as "
                        "DIR/<method>/clients/<id>.safetensors (`fmtl-edge export FILE --onnx` makes it ONNX)")
    # testing and benchmarks only
    p.add_argument("--max-works", type=int, help=argparse.SUPPRESS)
    p.add_argument("--inject-fault", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_join)


def cmd_join(args: argparse.Namespace) -> int:
    # gRPC core logs every failed TLS handshake on its own; the agent says what failed and how to fix
    # it (set GRPC_VERBOSITY=INFO to see gRPC's lines again)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fmtl_edge.data.base import DataError
    from fmtl_edge.transport.agent import Agent, AgentOptions, DataSpec

    token = args.token or os.environ.get("FMTL_EDGE_TOKEN")
    if not token:
        print("fmtl-edge join: error: no token: pass --token or set FMTL_EDGE_TOKEN", file=sys.stderr)
        return 2
    if not args.insecure and not args.ca:
        # system roots may still verify a publicly signed server certificate
        print("fmtl-edge join: note: no --ca given; the server certificate is checked against the system roots",
              file=sys.stderr)
    if args.insecure:
        print("fmtl-edge join: WARNING: --insecure: plaintext connection, the token and the model travel unencrypted",
              file=sys.stderr)
    try:
        spec = DataSpec.parse(args.data, args.data_dir)
        opts = AgentOptions(server=args.server, token=token, data=spec, profile=args.profile, meter=args.meter,
                            device=args.device, lease=args.lease, lease_wait_s=args.lease_wait_s, insecure=args.insecure,
                            ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name,
                            work_dir=args.work_dir, max_backoff_s=args.max_backoff_s, poll_wait_s=args.poll_wait_s,
                            fault=args.inject_fault, max_works=args.max_works, threads=args.threads,
                            allow_power_mode=args.allow_power_mode, save_model=args.save_model)
        agent = Agent(opts)
        agent.prepare()
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"fmtl-edge join: error: {e}", file=sys.stderr)
        return 2

    def _stop(signum, frame):
        agent.log(f"signal {signum}: stopping")
        agent.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return agent.run()
