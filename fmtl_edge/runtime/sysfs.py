"""One redirectable root for every read of ``/sys``, ``/etc/nv_tegra_release`` and friends.

Every meter reads the machine's files through a :class:`Sysfs` object. Its root is ``/`` unless the
environment variable ``FMTL_EDGE_SYSFS_ROOT`` (or the ``root`` argument) points somewhere else, so
tests build a fake Jetson / RAPL tree in a temporary directory and the very same code reads it.

Paths are always written as the machine sees them (``/sys/class/powercap/...``); they are what the
meters put into ``Measurement.source``, whatever the root. ``/proc/self`` is never redirected (it
describes this process, not the device).
"""

from __future__ import annotations

import glob as _glob
import os
from pathlib import Path

ENV_ROOT = "FMTL_EDGE_SYSFS_ROOT"


def default_root() -> Path:
    """The root from ``FMTL_EDGE_SYSFS_ROOT`` (read at call time), else ``/``."""
    return Path(os.environ.get(ENV_ROOT) or "/")


class Sysfs:
    """Reads files of the device under a root (``/`` on a real machine, a fake tree in tests)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    @property
    def redirected(self) -> bool:
        """True when the root is not the real ``/`` (a fake tree)."""
        return self.root.resolve() != Path("/")

    def path(self, logical: str) -> Path:
        """The real file behind a logical path such as ``/sys/class/powercap``."""
        return self.root / logical.lstrip("/")

    def exists(self, logical: str) -> bool:
        return self.path(logical).exists()

    def read_text(self, logical: str) -> str:
        """The file's text, stripped of surrounding whitespace and NUL bytes (device-tree strings).

        Raises OSError (FileNotFoundError, PermissionError, ...) as the OS does.
        """
        with open(self.path(logical), "rb") as f:
            data = f.read()
        return data.decode("utf-8", errors="replace").strip().strip("\x00").strip()

    def read_int(self, logical: str) -> int:
        """The file's content as an integer (raises ValueError on garbage)."""
        return int(self.read_text(logical).split()[0])

    def try_read_text(self, logical: str) -> str | None:
        try:
            return self.read_text(logical)
        except (OSError, UnicodeError):
            return None

    def glob(self, pattern: str) -> list[str]:
        """Logical paths matching a glob pattern, sorted naturally (``hwmon10`` after ``hwmon9``)."""
        root = str(self.root).rstrip("/")
        hits = _glob.glob(str(self.path(pattern)))
        out = []
        for h in hits:
            rel = h[len(root):] if root else h
            out.append("/" + rel.lstrip("/"))
        return sorted(out, key=natural_key)

    def open_fd(self, logical: str) -> int:
        """An O_RDONLY file descriptor for fast re-reading with :func:`pread_text`."""
        return os.open(self.path(logical), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def pread_text(fd: int, size: int = 64) -> str:
    """Re-read a sysfs attribute from offset 0 (sysfs regenerates the value on every read at 0)."""
    return os.pread(fd, size, 0).decode("ascii", errors="replace").strip()


def natural_key(s: str) -> list:
    """Sort key that orders embedded numbers numerically (``in2`` < ``in10``)."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
