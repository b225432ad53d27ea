"""The committed gRPC stubs are what grpcio-tools generates from the committed .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmtl_edge.transport import codegen


def _requirements() -> dict[str, str]:
    """name → specifier of pyproject.toml's dependencies and extras (``name[extra]`` folded to name)."""
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    proj = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [*proj["dependencies"], *(r for extra in proj["optional-dependencies"].values() for r in extra)]
    out = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)", r)
        out.setdefault(m.group(1).lower(), m.group(3).strip())
    return out


def _stamps() -> tuple[str, str]:
    """(protobuf gencode version, GRPC_GENERATED_VERSION) of the committed stubs."""
    import re

    pb2 = (codegen.HERE / "fmtl_edge_pb2.py").read_text()
    grpc_py = (codegen.HERE / "fmtl_edge_pb2_grpc.py").read_text()
    return (re.search(r"^# Protobuf Python Version: (\S+)$", pb2, re.M).group(1),
            re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", grpc_py, re.M).group(1))


def test_stubs_run_on_every_runtime_the_requirements_allow():
    """Generated code runs on its own protobuf/grpcio version and newer, never older: the lowest
    protobuf and grpcio that pyproject.toml admits must not be older than the stubs' stamps, and the
    protobuf range must meet flwr 1.42's (<7) so that '.[flower]' resolves."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    req = _requirements()
    gencode, grpc_gen = _stamps()
    for name, stamp in (("protobuf", gencode), ("grpcio", grpc_gen)):
        spec = SpecifierSet(req[name])
        lows = [Version(s.version) for s in spec if s.operator in (">=", "==")]
        assert lows, f"pyproject.toml gives {name} no lower bound"
        assert max(lows) >= Version(stamp), (f"pyproject.toml admits {name} {max(lows)}, older than the stubs' "
                                             f"{stamp}: regenerate with an older grpcio-tools or raise the bound")
    assert any(SpecifierSet(req["protobuf"]).contains(v) for v in ("6.31.1", "6.33.6")), "no protobuf flwr 1.42 accepts"
    assert req["flwr"] == "==1.42.0"
    assert req["grpcio-tools"] == f"=={grpc_gen}", "the test extra pins the grpcio-tools that generated the stubs"


def test_committed_stubs_match_the_proto(tmp_path):
    """The pinned grpcio-tools (the ``test`` extra) regenerates the committed stubs from the committed
    .proto byte for byte, version stamps included. Another grpcio-tools release writes other code
    (type hints, class syntax, stamps): then the comparison cannot be made and the test says so."""
    from importlib.metadata import version

    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the stubs")
    pinned = _requirements()["grpcio-tools"].removeprefix("==")
    if version("grpcio-tools") != pinned:
        pytest.skip(f"grpcio-tools {version('grpcio-tools')} is installed; the stubs come from the pinned {pinned} "
                    f"(pip install grpcio-tools=={pinned})")
    for name, path in codegen.generate(tmp_path).items():
        committed = codegen.HERE / name
        assert committed.is_file(), f"{name} is not committed; run python -m fmtl_edge.transport.codegen"
        assert committed.read_text() == path.read_text(), (
            f"{name} is out of date with fmtl_edge.proto: run python -m fmtl_edge.transport.codegen and commit")


def test_messages_round_trip_with_optional_and_map_fields():
    from fmtl_edge.transport import fmtl_edge_pb2 as pb

    m = pb.UpdateMeta(job="merge", round=3, client_id=2, n_samples=40, device_s=1.5, affinity=[0.1, 0.2, 0.3, 0.4],
                      affinity_n=2, total_bytes=123, sha256="ab")
    m.train_loss["digit"] = 0.5
    m.eval["digit"].loss_sum = 2.0
    back = pb.UpdateMeta.FromString(m.SerializeToString())
    assert back == m and not back.HasField("energy_j")
    back.energy_j = 0.0
    assert pb.UpdateMeta.FromString(back.SerializeToString()).HasField("energy_j")  # 0 J is not "unknown"
    w = pb.Work(work_id="x")
    assert not w.HasField("time_budget_s")
    assert Path(codegen.PROTO).read_text().count("rpc ") == 7
