"""Task-affinity measurement by lookahead (client side) and its averaging (server side).

Source: MAS (Zhuang et al., ICCV 2023), Eq. 3, after TAG (Fifty et al., NeurIPS 2021, Eq. 1–2).
On a batch ``X_t`` of all-in-one training, for each task ``i`` a lookahead step is taken on the shared
parameters only,

    θ_s' = θ_s − η·(∇_{θ_s} L_i(X_t; θ_s, θ_i) + wd·θ_s)        (heads unchanged)

and for every task ``j``

    S[i, j] = S_{i→j} = 1 − L_j(X_t; θ_s', θ_j) / L_j(X_t; θ_s, θ_j).

The lookahead changes nothing: the backbone is evaluated with :func:`torch.func.functional_call`
on substituted parameters and *cloned* buffers, so BatchNorm running statistics, the module's
parameters and the optimizer state are untouched (tested).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call

from fmtl_edge.models import MultiTaskModel


def lookahead_affinity(
    model: MultiTaskModel,
    x: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    base_losses: Mapping[str, torch.Tensor],
    lr: float,
    weight_decay: float = 0.0,
    tasks: Sequence[str] | None = None,
    divide_by_lr: bool = False,
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """One lookahead measurement of the ``n × n`` task-affinity matrix on one batch (Eq. 3).

    Args:
        model: the multi-task model, in the mode training uses (``train()``: BatchNorm uses batch
            statistics, as in the training forward that produced ``base_losses``).
        x: the batch, ``(B, ...)`` float32 on the model's device.
        targets: task → targets of the batch.
        base_losses: task → scalar loss ``L_j(X_t; θ_s, θ_j)`` *with its autograd graph* (the
            training forward of this batch); the graph is kept (``retain_graph``) for the real step.
        lr: η, the learning rate of the current round.
        weight_decay: ``wd`` added to the lookahead gradient.
        tasks: task order of rows/columns (default: the model's).
        divide_by_lr: TAG's normalisation, ``S / η`` (off by default; docs/design.md §2).
        weights: task → w_i of the objective (``--loss-weights``): task i's lookahead step follows
            ∇(w_i·L_i), the step its share of the training objective takes; S compares raw losses
            (a ratio, the same on any scale). None: every w_i = 1.

    Returns:
        ``(n, n)`` float64, ``S[i, j]`` = effect of task i's lookahead step on task j's loss. A task
        whose base loss is 0 gets 0 in its column.
    """
    names = list(model.task_names if tasks is None else tasks)
    shared = dict(model.backbone.named_parameters())
    shared_names = list(shared)
    params = [shared[n] for n in shared_names]
    base = {j: float(base_losses[j].detach()) for j in names}
    S = np.zeros((len(names), len(names)), dtype=np.float64)
    for i, ti in enumerate(names):
        w = 1.0 if weights is None else float(weights.get(ti, 1.0))
        objective = base_losses[ti] if w == 1.0 else w * base_losses[ti]
        grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
        with torch.no_grad():
            stepped = {
                n: p - lr * ((g if g is not None else torch.zeros_like(p)) + weight_decay * p)
                for n, p, g in zip(shared_names, params, grads)
            }
            # Cloned buffers absorb BatchNorm's running-statistics update in train mode.
            buffers = {n: b.clone() for n, b in model.backbone.named_buffers()}
            feats = functional_call(model.backbone, {**stepped, **buffers}, (x,))
            for j, tj in enumerate(names):
                if base[tj] == 0.0:
                    continue
                new = float(model.tasks[tj].loss(model.heads[tj](feats), targets[tj]))
                S[i, j] = 1.0 - new / base[tj]
    if divide_by_lr:
        S /= lr
    return S


class AffinityAverager:
    """Server-side averaging of client affinity matrices (MAS Alg. 1 line 12).

    Each round's matrix is the equal-weight mean of the matrices of that round's clients that
    measured at least one step; the result is the mean over the rounds selected by ``rounds``
    (default: every round added). Non-positive values are kept (never dropped).

    Args:
        n: number of tasks.
        rounds: the round indices to average over, or None for all.
    """

    def __init__(self, n: int, rounds: Sequence[int] | None = None):
        self.n = n
        self.rounds = None if rounds is None else set(int(r) for r in rounds)
        self.per_round: dict[int, np.ndarray] = {}

    def add_round(self, round_idx: int, client_matrices: Sequence[np.ndarray | None]) -> np.ndarray | None:
        """Average one round's client matrices (``None`` entries skipped); returns the round mean."""
        mats = [np.asarray(m, dtype=np.float64) for m in client_matrices if m is not None]
        for m in mats:
            if m.shape != (self.n, self.n):
                raise ValueError(f"client affinity matrix has shape {m.shape}, expected {(self.n, self.n)}")
            if not np.all(np.isfinite(m)):
                raise ValueError("client affinity matrix has NaN/Inf entries")
        if not mats:
            return None
        mean = np.mean(mats, axis=0)
        self.per_round[int(round_idx)] = mean
        return mean

    def result(self) -> np.ndarray | None:
        """Mean over the selected rounds, ``(n, n)`` float64, or None if nothing was measured."""
        keys = sorted(r for r in self.per_round if self.rounds is None or r in self.rounds)
        if not keys:
            return None
        return np.mean([self.per_round[r] for r in keys], axis=0)
