"""``ditto``: soft sharing (Li et al., "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, Alg. 1).

Per round a sampled client k (1) trains its copy of the global model w from w^t by plain local SGD
(E epochs) and uploads it (FedAvg'd by the server), then (2) trains its personal model p_k for
``personal_epochs`` epochs on F_k(p_k) + λ/2·‖p_k − w^t‖² (Eq. 2; the anchor is the received
global model w^t). p_k starts as w^t at the client's first round and is client state: it never
leaves the client, and personalised evaluation uses it.

``method_config``: ``lambda`` (λ ≥ 0; 0 = each client fine-tunes alone from w^t), ``personal_epochs``
(default: the job's E).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fmtl_edge.models import MultiTaskModel
from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register
from fmtl_edge.procedures.sgd import l2_pull, local_sgd

PREFIX = "p."


@register
class DittoProcedure(Procedure):
    name = "ditto"

    def train(self, ctx: LocalContext) -> LocalResult:
        lam = ctx.setting("lambda", kind=float)
        if lam is None or not lam >= 0:
            raise ValueError(f"ditto: method_config['lambda'] must be >= 0, got {lam!r}")
        a = ctx.assignment
        epochs = ctx.setting("personal_epochs", a.config.local_epochs, int)
        received = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        anchor = {n: received[n] for n, _ in ctx.model.named_parameters()}
        # (1) the global copy: plain local SGD from w^t, uploaded by the framework.
        res = local_sgd(ctx, ctx.model, epochs=a.config.local_epochs, lr=a.lr)
        # (2) the personal model p_k with the L2 pull towards w^t.
        personal = MultiTaskModel(ctx.spec, ctx.model.tasks).to(a.config.device)
        if ctx.stored is None:
            personal.load_state_dict(received)
        else:
            own = personal.state_dict()
            personal.load_state_dict({k: torch.as_tensor(np.asarray(ctx.stored[PREFIX + k])).to(v.dtype)
                                      for k, v in own.items()})
        pres = local_sgd(ctx, personal, epochs=epochs, lr=a.lr, extra_loss=l2_pull(personal, anchor, lam))
        res.stored = {PREFIX + k: v.detach().cpu().numpy().copy() for k, v in personal.state_dict().items()}
        res.stopped_by = res.stopped_by or pres.stopped_by
        res.sample_passes += pres.sample_passes  # both models' training counted
        return res

    def personal_state(self, global_state: Mapping[str, np.ndarray],
                       stored: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
        if stored is None:  # never sampled: its personal model is still the global one
            return global_state
        return {k[len(PREFIX):]: v for k, v in stored.items() if k.startswith(PREFIX)}
