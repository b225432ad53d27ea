"""Model states as safetensors files, written and read in a streaming way, and sent in chunks.

Weights cross process boundaries as safetensors bytes (docs/design.md §1), never pickle. The format is
simple (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``name → {dtype, shape, data_offsets}`` plus ``__metadata__``, padded with spaces to
a multiple of 8) and the tensors' bytes back to back. This module writes that layout tensor by tensor
from the caller's arrays (no serialised copy of the whole model in memory) and reads it back as
memory-mapped NumPy views, so a 600 MB model costs the server page cache rather than heap. Files it
writes load with the ``safetensors`` package and vice versa.

- :func:`write_state` — a state (``name → array``) to a file, atomically, returning size and SHA-256;
- :class:`SafetensorsFile` — header parsing with validation, lazy memory-mapped tensors,
  :meth:`~SafetensorsFile.flat_float32` for a contiguous float32 region (zero-copy aggregation);
- :class:`MappedState` — a read-only ``Mapping`` over a file (what a received update's ``state`` is);
- :func:`iter_chunks` / :class:`ChunkSink` — the file as 1–4 MiB chunks and their reassembly with a
  size limit and a checksum;
- :func:`check_finite` — NaN/Inf scan in fixed-size blocks (bounded memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

MIB = 1 << 20
MIN_CHUNK_BYTES = 1 * MIB
MAX_CHUNK_BYTES = 4 * MIB
DEFAULT_CHUNK_BYTES = 2 * MIB
#: header size refused beyond this (the safetensors package uses the same bound)
MAX_HEADER_BYTES = 100 * MIB

_TO_ST = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_FROM_ST = {v: k.newbyteorder("<") if k.itemsize > 1 else k for k, v in _TO_ST.items()}


class TensorFileError(ValueError):
    """A file or stream that is not a valid safetensors state (message names what is wrong)."""


def st_dtype(dtype: np.dtype) -> str:
    """The safetensors dtype string of a NumPy dtype (``float32`` → ``F32``).

    Raises:
        TensorFileError: a dtype safetensors (or this module) cannot hold.
    """
    try:
        return _TO_ST[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise TensorFileError(f"dtype {np.dtype(dtype)} cannot be stored (use float32/16/64 or an integer type)") from None


def _le(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian and arr.dtype.itemsize > 1):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def build_header(entries: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str] | None = None) -> tuple[bytes, int]:
    """The length-prefixed header for ``(name, st_dtype, shape, nbytes)`` entries laid out in order.

    Returns:
        (header bytes including the 8-byte length, total data bytes)
    """
    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dt, shape, nbytes in entries:
        if name == "__metadata__" or name in head:
            raise TensorFileError(f"tensor name {name!r} is reserved or repeated")
        head[name] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [off, off + int(nbytes)]}
        off += int(nbytes)
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * ((-(len(text) + 8)) % 8)
    return struct.pack("<Q", len(text)) + text, off


def write_state(path: str | os.PathLike, state: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                order: Sequence[str] | None = None, fsync: bool = True) -> tuple[int, str]:
    """Write ``state`` (``name → array``) as a safetensors file, atomically (temp file + rename).

    Tensors are written one after another straight from the arrays' buffers: no serialised copy of
    the model is made. ``order`` fixes the tensor order (default: the mapping's order).

    Returns:
        (file size in bytes, SHA-256 hex digest of the file)
    """
    path = Path(path)
    names = list(order) if order is not None else list(state.keys())
    arrays = []
    entries = []
    for n in names:
        a = _le(state[n])
        arrays.append(a)
        entries.append((n, st_dtype(a.dtype), tuple(a.shape), a.nbytes))
    header, _ = build_header(entries, metadata)
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            h.update(header)
            size += len(header)
            for a in arrays:
                if a.nbytes == 0:
                    continue
                mv = memoryview(a.reshape(-1)).cast("B")
                # hash and write in slices so a huge tensor is never duplicated in memory
                for i in range(0, len(mv), 16 * MIB):
                    part = mv[i : i + 16 * MIB]
                    f.write(part)
                    h.update(part)
                size += a.nbytes
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return size, h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, block: int = 8 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return h.hexdigest()
            h.update(b)


def _uint(v: Any) -> int:
    """A JSON integer >= 0 (not a bool, float or string), else TypeError."""
    if type(v) is not int or v < 0:
        raise TypeError(v)
    return v


def _safetensors_refusal(path: Path) -> str | None:
    """None when the ``safetensors`` package opens ``path``, else its error message."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except SafetensorError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - whatever it raises, the file is refused
        return f"{type(e).__name__}: {e}"


class SafetensorsFile:
    """A safetensors file: validated header, lazily memory-mapped tensors.

    Args:
        path: the file.
        max_bytes: refuse files larger than this (None: no limit).

    Raises:
        TensorFileError: truncated file, oversized or malformed header, unknown dtype, a shape that
            disagrees with its byte range, overlapping or gapped data, trailing bytes.
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = None):
        self.path = Path(path)
        size = self.path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise TensorFileError(f"{size} bytes is above the limit of {max_bytes} bytes")
        if size < 8:
            raise TensorFileError(f"{size} bytes: too short for a safetensors header")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            # capped before anything is read or parsed
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise TensorFileError(f"header length {n} does not fit the {size}-byte file "
                                      f"(at most {MAX_HEADER_BYTES} header bytes)")
            raw = f.read(n)
        # The safetensors package's own parser decides what is valid (it is fuzzed upstream); ours
        # below only reads the offsets it does not expose and words the common errors.
        refused = _safetensors_refusal(self.path)
        if refused is not None and n > MIB:
            raise TensorFileError(f"not a valid safetensors file: {refused}")
        try:
            head, spans = self._parse(raw, size - 8 - n)
        except TensorFileError as e:
            raise TensorFileError(str(e) + (f" (safetensors: {refused})" if refused else "")) from None
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
            raise TensorFileError(f"malformed header: {refused or type(e).__name__}") from None
        if refused is not None:
            raise TensorFileError(f"not a valid safetensors file: {refused}")
        self.data_start = 8 + n
        self.size_bytes = size
        self._cache: dict[str, np.ndarray] = {}

    def _parse(self, raw: bytes, data_len: int):
        """Header JSON → metadata and entries (strict types, Python integers: no overflow)."""
        try:
            head = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"header is not JSON: {e}") from None
        if not isinstance(head, dict):
            raise TensorFileError("header is not a JSON object")
        meta = head.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise TensorFileError("__metadata__ is not an object of strings")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in head.items():
            try:
                dt = _FROM_ST[e["dtype"]]
                shape = tuple(_uint(s) for s in e["shape"])
                offsets = e["data_offsets"]
                if not isinstance(offsets, list) or len(offsets) != 2:
                    raise TypeError
                begin, end = (_uint(v) for v in offsets)
            except (KeyError, TypeError, ValueError):
                raise TensorFileError(f"tensor {name!r}: bad header entry {e!r:.200} (dtype one of "
                                      f"{sorted(_FROM_ST)}, shape and data_offsets lists of integers >= 0)") from None
            count = math.prod(shape)  # Python integers: no wrap-around
            if end - begin != count * dt.itemsize or begin > end or end > data_len:
                raise TensorFileError(
                    f"tensor {name!r}: byte range [{begin}, {end}) does not hold {shape} {e['dtype']} "
                    f"inside {data_len} data bytes"
                )
            self.entries[name] = (dt, shape, begin, end)
            spans.append((begin, end, name))
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise TensorFileError(f"tensor {name!r}: data starts at {begin}, expected {pos} (gap or overlap)")
            pos = end
        if pos != data_len:
            raise TensorFileError(f"{data_len - pos} trailing bytes after the last tensor")
        return head, spans

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def spec(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(name, dtype name, shape)`` per tensor, in file order."""
        return [(n, np.dtype(dt).name, shape) for n, (dt, shape, _, _) in self.entries.items()]

    def array(self, name: str) -> np.ndarray:
        """Read-only memory-mapped view of one tensor (mapped on first use)."""
        a = self._cache.get(name)
        if a is None:
            dt, shape, begin, end = self.entries[name]
            if end == begin:
                a = np.zeros(shape, dtype=dt)
            else:
                # np.memmap cannot map a 0-d array: map one element and view it as a scalar array
                a = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_start + begin, shape=shape or (1,))
                if not shape:
                    a = a.reshape(())
            self._cache[name] = a
        return a

    def flat_float32(self, names: Sequence[str]) -> np.ndarray | None:
        """One read-only float32 view over ``names`` when they are float32 tensors stored back to back
        in that order (how :func:`write_update_file` lays out an update), else None."""
        if not names:
            return None
        start = None
        pos = None
        total = 0
        for n in names:
            e = self.entries.get(n)
            if e is None or e[0] != np.dtype("<f4"):
                return None
            if start is None:
                start = pos = e[2]
            if e[2] != pos:
                return None
            pos = e[3]
            total += (e[3] - e[2]) // 4
        if total == 0:
            return None
        return np.memmap(self.path, dtype="<f4", mode="r", offset=self.data_start + start, shape=(total,))

    def read_blocks(self, name: str, block_bytes: int = 4 * MIB) -> Iterator[np.ndarray]:
        """A tensor's elements in blocks read with ``read()`` (no mapping: memory stays O(block))."""
        dt, _, begin, end = self.entries[name]
        step = max(dt.itemsize, block_bytes - block_bytes % dt.itemsize)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            left = end - begin
            while left > 0:
                b = f.read(min(step, left))
                if not b:
                    raise TensorFileError(f"tensor {name!r}: file ended early")
                left -= len(b)
                yield np.frombuffer(b, dtype=dt)

    def load(self) -> dict[str, np.ndarray]:
        """Every tensor as an in-memory (writable) copy, in file order."""
        return {n: np.array(self.array(n)) for n in self.entries}

    def release(self) -> None:
        """Drop the mapped views held by this object (the mapping goes when no view is left)."""
        self._cache.clear()


