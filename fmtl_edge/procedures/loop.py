"""``loop``: one visit of Loop Improvement's ring (Li et al., "Loop Improvement: An Efficient
Approach for Extracting Shared Features from Heterogeneous Data without Central Server", 2024,
arXiv 2403.14371, §3; reference code axedge1983/LI; docs/design.md §4).

A node receives the travelling backbone and, on its own data,

1. trains its head(s) only: backbone frozen (no gradient, its BatchNorm in eval mode so the running
   statistics do not move);
2. trains the backbone only: heads frozen (no gradient, eval mode);
3. optionally (``steps`` = 3) trains every layer;

each step with its own fresh optimiser (AdamW, weight decay 0.1, lr 1e-4 / 4e-4 / 5e-4 in the
reference; SGD selectable) for ``epochs`` epochs; every lr is halved every ``decay_every`` passes
(the reference's StepLR). The framework then uploads the backbone; the heads are personal (client
state) in the ``clients`` ring, or task heads FedAvg'd by the server in the ``tasks`` ring.

``phase = "finetune"``: step 1 only, ``finetune_epochs`` at ``finetune_lr`` (the reference: 6
epochs at 2e-5): every node fits its head to the final backbone; the backbone does not move.

``method_config``: ``phase`` (``train`` | ``finetune``), ``steps`` (2 | 3), ``epochs``,
``optimizer`` (``adamw`` | ``sgd``: SGD uses the run's momentum and weight decay), ``lr_head``,
``lr_backbone``, ``lr_all``, ``weight_decay`` (AdamW's), ``decay_every``, ``decay_factor``,
``finetune_epochs``, ``finetune_lr``, ``pass_length`` (rounds per pass: 1 for the clients ring,
T for the tasks ring, so ``round // pass_length`` is the pass), ``task`` (the tasks ring: train
only this task's head; the update then reports only that task).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fmtl_edge.models import MultiTaskModel
from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register
from fmtl_edge.procedures.sgd import batches, budget_hit, weighted_sum

#: step → (part trained, its lr key)
STEPS = {1: ("heads", "lr_head"), 2: ("backbone", "lr_backbone"), 3: ("all", "lr_all")}
DEFAULTS = {"steps": 2, "epochs": 2, "optimizer": "adamw", "lr_head": 1e-4, "lr_backbone": 4e-4, "lr_all": 5e-4,
            "weight_decay": 0.1, "decay_every": 10, "decay_factor": 0.5, "finetune_epochs": 6, "finetune_lr": 2e-5,
            "pass_length": 1}


def part_parameters(model: MultiTaskModel, part: str, names) -> list[torch.nn.Parameter]:
    """The parameters of ``part`` (``heads``: the heads of ``names``; ``backbone``; ``all``: both)."""
    heads = [p for n in names for p in model.heads[n].parameters()]
    if part == "heads":
        return heads
    if part == "backbone":
        return list(model.backbone.parameters())
    return list(model.backbone.parameters()) + heads


def make_optimizer(kind: str, params, lr: float, weight_decay: float, momentum: float, sgd_weight_decay: float):
    """AdamW (decoupled ``weight_decay``) or SGD (``momentum``, L2 ``sgd_weight_decay``)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=sgd_weight_decay)
    raise ValueError(f"loop: method_config['optimizer'] must be adamw or sgd, got {kind!r}")


def run_step(ctx: LocalContext, model: MultiTaskModel, part: str, names, *, epochs: int, lr: float,
             optimizer: str, weight_decay: float) -> tuple[dict[str, float], int, str | None]:
    """One step of a visit: ``epochs`` passes over the client's data training ``part`` only.

    Returns:
        (task → mean training loss of the step, samples seen, ``time``/``energy`` if a budget stopped it).
    """
    a = ctx.assignment
    cfg = a.config
    device = torch.device(cfg.device)
    model.train()
    ctx.freeze(model)  # the job's frozen (pre-trained) tensors stay frozen in every step
    allowed = {id(p) for p in model.parameters() if p.requires_grad}
    train_ids = {id(p) for p in part_parameters(model, part, names)} & allowed
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
    if part == "heads":
        model.backbone.eval()  # frozen backbone: BatchNorm statistics do not move either
    elif part == "backbone":
        model.heads.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr, weight_decay, cfg.momentum, cfg.weight_decay)
    data = ctx.data
    x_all = torch.from_numpy(np.ascontiguousarray(data.x_train))
    y_all = {n: torch.from_numpy(np.ascontiguousarray(data.y_train[n])) for n in names}
    sums = {n: 0.0 for n in names}
    seen = 0
    stopped = None
    for _ in range(epochs):
        for idx in batches(data.n_train, cfg.batch_size, ctx.rng):
            it = torch.from_numpy(idx)
            x = x_all[it].to(device, torch.float32)
            outs = model.forward_heads(model.backbone(x), names)
            losses = {}
            for n in names:
                y = y_all[n][it].to(device)
                losses[n] = ctx.tasks[n].loss(outs[n], y.float() if y.is_floating_point() else y)
            opt.zero_grad(set_to_none=True)
            weighted_sum(losses, {n: a.weight(n) for n in names}).backward()
            opt.step()
            for n in names:
                sums[n] += float(losses[n].detach()) * len(idx)
            seen += len(idx)
            stopped = budget_hit(a, time.perf_counter() - ctx.t0, ctx.energy_probe)
            if stopped:
                break
        if stopped:
            break
    for p in model.parameters():
        p.requires_grad_(id(p) in allowed)
    return {n: sums[n] / max(seen, 1) for n in names}, seen, stopped


@register
class LoopVisit(Procedure):
    name = "loop"

    def train(self, ctx: LocalContext) -> LocalResult:
        def s(key, kind):
            return ctx.setting(key, DEFAULTS[key], kind)

        a = ctx.assignment
        task = ctx.setting("task", None, str)
        if task is not None and task not in ctx.tasks.names:
            raise ValueError(f"loop: method_config['task'] = {task!r} is not a task this client trains")
        names = [task] if task is not None else list(ctx.tasks.names)
        optimizer = s("optimizer", str)
        wd = s("weight_decay", float)
        if ctx.setting("phase", "train", str) == "finetune":
            plan = [("heads", s("finetune_epochs", int), s("finetune_lr", float))]
        else:
            steps = s("steps", int)
            if steps not in (2, 3):
                raise ValueError(f"loop: method_config['steps'] must be 2 or 3, got {steps}")
            passes = a.round // max(s("pass_length", int), 1)
            scale = s("decay_factor", float) ** (passes // max(s("decay_every", int), 1))
            plan = [(STEPS[k][0], s("epochs", int), s(STEPS[k][1], float) * scale) for k in range(1, steps + 1)]
        loss: dict[str, float] = {n: 0.0 for n in names}
        stopped = None
        n_passes = 0
        for part, epochs, lr in plan:
            if epochs <= 0:
                continue
            loss, seen, stopped = run_step(ctx, ctx.model, part, names, epochs=epochs, lr=lr, optimizer=optimizer,
                                            weight_decay=wd)
            n_passes += int(seen)
            if stopped:
                break
        return LocalResult(n_samples=int(ctx.data.n_train), train_loss=loss, stopped_by=stopped,
                           tasks=(task,) if task is not None else None, sample_passes=n_passes)
