"""``loop-global``: Loop Improvement's global model, trained over the ring (Li et al., "Loop
Improvement: An Efficient Approach for Extracting Shared Features from Heterogeneous Data without
Central Server", 2024, arXiv 2403.14371, §3.4 solution 2; docs/design.md §4).

The model (:func:`fmtl_edge.models.stacked_head_model`): the final travelling backbone, every node's
head for each task stacked (``heads.<t>.nodes.<j>.*``), and a small integrating network per task
(``heads.<t>.mix.*``) over the concatenated head outputs. The reference code trains the integrator
on the pooled training set, which is not federated; here it is trained over the ring, each node on
its own data, like the backbone.

Two phases (``method_config['phase']``):

- ``gather``: the explicit step that shares the heads. The node copies the head it kept in the ring
  job's client state (``method_config['heads_from']``, e.g. ``loop``) into its slot
  ``j = method_config['nodes'].index(client id)`` of the tasks it holds and sends the model on;
  nothing is trained (its train loss is its own head's, forward passes only). A node that never
  does (it failed) leaves its slot at zero.
- ``train`` (default): ``epochs`` epochs of the integrator only (the job freezes the backbone and
  the node heads: ``frozen``), optimiser ``optimizer`` (AdamW with ``weight_decay``, or SGD with the
  run's momentum and weight decay) at ``lr``.

``method_config``: ``nodes`` (the ring's client ids: the stacked slots' order), ``phase``,
``heads_from``, ``epochs``, ``lr``, ``optimizer``, ``weight_decay``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from fmtl_edge.layer_names import LAYER_PREFIX
from fmtl_edge.models import ModelSpec, MultiTaskModel, stacked_head_model
from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register
from fmtl_edge.procedures.loop import run_step
from fmtl_edge.tasks import TaskSet


def node_list(method_config: Mapping[str, Any]) -> list[int]:
    """``method_config['nodes']`` as client ids.

    Raises:
        ValueError: missing or empty.
    """
    nodes = method_config.get("nodes")
    if not nodes:
        raise ValueError("loop-global: method_config['nodes'] (the ring's client ids) is missing or empty")
    return [int(n) for n in nodes]


def own_head_loss(ctx: LocalContext, slot: int, names: list[str]) -> dict[str, float]:
    """task → mean training loss of the node's own head (slot ``slot``) on the final backbone, on its
    training split (forward passes only): what the gather pass reports as its train loss."""
    model = ctx.model.eval()
    x_all = torch.from_numpy(np.ascontiguousarray(ctx.data.x_train))
    device = torch.device(ctx.assignment.config.device)
    sums = {n: 0.0 for n in names}
    bs = int(ctx.assignment.config.batch_size)
    with torch.no_grad():
        for i in range(0, ctx.data.n_train, bs):
            f = model.backbone(x_all[i:i + bs].to(device, torch.float32))
            for n in names:
                y = torch.from_numpy(np.ascontiguousarray(ctx.data.y_train[n][i:i + bs])).to(device)
                out = model.heads[n].nodes[slot](f)
                sums[n] += float(ctx.tasks[n].loss(out, y.float() if y.is_floating_point() else y)) * len(y)
    return {n: sums[n] / max(ctx.data.n_train, 1) for n in names}


@register
class LoopGlobal(Procedure):
    name = "loop-global"

    def model(self, spec: ModelSpec, tasks: TaskSet, method_config: Mapping[str, Any]) -> MultiTaskModel:
        return stacked_head_model(spec, tasks, len(node_list(method_config)))

    def train(self, ctx: LocalContext) -> LocalResult:
        cfg = ctx.assignment.method_config
        nodes = node_list(cfg)
        names = list(ctx.tasks.names)
        phase = ctx.setting("phase", "train", str)
        if phase == "gather":
            cid = int(ctx.data.client_id)
            if cid not in nodes:
                raise ValueError(f"loop-global: client {cid} is not a node of the ring {nodes}")
            source = ctx.setting("heads_from", None, str)
            kept = ctx.job_state(source) if source else None
            if not kept:
                raise ValueError(f"loop-global: client {cid} holds no head of job {source!r} to share")
            slot = nodes.index(cid)
            with torch.no_grad():
                for t in names:
                    target = ctx.model.heads[t].nodes[slot]
                    for n, p in target.state_dict().items():
                        v = kept.get(f"{LAYER_PREFIX}heads.{t}.{n}")
                        if v is None:
                            raise ValueError(f"loop-global: client {cid}'s kept state lacks heads.{t}.{n}")
                        p.copy_(torch.as_tensor(np.asarray(v)).to(p.dtype))
            return LocalResult(n_samples=int(ctx.data.n_train), train_loss=own_head_loss(ctx, slot, names),
                               sample_passes=0)
        if phase != "train":
            raise ValueError(f"loop-global: method_config['phase'] must be gather or train, got {phase!r}")
        loss, seen, stopped = run_step(ctx, ctx.model, "all", names, epochs=ctx.setting("epochs", 1, int),
                                       lr=ctx.setting("lr", 1e-3, float), optimizer=ctx.setting("optimizer", "adamw", str),
                                       weight_decay=ctx.setting("weight_decay", 0.0, float))
        return LocalResult(n_samples=int(ctx.data.n_train), train_loss=loss, stopped_by=stopped, sample_passes=int(seen))