class MappedState(Mapping):
    """Read-only ``name → array`` view of a safetensors file (a received update's ``state``).

    :meth:`as_flat` hands the coordinator the float tensors as one flat float32 vector when the
    file stores them back to back in the layout's order, so aggregation reads the upload in place.
    """

    def __init__(self, path: str | os.PathLike, file: SafetensorsFile | None = None):
        self.file = file if file is not None else SafetensorsFile(path)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.file.entries:
            raise KeyError(name)
        return self.file.array(name)

    def __iter__(self):
        return iter(self.file.entries)

    def __len__(self) -> int:
        return len(self.file.entries)

    def as_flat(self, layout) -> np.ndarray | None:
        """The float32 vector in ``layout`` order (a :class:`fmtl_edge.partition.ParameterLayout`),
        or None when the file is not laid out that way (the caller then copies tensor by tensor)."""
        for s in layout.slices:
            e = self.file.entries.get(s.name)
            if e is None or tuple(e[1]) != tuple(s.shape):
                return None
        vec = self.file.flat_float32(layout.names)
        if vec is None or vec.shape != (layout.n_params,):
            return None
        return vec

    def release(self) -> None:
        self.file.release()


def update_order(state: Mapping[str, np.ndarray], reference_order: Sequence[str] | None = None) -> list[str]:
    """Tensor order of an update file: floating tensors first (in ``reference_order``, else the state's
    order), then the rest, so the floats form one contiguous float32 region."""
    names = [n for n in (reference_order or state.keys()) if n in state]
    names += [n for n in state if n not in set(names)]
    floats = [n for n in names if np.issubdtype(np.asarray(state[n]).dtype, np.floating)]
    return floats + [n for n in names if n not in set(floats)]


