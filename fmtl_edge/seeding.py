"""Seeds derived from names: every random draw of a run (model init, client sampling, batch order,
dropout, replacements) is seeded by the run seed and the names of where it happens, so a resumed or
re-run round draws the same numbers whichever process (simulation, server, device) makes it."""

from __future__ import annotations

import zlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from strings/ints: CRC-32 of ``"/".join(parts)`` (independent of
    Python's hash randomisation and of the process).

    Example: ``derive_seed(seed, job, round)`` seeds the client sampling of a round.
    """
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
