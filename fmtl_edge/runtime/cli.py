"""``fmtl-edge info``, ``fmtl-edge meter`` and ``fmtl-edge profile-modes`` (registered into the main CLI
by :func:`register`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
from typing import Any

from .factory import BACKENDS, make_meter, probe_all
from .meter import MeterUnavailable
from .sysfs import ENV_ROOT, Sysfs

INFO_HELP = """\
Describe this device for fmtl-edge: what it is, its accelerators, which energy meters work here (and
why the others do not), the power mode, the budgets of its device profile, and whether the native
kernels (and their CUDA part) are built.

examples:
  fmtl-edge info
  fmtl-edge info --json
  fmtl-edge info --profile nano-07.toml
  FMTL_EDGE_SYSFS_ROOT=/tmp/fake-orin fmtl-edge info     # read a fake /sys tree
"""

METER_HELP = """\
Run a command and report its wall time and energy per domain (rails, GPUs, CPU packages), with the
total, its scope (board_input | sum_of_rails | gpu_device | cpu_package | none) and how each number
was obtained (counter | integrated | estimated). The exit code is the command's.

The human-readable report goes to stderr; with --json one JSON object goes to stdout (or to -o FILE):
  {"wall_s", "total_j" (null when unknown), "total_scope", "estimated", "source",
   "domains": [{"domain", "joules", "method", "source", "scope", "in_total"}],
   "sample_hz", "power_mode", "warnings", "command", "exit_code", "backend"}

examples:
  fmtl-edge meter -- python train.py --epochs 1
  fmtl-edge meter --json -- ./bench.sh > energy.json
  fmtl-edge meter --backend estimate --power-w 2.5 -- make -j4
  fmtl-edge meter --backend jetson --sample-hz 100 -o run.json -- python -m my.job
"""

PROFILE_MODES_HELP = """\
Run a short fixed training workload (a small model on fixed synthetic data, --samples sample-passes)
under each Jetson power mode and print J/sample and s/sample per mode, with the meter's source
(energy from the estimate meter is labelled ESTIMATED: a model of CPU energy, not a measurement).

Switching modes (nvpmodel -m, root) happens only with --allow-power-mode; without it the current
mode alone is profiled and the report says so. The original mode is restored afterwards, also after
Ctrl-C. The modes come from /etc/nvpmodel.conf (under $FMTL_EDGE_SYSFS_ROOT), the command from
$FMTL_EDGE_NVPMODEL or nvpmodel on the PATH.

examples:
  fmtl-edge profile-modes                                   # the current mode only
  sudo fmtl-edge profile-modes --allow-power-mode --samples 4096
  sudo fmtl-edge profile-modes --allow-power-mode --modes MODE_15W,MODE_30W --workload conv --json
