"""The names the whole system uses for a model's tensors and a client's kept layers (no torch).

A multi-task model's state names are ``backbone.*`` (the shared backbone θ_s) and
``heads.<task>.*`` (task t's head θ_t); :mod:`fmtl_edge.partition` turns them into aggregation
scopes. A client's state (:mod:`fmtl_edge.client_state`) keeps its personal layers under
``layer:<state name>`` beside a procedure's own entries.
"""

from __future__ import annotations

#: prefix of the shared backbone's tensors
BACKBONE = "backbone."
#: prefix of every task head's tensors (``heads.<task>.``)
HEADS = "heads."
#: prefix of a personal layer's entry in a client's state (``layer:heads.age.fc.weight``)
LAYER_PREFIX = "layer:"


def head_prefix(task: str) -> str:
    """``heads.<task>.``: the prefix of task ``task``'s head tensors."""
    return f"{HEADS}{task}."
