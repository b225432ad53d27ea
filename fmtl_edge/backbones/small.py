"""The small built-in families: ``conv`` (images) and ``mlp`` (vectors); ``auto`` picks one by input.

These are the models fmtl-edge trained before the model API (issue 20), with the same modules,
parameter names and initialisation, so ``--model auto`` (the default) reproduces every earlier
result bit for bit. ``conv``: three 3×3 conv blocks (BatchNorm, ReLU; two of them stride 2) and
pooled linear heads or transposed-conv decoders for dense tasks; ``mlp``: Linear-BatchNorm-ReLU
layers with pooled linear heads.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fmtl_edge.backbones.common import Network, PooledHead, ModelError, reject_dense, require_image


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvBackbone(nn.Module):
    """Shared conv encoder: ``(B, C, H, W)`` float32 → ``(B, 2·width, ceil(H/4), ceil(W/4))``.

    A stride-1 block, then two stages (``width`` and ``2·width`` channels), each a stride-2 block and
    ``depth − 1`` stride-1 blocks.
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [_conv_block(in_channels, width, 1)]
        c = width
        for c_out in (width, 2 * width):
            layers.append(_conv_block(c, c_out, 2))
            layers.extend(_conv_block(c_out, c_out, 1) for _ in range(depth - 1))
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MLPBackbone(nn.Module):
    """Shared MLP encoder: ``(B, D)`` float32 → ``(B, width)``; ``depth`` Linear-BatchNorm-ReLU layers."""

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


class DenseHead(nn.Module):
    """Decoder of the ``conv`` family for dense tasks: ``(B, C, h, w)`` → ``(B, out_dim, H, W)``.

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


def conv(input_shape: Sequence[int], tasks, *, width: int = 16, depth: int = 1, head_hidden: int = 0) -> Network:
    """The small conv family (images ``(C, H, W)``): :class:`ConvBackbone` (about 7.5 k parameters at
    width 16), :class:`~fmtl_edge.backbones.common.PooledHead` heads and :class:`DenseHead` decoders.

    Raises:
        ModelError: a vector input.
    """
    require_image("conv", input_shape)
    backbone = ConvBackbone(int(input_shape[0]), width, depth)  # built first: its init ignores the heads
    heads = nn.ModuleDict()
    for t in tasks:
        if t.kind == "dense":
            heads[t.name] = DenseHead(backbone.out_channels, t.out_shape[0], tuple(input_shape[1:]), width)
        else:
            heads[t.name] = PooledHead(backbone.out_channels, t.out_shape[0], head_hidden)
    return Network(backbone, heads)


def mlp(input_shape: Sequence[int], tasks, *, width: int = 16, depth: int = 1, head_hidden: int = 0) -> Network:
    """The MLP family (vectors ``(D,)``): ``depth + 1`` hidden layers of ``4·max(width, 8)`` units and
    :class:`~fmtl_edge.backbones.common.PooledHead` heads.

    Raises:
        ModelError: an image input, or a dense task (no spatial features).
    """
    if len(input_shape) != 1:
        raise ModelError(f"mlp needs a vector input (D,), but the data's input is {tuple(input_shape)}; "
                         "use conv, resnet or mobilenet (or auto) for images")
    reject_dense("mlp", tasks, input_shape)
    backbone = MLPBackbone(int(input_shape[0]), max(width, 8) * 4, depth + 1)
    heads = nn.ModuleDict()
    for t in tasks:
        heads[t.name] = PooledHead(backbone.out_features, t.out_shape[0], head_hidden)
    return Network(backbone, heads)


def auto(input_shape: Sequence[int], tasks, *, width: int = 16, depth: int = 1, head_hidden: int = 0) -> Network:
    """:func:`conv` for images ``(C, H, W)``, :func:`mlp` for vectors ``(D,)`` (the default ``--model``)."""
    if len(input_shape) == 3:
        return conv(input_shape, tasks, width=width, depth=depth, head_hidden=head_hidden)
    return mlp(input_shape, tasks, width=width, depth=depth, head_hidden=head_hidden)
