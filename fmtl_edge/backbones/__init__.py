"""Built-in model families, each a factory with the model API's signature
(:mod:`fmtl_edge.model_factory`): ``family(input_shape, tasks, *, width, depth, head_hidden)`` →
a module with ``backbone`` and ``heads``.

========== ================ ===================================================================
``--model`` input            module
========== ================ ===================================================================
auto       either            :func:`fmtl_edge.backbones.small.auto`: conv for images, mlp for vectors
conv       ``(C, H, W)``     :func:`fmtl_edge.backbones.small.conv` (about 7.5 k parameters)
mlp        ``(D,)``          :func:`fmtl_edge.backbones.small.mlp`
resnet     ``(C, H, W)``     :func:`fmtl_edge.backbones.resnet.resnet` (BasicBlocks, about 0.31 M)
mobilenet  ``(C, H, W)``     :func:`fmtl_edge.backbones.mobilenet.mobilenet` (inverted residuals, about 0.30 M)
========== ================ ===================================================================

Parameter counts are the encoders' at width 16, depth 1; ``fmtl-edge models`` prints each family's
parameters and FLOPs for an input shape and task set.
"""

from __future__ import annotations

#: family name → (module, function, one line for ``--help`` and ``fmtl-edge models``)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "auto": ("fmtl_edge.backbones.small", "auto", "conv for images, mlp for vectors (the default)"),
    "conv": ("fmtl_edge.backbones.small", "conv", "3 conv blocks (2 stride-2), transposed-conv decoders; images"),
    "mlp": ("fmtl_edge.backbones.small", "mlp", "Linear-BatchNorm-ReLU layers; vectors"),
    "resnet": ("fmtl_edge.backbones.resnet", "resnet",
               "ResNet BasicBlocks, 4 stages (w, 2w, 4w, 8w); conv decoders; images"),
    "mobilenet": ("fmtl_edge.backbones.mobilenet", "mobilenet",
                  "MobileNetV2 inverted residuals (expansion 6); separable decoders; images"),
}