"""


def register(subparsers) -> None:
    """Add the ``info``, ``meter`` and ``profile-modes`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "info",
        help="device, accelerators, working energy meters, power mode, budgets, native kernels",
        description=INFO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--profile", help="device profile TOML file or device class (default: detected / $FMTL_EDGE_PROFILE)")
    p.add_argument("--sysfs-root", help=f"read /sys and /etc files under this root (default: ${ENV_ROOT} or /)")
    p.set_defaults(func=cmd_info)

    m = subparsers.add_parser(
        "meter",
        help="run a command and print its time and energy per domain",
        description=METER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] -- CMD [ARG ...]",
    )
    m.add_argument("--json", action="store_true", help="print one JSON object to stdout (report on stderr suppressed)")
    m.add_argument("-o", "--output", help="also write the JSON object to this file")
    _meter_options(m, "/sys")
    # dest "cmd", not "command": the main parser's subparsers use dest="command"
    m.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run, after --")
    m.set_defaults(func=cmd_meter)

    pm = subparsers.add_parser(
        "profile-modes",
        help="J/sample and s/sample of a fixed training workload under each Jetson power mode",
        description=PROFILE_MODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pm.add_argument("--modes", default="all", help="all | NAME[,NAME...] (names or ids from nvpmodel.conf; default all)")
    pm.add_argument("--samples", type=int, default=2048, help="metered sample-passes per mode (default 2048)")
    pm.add_argument("--allow-power-mode", action="store_true",
                    help="allow switching the power mode with nvpmodel -m (needs root); restored afterwards")
    pm.add_argument("--workload", default="mlp", choices=("mlp", "conv"), help="mlp (HAR-sized) or conv (UTKFace-sized)")
    pm.add_argument("--batch-size", type=int, default=32, help="batch size of the workload (default 32)")
    pm.add_argument("--device", help="torch device: cpu | cuda (default: cuda when available)")
    pm.add_argument("--warmup-samples", type=int, default=64, help="unmetered sample-passes before each window (default 64)")
    pm.add_argument("--settle-s", type=float, default=1.0, help="seconds to wait after a mode switch (default 1)")
    pm.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pm.add_argument("-o", "--output", help="also write the JSON object to this file")
    _meter_options(pm, "/sys and /etc")
    pm.set_defaults(func=cmd_profile_modes)


def _meter_options(p: argparse.ArgumentParser, reads: str) -> None:
    """The meter options ``meter`` and ``profile-modes`` share (backend, profile, rates, sysfs root)."""
    p.add_argument("--backend", choices=("auto",) + BACKENDS, help="meter backend (default: the profile's, usually auto)")
    p.add_argument("--profile", help="device profile TOML file or device class (default: detected / $FMTL_EDGE_PROFILE)")
    p.add_argument("--sample-hz", type=float, help="sampling rate of integrating meters (default: profile, 50)")
    p.add_argument("--power-w", type=float, help="estimate backend: W per busy core (default: profile)")
    p.add_argument("--idle-w", type=float, help="estimate backend: W charged per wall second (default: profile)")
    p.add_argument("--sysfs-root", help=f"read {reads} under this root (default: ${ENV_ROOT} or /)")


def _write_json(args: argparse.Namespace, obj: dict) -> bool:
    """``-o FILE`` writes ``obj`` there; ``--json`` prints it to stdout. True when it was printed
    (the caller then prints no table)."""
    if args.output:
        with open(args.output, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    if args.json:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    return bool(args.json)


# ---- meter ---------------------------------------------------------------------------------------


class _NotStarted(Exception):
    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc


def _eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def _meter_from_args(args) -> Any:
    from .profile import load_profile

    profile = load_profile(args.profile, sysfs_root=args.sysfs_root)
    kw = profile.meter_kwargs()
    for k in ("sample_hz", "power_w", "idle_w", "sysfs_root"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return make_meter(args.backend or profile.meter, **kw)


def _run(cmd: list[str]) -> int:
    """Run ``cmd``; its exit code (128+N for signal N). 127/126 when it cannot start, raised as
    :class:`_NotStarted` so no energy is reported for a command that never ran."""
    try:
        p = subprocess.Popen(cmd)
    except FileNotFoundError:
        raise _NotStarted(127, f"command not found: {cmd[0]}") from None
    except PermissionError:
        raise _NotStarted(126, f"permission denied: {cmd[0]}") from None
    except OSError as exc:  # not an executable format, ...
        raise _NotStarted(126, f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
    while True:
        try:
            rc = p.wait()
            break
        except KeyboardInterrupt:  # the terminal sent SIGINT to the child too; wait for it to finish
            try:
                p.send_signal(signal.SIGINT)
            except OSError:
                pass
    return 128 - rc if rc < 0 else rc


def format_measurement(m, title: str = "") -> str:
    """The human-readable report of a Measurement (used by ``meter``)."""
    lines = []
    if title:
        lines.append(title)
    if m.total_j is None:
        lines.append(f"energy: unknown (scope {m.total_scope}) — source {m.source}")
    else:
        how = "estimated" if m.estimated else "measured"
        p = f", mean {m.total_j / m.wall_s:.2f} W" if m.wall_s > 0 else ""
        lines.append(f"energy: {m.total_j:.3f} J {how}, scope {m.total_scope}{p} — source {m.source}")
    if m.domains:
        w = max(8, max(len(d.domain) for d in m.domains))
        lines.append(f"  {'domain':<{w}}  {'joules':>12}  {'mean W':>9}  {'method':<10}  {'scope':<12}  total")
        for d in m.domains:
            mw = f"{d.joules / m.wall_s:9.3f}" if m.wall_s > 0 else f"{'-':>9}"
            lines.append(
                f"  {d.domain:<{w}}  {d.joules:12.3f}  {mw}  {d.method:<10}  {d.scope:<12}  {'yes' if d.in_total else 'no'}"
            )
    if m.sample_hz:
        lines.append(f"sampling: {m.sample_hz:g} Hz")
    if m.power_mode:
        lines.append(f"power mode: {m.power_mode}")
    for wmsg in m.warnings:
        lines.append(f"warning: {wmsg}")
    return "\n".join(lines)


def cmd_meter(args) -> int:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        _eprint("fmtl-edge meter: no command given (usage: fmtl-edge meter [options] -- CMD [ARG ...])")
        return 2
    try:
        meter = _meter_from_args(args)
    except (MeterUnavailable, ValueError, TypeError, FileNotFoundError) as exc:
        _eprint(f"fmtl-edge meter: {exc}")
        return 2
    try:
        with meter.window("command") as win:
            rc = _run(cmd)
    except _NotStarted as exc:  # nothing ran: no time or energy to report
        _eprint(f"fmtl-edge meter: {exc}; nothing was measured")
        return exc.rc
    finally:
        meter.close()
    meas = win.measurement
    obj = meas.to_dict()
    obj["command"] = cmd
    obj["exit_code"] = rc
    obj["backend"] = meter.backend
    if not _write_json(args, obj):
        title = f"fmtl-edge meter: `{shlex.join(cmd)}` exited {rc} after {meas.wall_s:.3f} s ({meter.backend} meter)"
        _eprint(format_measurement(meas, title))
    return rc


# ---- profile-modes -------------------------------------------------------------------------------


def cmd_profile_modes(args) -> int:
    from .power_modes import PowerModeControl, PowerModeError
    from .profile_modes import format_report, profile_modes

    if args.samples < 1:
        _eprint("fmtl-edge profile-modes: --samples must be >= 1")
        return 2
    device = args.device
    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # pragma: no cover - torch is a dependency
            device = "cpu"
    modes = None if args.modes.strip().lower() == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        meter = _meter_from_args(args)
    except (MeterUnavailable, ValueError, TypeError, FileNotFoundError) as exc:
        _eprint(f"fmtl-edge profile-modes: {exc}")
        return 2
    control = PowerModeControl(allow=args.allow_power_mode, sysfs_root=args.sysfs_root, log=_eprint)
    try:
        rep = profile_modes(meter, control, modes, args.samples, workload=args.workload, batch_size=args.batch_size,
                            device=device, warmup_samples=args.warmup_samples, settle_s=args.settle_s, log=_eprint)
    except (PowerModeError, ValueError) as exc:
        _eprint(f"fmtl-edge profile-modes: {exc}")
        return 2
    finally:
        meter.close()
    if not _write_json(args, rep.to_dict()):
        print(format_report(rep), flush=True)
    return 0


# ---- info ----------------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _accelerators() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append(
                    {"via": "torch.cuda", "index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                     "capability": f"{p.major}.{p.minor}"}
                )
        else:
            out.append({"via": "torch.cuda", "available": False, "torch": torch.__version__,
                        "cuda_build": torch.version.cuda})
    except Exception as exc:  # torch missing or broken: say so, do not fail `info`
        out.append({"via": "torch.cuda", "available": False, "error": f"{type(exc).__name__}: {exc}"})
    return out


def _kernels_info() -> dict[str, Any]:
    try:
        from fmtl_edge import _kernels  # type: ignore[attr-defined]
    except Exception as exc:
        from fmtl_edge.kernels import FIX

        return {"built": False, "mode": "python-reference", "error": f"{type(exc).__name__}: {exc}", "fix": FIX}
    info: dict[str, Any] = {"built": True, "mode": "native", "version": getattr(_kernels, "__version__", None)}
    info["cuda_compiled"] = bool(getattr(_kernels, "cuda_compiled", False))
    fn = getattr(_kernels, "cuda_available", None)
    if callable(fn):
        try:
            info["cuda_available"] = bool(fn())
        except Exception as exc:
            info["cuda_available"] = False
            info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    else:
        info["cuda_available"] = None
    return info


def collect_info(profile: str | None = None, sysfs_root: str | None = None) -> dict[str, Any]:
    """Everything ``fmtl-edge info`` prints, as a JSON-able dict."""
    from .jetson import nvpmodel_mode, tegra_release
    from .profile import detect_device_class, device_model, load_profile

    sysfs = Sysfs(sysfs_root)
    info: dict[str, Any] = {}
    info["device"] = {
        "host": socket.gethostname(),
        "model": device_model(sysfs),
        "device_class": detect_device_class(sysfs),
        "l4t": tegra_release(sysfs),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _mem_total_bytes(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "sysfs_root": str(sysfs.root),
    }
    info["accelerators"] = _accelerators()
    opts = {"sysfs_root": sysfs_root} if sysfs_root else {}
    probes = probe_all(**opts)
    info["meters"] = [p.to_dict() for p in probes]
    chosen: dict[str, Any] = {}
    try:
        m = make_meter("auto", **opts)
        chosen = m.describe()
        m.close()
    except Exception as exc:  # pragma: no cover - auto always has estimate
        chosen = {"error": str(exc)}
    info["auto_meter"] = chosen
    info["power_mode"] = chosen.get("power_mode") or nvpmodel_mode(sysfs)
    from .power_modes import PowerModeError, read_nvpmodel_conf

    try:
        conf = read_nvpmodel_conf(sysfs)
        info["power_modes"] = [m.to_dict() for m in conf.modes] if conf is not None else []
    except PowerModeError as exc:
        info["power_modes"] = [{"error": str(exc)}]
    try:
        prof = load_profile(profile, sysfs_root=sysfs_root)
        info["profile"] = prof.to_dict()
    except Exception as exc:
        info["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    info["kernels"] = _kernels_info()
    return info


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unset"
    return f"{n / 2**30:.2f} GiB"


def format_info(info: dict[str, Any]) -> str:
    d = info["device"]
    lines = [
        f"device: {d.get('model') or d.get('cpu') or 'unknown'} ({d['device_class']}) on {d['host']}",
        f"  cpu: {d.get('cpu')} x{d.get('cpu_count')}, memory {_fmt_bytes(d.get('memory_bytes'))}, {d['machine']}, python {d['python']}",
    ]
    if d.get("l4t"):
        lines.append(f"  jetson: {d['l4t']}")
    if d["sysfs_root"] != "/":
        lines.append(f"  sysfs root: {d['sysfs_root']} (redirected)")
    lines.append("accelerators:")
    for a in info["accelerators"]:
        if a.get("name"):
            lines.append(f"  cuda:{a['index']} {a['name']} ({_fmt_bytes(a['memory_bytes'])}, sm {a['capability']})")
        else:
            why = a.get("error") or f"torch {a.get('torch')} (CUDA build: {a.get('cuda_build')}) sees no CUDA device"
            lines.append(f"  none: {why}")
    lines.append("energy meters:")
    for p in info["meters"]:
        lines.append(f"  {p['backend']:<9} {'ok ' if p['ok'] else 'no '} {p['reason']}")
    am = info["auto_meter"]
    if "backend" in am:
        lines.append(f"  auto -> {am['backend']} ({am['source']}), total scope {am['total_scope']}"
                     + (", estimated" if am.get("estimated") else ""))
        for wmsg in am.get("warnings", []):
            lines.append(f"    warning: {wmsg}")
    lines.append(f"power mode: {info.get('power_mode') or 'unknown'}")
    modes = [m.get("name") for m in info.get("power_modes", []) if m.get("name")]
    if modes:
        lines.append(f"  power modes (nvpmodel.conf): {', '.join(modes)}; switch them only with --allow-power-mode")
    prof = info["profile"]
    if "error" in prof:
        lines.append(f"profile: error: {prof['error']}")
    else:
        lines.append(f"profile: {prof['name']} ({prof['device_class']}, from {prof['source']})")
        lines.append(f"  memory budget: {_fmt_bytes(prof['memory_budget_bytes'])}")
        rt, re_ = prof["round_time_s"], prof["round_energy_j"]
        lines.append(f"  round time budget: {'unset' if rt is None else f'{rt:g} s'}")
        lines.append(f"  round energy budget: {'unset' if re_ is None else f'{re_:g} J'}")
        lines.append(f"  meter: {prof['meter']} (sample {prof['sample_hz']:g} Hz, estimate {prof['power_w']:g} W/core)")
    k = info["kernels"]
    if k.get("built"):
        cuda = "CUDA compiled" if k.get("cuda_compiled") else "CPU only (no CUDA part compiled)"
        if k.get("cuda_compiled"):
            cuda += ", CUDA device available" if k.get("cuda_available") else ", no CUDA device at run time"
        lines.append(f"native kernels: native{' ' + str(k['version']) if k.get('version') else ''}, {cuda}")
    else:
        lines.append(f"native kernels: not built ({k.get('error')}): python-reference (slow) in use")
        lines.append(f"  fix: {k.get('fix')}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    info = collect_info(getattr(args, "profile", None), getattr(args, "sysfs_root", None))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m fmtl_edge.runtime.cli info``) for use without the main CLI."""
    parser = argparse.ArgumentParser(prog="fmtl-edge")
    sub = parser.add_subparsers(dest="command_name", metavar="command")
    register(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
