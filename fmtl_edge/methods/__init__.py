"""Training methods (one module each) and their registry.

``make_method("mas-2", tasks, cfg)`` parses a ``--methods`` entry: ``<name>`` or ``<name>-<arg>``
(``mas-2``: MAS with x = 2 groups) looked up in :data:`METHODS`. A new method is one module here and
one line in :data:`METHODS` (plus its client procedure in :mod:`fmtl_edge.procedures`, if new).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from fmtl_edge.methods.all_in_one import AllInOne
from fmtl_edge.methods.base import Method, Option
from fmtl_edge.methods.centralized import Centralized
from fmtl_edge.methods.ditto import Ditto
from fmtl_edge.methods.fedprox import FedProx
from fmtl_edge.methods.gradnorm import GradNorm
from fmtl_edge.methods.hoa import HOA
from fmtl_edge.methods.layered import Layered
from fmtl_edge.methods.local import Local
from fmtl_edge.methods.loop import Loop
from fmtl_edge.methods.mas import MAS
from fmtl_edge.methods.mas_auto import MASAuto
from fmtl_edge.methods.mas_oracle import MASOracle
from fmtl_edge.methods.one_by_one import OneByOne
from fmtl_edge.methods.tag import TAG
from fmtl_edge.tasks import TaskSet

#: ``--methods`` name (without its ``-<arg>``) → method class
METHODS: dict[str, type[Method]] = {
    "mas": MAS,
    "mas-auto": MASAuto,
    "mas-oracle": MASOracle,
    "all-in-one": AllInOne,
    "one-by-one": OneByOne,
    "fedprox": FedProx,
    "gradnorm": GradNorm,
    "tag": TAG,
    "hoa": HOA,
    "layered": Layered,
    "ditto": Ditto,
    "local": Local,
    "loop": Loop,
    "centralized": Centralized,
}

METHOD_NAMES = tuple(c.name for c in METHODS.values())


def method_options() -> dict[str, Option]:
    """Every registered method's :class:`~fmtl_edge.methods.base.Option`, by config key.

    Raises:
        RuntimeError: two methods declare one key.
    """
    out: dict[str, Option] = {}
    for cls in METHODS.values():
        for o in cls.OPTIONS:
            if o.name in out:
                raise RuntimeError(f"option {o.name!r} is declared by two methods")
            out[o.name] = o
    return out


def methods_help(width: int = 100, pooled: bool = True) -> str:
    """The ``--methods`` section of ``simulate --help``, from each method's ``summary``
    (``pooled=False``: without the references on pooled data, for ``fmtl-server serve --help``)."""
    import textwrap

    lines = []
    for cls in METHODS.values():
        if cls.pooled_data and not pooled:
            continue
        wrapped = textwrap.wrap(cls.summary, width - 15) or [""]
        lines.append(f"  {cls.name:<12} {wrapped[0]}")
        lines += [" " * 15 + w for w in wrapped[1:]]
    return "\n".join(lines)


def make_method(name: str, tasks: TaskSet, cfg: Any, pretrained: Mapping[str, np.ndarray] | None = None) -> Method:
    """Build the method named by a ``--methods`` entry from the run config
    (:class:`~fmtl_edge.config.SimulationConfig`).

    Args:
        pretrained: tensors of ``--pretrained`` (read by the caller), for the methods that use them.

    Raises:
        ValueError: unknown name, or settings the method cannot use (the message says the fix).
    """
    name = name.strip()
    base, arg = name, None
    if name not in METHODS:
        m = re.fullmatch(r"(.+?)-([^-]+)", name)
        if m and m.group(1) in METHODS:
            base, arg = m.group(1), m.group(2)
    cls = METHODS.get(base)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
    if cls is Layered:
        return Layered.from_config(arg, tasks, cfg, pretrained=pretrained)
    return cls.from_config(arg, tasks, cfg)


__all__ = ["METHODS", "METHOD_NAMES", "Method", "Option", "make_method", "method_options", "methods_help",
           *[c.__name__ for c in METHODS.values()]]
