"""``fedprox``: local SGD on Σ_i L_i + μ/2·‖w − w_global‖² (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020, Eq. 2). ``method_config``: ``mu`` (> 0)."""

from __future__ import annotations

from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, register
from fmtl_edge.procedures.sgd import l2_pull, local_sgd


@register
class FedProxProcedure(Procedure):
    name = "fedprox"

    def train(self, ctx: LocalContext) -> LocalResult:
        mu = ctx.setting("mu", kind=float)
        if mu is None or not mu > 0:
            raise ValueError(f"fedprox: method_config['mu'] must be > 0, got {mu!r}")
        anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        a = ctx.assignment
        return local_sgd(ctx, ctx.model, epochs=a.config.local_epochs, lr=a.lr,
                         extra_loss=l2_pull(ctx.model, anchor, mu), measure_affinity=a.measure_affinity)
