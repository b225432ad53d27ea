"""FLOPs of training, an estimate from one step (issue 10 item 7).

:func:`training_flops_per_sample` counts, with :class:`torch.utils.flop_counter.FlopCounterMode`,
the FLOPs of **one** training step (forward of the backbone and every head, backward of all of it)
of a fresh model on a batch of ``batch`` random inputs, divided by ``batch``: the FLOPs of one
sample-pass. The loss is replaced by the sum of the outputs (a loss's own FLOPs are negligible
beside the layers'). A method's FLOPs are then ``flops_per_sample × sample_passes`` (lookahead
passes priced like training passes, frozen layers' skipped weight gradients not subtracted): an
**estimate from one step**, independent of the machine's load, as the sample-passes are.
Counted once per (model spec, tasks, batch) per process (cached). Works for every model of
``--model`` (:mod:`fmtl_edge.model_factory`) the counter can trace.

The backward of a grouped convolution (MobileNet's depthwise convolutions) is counted here as its
forward once per gradient computed (input, weight): torch's own formula for
``aten.convolution_backward`` ignores the groups and counts a depthwise convolution's weight
gradient ``groups`` times over (:func:`flop_counter`).
"""

from __future__ import annotations

import functools

import torch

from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.tasks import TaskSet


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """A :class:`torch.utils.flop_counter.FlopCounterMode` (no display) whose convolution backward
    counts grouped convolutions right (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


@functools.lru_cache(maxsize=64)
def _per_sample(spec: ModelSpec, tasks: TaskSet, batch: int) -> float:
    model = MultiTaskModel(spec, tasks, seed=0)
    model.train()
    x = torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    with flop_counter() as fc:
        outs = model.forward_heads(model.backbone(x))
        sum(o.float().sum() for o in outs.values()).backward()
    return float(fc.get_total_flops()) / batch


def training_flops_per_sample(spec: ModelSpec, tasks: TaskSet, batch: int = 4) -> float | None:
    """FLOPs of one training sample-pass (forward + backward) of ``spec`` with heads for ``tasks``,
    counted on one step of ``batch`` samples; None when the count fails (never raises)."""
    try:
        return _per_sample(spec, tasks, max(int(batch), 2))
    except Exception:  # noqa: BLE001 - an estimate; a model the counter cannot trace reports None
        return None
