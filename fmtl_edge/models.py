"""Multi-task models: a shared backbone θ_s and one task head θ_i per task.

``MultiTaskModel(backbone, heads)`` maps an input batch to ``{task name: head output}``. Parameter
names are ``backbone.*`` (shared, scope ``common``) and ``heads.<task>.*`` (scope ``task:<task>``);
:mod:`fmtl_edge.partition` turns these names into aggregation slices.

The model family is chosen from the input shape: images ``(C, H, W)`` get a small conv backbone
(two stride-2 stages, BatchNorm, ReLU) whose feature map feeds pooled linear heads (classification,
binary, regression) or transposed-conv decoders (dense, output ``(C_out, H, W)``); vectors ``(D,)`` get
an MLP backbone with linear heads. Every task of a dataset shares the same backbone architecture,
as MAS requires (Zhuang et al., "MAS: Towards Resource-Efficient Federated Multiple-Task Learning",
ICCV 2023, §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fmtl_edge.tasks import Task, TaskSet


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters (part of the run config; same for every task and method).

    Attributes:
        input_shape: per-sample input shape, ``(C, H, W)`` or ``(D,)``.
        width: channels of the first conv stage (the second has ``2*width``) or the MLP hidden size.
        depth: conv blocks per stage, or hidden layers of the MLP.
    """

    input_shape: tuple[int, ...]
    width: int = 16
    depth: int = 1

    def __post_init__(self) -> None:
        if len(self.input_shape) not in (1, 3):
            raise ValueError(
                f"input_shape {self.input_shape}: expected (C, H, W) for images or (D,) for vectors"
            )
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"model width and depth must be >= 1, got {self.width}, {self.depth}")

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvBackbone(nn.Module):
    """Shared conv encoder: ``(B, C, H, W)`` float32 → ``(B, 2·width, ceil(H/4), ceil(W/4))``."""

    def __init__(self, in_channels: int, width: int = 16, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [_conv_block(in_channels, width, 1)]
        c = width
        for stage, c_out in enumerate((width, 2 * width)):
            layers.append(_conv_block(c, c_out, 2))
            layers.extend(_conv_block(c_out, c_out, 1) for _ in range(depth - 1))
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MLPBackbone(nn.Module):
    """Shared MLP encoder: ``(B, D)`` float32 → ``(B, width)``."""

    def __init__(self, in_features: int, width: int = 64, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PooledHead(nn.Module):
    """Global-average-pooled linear head: features ``(B, C, h, w)`` or ``(B, C)`` → ``(B, out_dim)``."""

    def __init__(self, in_features: int, out_dim: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.fc = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        else:
            self.fc = nn.Linear(in_features, out_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() == 4:
            f = f.mean(dim=(2, 3))
        return self.fc(f)


class DenseHead(nn.Module):
    """Decoder for dense (image-to-image) tasks: ``(B, C, h, w)`` → ``(B, out_dim, H, W)``.

    Two ×2 transposed-conv stages mirror :class:`ConvBackbone`'s two stride-2 stages; the output is
    cropped to the input's ``(H, W)`` (odd sizes).
    """

    def __init__(self, in_channels: int, out_dim: int, out_hw: tuple[int, int], width: int = 16):
        super().__init__()
        self.out_hw = tuple(out_hw)
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(in_channels, width, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_dim, 3, padding=1),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y = self.decode(f)
        h, w = self.out_hw
        return y[..., :h, :w]


def make_backbone(spec: ModelSpec) -> nn.Module:
    """Backbone θ_s for a :class:`ModelSpec` (conv for images, MLP for vectors)."""
    if spec.is_image:
        return ConvBackbone(spec.input_shape[0], spec.width, spec.depth)
    return MLPBackbone(spec.input_shape[0], max(spec.width, 8) * 4, spec.depth + 1)


def make_head(task: Task, spec: ModelSpec, backbone: nn.Module) -> nn.Module:
    """Task head θ_i for ``task`` on top of ``backbone``.

    Raises:
        ValueError: a dense task on a vector (non-image) input.
    """
    if task.kind == "dense":
        if not spec.is_image:
            raise ValueError(
                f"task {task.name!r} is dense but the input {spec.input_shape} is not an image"
            )
        return DenseHead(backbone.out_channels, task.out_dim, spec.input_shape[1:], spec.width)
    feats = backbone.out_channels if spec.is_image else backbone.out_features
    return PooledHead(feats, task.out_dim)


class MultiTaskModel(nn.Module):
    """Shared backbone θ_s plus one head per task: ``forward(x) -> {task: output}``.

    Args:
        spec: architecture; identical for every task and method so weights transfer between jobs.
        tasks: the tasks this model has heads for (a single-task model is the one-task case).
        seed: if given, parameters are initialised from ``torch.manual_seed(seed)`` so that two
            models built with the same seed and tasks are identical. The backbone is always built
            first, so its initial weights do not depend on which heads follow.
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
            self.backbone = make_backbone(spec)
            self.heads = nn.ModuleDict()
            for t in self.tasks:
                self.heads[t.name] = make_head(t, spec, self.backbone)
        finally:
            if gen_state is not None:
                torch.random.set_rng_state(gen_state)

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
    (names ``heads.<task>.nodes.<j>.*``, ``heads.<task>.mix.*``); the backbone is unchanged.

    Raises:
        ValueError: ``n_nodes < 1``; a dense task on a vector input.
    """
    model = MultiTaskModel(spec, tasks)
    for t in model.tasks:
        model.heads[t.name] = StackedHead(lambda t=t: make_head(t, spec, model.backbone), n_nodes, t.out_dim)
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
