"""``sgd``: E local epochs of SGD (momentum, weight decay, the round's poly-decayed learning rate)
on Σ_i L_i over the client's tasks, with MAS's lookahead affinity every ρ batches when the
assignment asks for it (Zhuang et al., ICCV 2023, Eq. 3) and the per-round time/energy budgets.

:func:`local_sgd` is the loop every SGD-based procedure shares (``fedprox`` and ``ditto`` add a
penalty through ``extra_loss``).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np
import torch

from fmtl_edge.affinity.measure import lookahead_affinity
from fmtl_edge.messages import Assignment
from fmtl_edge.models import MultiTaskModel
from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation of ``0..n-1`` cut into batches; a last batch of one sample is folded into
    the previous one (a batch of one breaks BatchNorm in training mode)."""
    order = rng.permutation(n)
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    return out


def budget_hit(a: Assignment, elapsed_s: float, energy_probe) -> str | None:
    """``"time"``/``"energy"`` when the assignment's per-round budget is spent, else None."""
    if a.time_budget_s is not None and elapsed_s >= a.time_budget_s:
        return "time"
    if a.energy_budget_j is not None and energy_probe is not None:
        used = energy_probe()
        if used is not None and used >= a.energy_budget_j:
            return "energy"
    return None


def local_sgd(
    ctx: LocalContext,
    model: MultiTaskModel,
    *,
    epochs: int,
    lr: float,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    combine: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    measure_affinity: bool = False,
    rng: np.random.Generator | None = None,
) -> LocalResult:
    """``epochs`` passes of SGD over the client's training data on ``model`` (in place).

    Args:
        extra_loss: a penalty added to Σ_i L_i at every step (FedProx's, Ditto's), or None.
        combine: ``task → loss (with graph) -> objective`` replacing Σ_i L_i at every step (GradNorm's
            weighted sum), or None.
        measure_affinity: run the lookahead every ``config.affinity_every`` batches.
        rng: batch-order generator (default ``ctx.rng``).

    Returns:
        The round's figures; ``n_samples`` counts the distinct samples used when a budget may stop
        training early, else the client's training-set size. ``sample_passes`` is Σ over the steps
        of the batch size plus ``lookahead_passes`` = Σ over the lookahead measurements of
        ``n_tasks × B`` (see :class:`LocalResult`).
    """
    a = ctx.assignment
    cfg = a.config
    names = list(ctx.tasks.names)
    weights = {n: a.weight(n) for n in names}
    device = torch.device(cfg.device)
    model.train()
    ctx.freeze(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    rng = ctx.rng if rng is None else rng
    data = ctx.data
    x_all = torch.from_numpy(np.ascontiguousarray(data.x_train))
    y_all = {n: torch.from_numpy(np.ascontiguousarray(data.y_train[n])) for n in names}
    loss_sums = {n: 0.0 for n in names}
    seen = 0
    used_idx: set[int] | None = set() if (a.time_budget_s or a.energy_budget_j) else None
    aff_sum = np.zeros((len(names), len(names)))
    aff_steps = 0
    look_passes = 0
    stopped_by = None
    step = 0
    for _epoch in range(epochs):
        for idx in batches(data.n_train, cfg.batch_size, rng):
            it = torch.from_numpy(idx)
            x = x_all[it].to(device, torch.float32)
            ys = {n: y_all[n][it].to(device) for n in names}
            ys = {n: (v.float() if v.is_floating_point() else v) for n, v in ys.items()}
            feats = model.backbone(x)
            outs = model.forward_heads(feats, names)
            losses = {n: ctx.tasks[n].loss(outs[n], ys[n]) for n in names}
            if measure_affinity and len(names) > 1 and step % cfg.affinity_every == 0:
                aff_sum += lookahead_affinity(model, x, ys, losses, lr, cfg.weight_decay, names,
                                              cfg.affinity_divide_by_lr, weights)
                aff_steps += 1
                look_passes += len(names) * len(idx)
            total = weighted_sum(losses, weights) if combine is None else combine(losses)
            if extra_loss is not None:
                total = total + extra_loss()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            b = len(idx)
            for n in names:
                loss_sums[n] += float(losses[n].detach()) * b
            seen += b
            if used_idx is not None:
                used_idx.update(idx.tolist())
            step += 1
            stopped_by = budget_hit(a, time.perf_counter() - ctx.t0, ctx.energy_probe)
            if stopped_by:
                break
        if stopped_by:
            break
    n_used = data.n_train if used_idx is None else len(used_idx)
    return LocalResult(
        n_samples=int(n_used),
        train_loss={n: loss_sums[n] / max(seen, 1) for n in names},
        affinity=(aff_sum / aff_steps) if aff_steps else None,
        affinity_steps=aff_steps,
        stopped_by=stopped_by,
        sample_passes=int(seen + look_passes),
        lookahead_passes=int(look_passes),
    )


def weighted_sum(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Σ_t w_t·L_t, the multi-task objective (MAS Eq. 2; weights from ``--loss-weights``,
    :mod:`fmtl_edge.loss_weights`); a task of weight 1 adds its loss as it is (bit-equal to the
    unweighted sum)."""
    return sum(losses[n] if weights.get(n, 1.0) == 1.0 else weights[n] * losses[n] for n in losses)


def l2_pull(model: torch.nn.Module, anchor: dict[str, torch.Tensor], weight: float) -> Callable[[], torch.Tensor]:
    """``weight/2 · Σ ‖p − anchor_p‖²`` over the trainable parameters of ``model`` (a closure, for
    :func:`local_sgd`'s ``extra_loss``): FedProx's proximal term (Li et al., MLSys 2020, Eq. 2) and
    Ditto's personal objective (Li et al., ICML 2021, Eq. 2)."""
    pairs = [(p, anchor[n]) for n, p in model.named_parameters() if p.requires_grad]

    def penalty() -> torch.Tensor:
        return 0.5 * weight * sum(((p - r) ** 2).sum() for p, r in pairs)

    return penalty


@register
class SGD(Procedure):
    name = "sgd"

    def train(self, ctx: LocalContext) -> LocalResult:
        a = ctx.assignment
        return local_sgd(ctx, ctx.model, epochs=a.config.local_epochs, lr=a.lr, measure_affinity=measures(ctx))


def measures(ctx: LocalContext) -> bool:
    """Whether this round measures affinity: the assignment asks for it and, when ``method_config``
    has ``affinity_rounds`` (MAS's ``--affinity-rounds``), the round is one of them; the other
    rounds of the job are plain all-in-one rounds (no lookahead)."""
    a = ctx.assignment
    window = a.method_config.get("affinity_rounds")
    return bool(a.measure_affinity) and (window is None or int(a.round) in {int(r) for r in window})
