"""The committed gRPC stubs are what grpcio-tools generates from the committed .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmtl_edge.transport import codegen


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the stubs")
    generated = codegen.generate(tmp_path)
    for name, path in generated.items():
        committed = codegen.HERE / name
        assert committed.is_file(), f"{name} is not committed; run python -m fmtl_edge.transport.codegen"
        assert codegen.normalise(committed.read_text()) == codegen.normalise(path.read_text()), (
            f"{name} is out of date with fmtl_edge.proto: run python -m fmtl_edge.transport.codegen and commit"
        )


def test_normalise_only_blanks_version_stamps():
    a = "# Protobuf Python Version: 7.35.1\nx = 1\nGRPC_GENERATED_VERSION = '1.85.1'\n"
    b = "# Protobuf Python Version: 7.40.0\nx = 1\nGRPC_GENERATED_VERSION = '1.90.0'\n"
    assert codegen.normalise(a) == codegen.normalise(b)
    assert codegen.normalise(a) != codegen.normalise(a.replace("x = 1", "x = 2"))


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
