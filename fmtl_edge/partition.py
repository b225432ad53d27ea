"""Parameter scopes and the flat slice layout used for aggregation.

Every floating-point tensor of a model's state (parameters and BatchNorm running statistics) gets a
*scope* that says over which clients it is averaged (docs/design.md §3, "layered"):

=============== ==================================================================================
``frozen``      pre-trained, never trained nor averaged (left as it is)
``common``      averaged over every client of the round (the shared backbone θ_s)
``task:<name>`` averaged over the round's clients that trained task ``<name>`` (the task head θ_i)
``personal``    never leaves the client; the server keeps its own copy unchanged
=============== ==================================================================================

A :class:`ParameterLayout` lays the tensors end to end in one float32 vector of ``n_params`` elements;
each tensor is a slice ``(offset, length)``. The aggregation kernels
(:func:`fmtl_edge.aggregation.weighted_average_slices`, :class:`fmtl_edge.aggregation.Accumulator`)
work on that vector, a slice table ``(S, 2)`` int64 and a contribution mask ``(S, K)`` bool.
Integer buffers (``num_batches_tracked``) are not part of the layout: they stay local.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

FROZEN = "frozen"
COMMON = "common"
PERSONAL = "personal"
TASK_PREFIX = "task:"


def task_scope(task: str) -> str:
    """The scope string of task ``task``'s parameters, ``task:<task>``."""
    return TASK_PREFIX + task


def default_scope(name: str) -> str:
    """Scope implied by a :class:`~fmtl_edge.models.MultiTaskModel` state name:
    ``heads.<task>.*`` → ``task:<task>``, everything else → ``common``."""
    if name.startswith("heads."):
        return task_scope(name.split(".", 2)[1])
    return COMMON


@dataclass(frozen=True)
class ParamSlice:
    """One tensor of the model state inside the flat vector.

    Attributes:
        name: state-dict key.
        offset, length: position in the flat float32 vector (elements, not bytes).
        shape: the tensor's shape.
        scope: ``frozen | common | task:<name> | personal``.
    """

    name: str
    offset: int
    length: int
    shape: tuple[int, ...]
    scope: str


