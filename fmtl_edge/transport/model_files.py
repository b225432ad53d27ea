"""Model files of the remote pool: the round's global model written for downloads, the global
vector's paged-out storage, and returning freed heap to the OS (``malloc_trim``)."""

from __future__ import annotations

import logging
import mmap
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fmtl_edge.plan import RoundFailed
from fmtl_edge.transport.tensors import write_state

log = logging.getLogger("fmtl_edge.transport.pool")

_malloc_trim: Any = None


def _page_out(state: Mapping[str, Any]) -> None:
    """Drop from RAM the pages of the shared file mappings behind ``state``'s arrays (the global vector
    from :meth:`ModelFiles.global_vector_buffer`); their contents stay in the file. Arrays in
    ordinary memory are left alone."""
    seen: set[int] = set()
    for v in state.values():
        b = v
        while isinstance(b, np.ndarray):
            b = b.base
        if isinstance(b, memoryview):  # np.frombuffer(mmap)
            b = b.obj
        if isinstance(b, mmap.mmap) and id(b) not in seen:
            seen.add(id(b))
            try:
                b.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # no madvise on this platform
                pass


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    The 2 MiB chunk buffers of K concurrent download/upload streams (``bytes`` from ``read()``,
    protobuf and gRPC copies, allocated on many threads) are served from glibc's per-thread arenas,
    and glibc keeps their pages after they are freed: measured on the 500 MB, K = 8 bench, 0.3–0.6
    model sizes of freed arena memory were still resident while the round's updates were being
    aggregated. The pool calls this before it hands an update to the aggregation and at the end of a
    round, so that memory is not stacked on the accumulator, the global vector and the mapped update.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
            _malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class WriteFailed(RoundFailed):
    """A file a round needs could not be written (a full disk, ``ENOSPC``; a quota; an I/O error): the
    round fails (the runner's retry policy tries it again from the last checkpoint), never the server.

    Args:
        job, round_idx: the round.
        what: what could not be written ("the round model", "the checkpoint").
        err: the ``OSError`` (or ``sqlite3`` error) raised.
        where: the folder it went to.
    """

    def __init__(self, job: str, round_idx: int, what: str, err: BaseException, where: str | Path | None = None):
        super().__init__(job, round_idx, 0, 0)
        self.err = err
        why = getattr(err, "strerror", None) or str(err)
        no = getattr(err, "errno", None)
        place = f" in {where}" if where is not None else ""
        self.args = (f"job {job!r} round {round_idx}: could not write {what}{place}: {why}"
                     + (f" [Errno {no}]" if no else "") + "; free disk space there",)


@dataclass
class ModelFile:
    path: Path
    size_bytes: int
    sha256: str
    spec: list[tuple[str, str, tuple[int, ...]]]   # (name, dtype name, shape) in file order
    l2_norm: float | None = None                   # of the float tensors (validation.model_norm)



class ModelFiles:
    """The round models the devices download and the coordinator's paged-out global vector.

    Args:
        work_dir: the pool's work folder: round models go to ``models/`` (emptied here), the global
            vector's scratch file to ``scratch/``.
    """

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.models_dir = self.work_dir / "models"
        shutil.rmtree(self.models_dir, ignore_errors=True)
        self.models_dir.mkdir(parents=True)

    def write(self, state: Mapping[str, np.ndarray], tag: str) -> ModelFile:
        """The round's global model as a safetensors file for downloads.

        Raises:
            OSError: the file cannot be written (a full disk: ``ENOSPC``); nothing is left behind.
        """
        path = self.models_dir / f"{tag}-{secrets.token_hex(4)}.safetensors"
        size, sha = write_state(path, state, {"format": "fmtl-edge/global/1", "tag": tag}, fsync=False)
        spec = [(k, np.asarray(v).dtype.name, tuple(np.asarray(v).shape)) for k, v in state.items()]
        return ModelFile(path, size, sha, spec)

    def remove(self, files) -> None:
        """Delete the model files ``files`` (each once; missing ones are skipped)."""
        for f in {id(m): m for m in files}.values():
            try:
                f.path.unlink()
            except FileNotFoundError:
                pass

    def page_out(self, state: Mapping[str, Any]) -> None:
        """Drop from RAM the pages of the global vector behind ``state`` (see :func:`_page_out`)."""
        _page_out(state)

    def global_vector_buffer(self, n: int) -> np.ndarray:
        """The coordinator's global model vector (``n`` float32): a shared mapping of an unlinked scratch
        file in the work directory, so that the scheduler can drop its pages from the server's
        RAM while the round's updates are transferred and aggregated (they come back, from the page
        cache or the file, when the aggregate is written into it). Without this the server holds the
        global vector, the accumulator and one mapped update at once: three model sizes."""
        if n <= 0:
            return np.empty(max(n, 0), dtype=np.float32)
        d = self.work_dir / "scratch"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"global-{secrets.token_hex(4)}.f32"
        with open(path, "w+b") as f:
            f.truncate(4 * n)
            mm = mmap.mmap(f.fileno(), 4 * n)
        try:
            path.unlink()  # the mapping keeps the data; the disk space goes with the vector
        except OSError:  # pragma: no cover - platforms that cannot unlink a mapped file
            pass
        return np.frombuffer(mm, dtype=np.float32, count=n)
