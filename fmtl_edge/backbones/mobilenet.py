"""The ``mobilenet`` family: a MobileNetV2-style encoder of inverted residual blocks for images.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (§3.3-3.4,
Table 1/2): a 3×3 stride-2 stem of ``width`` channels, then six stages (expansion ``t``, channels as a
multiple of ``width``, first stride) ``(1, 1, 1)``, ``(t, 1.5, 2)``, ``(t, 2, 2)``, ``(t, 4, 2)``,
``(t, 6, 1)``, ``(t, 10, 2)`` of ``depth`` blocks each (at width 16 the channels are MobileNetV2's
16, 24, 32, 64, 96, 160) and a 1×1 conv to ``20·width`` channels; ReLU6, linear bottlenecks,
residual connections where shape allows. Heads: pooled (optionally with a hidden layer; features
scaled by √(32/C), see :func:`~fmtl_edge.backbones.common.task_heads`) for classification, binary and
regression tasks; for dense tasks a :class:`~fmtl_edge.backbones.common.MirrorDecoder` with
depthwise-separable conv-ReLU6 blocks (five ×2 upsamplings, one per stride-2 stage).

At width 16, depth 1, expansion 6 the encoder has about 0.30 M parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fmtl_edge.backbones.common import MirrorDecoder, Network, init_conv_bn, require_image, task_heads

#: (expansion: 1 or the family's t, channels / width, stride of the stage's first block)
STAGES: tuple[tuple[bool, float, int], ...] = (
    (False, 1.0, 1), (True, 1.5, 2), (True, 2.0, 2), (True, 4.0, 2), (True, 6.0, 1), (True, 10.0, 2),
)
LAST_MULT = 20


def _ch(width: int, mult: float) -> int:
    return max(1, int(round(width * mult)))


class InvertedResidual(nn.Module):
    """1×1 expansion (× ``t``; skipped for t = 1), 3×3 depthwise conv (stride ``s``), 1×1 linear
    projection, each with BatchNorm (ReLU6 after the first two); a residual connection when
    ``s = 1`` and ``c_in = c_out``. ``(B, c_in, h, w)`` → ``(B, c_out, ⌈h/s⌉, ⌈w/s⌉)``."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetBackbone(nn.Module):
    """``(B, C, H, W)`` float32 → ``(B, 20·width, ⌈H/32⌉, ⌈W/32⌉)``.

    Attributes:
        level_channels: channels at stride 2, 4, 8, 16, 32 (``width``, ``1.5·width``, ``2·width``,
            ``6·width``, ``20·width``).
        out_channels: ``20·width``.
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 1, expansion: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        c = width
        levels: list[int] = []
        for expand, mult, stride in STAGES:
            c_out = _ch(width, mult)
            if stride == 2:
                levels.append(c)  # the channels the previous resolution ended with
            for b in range(depth):
                blocks.append(InvertedResidual(c, c_out, stride if b == 0 else 1, expansion if expand else 1))
                c = c_out
        last = _ch(width, LAST_MULT)
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.level_channels = (*levels, last)
        self.out_channels = last
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.blocks(self.stem(x)))


def _separable(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.ReLU6(inplace=True),
        nn.Conv2d(c_in, c_out, 1), nn.ReLU6(inplace=True),
    )


def mobilenet(input_shape: Sequence[int], tasks, *, width: int = 16, depth: int = 1, head_hidden: int = 0,
              expansion: int = 6) -> Network:
    """The ``mobilenet`` family for images ``(C, H, W)``: :class:`MobileNetBackbone` (``width``
    channels in the first stage, ``depth`` inverted residual blocks per stage, expansion factor
    ``expansion``), pooled heads with ``head_hidden`` hidden units (0: linear), mirror decoders
    of depthwise-separable blocks for dense tasks.

    Raises:
        ModelError: a vector input, or ``expansion < 1``.
    """
    require_image("mobilenet", input_shape)
    if expansion < 1:
        from fmtl_edge.backbones.common import ModelError

        raise ModelError(f"mobilenet: expansion must be >= 1, got {expansion}")
    backbone = MobileNetBackbone(int(input_shape[0]), width, depth, expansion)  # first: init ignores heads
    hw = tuple(int(s) for s in input_shape[1:])
    heads = task_heads(tasks, backbone.out_channels, head_hidden,
                       lambda t: MirrorDecoder(backbone.level_channels, t.out_shape[0], hw, _separable))
    return Network(backbone, heads)