class ParameterLayout:
    """Flat float32 layout of a model's floating-point state with one scope per tensor.

    Args:
        entries: ``(name, shape, scope)`` in order.

    Raises:
        ValueError: duplicate names or an unknown scope.
    """

    def __init__(self, entries: Iterable[tuple[str, Sequence[int], str]]):
        slices: list[ParamSlice] = []
        offset = 0
        seen: set[str] = set()
        for name, shape, scope in entries:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r} in layout")
            seen.add(name)
            if scope not in (FROZEN, COMMON, PERSONAL) and not (
                scope.startswith(TASK_PREFIX) and len(scope) > len(TASK_PREFIX)
            ):
                raise ValueError(
                    f"tensor {name!r}: scope {scope!r} is not frozen | common | task:<name> | personal"
                )
            length = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
            slices.append(ParamSlice(name, offset, length, tuple(int(s) for s in shape), scope))
            offset += length
        self.slices: tuple[ParamSlice, ...] = tuple(slices)
        self.n_params: int = offset
        self._by_name = {s.name: s for s in self.slices}
        self.table: np.ndarray = np.array(
            [(s.offset, s.length) for s in self.slices], dtype=np.int64
        ).reshape(-1, 2)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_state(
        cls,
        state: Mapping[str, torch.Tensor | np.ndarray],
        frozen: Sequence[str] = (),
        personal: Sequence[str] = (),
        common: Sequence[str] = (),
    ) -> "ParameterLayout":
        """Layout of the floating-point entries of ``state``, in its order.

        ``frozen``, ``personal`` and ``common`` are ``fnmatch`` patterns over names
        (``"backbone.layers.0.*"``) that override :func:`default_scope` (a head made ``common`` is
        averaged over every client, not only its task's).

        Raises:
            ValueError: a name matches patterns of two kinds.
        """
        entries = []
        kinds = ((FROZEN, frozen), (PERSONAL, personal), (COMMON, common))
        for name, t in state.items():
            if not _is_float(t):
                continue
            scope = default_scope(name)
            hits = [k for k, pats in kinds if any(fnmatch.fnmatchcase(name, p) for p in pats)]
            if len(hits) > 1:
                raise ValueError(f"tensor {name!r} matches both a {hits[0]} and a {hits[1]} pattern")
            if hits:
                scope = hits[0]
            entries.append((name, tuple(t.shape), scope))
        return cls(entries)

    @classmethod
    def from_model(cls, model: nn.Module, frozen: Sequence[str] = (), personal: Sequence[str] = ()) -> "ParameterLayout":
        """Layout of ``model.state_dict()`` (see :meth:`from_state`)."""
        return cls.from_state(model.state_dict(), frozen, personal)

    # -- queries -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slices)

    def __getitem__(self, name: str) -> ParamSlice:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.slices)

    def scopes(self) -> tuple[str, ...]:
        return tuple(s.scope for s in self.slices)

    def names_in(self, scope: str) -> tuple[str, ...]:
        """Names of the tensors of ``scope`` (``frozen``, ``personal``, ``common``, ``task:<t>``)."""
        return tuple(s.name for s in self.slices if s.scope == scope)

    def contributes(self, client_tasks: Sequence[str]) -> np.ndarray:
        """``(S,)`` bool: which slices a client that trained ``client_tasks`` contributes to —
        ``common`` always, ``task:<t>`` when ``t`` is among its tasks, never ``frozen``/``personal``."""
        tasks = set(client_tasks)
        out = np.zeros(len(self.slices), dtype=bool)
        for i, s in enumerate(self.slices):
            if s.scope == COMMON:
                out[i] = True
            elif s.scope.startswith(TASK_PREFIX):
                out[i] = s.scope[len(TASK_PREFIX):] in tasks
        return out

    def contribution_mask(self, clients_tasks: Sequence[Sequence[str]]) -> np.ndarray:
        """``(S, K)`` bool mask for K clients, column k = :meth:`contributes` of client k."""
        if not clients_tasks:
            return np.zeros((len(self.slices), 0), dtype=bool)
        return np.stack([self.contributes(t) for t in clients_tasks], axis=1)

    # -- conversion --------------------------------------------------------------------------
    def flatten(self, state: Mapping[str, torch.Tensor | np.ndarray], out: np.ndarray | None = None,
                only_present: bool = False) -> np.ndarray:
        """Lay ``state``'s tensors into a ``(n_params,)`` float32 vector.

        Args:
            only_present: skip the tensors ``state`` lacks, except ``common``/``task`` ones (an
                update without its personal and frozen tensors), leaving those slices of ``out``
                as they are.

        Raises:
            KeyError: a layout tensor is missing from ``state``.
            ValueError: a tensor's shape differs from the layout's.
        """
        vec = np.empty(self.n_params, dtype=np.float32) if out is None else out
        for s in self.slices:
            if s.name not in state:
                if only_present and s.scope in (FROZEN, PERSONAL):
                    continue
                raise KeyError(f"state has no tensor {s.name!r} (expected by the model layout)")
            t = state[s.name]
            arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if tuple(arr.shape) != s.shape:
                raise ValueError(f"tensor {s.name!r} has shape {tuple(arr.shape)}, layout expects {s.shape}")
            vec[s.offset : s.offset + s.length] = arr.reshape(-1)
        return vec

    def unflatten(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector back into ``name → float32 array`` views (no copy)."""
        if vec.shape != (self.n_params,):
            raise ValueError(f"vector has shape {vec.shape}, layout has {self.n_params} params")
        return {s.name: vec[s.offset : s.offset + s.length].reshape(s.shape) for s in self.slices}


def _is_float(t: torch.Tensor | np.ndarray) -> bool:
    if isinstance(t, torch.Tensor):
        return t.is_floating_point()
    return np.issubdtype(np.asarray(t).dtype, np.floating)


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``name → tensor`` → ``name → float32/int64 NumPy array`` (copies, CPU)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def select_state(state: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """The backbone plus the heads of ``tasks`` from a multi-task state (MAS split init)."""
    keep = set(tasks)
    out = {}
    for k, v in state.items():
        if k.startswith("heads."):
            if k.split(".", 2)[1] in keep:
                out[k] = v
        else:
            out[k] = v
    return out