def write_update_file(path: str | os.PathLike, state: Mapping[str, np.ndarray],
                      reference_order: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """:func:`write_state` in :func:`update_order` (what an agent uploads)."""
    return write_state(path, state, metadata, update_order(state, reference_order), fsync=False)


def iter_chunks(path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES, offset: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """``(offset, bytes, total size)`` chunks of a file, from ``offset``."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be 1-4 MiB, got {chunk_bytes} bytes")
    total = os.path.getsize(path)
    if not 0 <= offset <= total:
        raise ValueError(f"offset {offset} is outside the {total}-byte file")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        pos = offset
        while pos < total:
            b = f.read(min(chunk_bytes, total - pos))
            if not b:
                raise IOError(f"{path} shrank while being sent")
            yield pos, b, total
            pos += len(b)


class ChunkSink:
    """Reassemble a chunked stream into a file, checking order, size limit and checksum.

    Each sink writes its own temp file (a random name beside ``path``); :meth:`finish` makes it
    read-only and links it to ``path``, refusing to replace an existing file.

    Args:
        path: final file; data goes to a temp file beside it until :meth:`finish`.
        expected_bytes: the announced size (chunks beyond it are refused); None = unknown.
        max_bytes: hard limit (refused as soon as it is passed).
        sha256: expected digest checked by :meth:`finish` (None: not checked).
    """

    def __init__(self, path: str | os.PathLike, expected_bytes: int | None = None, max_bytes: int | None = None,
                 sha256: str | None = None):
        self.path = Path(path)
        self.expected = expected_bytes
        self.max_bytes = max_bytes
        self.sha256 = sha256 or None
        if expected_bytes is not None and max_bytes is not None and expected_bytes > max_bytes:
            raise TensorFileError(f"announced size {expected_bytes} bytes is above the limit of {max_bytes} bytes")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one temp file per stream (O_EXCL, random name): two streams never share bytes
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")
        self._h = hashlib.sha256()
        self.received = 0

    def write(self, offset: int, data: bytes) -> None:
        if self._f is None:
            raise TensorFileError("stream already finished")
        if offset != self.received:
            raise TensorFileError(f"chunk at offset {offset}, expected {self.received} (lost or reordered chunk)")
        if len(data) > MAX_CHUNK_BYTES:
            raise TensorFileError(f"chunk of {len(data)} bytes is above {MAX_CHUNK_BYTES} bytes")
        n = self.received + len(data)
        if self.max_bytes is not None and n > self.max_bytes:
            raise TensorFileError(f"more than the limit of {self.max_bytes} bytes")
        if self.expected is not None and n > self.expected:
            raise TensorFileError(f"more than the announced {self.expected} bytes")
        self._f.write(data)
        self._h.update(data)
        self.received = n

    def finish(self) -> Path:
        """Close, check size and digest, move into place; returns the path."""
        if self._f is None:
            raise TensorFileError("stream already finished")
        self._f.close()
        self._f = None
        if self.expected is not None and self.received != self.expected:
            self.abort()
            raise TensorFileError(f"stream ended after {self.received} of {self.expected} bytes")
        digest = self._h.hexdigest()
        if self.sha256 is not None and digest != self.sha256:
            self.abort()
            raise TensorFileError(f"SHA-256 mismatch: got {digest[:12]}…, announced {self.sha256[:12]}…")
        # read-only, and never over an existing file: an accepted file cannot change under its mapping
        os.chmod(self._tmp, 0o444)
        try:
            os.link(self._tmp, self.path)
        except FileExistsError:
            self.abort()
            raise TensorFileError(f"{self.path.name} already exists (a second stream for the same file)") from None
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    @property
    def digest(self) -> str:
        return self._h.hexdigest()

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


def check_finite(file: SafetensorsFile, names: Sequence[str] | None = None, block_bytes: int = 4 * MIB) -> str | None:
    """Name of the first floating tensor holding NaN or Inf (scanned in blocks), or None."""
    for n in names if names is not None else file.names:
        dt = file.entries[n][0]
        if not np.issubdtype(dt, np.floating):
            continue
        for block in file.read_blocks(n, block_bytes):
            if not np.isfinite(block).all():
                return n
    return None
