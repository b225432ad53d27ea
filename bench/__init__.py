"""Benchmarks (not timed tests), run from the repository root: ``python -m bench.<name>``
(``python -m bench.kernels``, ``python -m bench.threads``...).

They measure the *installed* package (``pip install .``: the compiled ``fmtl_edge._kernels``), not
the source tree: a checkout has no compiled module, and Python started from the repository root
would import the checkout's ``fmtl_edge`` first. So importing this package takes the checkout off
``sys.path`` when an installed fmtl-edge can be found there without it; without an installed
package the source tree stays (its kernels run their Python references, and fmtl-edge warns).
Subprocesses started by a benchmark get :func:`pythonpath` for the same choice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

#: the repository root (the benchmarks read its tests/ helpers and examples/)
ROOT = Path(__file__).resolve().parents[1]


def _is_checkout(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() in (ROOT, ROOT / "server")
    except OSError:
        return False


def _prefer_installed() -> bool:
    """Drop the checkout from ``sys.path`` if fmtl_edge is installed elsewhere; True when it is."""
    if "fmtl_edge" in sys.modules:
        return not Path(sys.modules["fmtl_edge"].__file__).resolve().is_relative_to(ROOT)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _is_checkout(p)]
    spec = importlib.util.find_spec("fmtl_edge")
    if spec is None or spec.origin is None:  # none, or a bare folder (e.g. only a copied _kernels*.so)
        sys.path[:] = saved + [str(ROOT / "server")]
        return False
    return True


#: whether the benchmarks import an installed fmtl-edge (False: the source tree)
INSTALLED = _prefer_installed()


def pythonpath() -> str:
    """``PYTHONPATH`` for a benchmark's subprocesses: the caller's, plus the checkout (and its
    ``server/``) only when fmtl-edge is not installed."""
    own = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return os.pathsep.join(own if INSTALLED else [str(ROOT), str(ROOT / "server"), *own])
