"""The ``resnet`` family: a ResNet-style encoder of BasicBlocks for images, edge-scale.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (§3.3, the BasicBlock of
ResNet-18/34), sized for small inputs: a 3×3 stride-2 stem instead of the 7×7 stem and max-pool, and
four stages of ``width``, ``2·width``, ``4·width``, ``8·width`` channels (stride 1, 2, 2, 2), each of
``depth`` blocks; He initialisation, and the last BatchNorm γ of each block's residual branch 0
(Goyal et al., "Accurate, Large Minibatch SGD", 2017, §5.1). Heads: pooled (optionally with a
hidden layer, ``head_hidden``; features scaled by √(32/C), see
:func:`~fmtl_edge.backbones.common.task_heads`) for classification, binary and regression tasks; for
dense tasks a :class:`~fmtl_edge.backbones.common.MirrorDecoder` with 3×3 conv-ReLU blocks (four ×2
upsamplings, one per stride-2 stage).

At width 16, depth 1 the encoder has about 0.31 M parameters (``fmtl-edge models`` lists the counts
and FLOPs for an input shape and task set).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fmtl_edge.backbones.common import MirrorDecoder, Network, init_conv_bn, require_image, task_heads


class BasicBlock(nn.Module):
    """Two 3×3 conv-BatchNorm layers with an identity (or 1×1 conv-BatchNorm projection) shortcut:
    ``(B, c_in, h, w)`` → ``(B, c_out, ⌈h/s⌉, ⌈w/s⌉)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                                     nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """``(B, C, H, W)`` float32 → ``(B, 8·width, ⌈H/16⌉, ⌈W/16⌉)``.

    Attributes:
        level_channels: channels at stride 2, 4, 8, 16 (``width``, ``2·width``, ``4·width``, ``8·width``).
        out_channels: ``8·width``.
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        chans = [width, 2 * width, 4 * width, 8 * width]
        stages = []
        c = width
        for i, c_out in enumerate(chans):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(c if b == 0 else c_out, c_out, stride if b == 0 else 1)
                                          for b in range(depth)]))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.level_channels = tuple(chans)
        self.out_channels = chans[-1]
        init_conv_bn(self)
        for m in self.modules():  # each residual branch starts at 0: every block starts as its shortcut
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def _conv_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))


def resnet(input_shape: Sequence[int], tasks, *, width: int = 16, depth: int = 1, head_hidden: int = 0) -> Network:
    """The ``resnet`` family for images ``(C, H, W)``: :class:`ResNetBackbone` (``width`` channels in
    the first stage, ``depth`` BasicBlocks per stage), pooled heads with ``head_hidden`` hidden units
    (0: linear), mirror decoders for dense tasks.

    Raises:
        ModelError: a vector input.
    """
    require_image("resnet", input_shape)
    backbone = ResNetBackbone(int(input_shape[0]), width, depth)  # first: its init ignores the heads
    hw = tuple(int(s) for s in input_shape[1:])
    heads = task_heads(tasks, backbone.out_channels, head_hidden,
                       lambda t: MirrorDecoder(backbone.level_channels, t.out_shape[0], hw, _conv_relu))
    return Network(backbone, heads)
