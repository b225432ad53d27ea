"""Weighted averaging of parameter slices over the clients that hold them.

This is the server side of FedAvg with scoped parameters (MAS seed 003 all-in-one/split training,
the layered method of seed 000): the flat parameter vector of P float32 values is cut into slices
``(offset, length)``; each slice is averaged over the clients that contribute to it (``common``: all,
``task:<t>``: the clients that trained task t) and slices without a contributor (``personal``,
``frozen``) keep their current value::

    out[off:off+len] = sum_k w_k * x_k[off:off+len] / sum_k w_k      over k with contrib[s, k]

The work is done by the native module :mod:`fmtl_edge._kernels` (multi-threaded, vectorised, GIL
released; a CUDA kernel for CUDA tensors).  Every kernel has a plain NumPy ``*_reference`` twin with
the same semantics and, for the weighted average, the same float32 rounding (results are equal bit
for bit on CPU).

Inputs (one per client, all of P elements)
    * ``np.ndarray`` of dtype float32, float16 or bfloat16 (``ml_dtypes.bfloat16``), any shape with
      P elements; a ``uint16`` array is taken as raw bfloat16/float16 bits when ``dtype`` says so;
    * ``torch.Tensor`` of float32/float16/bfloat16: CPU tensors are read in place through the buffer
      protocol (no copy when contiguous); CUDA tensors dispatch to the CUDA kernel (then every input
      and ``out`` must be CUDA tensors on one device);
    * raw little-endian bytes (``bytes``, ``bytearray``, ``memoryview``, e.g. a tensor's byte range in
      a safetensors payload) together with ``dtype``.

``dtype`` names: ``"float32"``/``"F32"``, ``"float16"``/``"F16"``, ``"bfloat16"``/``"BF16"`` (the
safetensors spellings work), or a NumPy/torch dtype; give one for all clients or a sequence with one
entry (or ``None`` = infer) per client.

Arithmetic (all paths): weights are taken relative to the slice's first contributing client f; per
element ``acc = 0; acc = acc + float32(w_k / w_f) * x_k`` in float32 in client order, then
``out = acc / float32(W / w_f)`` with ``W = sum_k w_k`` summed in float64.  A single client or equal
weights thus multiply by exactly 1 (one client gives its values back unchanged).  Relative error
versus exact arithmetic is below ``(K + 2) * 2**-24`` times ``sum_k w_k |x_k| / W``.

Errors: :class:`ValueError` naming the client index for a weight that is <= 0, NaN or Inf, a
non-finite value (NaN/Inf) in an element that enters an average, a length mismatch or an unknown
dtype; also for malformed ``slices``/``contrib``.  On error nothing is written to ``out``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # the native module; absent only in a source tree that was never built
    from fmtl_edge import _kernels as _K
except ImportError as _exc:  # pragma: no cover - exercised only without a build
    if os.environ.get("FMTL_REQUIRE_NATIVE"):
        raise
    _K = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None

__all__ = [
    "Accumulator",
    "coordinate_median",
    "coordinate_median_reference",
    "native_available",
    "trimmed_mean",
    "trimmed_mean_reference",
    "weighted_average_slices",
    "weighted_average_slices_reference",
]

F32, F16, BF16 = 0, 1, 2
_DTYPE_NAMES = {
    "float32": F32, "f32": F32, "fp32": F32, "float": F32, "<f4": F32,
    "float16": F16, "f16": F16, "fp16": F16, "half": F16, "<f2": F16,
    "bfloat16": BF16, "bf16": BF16,
}
_CODE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}
_ITEMSIZE = {F32: 4, F16: 2, BF16: 2}


def native_available() -> bool:
    """True when the compiled module :mod:`fmtl_edge._kernels` could be imported."""
    return _K is not None


def _native() -> Any:
    if _K is None:
        from fmtl_edge.kernels import warn_fallback

        warn_fallback("aggregation")
    return _K


# ----------------------------------------------------------------------------------- inputs ----

def _dtype_code(d: Any, who: str) -> int:
    """Maps a dtype spelling (str, NumPy dtype, torch dtype) to a kernel code or raises."""
    if isinstance(d, str):
        code = _DTYPE_NAMES.get(d.lower())
        if code is None:
            raise ValueError(f"{who}: unknown dtype {d!r}; use float32, float16 or bfloat16")
        return code
    name = str(d)
    if name.startswith("torch."):
        name = name[len("torch."):]
    try:
        np_name = np.dtype(d).name if not name.startswith(("bfloat16",)) else name
    except TypeError:
        np_name = name
    code = _DTYPE_NAMES.get(np_name.lower())
    if code is None:
        raise ValueError(f"{who}: unknown dtype {d!r}; use float32, float16 or bfloat16")
    return code


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "is_cuda") and hasattr(x, "data_ptr")


def _per_client(dtype: Any, K: int) -> list[Any]:
    if dtype is None or isinstance(dtype, str) or not isinstance(dtype, Sequence):
        return [dtype] * K
    if len(dtype) != K:
        raise ValueError(f"dtype: got {len(dtype)} entries for {K} clients; give one dtype or one per client")
    return list(dtype)


def _as_buffer(x: Any, dtype: Any, P: int, who: str) -> tuple[Any, int]:
    """Returns (contiguous buffer object, dtype code) for one CPU client input, zero-copy when possible."""
    if _is_torch(x):
        import torch

        if x.is_cuda:
            raise ValueError(f"{who}: CUDA tensor mixed with CPU inputs/out; pass all inputs and out on one device")
        t = x.detach()
        if dtype is not None and t.dtype in (torch.uint8, torch.int16, torch.uint16):
            code = _dtype_code(dtype, who)
        else:
            code = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}.get(t.dtype, -1)
            if code < 0:
                raise ValueError(f"{who}: unsupported tensor dtype {t.dtype}; use float32, float16 or bfloat16")
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        arr = t.numpy().reshape(-1)
        return _check_len(arr, code, P, who)
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":
            code = BF16
            if dtype is not None and _dtype_code(dtype, who) != BF16:
                raise ValueError(f"{who}: array is bfloat16 but dtype={dtype!r}")
            arr = np.ascontiguousarray(x).reshape(-1).view(np.uint16)
        elif x.dtype in (np.float32, np.float16):
            code = F32 if x.dtype == np.float32 else F16
            if dtype is not None and _dtype_code(dtype, who) != code:
                raise ValueError(f"{who}: array is {x.dtype} but dtype={dtype!r}")
            arr = np.ascontiguousarray(x).reshape(-1)
        elif dtype is not None and x.dtype in (np.uint16, np.int16, np.uint8, np.int8):
            code = _dtype_code(dtype, who)
            arr = np.ascontiguousarray(x).reshape(-1)
        else:
            raise ValueError(f"{who}: unsupported array dtype {x.dtype}; use float32, float16, bfloat16, "
                             "or raw uint16/uint8 with dtype=...")
        if not arr.dtype.isnative:
            arr = arr.byteswap().view(arr.dtype.newbyteorder())
        return _check_len(arr, code, P, who)
    if isinstance(x, (bytes, bytearray, memoryview)):
        if dtype is None:
            raise ValueError(f"{who}: raw bytes need dtype= (float32, float16 or bfloat16)")
        code = _dtype_code(dtype, who)
        mv = memoryview(x)
        if not mv.c_contiguous:
            raise ValueError(f"{who}: memoryview must be C-contiguous")
        mv = mv.cast("B")
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            le = np.frombuffer(mv, dtype={F32: "<f4", F16: "<f2", BF16: "<u2"}[code])
            mv = memoryview(le.astype(le.dtype.newbyteorder("=")))
        return _check_len(mv, code, P, who)
    raise ValueError(f"{who}: unsupported input type {type(x).__name__}; pass a NumPy array, a torch tensor "
                     "or raw bytes with dtype=")


def _check_len(buf: Any, code: int, P: int, who: str) -> tuple[Any, int]:
    nbytes = buf.nbytes if hasattr(buf, "nbytes") else len(buf)
    item = _ITEMSIZE[code]
    if nbytes != P * item:
        n = nbytes / item
        n_txt = str(int(n)) if n == int(n) else f"{n:g}"
        raise ValueError(f"{who}: has {n_txt} {_CODE_NAMES[code]} elements ({nbytes} bytes), expected {P}")
    return buf, code


def _decode(buf: Any, code: int) -> np.ndarray:
    """float32 NumPy copy/view of a buffer returned by :func:`_as_buffer` (reference path)."""
    if code == F32:
        return np.frombuffer(buf, dtype=np.float32)
    u = np.frombuffer(buf, dtype=np.uint16)
    if code == F16:
        return u.view(np.float16).astype(np.float32)
    return (u.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------- validation ----

def _check_out(out: Any) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a float32 np.ndarray (or a CUDA tensor with CUDA inputs), got {type(out).__name__}")
    if out.dtype != np.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a C-contiguous, writeable float32 array")
    return out


def _check_weights(weights: Any, K: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1) if not _is_torch(weights) else \
        weights.detach().cpu().double().numpy().reshape(-1)
    if w.shape != (K,):
        raise ValueError(f"weights: expected {K} values (one per client), got shape {w.shape}")
    for k in range(K):
        if not (math.isfinite(w[k]) and w[k] > 0):
            raise ValueError(f"client {k}: weight must be positive and finite, got {w[k]!r}")
    return np.ascontiguousarray(w)


def _check_slices(slices: Any, P: int) -> np.ndarray:
    s = np.asarray(slices)
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"slices: expected an (S, 2) array of (offset, length), got shape {s.shape}")
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"slices: expected integers, got {s.dtype}")
    s = np.ascontiguousarray(s, dtype=np.int64)
    if s.size:
        off, ln = s[:, 0], s[:, 1]
        bad = np.flatnonzero((off < 0) | (ln < 0) | (off + ln > P))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"slices: slice {i} = (offset {off[i]}, length {ln[i]}) is outside 0..{P}")
        nz = np.flatnonzero(ln > 0)
        order = nz[np.argsort(off[nz], kind="stable")]
        ends = off[order] + ln[order]
        clash = np.flatnonzero(off[order][1:] < ends[:-1])
        if clash.size:
            a, b = int(order[clash[0]]), int(order[clash[0] + 1])
            raise ValueError(f"slices: slices {a} and {b} overlap; slices must be disjoint")
    return s


def _check_contrib(contrib: Any, S: int, K: int) -> np.ndarray:
    c = np.asarray(contrib)
    if c.shape != (S, K):
        raise ValueError(f"contrib: expected shape (S, K) = ({S}, {K}), got {c.shape}")
    if c.dtype != np.bool_:
        if not (np.issubdtype(c.dtype, np.integer) and np.isin(c, (0, 1)).all()):
            raise ValueError(f"contrib: expected a bool array, got {c.dtype}")
        c = c.astype(np.bool_)
    return np.ascontiguousarray(c)


def _prepare(out: np.ndarray, inputs: Sequence[Any], weights: Any, slices: Any, contrib: Any,
             dtype: Any, need_weights: bool = True):
    out = _check_out(out)
    P = out.size
    if isinstance(inputs, (bytes, bytearray, memoryview, np.ndarray)) or _is_torch(inputs):
        raise ValueError("inputs: expected a sequence of K client vectors (a list), not a single array/buffer")
    inputs = list(inputs)
    K = len(inputs)
    dts = _per_client(dtype, K)
    bufs, codes = [], []
    for k, (x, d) in enumerate(zip(inputs, dts)):
        b, c = _as_buffer(x, d, P, f"client {k}")
        bufs.append(b)
        codes.append(c)
    w = _check_weights(weights, K) if need_weights else None
    s = _check_slices(slices, P)
    c = _check_contrib(contrib, s.shape[0], K)
    return out, bufs, codes, w, s, c


def _threads(n_threads: int | None) -> int:
    return 0 if n_threads is None else int(n_threads)


# ------------------------------------------------------------------------- batch average ----

def weighted_average_slices(out: Any, inputs: Sequence[Any], weights: Any, slices: Any, contrib: Any,
                            dtype: Any = None, *, n_threads: int | None = None, check_finite: bool = True,
                            rollback: bool = True) -> Any:
    """Weighted average of parameter slices over their contributing clients (FedAvg per slice).

    For every slice ``s`` with at least one contributing client::

        out[off:off+len] = sum_k w_k * x_k[off:off+len] / sum_k w_k   over clients k with contrib[s, k]

    and slices with no contributor (personal / frozen scopes) are left as they are.

    Args:
        out: ``(P,)`` float32 C-contiguous ``np.ndarray`` holding the current global values; updated in
            place.  With CUDA-tensor inputs, a float32 CUDA tensor of P elements on the same device.
        inputs: sequence of K client vectors of P elements each: float32/float16/bfloat16 NumPy arrays or
            torch tensors, or raw little-endian bytes with ``dtype`` (see the module docstring).
        weights: ``(K,)`` positive finite numbers, typically sample counts (unitless).
        slices: ``(S, 2)`` int64 ``(offset, length)`` in elements; disjoint, inside ``0..P``;
            zero-length slices are allowed.
        contrib: ``(S, K)`` bool, ``contrib[s, k]`` = client k contributes to slice s.
        dtype: element type of raw inputs: one spelling for all clients or a per-client sequence.
        n_threads: CPU worker threads (default: ``FMTL_NUM_THREADS`` or all cores).
        check_finite: CUDA only: ``False`` skips the NaN/Inf check and its stream synchronisation (the call
            is then fully asynchronous on the current stream).  The CPU path always checks (it is free).
        rollback: CPU only.  ``True`` (default) makes the call atomic: the previous contents of the written
            part of ``out`` are saved (streamed to a reusable scratch of P floats held by the process, see
            ``fmtl_edge.kernels.info()['scratch_bytes']``) and restored on error.  ``False`` saves that
            extra read and write of P·4 bytes (about 30 % of the time at K = 4, 6 % at K = 32) and writes
            ``out`` with cache-bypassing stores, but after an error ``out`` may be partly updated.

    Returns:
        ``out``.

    Raises:
        ValueError: naming the client index for a weight <= 0/NaN/Inf, a NaN/Inf in an element that
            enters an average, a length mismatch or an unknown dtype; also for malformed slices/contrib.
            ``out`` is unchanged when it is raised (with the default ``rollback=True``).
    """
    if _is_torch(out) or any(_is_torch(x) and x.is_cuda for x in inputs):
        return _weighted_average_slices_cuda(out, inputs, weights, slices, contrib, dtype, check_finite)
    out, bufs, codes, w, s, c = _prepare(out, inputs, weights, slices, contrib, dtype)
    K = _native()
    if K is None:
        return _wavg_ref_core(out, bufs, codes, w, s, c)
    K.weighted_average_slices(out, bufs, codes, w, s, c, _threads(n_threads), bool(rollback))
    return out


def weighted_average_slices_reference(out: np.ndarray, inputs: Sequence[Any], weights: Any, slices: Any,
                                      contrib: Any, dtype: Any = None) -> np.ndarray:
    """Plain-NumPy reference of :func:`weighted_average_slices`: same arguments, errors and rounding.

    CPU inputs only (CPU torch tensors are accepted).  It is the test oracle; the result equals the
    native kernel's bit for bit.
    """
    out, bufs, codes, w, s, c = _prepare(out, inputs, weights, slices, contrib, dtype)
    return _wavg_ref_core(out, bufs, codes, w, s, c)


def _first_nonfinite(xs: list[np.ndarray], s: np.ndarray, c: np.ndarray) -> tuple[int, int] | None:
    """(client, flat index) of the first NaN/Inf among contributed elements: lowest client, then index."""
    for k, x in enumerate(xs):
        hits = []
        for i, (off, ln) in enumerate(s):
            if c[i, k] and ln > 0:
                bad = np.flatnonzero(~np.isfinite(x[off:off + ln]))
                if bad.size:
                    hits.append(int(off) + int(bad[0]))
        if hits:
            return k, min(hits)
    return None


def _decode_checked(bufs, codes, s, c) -> list[np.ndarray]:
    """Decode every client's buffer; ValueError naming the client if a contributed element is NaN/Inf."""
    xs = [_decode(b, code) for b, code in zip(bufs, codes)]
    bad = _first_nonfinite(xs, s, c)
    if bad is not None:
        raise ValueError(f"client {bad[0]}: input contains a non-finite value (NaN or Inf) at parameter index "
                         f"{bad[1]}; nothing was written to out")
    return xs


