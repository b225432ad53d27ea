"""A torchvision network trained by fmtl-edge through the model API (``--model FILE.py:FUNCTION``).

    pip install torchvision            # a build matching your torch (on a Jetson: NVIDIA's wheel)
    fmtl-edge simulate --model examples/torchvision_model.py:resnet18_heads --dataset utkface \\
        --data-dir ../shared/data/utkface/images --methods mas-2,all-in-one,one-by-one

The factory gets the per-sample input shape and the job's tasks (each with ``name``, ``kind`` and
``out_shape``) and returns a module with ``backbone`` (the layers every task shares, θ_s) and
``heads`` (an ``nn.ModuleDict``: one head per task name, θ_i). fmtl-edge computes
``heads[t](backbone(x))`` and owns everything else: the methods, aggregation, personal layers,
export. Keep every parameter inside ``backbone`` or ``heads``, build a head for exactly the tasks
asked for, and do not let the backbone depend on which tasks those are (a MAS split trains a subset).

A timm model plugs in the same way: ``timm.create_model(name, pretrained=False, num_classes=0)``
is a backbone that returns pooled features.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseHead(nn.Module):
    """Dense task head: ``(B, 512, h, w)`` features → ``(B, C, H, W)`` at the input's size."""

    def __init__(self, in_channels: int, out_shape: tuple[int, int, int], hidden: int = 64):
        super().__init__()
        c, h, w = out_shape
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True))
        self.up = nn.Upsample(size=(h, w), mode="bilinear", align_corners=False)
        self.out = nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.reduce(f)))


class TorchvisionMultiTask(nn.Module):
    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # not used by fmtl-edge; handy on its own
        f = self.backbone(x)
        return {name: head(f) for name, head in self.heads.items()}


def resnet18_heads(input_shape, tasks, *, head_hidden: int = 0) -> nn.Module:
    """torchvision's ResNet-18 (random init, 11.2 M parameters) without its classifier as the shared
    backbone: ``(B, C, H, W)`` → ``(B, 512, ⌈H/32⌉, ⌈W/32⌉)``; pooled heads (a hidden layer of
    ``head_hidden`` units when > 0, ``--head-hidden``) and upsampling heads for dense tasks."""
    import torchvision

    c_in = int(input_shape[0])
    net = torchvision.models.resnet18(weights=None)
    if c_in != 3:  # e.g. 1-channel digits
        net.conv1 = nn.Conv2d(c_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
    backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    heads = nn.ModuleDict()
    for t in tasks:
        if t.kind == "dense":
            heads[t.name] = DenseHead(512, t.out_shape)
        elif head_hidden:
            heads[t.name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, head_hidden),
                                          nn.ReLU(inplace=True), nn.Linear(head_hidden, t.out_shape[0]))
        else:
            heads[t.name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, t.out_shape[0]))
    return TorchvisionMultiTask(backbone, heads)
