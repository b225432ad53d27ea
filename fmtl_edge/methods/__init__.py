"""Training methods (one module each) and their registry.

``make_method("mas-2", tasks, rounds=..., r0=...)`` parses a ``--methods`` entry. Known names:
``one-by-one``, ``all-in-one``, ``fedprox``, ``mas-<x>``.
"""

from __future__ import annotations

import re

from fmtl_edge.methods.all_in_one import AllInOne, FedProx
from fmtl_edge.methods.base import Method
from fmtl_edge.methods.mas import MAS
from fmtl_edge.methods.one_by_one import OneByOne
from fmtl_edge.tasks import TaskSet

METHOD_NAMES = ("one-by-one", "all-in-one", "fedprox", "mas-<x>")


def make_method(name: str, tasks: TaskSet, rounds: int, r0: int | None = None, fedprox_mu: float = 0.01) -> Method:
    """Build the method named by a ``--methods`` entry.

    Raises:
        ValueError: unknown name, or parameters the method cannot use (message says the fix).
    """
    name = name.strip()
    if name == "one-by-one":
        return OneByOne(tasks, rounds)
    if name == "all-in-one":
        return AllInOne(tasks, rounds)
    if name == "fedprox":
        return FedProx(tasks, rounds, mu=fedprox_mu)
    m = re.fullmatch(r"mas-(\d+)", name)
    if m:
        if r0 is None:
            raise ValueError(f"{name} needs r0 (rounds of the merge phase): pass --r0")
        return MAS(tasks, rounds, r0, int(m.group(1)))
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)} (e.g. mas-2)")


__all__ = ["AllInOne", "FedProx", "MAS", "METHOD_NAMES", "Method", "OneByOne", "make_method"]
