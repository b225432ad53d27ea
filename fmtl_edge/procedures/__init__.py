"""Client-side training procedures, registered by name.

An :class:`~fmtl_edge.messages.Assignment` names the procedure a client runs (``procedure``) and
carries its settings (``method_config``); the client framework (:func:`fmtl_edge.client.train_round`)
builds the model, overlays the client's personal layers, freezes pre-trained layers, calls the
procedure and uploads what may leave the client. A new method registers its procedure here with
:func:`register` and never touches the messages, the transport or the client framework.

=============== ===================================================================================
``sgd``         E local epochs of SGD on Σ_i L_i (+ MAS's lookahead affinity every ρ batches)
``fedprox``     ``sgd`` plus FedProx's proximal term μ/2·‖w − w_global‖² (``mu``)
``gradnorm``    ``sgd`` on Σ_i w_i·L_i with GradNorm's weights (``alpha``), weights in the model state
``ditto``       the global copy by ``sgd``, then the personal model p_k with λ/2·‖p_k − w*‖²
                (``lambda``, ``personal_epochs``); p_k is client state
``loop``        a Loop Improvement visit: heads only, backbone only, optionally all layers, each
                with its own optimiser (AdamW or SGD); ``phase=finetune``: the heads only
``loop-global`` Loop Improvement's stacked-head global model: ``phase=gather`` puts the node's kept
                head into its slot, ``phase=train`` trains the integrating network only
=============== ===================================================================================
"""

from __future__ import annotations

from fmtl_edge.procedures.base import LocalContext, LocalResult, Procedure, get_procedure, procedure_names, register

# The registry: one import per procedure module (each registers itself).
from fmtl_edge.procedures import sgd as _sgd  # noqa: E402,F401
from fmtl_edge.procedures import fedprox as _fedprox  # noqa: E402,F401
from fmtl_edge.procedures import ditto as _ditto  # noqa: E402,F401
from fmtl_edge.procedures import gradnorm as _gradnorm  # noqa: E402,F401
from fmtl_edge.procedures import loop as _loop  # noqa: E402,F401
from fmtl_edge.procedures import loop_global as _loop_global  # noqa: E402,F401

__all__ = ["LocalContext", "LocalResult", "Procedure", "get_procedure", "procedure_names", "register"]