def _wavg_ref_core(out, bufs, codes, w, s, c) -> np.ndarray:
    xs = _decode_checked(bufs, codes, s, c)
    results = []
    for i, (off, ln) in enumerate(s):
        ks = np.flatnonzero(c[i])
        if ks.size == 0 or ln == 0:
            continue
        acc = np.zeros(ln, dtype=np.float32)
        tot, ref = 0.0, float(w[ks[0]])
        for k in ks:
            acc = acc + np.float32(float(w[k]) / ref) * xs[k][off:off + ln]
            tot += float(w[k])
        res = acc / np.float32(tot / ref)
        if not np.isfinite(res).all():
            raise ValueError(f"the float32 weighted sum overflowed in slice {i} (inputs are finite; scale the "
                             "weights or inputs down); nothing was written to out")
        results.append((off, ln, res))
    for off, ln, res in results:
        out[off:off + ln] = res
    return out


# ------------------------------------------------------------------------------------ CUDA ----

def _weighted_average_slices_cuda(out, inputs, weights, slices, contrib, dtype, check_finite):
    import torch

    inputs = list(inputs)
    if not (_is_torch(out) and out.is_cuda and out.dtype == torch.float32 and out.is_contiguous()):
        raise ValueError("out: with CUDA inputs, out must be a contiguous float32 CUDA tensor")
    dev = out.device
    P = out.numel()
    Kn = len(inputs)
    dts = _per_client(dtype, Kn)
    ptrs, codes, keep = [], [], []
    for k, (x, d) in enumerate(zip(inputs, dts)):
        who = f"client {k}"
        if not (_is_torch(x) and x.is_cuda):
            raise ValueError(f"{who}: out is a CUDA tensor, so every input must be a CUDA tensor")
        if x.device != dev:
            raise ValueError(f"{who}: on {x.device}, out on {dev}; use one device")
        t = x.detach()
        if dtype is not None and d is not None and t.dtype in (torch.uint8, torch.int16, torch.uint16):
            code = _dtype_code(d, who)
            nbytes = t.numel() * t.element_size()
            if nbytes != P * _ITEMSIZE[code]:
                raise ValueError(f"{who}: has {nbytes} bytes, expected {P} {_CODE_NAMES[code]} elements")
        else:
            code = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}.get(t.dtype, -1)
            if code < 0:
                raise ValueError(f"{who}: unsupported tensor dtype {t.dtype}; use float32, float16 or bfloat16")
            if t.numel() != P:
                raise ValueError(f"{who}: has {t.numel()} elements, expected {P}")
        if not t.is_contiguous():
            t = t.contiguous()
        keep.append(t)
        ptrs.append(t.data_ptr())
        codes.append(code)
    w = _check_weights(weights, Kn)
    s = _check_slices(slices, P)
    c = _check_contrib(contrib, s.shape[0], Kn)
    K = _native()
    if K is not None and getattr(K, "cuda_compiled", False):
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            K.weighted_average_slices_cuda(out.data_ptr(), P, ptrs, codes, w, s, c, stream, bool(check_finite),
                                           dev.index if dev.index is not None else torch.cuda.current_device())
        return out
    return _wavg_torch(out, keep, codes, w, s, c)


