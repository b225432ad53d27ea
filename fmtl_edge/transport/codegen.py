"""Regenerate the gRPC stubs from ``fmtl_edge.proto`` with grpcio-tools.

``python -m fmtl_edge.transport.codegen`` rewrites ``fmtl_edge_pb2.py``, ``fmtl_edge_pb2.pyi`` and
``fmtl_edge_pb2_grpc.py`` beside the ``.proto``; :func:`generate` writes them into any folder (the
test that keeps the committed stubs in sync generates into a temporary one and compares).

Use the grpcio-tools pinned in the ``test`` extra of ``pyproject.toml`` (1.76.0: protobuf gencode
6.31.1, ``GRPC_GENERATED_VERSION`` 1.76.0). Generated code runs on its own protobuf/grpcio runtime
versions and newer ones, never older: the stubs' stamps set the lower bounds of ``protobuf`` and
``grpcio`` in the package's requirements, and flwr 1.42 (extra ``[flower]``) needs protobuf < 7.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "fmtl_edge.proto"
GENERATED = ("fmtl_edge_pb2.py", "fmtl_edge_pb2.pyi", "fmtl_edge_pb2_grpc.py")
# The proto is compiled as fmtl_edge/transport/fmtl_edge.proto relative to this include root, so
# the generated grpc module imports ``from fmtl_edge.transport import fmtl_edge_pb2``.
_REL = Path("fmtl_edge") / "transport" / "fmtl_edge.proto"


def generate(out_dir: str | Path) -> dict[str, Path]:
    """Compile the .proto into ``out_dir``; returns file name → path.

    Raises:
        ImportError: grpcio-tools is not installed (``pip install grpcio-tools``).
        RuntimeError: protoc failed (its message included).
    """
    from grpc_tools import protoc

    import grpc_tools

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        (root / _REL.parent).mkdir(parents=True)
        shutil.copyfile(PROTO, root / _REL)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={gen}", f"--pyi_out={gen}",
            f"--grpc_python_out={gen}", str(root / _REL),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        out = {}
        for name in GENERATED:
            dst = out_dir / name
            shutil.copyfile(gen / _REL.parent / name, dst)
            out[name] = dst
    return out


def main() -> int:
    written = generate(HERE)
    for p in written.values():
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
