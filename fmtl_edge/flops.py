"""FLOPs of training, an estimate from one step (issue 10 item 7).

:func:`training_flops_per_sample` counts, with :class:`torch.utils.flop_counter.FlopCounterMode`,
the FLOPs of **one** training step (forward of the backbone and every head, backward of all of it)
of a fresh model on a batch of ``batch`` random inputs, divided by ``batch``: the FLOPs of one
sample-pass. The loss is replaced by the sum of the outputs (a loss's own FLOPs are negligible
beside the layers'). A method's FLOPs are then ``flops_per_sample × sample_passes`` (lookahead
passes priced like training passes, frozen layers' skipped weight gradients not subtracted): an
**estimate from one step**, independent of the machine's load, as the sample-passes are.
Counted once per (model spec, tasks, batch) per process (cached).
"""

from __future__ import annotations

import functools

import torch

from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.tasks import TaskSet


@functools.lru_cache(maxsize=64)
def _per_sample(spec: ModelSpec, tasks: TaskSet, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = MultiTaskModel(spec, tasks, seed=0)
    model.train()
    x = torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
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
