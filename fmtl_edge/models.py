"""Multi-task models: a shared backbone θ_s and one task head θ_i per task.

``MultiTaskModel(spec, tasks, seed)`` maps an input batch to ``{task name: head output}``. Parameter
names are ``backbone.*`` (shared, scope ``common``) and ``heads.<task>.*`` (scope ``task:<task>``);
:mod:`fmtl_edge.partition` turns these names into aggregation slices.

The architecture is ``spec.model`` (``--model``): a built-in family (:mod:`fmtl_edge.backbones`:
``auto`` = the small conv for images ``(C, H, W)`` or the MLP for vectors ``(D,)``; ``conv``,
``mlp``, ``resnet``, ``mobilenet``) or the user's factory ``module:function`` /
``path/to/file.py:function``; every one is built through the model API of
:mod:`fmtl_edge.model_factory`, whose ``backbone`` and ``heads`` the model adopts. Every task of a
dataset shares the same backbone architecture, as MAS requires (Zhuang et al., "MAS: Towards
Resource-Efficient Federated Multiple-Task Learning", ICCV 2023, §3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fmtl_edge.model_factory import TaskInfo, build_network, validate_model
from fmtl_edge.tasks import Task, TaskSet

__all__ = ["ModelSpec", "MultiTaskModel", "TaskInfo", "validate_model", "StackedHead", "stacked_head_model",
           "state_signature", "signature_digest", "signature_difference",
           "stack_head_state"]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters (part of the run config; same for every task and method).

    Hashable (a cache key of :mod:`fmtl_edge.flops`).

    Attributes:
        input_shape: per-sample input shape, ``(C, H, W)`` or ``(D,)``.
        width: channels of the first conv stage (conv: the second has ``2*width``; resnet, mobilenet:
            see :mod:`fmtl_edge.backbones`) or the MLP hidden size (``4*max(width, 8)``).
        depth: conv blocks per stage (conv, resnet, mobilenet), or hidden layers − 1 of the MLP.
        model: ``auto`` (default), a built-in family (``conv``, ``mlp``, ``resnet``, ``mobilenet``)
            or a factory reference ``module:function`` / ``path/to/file.py:function``
            (:mod:`fmtl_edge.model_factory`).
        head_hidden: hidden units of the pooled heads of the built-in families (0: one linear layer).

    Raises:
        ValueError: a shape that is neither ``(C, H, W)`` nor ``(D,)``; width or depth < 1;
            head_hidden < 0; an empty model reference.
    """

    input_shape: tuple[int, ...]
    width: int = 16
    depth: int = 1
    model: str = "auto"
    head_hidden: int = 0

    def __post_init__(self) -> None:
        if len(self.input_shape) not in (1, 3):
            raise ValueError(
                f"input_shape {self.input_shape}: expected (C, H, W) for images or (D,) for vectors"
            )
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"model width and depth must be >= 1, got {self.width}, {self.depth}")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0 (0: linear heads), got {self.head_hidden}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a family name or module:function, got {self.model!r}")

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the work items and Flower messages that carry the job's model)."""
        return {"input_shape": [int(s) for s in self.input_shape], "width": int(self.width), "depth": int(self.depth),
                "model": self.model, "head_hidden": int(self.head_hidden)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """The spec of :meth:`to_dict` (absent fields take their defaults)."""
        return cls(tuple(int(s) for s in d["input_shape"]), width=int(d.get("width", 16)),
                   depth=int(d.get("depth", 1) or 1), model=str(d.get("model") or "auto"),
                   head_hidden=int(d.get("head_hidden", 0) or 0))


def state_signature(state: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """A model's signature: ``(name, shape, dtype)`` of every tensor of ``state`` (a state dict of
    torch tensors or NumPy arrays), sorted by name; dtypes in NumPy's spelling (``float32``)."""
    out = []
    for k in sorted(state):
        v = state[k]
        dtype = str(v.dtype).replace("torch.", "")
        out.append((str(k), tuple(int(n) for n in v.shape), dtype))
    return out


def signature_digest(signature: Sequence[tuple[str, tuple[int, ...], str]]) -> str:
    """SHA-256 (hex) of a :func:`state_signature`: two models with the same digest have the same
    tensor names, shapes and dtypes."""
    import hashlib

    return hashlib.sha256(repr(list(signature)).encode()).hexdigest()


def signature_difference(expected, got) -> str | None:
    """The first difference between two :func:`state_signature` s, in words, or None when equal."""
    a, b = dict((n, (s, d)) for n, s, d in expected), dict((n, (s, d)) for n, s, d in got)
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"tensor {name!r} {a[name][0]} {a[name][1]} is missing"
        if name not in a:
            return f"tensor {name!r} {b[name][0]} {b[name][1]} is not in the job's model"
        if a[name] != b[name]:
            return f"tensor {name!r}: the job's is {a[name][1]}{a[name][0]}, this device's {b[name][1]}{b[name][0]}"
    return None


class MultiTaskModel(nn.Module):
    """Shared backbone θ_s plus one head per task: ``forward(x) -> {task: output}``.

    Built by ``spec.model``'s factory (:func:`fmtl_edge.model_factory.build_network`); the model
    adopts the factory's ``backbone`` and ``heads`` (heads in task order).

    Args:
        spec: architecture; identical for every task and method so weights transfer between jobs.
        tasks: the tasks this model has heads for (a single-task model is the one-task case).
        seed: if given, parameters are initialised from ``torch.manual_seed(seed)`` so that two
            models built with the same seed and tasks are identical (the global RNG is restored
            afterwards). The built-in families build the backbone first, so its initial weights do
            not depend on which heads follow.

    Raises:
        fmtl_edge.model_factory.ModelError: (a ValueError) the factory fails or breaks the contract,
            e.g. a dense task on a vector input.
    """

    def __init__(self, spec: ModelSpec, tasks: TaskSet | Sequence[Task], seed: int | None = None):
        super().__init__()
        self.spec = spec
        self.tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
        gen_state = None
        if seed is not None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            backbone, heads = build_network(spec, self.tasks)
        finally:
            if gen_state is not None:
                torch.random.set_rng_state(gen_state)
        self.backbone = backbone
        self.heads = heads

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks.names

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        return self.forward_heads(f, tasks)

    def forward_heads(self, f: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Heads on already computed backbone features ``f``."""
        names = self.task_names if tasks is None else tasks
        return {n: self.heads[n](f) for n in names}

    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of θ_s (the backbone), in registration order."""
        return [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]


class StackedHead(nn.Module):
    """Loop Improvement's global-model head (Li et al. 2024, arXiv 2403.14371, §3.4, solution 2):
    every node's head for one task, stacked, feeding a small integrating network.

    ``forward(f)``: each node head maps the backbone features to ``(B, C, ...)`` (C = the task's
    ``out_dim``; ``...`` = H, W for a dense task); the N outputs are concatenated on the channel
    axis, ``(B, N·C, ...)``, and ``mix`` (a linear map N·C → C applied at every position: a 1×1
    convolution for dense tasks) gives ``(B, C, ...)``. Parameter names: ``nodes.<j>.*`` (node j's
    head, as it was on the node) and ``mix.weight`` ``(C, N·C)``, ``mix.bias`` ``(C,)``, float32.
    """

    def __init__(self, make_head_fn, n_nodes: int, out_dim: int):
        super().__init__()
        if n_nodes < 1:
            raise ValueError(f"a stacked head needs at least one node head, got {n_nodes}")
        self.nodes = nn.ModuleList(make_head_fn() for _ in range(int(n_nodes)))
        self.mix = nn.Linear(int(n_nodes) * int(out_dim), int(out_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = torch.cat([h(f) for h in self.nodes], dim=1)
        return self.mix(z.movedim(1, -1)).movedim(-1, 1)


def stacked_head_model(spec: ModelSpec, tasks: TaskSet | Sequence[Task], n_nodes: int) -> MultiTaskModel:
    """A :class:`MultiTaskModel` whose every head is a :class:`StackedHead` of ``n_nodes`` node heads
    (names ``heads.<task>.nodes.<j>.*``, ``heads.<task>.mix.*``); the backbone is unchanged. Every
    node head is a copy of the head ``spec.model``'s factory builds for the task (any family or
    user factory); :func:`stack_head_state` gives the stacked model's initial state.

    Raises:
        ValueError: ``n_nodes < 1``; the model cannot be built (a dense task on a vector input...).
    """
    model = MultiTaskModel(spec, tasks)
    for t in model.tasks:
        head = model.heads[t.name]
        model.heads[t.name] = StackedHead(lambda head=head: copy.deepcopy(head), n_nodes, t.out_dim)
    return model


def stack_head_state(state: Mapping[str, np.ndarray], tasks: TaskSet, n_nodes: int) -> dict[str, np.ndarray]:
    """The initial state of :func:`stacked_head_model` from a plain multi-task ``state``: the backbone
    as it is, every node slot ``heads.<t>.nodes.<j>.*`` zero (a node that never fills its slot adds
    nothing), and ``mix`` the mean of the node outputs (``W[c, j·C + c] = 1/N``, bias 0), so the
    integrator starts as the average of the stacked heads.

    Args:
        state: name → array with ``backbone.*`` and ``heads.<t>.*`` for each task of ``tasks``.
        tasks: the tasks (their ``out_dim`` sizes ``mix``).
        n_nodes: N, the number of stacked node heads.

    Returns:
        name → float32 (buffers: their dtype) array.

    Raises:
        ValueError: ``n_nodes < 1``; ``state`` has no head for a task.
    """
    if n_nodes < 1:
        raise ValueError(f"a stacked head needs at least one node head, got {n_nodes}")
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        if not k.startswith("heads."):
            out[k] = np.asarray(v)
    for t in tasks:
        prefix = f"heads.{t.name}."
        own = {k[len(prefix):]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"the state has no head for task {t.name!r}")
        for j in range(int(n_nodes)):
            for rest, v in own.items():
                out[f"{prefix}nodes.{j}.{rest}"] = np.zeros_like(v)
        c = int(t.out_dim)
        w = np.zeros((c, int(n_nodes) * c), dtype=np.float32)
        for j in range(int(n_nodes)):
            w[np.arange(c), j * c + np.arange(c)] = 1.0 / n_nodes
        out[f"{prefix}mix.weight"] = w
        out[f"{prefix}mix.bias"] = np.zeros(c, dtype=np.float32)
    return out
