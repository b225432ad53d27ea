"""CUDA slice aggregation against the CPU kernel (bit-for-bit: same float operations, no FMA).

Runs where a CUDA GPU is present and the module was built with the CUDA kernel; skips with the reason
elsewhere.  The import-without-GPU behaviour is checked in test_aggregation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_edge import _kernels
from fmtl_edge.aggregation import weighted_average_slices, weighted_average_slices_reference

HAS_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to torch (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not _kernels.cuda_compiled, reason="fmtl_edge._kernels was built without the CUDA kernel "
                       "(no CUDA toolkit at build time)"),
]

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _problem(rng, P, K, dtypes):
    cut = sorted(rng.integers(0, P + 1, size=3).tolist())
    slices = np.array([[0, cut[0]], [cut[0], cut[1] - cut[0]], [cut[2], P - cut[2]]], dtype=np.int64)
    contrib = rng.random((3, K)) < 0.7
    w = rng.uniform(0.5, 100.0, K)
    xs = [torch.from_numpy(rng.normal(0, 2, P).astype(np.float32)).to(TORCH_DT[d]) for d in dtypes]
    g = rng.normal(size=P).astype(np.float32)
    return g, xs, w, slices, contrib


def test_cuda_available_reported():
    assert _kernels.cuda_available()
    assert _kernels.cuda_device_count() >= 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 5000), st.lists(st.sampled_from(list(TORCH_DT)), min_size=1, max_size=5),
       st.integers(0, 2**31 - 1))
def test_cuda_equals_cpu_bitwise(P, dtypes, seed):
    rng = np.random.default_rng(seed)
    g, xs, w, slices, contrib = _problem(rng, P, len(dtypes), dtypes)
    cpu = weighted_average_slices_reference(g.copy(), xs, w, slices, contrib)
    out = torch.from_numpy(g.copy()).cuda()
    res = weighted_average_slices(out, [x.cuda() for x in xs], w, slices, contrib)
    assert res is out
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy(), cpu)


def test_cuda_large_and_on_side_stream():
    rng = np.random.default_rng(0)
    P = (1 << 22) + 5
    dtypes = ["float32", "float16", "bfloat16", "float32"]
    g, xs, w, slices, contrib = _problem(rng, P, 4, dtypes)
    cpu = weighted_average_slices(g.copy(), xs, w, slices, contrib)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = torch.from_numpy(g.copy()).cuda(non_blocking=False)
        dx = [x.cuda() for x in xs]
        weighted_average_slices(out, dx, w, slices, contrib, check_finite=False)
    s.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy(), cpu)


@pytest.mark.parametrize("dtype", list(TORCH_DT))
def test_cuda_nonfinite_names_client_and_restores(dtype):
    P = 100_003
    xs = [torch.ones(P, dtype=TORCH_DT[dtype], device="cuda") for _ in range(3)]
    xs[2][P - 7] = float("nan")
    out = torch.arange(P, dtype=torch.float32, device="cuda")
    before = out.clone()
    with pytest.raises(ValueError, match=f"client 2: .*index {P - 7}"):
        weighted_average_slices(out, xs, [1.0, 2.0, 3.0], [[0, P]], np.ones((1, 3), bool))
    assert torch.equal(out, before)


def test_cuda_mixed_devices_refused():
    out = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match="client 1"):
        weighted_average_slices(out, [torch.ones(8, device="cuda"), torch.ones(8)], [1, 1], [[0, 8]],
                                np.ones((1, 2), bool))
