"""Deployment transport: the gRPC protocol between the coordinator and the device agents.

- ``fmtl_edge.proto`` and its generated stubs (``fmtl_edge_pb2``, ``fmtl_edge_pb2_grpc``;
  regenerate with ``python -m fmtl_edge.transport.codegen``);
- :mod:`~fmtl_edge.transport.tensors` — model states as safetensors files, streamed in 1–4 MiB chunks;
- :mod:`~fmtl_edge.transport.pool` — :class:`RemoteClientPool`, the coordinator's client pool over agents;
- :mod:`~fmtl_edge.transport.service` — the gRPC servicer, TLS, bearer tokens;
- :mod:`~fmtl_edge.transport.agent` — the device agent (``fmtl-edge join``, :mod:`~fmtl_edge.transport.cli`).

Submodules are imported on use, so ``import fmtl_edge.transport`` needs neither grpc nor torch.
"""