def _wavg_torch(out, xs, codes, w, s, c):
    """Torch fallback for device tensors when the CUDA kernel is not compiled (same rounding)."""
    import torch

    def dec(t, code):
        if code == F32:
            return t.view(torch.float32)
        if code == F16:
            return t.view(torch.float16).float()
        return t.view(torch.bfloat16).float()

    results = []
    for i, (off, ln) in enumerate(s.tolist()):
        ks = np.flatnonzero(c[i])
        if ks.size == 0 or ln == 0:
            continue
        acc = torch.zeros(ln, dtype=torch.float32, device=out.device)
        tot, ref = 0.0, float(w[ks[0]])
        for k in ks:
            x = dec(xs[k], codes[k]).reshape(-1)[off:off + ln]
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"client {k}: input contains a non-finite value (NaN or Inf) in slice {i}; "
                                 "nothing was written to out")
            acc = acc + x * float(np.float32(float(w[k]) / ref))
            tot += float(w[k])
        results.append((off, ln, acc / float(np.float32(tot / ref))))
    for off, ln, r in results:
        out[off:off + ln] = r
    return out


# ------------------------------------------------------------------------------- streaming ----

class Accumulator:
    """Streaming form of :func:`weighted_average_slices`: adds one client at a time.

    Holds one float32 accumulator per sliced element plus a float64 total weight per slice
    (``state_bytes`` ≈ 4 · Σ lengths), so a server needs O(P) memory instead of O(K·P).  Adding the
    clients of a batch call in the same order gives exactly (bit for bit) the batch result.

    Args:
        n_params: P, the length of every client vector.
        slices: ``(S, 2)`` int64 ``(offset, length)``; disjoint, inside ``0..P``.

    Attributes:
        n_added: number of clients added so far.
    """

    def __init__(self, n_params: int, slices: Any, *, n_threads: int | None = None):
        if int(n_params) != n_params or n_params < 0:
            raise ValueError(f"n_params must be a non-negative integer, got {n_params!r}")
        self.n_params = int(n_params)
        self.slices = _check_slices(slices, self.n_params)
        self._n_threads = _threads(n_threads)
        K = _native()
        self._native = K.Accumulator(self.n_params, self.slices) if K is not None else None
        if self._native is None:
            self._acc = np.zeros(self.n_params, dtype=np.float32)
            self._wsum = np.zeros(self.slices.shape[0], dtype=np.float64)
            self._wref = np.zeros(self.slices.shape[0], dtype=np.float64)
            self._n = 0

    @property
    def n_added(self) -> int:
        return int(self._native.n_added) if self._native is not None else self._n

    @property
    def state_bytes(self) -> int:
        """Bytes held by the accumulator state."""
        return int(self._native.state_bytes) if self._native is not None else self._acc.nbytes + self._wsum.nbytes

    @property
    def total_weight(self) -> np.ndarray:
        """``(S,)`` float64 sum of the weights added per slice."""
        return np.array(self._native.total_weight) if self._native is not None else self._wsum.copy()

    def add(self, x: Any, weight: float, contrib: Any, dtype: Any = None) -> None:
        """Adds ``weight * x`` to the slices where ``contrib`` is true.

        Args:
            x: one client vector of P elements (same input kinds as :func:`weighted_average_slices`;
               CUDA tensors are copied to the host).
            weight: positive finite weight (sample count).
            contrib: ``(S,)`` bool, the slices this client contributes to.
            dtype: element type when ``x`` is raw bytes / raw uint16.

        Raises:
            ValueError: weight <= 0/NaN/Inf, NaN/Inf in a contributed element, wrong length or dtype, or a
                malformed contrib; the accumulator is then unchanged.
        """
        who = f"client {self.n_added}"
        if _is_torch(x) and x.is_cuda:
            x = x.detach().cpu()
        buf, code = _as_buffer(x, dtype, self.n_params, who)
        wf = float(weight) if not _is_torch(weight) else float(weight.item())
        if not (math.isfinite(wf) and wf > 0):
            raise ValueError(f"{who}: weight must be positive and finite, got {weight!r}")
        c = np.asarray(contrib)
        if c.shape != (self.slices.shape[0],):
            raise ValueError(f"{who}: contrib must have shape ({self.slices.shape[0]},), got {c.shape}")
        c = np.ascontiguousarray(c.astype(np.bool_))
        if self._native is not None:
            try:
                self._native.add(buf, code, wf, c, self._n_threads)
            except ValueError as e:
                raise ValueError(f"{who}: {e}") from None
            return
        xs = _decode(buf, code)
        for i, (off, ln) in enumerate(self.slices):
            if c[i] and ln and not np.isfinite(xs[off:off + ln]).all():
                raise ValueError(f"{who}: input contains a non-finite value (NaN or Inf) in slice {i}; "
                                 "the accumulator is unchanged")
        for i, (off, ln) in enumerate(self.slices):
            if c[i]:
                if self._wref[i] == 0:
                    self._wref[i] = wf
                m = np.float32(wf / self._wref[i])
                self._acc[off:off + ln] = self._acc[off:off + ln] + m * xs[off:off + ln]
                self._wsum[i] += wf
        self._n += 1

    def result(self, out: np.ndarray) -> np.ndarray:
        """Writes ``acc / total weight`` into ``out`` for slices with total weight > 0; leaves the others.

        Args:
            out: ``(P,)`` float32 array with the current global values.

        Returns:
            ``out``.
        """
        out = _check_out(out)
        if out.size != self.n_params:
            raise ValueError(f"out has {out.size} elements, expected {self.n_params}")
        if self._native is not None:
            self._native.result(out, self._n_threads)
            return out
        for i, (off, ln) in enumerate(self.slices):
            if self._wsum[i] > 0 and ln:
                out[off:off + ln] = self._acc[off:off + ln] / np.float32(self._wsum[i] / self._wref[i])
        return out

    def reset(self) -> None:
        """Clears the state (n_added = 0)."""
        if self._native is not None:
            self._native.reset()
        else:
            self._acc[:] = 0
            self._wsum[:] = 0
            self._wref[:] = 0
            self._n = 0


