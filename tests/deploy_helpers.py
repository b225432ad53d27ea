"""Helpers for tests of the deployment (moved here from the library): certificates, server and agent processes.

Not used by the runtime itself. :func:`self_signed_cert` needs the ``cryptography`` package (the
``test`` extra).
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


def self_signed_cert(folder: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                     name: str = "fmtl-test", ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.crt``/``<name>.key`` (EC P-256) for ``hosts``; self-signed, or signed by
    ``ca = (cert, key)``. Returns (cert path, key path)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if ca is not None:
        ca_cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
        ca_key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), None)
        issuer = ca_cert.subject
    else:
        ca_key, issuer = key, subject
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = _dt.datetime.now(_dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
         .not_valid_after(now + _dt.timedelta(days=2)))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    b = b.add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    crt, kp = folder / f"{name}.crt", folder / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    os.chmod(kp, 0o600)
    return crt, kp


#: the ``[server]`` table of the loopback deployment tests' job.toml (state, results and tokens in
#: the test's folder; a fast heartbeat so a killed agent is noticed within seconds)
SERVER_TABLE = """
[server]
state_dir = "state"
out = "out"
tokens = "tokens.txt"
heartbeat_interval_s = 0.3
heartbeat_timeout_s = 2.5
"""


def python_path() -> str:
    """A PYTHONPATH under which child processes import the same fmtl_edge and fmtl_server as this one."""
    import fmtl_edge

    paths = [str(Path(fmtl_edge.__file__).resolve().parent.parent)]
    try:
        import fmtl_server

        paths.append(str(Path(fmtl_server.__file__).resolve().parent.parent))
    except ImportError:
        pass
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(dict.fromkeys(paths + ([old] if old else [])))


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, args: Sequence[str], log: Path, env: dict | None = None, cwd: str | Path | None = None):
        self.args = list(args)
        self.log_path = Path(log)
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = python_path()
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        self.p = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait(self, timeout: float) -> int:
        return self.p.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._log.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def server_cmd(config: Path, listen: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fmtl_server", "serve", "--config", str(config), "--listen", listen, *extra]


def agent_cmd(server: str, data: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fmtl_edge.cli", "join", "--server", server, "--data", data, *extra]


def wait_until(cond: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = (), poll: float = 0.2) -> None:
    """Poll ``cond`` until true; on timeout raise AssertionError with the processes' log tails."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(poll)
    tails = "\n".join(f"--- {p.log_path.name} ---\n" + p.text()[-3000:] for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM (peak resident set) of a running process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class LoopbackDeployment:
    """What every real-process deployment test shares: its processes (``self.procs``, killed by
    :meth:`close`), the server's ``out/results.json`` and its job table, under ``self.tmp``.
    Subclasses write the job file and start the server and agents."""

    tmp: Path
    procs: list[Proc]

    def results(self, timeout: float = 150) -> dict:
        import json

        res = self.tmp / "out" / "results.json"
        wait_until(lambda: res.is_file(), timeout, "results.json", self.procs)
        return json.loads(res.read_text())

    def job_rows(self) -> list[tuple]:
        """``(job, completed_round, done)`` rows of the server's state database (read-only; [] before it exists)."""
        import sqlite3

        db = self.tmp / "state" / "state.db"
        if not db.is_file():
            return []
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute("SELECT job, completed_round, done FROM jobs").fetchall()
        except sqlite3.Error:
            return []

    def close(self) -> None:
        for p in self.procs:
            p.kill()


def deployment_fixture(cls):
    """A pytest fixture ``deployment(**kw)`` making ``cls(tmp_path, **kw)`` and closing every one made."""
    import pytest

    @pytest.fixture
    def deployment(tmp_path):
        made = []

        def make(**kw):
            d = cls(tmp_path, **kw)
            made.append(d)
            return d

        yield make
        for d in made:
            d.close()

    return deployment
