"""Slice aggregation: native kernels against the NumPy references (property tests) and the error contract.

Tolerances: the weighted average is compared bit for bit (the kernel and the reference perform the
same float32 operations in the same order) and, against exact float64 arithmetic, within
(K + 2)·2^-24 relative to Σ w|x| / Σ w.  The robust variants are compared within 1 float32 ulp.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_edge import _kernels
from fmtl_edge.aggregation import (
    Accumulator,
    coordinate_median,
    coordinate_median_reference,
    trimmed_mean,
    trimmed_mean_reference,
    weighted_average_slices,
    weighted_average_slices_reference,
)

DTYPES = ("float32", "float16", "bfloat16")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


NP_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def encode(x32: np.ndarray, dtype: str) -> np.ndarray:
    """x as an array of the given dtype (bfloat16 via ml_dtypes)."""
    return x32.astype(NP_DTYPE[dtype])


def decoded(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


@st.composite
def problems(draw, max_p: int = 97, max_k: int = 5):
    """A random aggregation problem: odd lengths, gaps, zero-length slices, mixed dtypes."""
    P = draw(st.integers(0, max_p))
    K = draw(st.integers(1, max_k))
    cuts = sorted(draw(st.lists(st.integers(0, P), max_size=6)))
    bounds = [0, *cuts, P]
    slices = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if draw(st.booleans()) or a == b:  # keep the segment (zero-length ones too) or leave a gap
            slices.append((a, b - a))
    if not slices:
        slices = [(0, P)]
    S = len(slices)
    contrib = np.array(draw(st.lists(st.lists(st.booleans(), min_size=K, max_size=K), min_size=S, max_size=S)),
                       dtype=bool).reshape(S, K)
    weights = draw(st.lists(st.floats(0.01, 1000.0), min_size=K, max_size=K))
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=K, max_size=K))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    xs = [encode(rng.normal(0, 3, P).astype(np.float32), d) for d in dtypes]
    glob = rng.normal(0, 1, P).astype(np.float32)
    return glob, xs, np.array(weights), np.array(slices, dtype=np.int64).reshape(-1, 2), contrib


def exact(glob, xs, w, slices, contrib):
    out = glob.astype(np.float64).copy()
    for s, (off, ln) in enumerate(slices):
        ks = np.flatnonzero(contrib[s])
        if ks.size and ln:
            out[off:off + ln] = sum(w[k] * decoded(xs[k])[off:off + ln].astype(np.float64) for k in ks) / w[ks].sum()
    return out


@FAST
@given(problems())
def test_weighted_average_matches_reference_bitwise(prob):
    glob, xs, w, slices, contrib = prob
    got = weighted_average_slices(glob.copy(), xs, w, slices, contrib)
    ref = weighted_average_slices_reference(glob.copy(), xs, w, slices, contrib)
    np.testing.assert_array_equal(got, ref)
    # against exact arithmetic
    K = len(xs)
    scale = np.ones_like(glob, dtype=np.float64)
    for s, (off, ln) in enumerate(slices):
        ks = np.flatnonzero(contrib[s])
        if ks.size and ln:
            scale[off:off + ln] = sum(w[k] * np.abs(decoded(xs[k])[off:off + ln]) for k in ks) / w[ks].sum()
    err = np.abs(got.astype(np.float64) - exact(glob, xs, w, slices, contrib))
    assert (err <= (K + 2) * 2.0**-24 * scale + 1e-30).all()


@FAST
@given(problems())
def test_accumulator_equals_batch(prob):
    glob, xs, w, slices, contrib = prob
    batch = weighted_average_slices(glob.copy(), xs, w, slices, contrib)
    acc = Accumulator(glob.size, slices)
    for k, x in enumerate(xs):
        acc.add(x, w[k], contrib[:, k])
    assert acc.n_added == len(xs)
    np.testing.assert_array_equal(acc.result(glob.copy()), batch)


@FAST
@given(problems(max_k=6), st.floats(0.0, 0.49))
def test_robust_variants_match_reference(prob, trim):
    glob, xs, _, slices, contrib = prob
    m = coordinate_median(glob.copy(), xs, slices, contrib)
    mr = coordinate_median_reference(glob.copy(), xs, slices, contrib)
    np.testing.assert_array_max_ulp(m, mr, maxulp=1)
    t = trimmed_mean(glob.copy(), xs, slices, contrib, trim)
    tr = trimmed_mean_reference(glob.copy(), xs, slices, contrib, trim)
    np.testing.assert_array_max_ulp(t, tr, maxulp=1)


def test_single_client_is_identity_and_personal_slices_untouched():
    x = np.arange(10, dtype=np.float32)
    g = np.full(10, -1.0, np.float32)
    slices = np.array([[0, 4], [4, 3], [7, 3]])
    contrib = np.array([[True], [False], [True]])
    out = weighted_average_slices(g, [x], [7.0], slices, contrib)
    assert out is g
    np.testing.assert_array_equal(out, [0, 1, 2, 3, -1, -1, -1, 7, 8, 9])  # exact: one client
    x2 = [np.float32(0.1) * np.arange(10, dtype=np.float32)] * 3
    np.testing.assert_array_equal(weighted_average_slices(g.copy(), x2, [5, 5, 5], [[0, 10]], [[1, 1, 1]]), x2[0] * 3 / 3)


def test_input_kinds_torch_bytes_memoryview_uint16():
    rng = np.random.default_rng(1)
    P = 1001  # odd
    base = [rng.normal(size=P).astype(np.float32) for _ in range(6)]
    slices = np.array([[0, 500], [500, 501]])
    contrib = np.ones((2, 6), bool)
    w = np.arange(1.0, 7.0)
    bf = base[4].astype(ml_dtypes.bfloat16)
    payload = b"\x01" + base[3].astype(np.float16).tobytes()  # odd offset: unaligned
    inputs = [
        torch.from_numpy(base[0]),                              # torch fp32
        torch.from_numpy(base[1]).to(torch.bfloat16),           # torch bf16
        base[2].astype(np.float16).tobytes(),                   # bytes, F16
        memoryview(payload)[1:],                                # unaligned memoryview, F16
        bf.view(np.uint16),                                     # uint16 bits, BF16
        torch.from_numpy(base[5]).reshape(7, 11, 13).half(),    # shaped torch fp16
    ]
    dt = [None, None, "F16", "float16", "bfloat16", None]
    got = weighted_average_slices(np.zeros(P, np.float32), inputs, w, slices, contrib, dtype=dt)
    plain = [base[0], base[1].astype(ml_dtypes.bfloat16), base[2].astype(np.float16), base[3].astype(np.float16),
             bf, base[5].astype(np.float16)]
    ref = weighted_average_slices_reference(np.zeros(P, np.float32), plain, w, slices, contrib)
    np.testing.assert_array_equal(got, ref)


def test_multithreaded_large_matches_reference_and_rolls_back():
    rng = np.random.default_rng(2)
    P = (1 << 20) + 3
    xs = [rng.normal(size=P).astype(np.float32) for _ in range(5)]
    xs[2] = xs[2].astype(np.float16)
    slices = np.array([[0, 1000], [1000, P - 2000], [P - 1000, 1000]])
    contrib = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    g = rng.normal(size=P).astype(np.float32)
    got = weighted_average_slices(g.copy(), xs, w, slices, contrib, n_threads=2)
    np.testing.assert_array_equal(got, weighted_average_slices_reference(g.copy(), xs, w, slices, contrib))
    # a NaN near the end: earlier blocks were already committed and must be rolled back
    bad = [x.copy() for x in xs]
    bad[3][P - 1500] = np.nan
    out = g.copy()
    with pytest.raises(ValueError, match=r"client 3: .*NaN or Inf.*index %d" % (P - 1500)):
        weighted_average_slices(out, bad, w, slices, contrib, n_threads=2)
    np.testing.assert_array_equal(out, g)
    # without rollback: same result, and the error is still raised
    fast = weighted_average_slices(g.copy(), xs, w, slices, contrib, n_threads=2, rollback=False)
    np.testing.assert_array_equal(fast, got)
    with pytest.raises(ValueError, match="client 3: .*partly updated"):
        weighted_average_slices(g.copy(), bad, w, slices, contrib, rollback=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_names_client_and_writes_nothing(dtype, value):
    P = 33
    xs = [encode(np.ones(P, np.float32), dtype) for _ in range(3)]
    xs[1][17] = value
    g = np.arange(P, dtype=np.float32)
    out = g.copy()
    contrib = np.ones((1, 3), bool)
    with pytest.raises(ValueError, match="client 1"):
        weighted_average_slices(out, xs, [1, 1, 1], [[0, P]], contrib)
    np.testing.assert_array_equal(out, g)
    with pytest.raises(ValueError, match="client 1"):
        weighted_average_slices_reference(out, xs, [1, 1, 1], [[0, P]], contrib)
    np.testing.assert_array_equal(out, g)
    # streaming: the bad client is refused and the accumulator is unchanged
    acc = Accumulator(P, [[0, P]])
    acc.add(xs[0], 1.0, [True])
    with pytest.raises(ValueError, match="client 1"):
        acc.add(xs[1], 1.0, [True])
    acc.add(xs[2], 1.0, [True])
    assert acc.n_added == 2
    np.testing.assert_array_equal(acc.result(out), np.ones(P, np.float32))
    # NaN only in a slice the client does not contribute to: accepted
    contrib2 = np.array([[True, True, True], [True, False, True]])
    weighted_average_slices(g.copy(), xs, [1, 1, 1], [[0, 10], [10, 23]], contrib2)


@pytest.mark.parametrize("w", [0.0, -1.0, np.nan, np.inf])
def test_bad_weight_names_client(w):
    xs = [np.ones(4, np.float32)] * 3
    out = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="client 2: weight"):
        weighted_average_slices(out, xs, [1.0, 1.0, w], [[0, 4]], np.ones((1, 3), bool))
    assert not out.any()
    with pytest.raises(ValueError, match="weight"):
        Accumulator(4, [[0, 4]]).add(xs[0], w, [True])


def test_length_and_dtype_errors_name_client():
    out = np.zeros(8, np.float32)
    c = np.ones((1, 2), bool)
    with pytest.raises(ValueError, match="client 1: has 7 float32 elements"):
        weighted_average_slices(out, [np.ones(8, np.float32), np.ones(7, np.float32)], [1, 1], [[0, 8]], c)
    with pytest.raises(ValueError, match="client 0: unsupported array dtype float64"):
        weighted_average_slices(out, [np.ones(8), np.ones(8, np.float32)], [1, 1], [[0, 8]], c)
    with pytest.raises(ValueError, match="client 1: unknown dtype 'F64'"):
        weighted_average_slices(out, [np.ones(8, np.float32), b"\0" * 64], [1, 1], [[0, 8]], c, dtype=[None, "F64"])
    with pytest.raises(ValueError, match="client 1: raw bytes need dtype"):
        weighted_average_slices(out, [np.ones(8, np.float32), b"\0" * 32], [1, 1], [[0, 8]], c)
    with pytest.raises(ValueError, match="client 0: unsupported tensor dtype"):
        weighted_average_slices(out, [torch.ones(8, dtype=torch.float64), np.ones(8, np.float32)], [1, 1], [[0, 8]], c)
    with pytest.raises(ValueError, match="overlap"):
        weighted_average_slices(out, [np.ones(8, np.float32)] * 2, [1, 1], [[0, 5], [4, 4]], np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="outside"):
        weighted_average_slices(out, [np.ones(8, np.float32)] * 2, [1, 1], [[4, 5]], c)
    with pytest.raises(ValueError, match="contrib"):
        weighted_average_slices(out, [np.ones(8, np.float32)] * 2, [1, 1], [[0, 8]], np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="weights"):
        weighted_average_slices(out, [np.ones(8, np.float32)] * 2, [1, 1, 1], [[0, 8]], c)
    with pytest.raises(ValueError, match="out must be float32"):
        weighted_average_slices(np.zeros(8), [np.ones(8, np.float32)] * 2, [1, 1], [[0, 8]], c)
    assert not out.any()


def test_overflow_is_reported_and_rolled_back():
    P = 300_000
    xs = [np.full(P, 3e38, np.float32), np.full(P, 3e38, np.float32)]
    out = np.zeros(P, np.float32)
    with pytest.raises(ValueError, match="overflowed"):
        weighted_average_slices(out, xs, [1.0, 1.0], [[0, P]], np.ones((1, 2), bool))
    assert not out.any()


def test_half_decoding_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    finite = np.isfinite(h)
    x = bits[finite]
    out = np.zeros(x.size, np.float32)
    weighted_average_slices(out, [x], [1.0], [[0, x.size]], [[True]], dtype="float16")
    np.testing.assert_array_equal(out, h[finite].astype(np.float32))
    b = bits[np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))]
    out = np.zeros(b.size, np.float32)
    weighted_average_slices(out, [b], [1.0], [[0, b.size]], [[True]], dtype="bfloat16")
    np.testing.assert_array_equal(out, (b.astype(np.uint32) << 16).view(np.float32))


def test_accumulator_memory_is_o_p():
    acc = Accumulator(1000, [[0, 600], [700, 300]])
    assert acc.state_bytes <= 900 * 4 + 2 * 8
    assert acc.n_added == 0


def test_module_reports_cuda_state_without_gpu():
    assert isinstance(_kernels.cuda_compiled, bool)
    assert isinstance(_kernels.cuda_available(), bool)
    if not torch.cuda.is_available():
        assert _kernels.cuda_available() is False