# ---------------------------------------------------------------------------------- robust ----

def coordinate_median(out: np.ndarray, inputs: Sequence[Any], slices: Any, contrib: Any, dtype: Any = None,
                      *, n_threads: int | None = None) -> np.ndarray:
    """Coordinate-wise median over the contributing clients of each slice (Yin et al. 2018), unweighted.

    Same arguments as :func:`weighted_average_slices` without ``weights``; an even number of
    contributors gives the mean of the two middle values.  Slices without contributors are left as
    they are.  Raises ValueError (naming the client) on NaN/Inf, length or dtype errors; ``out`` is
    then unchanged.  CPU inputs only.
    """
    out, bufs, codes, _, s, c = _prepare(out, inputs, None, slices, contrib, dtype, need_weights=False)
    K = _native()
    if K is None:
        return _robust_ref_core(out, bufs, codes, s, c, None)
    K.coordinate_median(out, bufs, codes, s, c, 0.0, _threads(n_threads))
    return out


def trimmed_mean(out: np.ndarray, inputs: Sequence[Any], slices: Any, contrib: Any, trim_fraction: float = 0.1,
                 dtype: Any = None, *, n_threads: int | None = None) -> np.ndarray:
    """Coordinate-wise trimmed mean over the contributing clients of each slice, unweighted.

    Per coordinate of a slice with m contributors, drops the ``floor(trim_fraction * m)`` smallest and
    largest values and averages the rest (float64 sum, float32 result).  ``trim_fraction`` in
    ``[0, 0.5)``.  Errors as :func:`coordinate_median`.
    """
    tf = float(trim_fraction)
    if not (0.0 <= tf < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    out, bufs, codes, _, s, c = _prepare(out, inputs, None, slices, contrib, dtype, need_weights=False)
    K = _native()
    if K is None:
        return _robust_ref_core(out, bufs, codes, s, c, tf)
    K.trimmed_mean(out, bufs, codes, s, c, tf, _threads(n_threads))
    return out


def coordinate_median_reference(out: np.ndarray, inputs: Sequence[Any], slices: Any, contrib: Any,
                                dtype: Any = None) -> np.ndarray:
    """NumPy reference of :func:`coordinate_median` (``np.median`` per slice, float64 midpoint)."""
    out, bufs, codes, _, s, c = _prepare(out, inputs, None, slices, contrib, dtype, need_weights=False)
    return _robust_ref_core(out, bufs, codes, s, c, None)


def trimmed_mean_reference(out: np.ndarray, inputs: Sequence[Any], slices: Any, contrib: Any,
                           trim_fraction: float = 0.1, dtype: Any = None) -> np.ndarray:
    """NumPy reference of :func:`trimmed_mean` (sort, drop, float64 mean)."""
    tf = float(trim_fraction)
    if not (0.0 <= tf < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    out, bufs, codes, _, s, c = _prepare(out, inputs, None, slices, contrib, dtype, need_weights=False)
    return _robust_ref_core(out, bufs, codes, s, c, tf)


def _robust_ref_core(out, bufs, codes, s, c, trim):
    xs = _decode_checked(bufs, codes, s, c)
    results = []
    for i, (off, ln) in enumerate(s):
        ks = np.flatnonzero(c[i])
        if ks.size == 0 or ln == 0:
            continue
        m = np.stack([xs[k][off:off + ln] for k in ks]).astype(np.float64)
        if trim is None:
            res = np.median(m, axis=0)
        else:
            t = int(math.floor(trim * ks.size))
            srt = np.sort(m, axis=0)
            res = srt[t:ks.size - t].mean(axis=0)
        results.append((off, ln, res.astype(np.float32)))
    for off, ln, r in results:
        out[off:off + ln] = r
    return out
