"""``gradnorm``: local SGD on Σ_i w_i·L_i with GradNorm's loss weights (Chen et al., "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, §3).

At every step, with W the last shared layer (:func:`last_shared_weight`: the backbone's last
conv/linear weight), G_i = ‖∇_W w_i·L_i‖₂ = w_i·‖∇_W L_i‖₂, Ḡ = mean_i G_i (a constant),
L̃_i = L_i / L_i(0), r_i = L̃_i / mean_j L̃_j (Eq. 1) and

    L_grad = Σ_i |G_i − Ḡ·r_i^α|                                               (Eq. 2)

with Ḡ·r_i^α held constant. The model takes its step on Σ_i w_i·L_i with the step's weights; the
weights take a plain gradient step w ← w − η·∇_w L_grad (η: the round's learning rate), are kept
positive and renormalised to Σ_i w_i = n (the client's tasks of the job).

The weights are model state: ``gradnorm.weights`` (one per job task, job order) and the initial
losses L_i(0) ``gradnorm.loss0`` (0 = not yet set: a client sets it from its first batch) are
extra common tensors of the global state (the method adds them), loaded here into buffers of the
model, updated by the client and uploaded, so the server FedAvg's them with the backbone.

``method_config``: ``alpha`` (α ≥ 0, the restoring-force strength; 1.5 in the paper's NYUv2 runs).

Cost: every step that balances (a client holding ≥ 2 of the job's tasks) takes n extra gradients,
∇_W L_i for each of its n tasks — a backward of the batch from each task's loss to W. They are
counted in ``sample_passes`` as n × B per step (one sample-pass per sample and task, the convention
of the lookahead's passes; an upper bound, since the backward stops at W), on top of the step's B;
a one-task client balances nothing and adds nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register
from fmtl_edge.procedures.sgd import local_sgd

WEIGHTS = "gradnorm.weights"
LOSS0 = "gradnorm.loss0"
#: smallest weight kept (GradNorm's weights must stay positive)
MIN_WEIGHT = 1e-4


class GradNormState(nn.Module):
    """The loss weights and the initial losses as buffers (state names ``gradnorm.weights``,
    ``gradnorm.loss0`` once attached to a model as ``model.gradnorm``)."""

    def __init__(self, weights: torch.Tensor, loss0: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights.detach().clone().float())
        self.register_buffer("loss0", loss0.detach().clone().float())


def initial_entries(n_tasks: int) -> dict[str, np.ndarray]:
    """The global state's GradNorm entries at the start of a job: weights 1, initial losses unset."""
    return {WEIGHTS: np.ones(n_tasks, dtype=np.float32), LOSS0: np.zeros(n_tasks, dtype=np.float32)}


def last_shared_weight(model: nn.Module) -> torch.Tensor:
    """W: the weight of the backbone's last conv/linear layer that trains.

    Raises:
        ValueError: the backbone has no trainable conv/linear layer.
    """
    layers = [m for m in model.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and m.weight.requires_grad]
    if not layers:
        raise ValueError("gradnorm: the backbone has no trainable conv/linear layer to balance gradients on")
    return layers[-1].weight


def gradnorm_step(losses: Sequence[torch.Tensor], weights: torch.Tensor, loss0: torch.Tensor, W: torch.Tensor,
                  alpha: float, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One GradNorm update of the weights (Eq. 1–2) and the objective of the model's step.

    Args:
        losses: L_i with their graphs (kept: ``retain_graph``).
        weights: w_i (> 0), the weights of this step.
        loss0: L_i(0) (> 0).
        W: the last shared layer's weight.

    Returns:
        (Σ_i w_i·L_i with this step's weights, the updated weights renormalised to sum n).
    """
    n = len(losses)
    g = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(L, W, retain_graph=True)[0]).detach()
                     for L in losses])
    w = weights.detach()
    G = w * g
    G_bar = G.mean()
    L = torch.stack([x.detach() for x in losses])
    ratio = L / loss0
    r = ratio / ratio.mean()
    target = G_bar * r ** alpha
    grad_w = torch.sign(G - target) * g
    new = torch.clamp(w - lr * grad_w, min=MIN_WEIGHT)
    new = new * (n / new.sum())
    objective = sum(wi * Li for wi, Li in zip(w, losses))
    return objective, new


@register
class GradNormProcedure(Procedure):
    name = "gradnorm"

    def train(self, ctx: LocalContext) -> LocalResult:
        alpha = ctx.setting("alpha", 1.5, float)
        if not alpha >= 0:
            raise ValueError(f"gradnorm: method_config['alpha'] must be >= 0, got {alpha!r}")
        a = ctx.assignment
        job_tasks = list(a.tasks)
        st = a.state
        if WEIGHTS not in st or LOSS0 not in st:
            raise ValueError(f"gradnorm: the global state lacks {WEIGHTS!r}/{LOSS0!r} (the method adds them)")
        w0, l0 = np.asarray(st[WEIGHTS], dtype=np.float32), np.asarray(st[LOSS0], dtype=np.float32)
        if w0.shape != (len(job_tasks),) or l0.shape != (len(job_tasks),):
            raise ValueError(f"gradnorm: {WEIGHTS!r} has shape {w0.shape}, expected ({len(job_tasks)},)")
        device = a.config.device
        model = ctx.model
        model.gradnorm = GradNormState(torch.from_numpy(w0.copy()), torch.from_numpy(l0.copy())).to(device)
        mine = list(ctx.tasks.names)
        idx = torch.tensor([job_tasks.index(t) for t in mine], device=device)
        W = last_shared_weight(model)
        lr = a.lr

        def combine(losses: dict[str, torch.Tensor]) -> torch.Tensor:
            buf = model.gradnorm
            Ls = [losses[t] for t in mine]
            with torch.no_grad():
                l0_mine = buf.loss0[idx]
                unset = l0_mine <= 0
                if bool(unset.any()):
                    cur = torch.stack([x.detach() for x in Ls]).clamp_min(1e-12)
                    buf.loss0[idx] = torch.where(unset, cur, l0_mine)
            if len(Ls) == 1:  # one task: nothing to balance
                return buf.weights[idx][0].detach() * Ls[0]
            objective, new = gradnorm_step(Ls, buf.weights[idx], buf.loss0[idx], W, alpha, lr)
            with torch.no_grad():
                buf.weights[idx] = new
            return objective

        res = local_sgd(ctx, model, epochs=a.config.local_epochs, lr=lr, combine=combine,
                        measure_affinity=a.measure_affinity)
        return dataclasses.replace(res, sample_passes=res.sample_passes + gradnorm_passes(res, len(mine)))


def gradnorm_passes(res: LocalResult, n_tasks: int) -> int:
    """GradNorm's extra sample-passes of a client round: n × (the steps' samples) when n >= 2 tasks
    are balanced (one ∇_W L_i per task and step, see the module docstring), else 0. The steps'
    samples are ``sample_passes − lookahead_passes`` of :func:`~fmtl_edge.procedures.sgd.local_sgd`."""
    if n_tasks < 2:
        return 0
    return n_tasks * (int(res.sample_passes) - int(res.lookahead_passes))
