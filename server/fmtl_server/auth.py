"""Per-device bearer tokens.

The tokens file holds one line per device: ``NAME ROLE sha256:HEX [clients=ID,ID...]`` (``ROLE`` is
``device`` or ``admin``; ``clients=`` limits the client ids of the partition the token may serve, and
lets it take over a client first registered by another device); only the SHA-256 of a token is stored, the token itself is printed once by
``fmtl-server token add``. The file is re-read when it changes, so devices can be added (or
revoked, by deleting their line) while the server runs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from pathlib import Path

from fmtl_edge.transport.service import Identity

ROLES = ("device", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class TokenError(ValueError):
    """A malformed tokens file or request (the message names the line or value)."""


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, where: str = "tokens file") -> dict[str, tuple[str, str, frozenset[int] | None]]:
    """``hash → (name, role, clients or None)`` from a tokens file's text.

    Raises:
        TokenError: a line that is not ``NAME ROLE sha256:HEX [clients=ID,...]``, or a name given twice.
    """
    out: dict[str, tuple[str, str, frozenset[int] | None]] = {}
    names: set[str] = set()
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        clients = None
        if len(parts) == 4 and re.fullmatch(r"clients=\d{1,9}(,\d{1,9})*", parts[3]):
            clients = frozenset(int(c) for c in parts[3][len("clients="):].split(","))
            parts = parts[:3]
        if len(parts) != 3 or not _NAME.match(parts[0]) or parts[1] not in ROLES or not re.fullmatch(r"sha256:[0-9a-f]{64}", parts[2]):
            raise TokenError(f"{where}:{i}: expected 'NAME ROLE sha256:HEX [clients=ID,...]' (ROLE device|admin), "
                             f"got {line!r}")
        if parts[0] in names:
            raise TokenError(f"{where}:{i}: device {parts[0]!r} has a second line; one token per device")
        names.add(parts[0])
        out[parts[2]] = (parts[0], parts[1], clients)
    return out


def add_token(path: str | Path, name: str, role: str = "device") -> str:
    """Append a fresh token for ``name`` to the tokens file (made or left 0600: owner read/write only)
    and return it.

    Raises:
        TokenError: bad name or role, or ``name`` already has a token.
    """
    if not _NAME.match(name):
        raise TokenError(f"device name {name!r}: use 1-64 letters, digits, '_', '-', '.', '@'")
    if role not in ROLES:
        raise TokenError(f"role must be one of {ROLES}, got {role!r}")
    p = Path(path)
    existing = parse_tokens(p.read_text(), str(p)) if p.exists() else {}
    if any(n == name for n, *_ in existing.values()):
        raise TokenError(f"{name!r} already has a token in {p}; delete its line to revoke it first")
    token = secrets.token_urlsafe(32)
    while not token[0].isalnum():  # a leading '-' would read as an option on a command line
        token = secrets.token_urlsafe(32)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # an existing file made with looser permissions is tightened too
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} {role} {hash_token(token)}\n")
    return token


class TokenFile:
    """Checks bearer tokens against a tokens file, re-read when it changes (modification time, size
    or inode).

    Fails closed: when the file is missing, unreadable or has a malformed line, *every* token is
    refused (a revoked token must never keep working because the file broke) and :attr:`error`
    says why; the servicer reports it with each refusal. It works again as soon as the file is fixed.

    Raises (constructor):
        FileNotFoundError, TokenError: the file is missing or malformed at start.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._sig: tuple | None = None
        self._table: dict[str, tuple[str, str, frozenset[int] | None]] = {}
        #: why every token is refused now (None: the file is good)
        self.error: str | None = None
        self.reload()

    def reload(self) -> None:
        """Raises TokenError (bad file) or FileNotFoundError."""
        st = self.path.stat()
        table = parse_tokens(self.path.read_text(), str(self.path))
        with self._lock:
            self._table, self._sig, self.error = table, (st.st_mtime_ns, st.st_size, st.st_ino), None

    def __len__(self) -> int:
        return len(self._table)

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != self._sig or self.error is not None:
                self.reload()
        except FileNotFoundError:
            self._fail(f"the tokens file {self.path} is missing (restore it, or create it with "
                       f"`fmtl-server token add NAME --tokens {self.path}`)")
        except TokenError as e:
            self._fail(f"the tokens file is malformed: {e} (fix or delete that line)")
        except (OSError, UnicodeDecodeError) as e:
            self._fail(f"the tokens file {self.path} cannot be read: {e}")

    def _fail(self, why: str) -> None:
        with self._lock:
            self._table, self._sig, self.error = {}, None, why

    def __call__(self, token: str) -> Identity | None:
        self._refresh()
        h = hash_token(token)
        with self._lock:
            for k, (name, role, clients) in self._table.items():
                if hmac.compare_digest(k, h):
                    return Identity(name, role, clients)
        return None
