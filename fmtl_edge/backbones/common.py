"""Pieces shared by the built-in model families (:mod:`fmtl_edge.backbones`).

:class:`Network` is what every factory returns (``backbone`` + ``heads``); :class:`PooledHead` is
the head of classification, binary and regression tasks on any backbone; :class:`MirrorDecoder` is
the dense-task decoder of the ResNet and MobileNet families (one ×2 upsampling stage per stride-2
stage of the encoder, channels mirroring the encoder's); :class:`ModelError` is how a family
refuses an input it cannot take.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built or does not fit the model contract (see :mod:`fmtl_edge.model_factory`).
    ``field`` names the setting to fix (``--model``), as :class:`fmtl_edge.config.ConfigError`'s does."""

    field = "--model"


class Network(nn.Module):
    """A factory's result: ``backbone`` (θ_s) and ``heads`` (one head θ_i per task, keyed by task name).

    ``forward(x)``: ``{task: heads[task](backbone(x))}`` (so a factory's result also runs on its own).
    """

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        return {n: h(f) for n, h in self.heads.items()}


def require_image(family: str, input_shape: Sequence[int]) -> None:
    """Raise :class:`ModelError` unless ``input_shape`` is ``(C, H, W)``."""
    if len(input_shape) != 3:
        raise ModelError(f"{family} needs an image input (C, H, W), but the data's input is {tuple(input_shape)}; "
                         "use mlp (or auto) for vector inputs")


def reject_dense(family: str, tasks, input_shape: Sequence[int]) -> None:
    """Raise :class:`ModelError` for a dense task on a model without spatial features."""
    for t in tasks:
        if t.kind == "dense":
            raise ModelError(f"task {t.name!r} is dense but the input {tuple(input_shape)} is not an image "
                             f"({family} has no spatial features to decode)")


class PooledHead(nn.Module):
    """Global-average-pooled head: features ``(B, C, h, w)`` or ``(B, C)`` float32 → ``(B, out_dim)``.

    ``hidden = 0``: one ``Linear(C, out_dim)`` (parameter names ``fc.weight``, ``fc.bias``);
    ``hidden > 0``: ``Linear(C, hidden) → ReLU → Linear(hidden, out_dim)`` (``fc.0.*``, ``fc.2.*``).
    The pooled features are multiplied by ``feature_scale`` first (1: as they are).
    """

    def __init__(self, in_features: int, out_dim: int, hidden: int = 0, feature_scale: float = 1.0):
        super().__init__()
        self.feature_scale = float(feature_scale)
        if hidden:
            self.fc = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        else:
            self.fc = nn.Linear(in_features, out_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() == 4:
            f = f.mean(dim=(2, 3))
        if self.feature_scale != 1.0:
            f = f * self.feature_scale
        return self.fc(f)


class MirrorDecoder(nn.Module):
    """Dense-task decoder mirroring an encoder: ``(B, c_L, ⌈H/2^L⌉, ⌈W/2^L⌉)`` → ``(B, out_dim, H, W)``.

    ``level_channels[i]`` is the encoder's channel count at stride ``2^(i+1)`` (``L`` = its number of
    stride-2 stages). The decoder runs ``L`` ×2 nearest-neighbour upsamplings; after each of the first
    ``L − 1`` a ``block(c_in, c_out)`` maps ``c_{i+1} → c_i`` (the encoder's channels at that
    resolution); after the last, a 3×3 convolution gives the ``out_dim`` output channels at full
    resolution. The blocks keep PyTorch's default (fan-in) initialisation and no BatchNorm, and the
    output convolution starts at zero: the untrained decoder predicts 0 everywhere (a loss near the
    chance level of targets that are mostly near 0, such as edge and keypoint maps) and its updates
    stay small even when ``--loss-weights chance`` weighs such a task 100× a classification task
    (with BatchNorm'd unit-scale features the decoders of both families diverged at lr 0.1 on UTKFace). The output is cropped to ``out_hw`` (sizes that are not multiples of ``2^L``).
    """

    def __init__(self, level_channels: Sequence[int], out_dim: int, out_hw: Sequence[int],
                 block: Callable[[int, int], nn.Module]):
        super().__init__()
        chans = [int(c) for c in level_channels]
        if not chans:
            raise ModelError("a mirror decoder needs at least one encoder level")
        self.out_hw = tuple(int(s) for s in out_hw)
        stages: list[nn.Module] = []
        for i in range(len(chans) - 1, 0, -1):
            stages.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), block(chans[i], chans[i - 1])))
        out = nn.Conv2d(chans[0], int(out_dim), 3, padding=1)
        nn.init.zeros_(out.weight)  # the decoder starts as the constant 0: a loss near the chance level
        nn.init.zeros_(out.bias)
        stages.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), out))
        self.stages = nn.Sequential(*stages)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y = self.stages(f)
        h, w = self.out_hw
        return y[..., :h, :w]


def task_heads(tasks, pooled_features: int, head_hidden: int,
               dense: Callable[[object], nn.Module]) -> nn.ModuleDict:
    """One head per task, in task order: ``dense(task)`` for dense tasks, else a :class:`PooledHead`
    that reads the pooled features scaled by ``min(1, √(32 / C))`` (C = ``pooled_features``).

    The scale keeps a head's curvature at that of a 32-feature head (the small ``conv`` family's,
    which trains at lr 0.1): C ReLU features of mean ~0.4 make a regression head's Hessian
    ~2·0.16·C, and with C = 320 (mobilenet) SGD at lr 0.1 with momentum 0.9 diverged on UTKFace's
    age within two epochs. (A full 1/√C made them stable too but slowed resnet's classification
    heads: digits, 4 centralised epochs, total test loss 0.58 against 0.40 with √(32/C), 0.33 unscaled.)
    """
    heads = nn.ModuleDict()
    for t in tasks:
        if t.kind == "dense":
            heads[t.name] = dense(t)
        else:
            heads[t.name] = PooledHead(pooled_features, t.out_shape[0], head_hidden, min(1.0, (32 / pooled_features) ** 0.5))
    return heads


def init_conv_bn(module: nn.Module) -> None:
    """He (fan-out, ReLU) initialisation of every convolution, BatchNorm γ = 1 and β = 0 (He et al.,
    "Deep Residual Learning for Image Recognition", CVPR 2016)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
