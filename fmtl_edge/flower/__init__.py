"""fmtl-edge's methods as Flower apps (extra ``[flower]``: ``pip install 'fmtl-edge[flower]'``).

- :mod:`fmtl_edge.flower.server_app` — ``app``, a :class:`flwr.serverapp.ServerApp` whose ``main``
  runs every method of the run config (MAS merge → split jobs, all-in-one, layered, ditto, loop...)
  with fmtl-edge's :class:`~fmtl_edge.coordinator.Coordinator`, strategies, kernels and affinity
  search, over :class:`~fmtl_edge.flower.pool.FlowerGridPool`, and writes the same ``results.json``
  layout as ``fmtl-edge simulate``.
- :mod:`fmtl_edge.flower.client_app` — ``app``, a :class:`flwr.clientapp.ClientApp` that runs
  fmtl-edge's client procedures (:func:`fmtl_edge.client.execute`: device lease, memory/time/energy
  budgets, meter window) on the data of its own partition only, and keeps client state in
  ``Context.state`` or the SuperNode's folder (never in a reply).
- :mod:`fmtl_edge.flower.codec` — Assignment / ClientUpdate ↔ Flower ``RecordDict`` (ArrayRecord of
  NumPy arrays saved without pickle; ConfigRecord holding JSON).
- :mod:`fmtl_edge.flower.data` — run config → :class:`~fmtl_edge.config.SimulationConfig`, and the
  per-partition data source of a ClientApp (``digits``... or the ``synthetic`` scale data).

See ``docs/flower.md`` and ``examples/flower-app/``.
"""

from __future__ import annotations


def require_flwr():
    """Import and return :mod:`flwr`.

    Raises:
        ImportError: flwr is not installed (the message names the extra to install).
    """
    try:
        import flwr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fmtl_edge.flower needs Flower: pip install 'fmtl-edge[flower]' (flwr[simulation]==1.42.*)") from e
    return flwr
