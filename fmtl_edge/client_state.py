"""Client state: tensors a client keeps across rounds (personal layers, Ditto's p_k, a node's head).

Client state never leaves the client (docs/design.md §3): the simulated pool keeps it per client in
memory (:class:`MemoryStateStore`, saved with a resumable run through :meth:`snapshot`); a device
agent keeps it in its work folder (:class:`FolderStateStore`, one safetensors file per version with
its SHA-256 stored beside it).

Versions are tagged with the round that wrote them and a read asks for the newest version written
*before* a round: a round that is run again (a resumed server re-issues the round it had not
checkpointed) starts from the same client state as the first time, so resume is exact. The two
newest versions of each key are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("fmtl_edge.client_state")

#: versions kept per key (the newest, and the one before it for a re-run round)
KEEP_VERSIONS = 2


class ClientStateStore(ABC):
    """One client's state: ``key → versions``, each ``name → array`` tagged with its round."""

    @abstractmethod
    def load(self, key: str, before_round: int) -> dict[str, np.ndarray] | None:
        """The newest version of ``key`` written at a round ``< before_round``, or None."""

    @abstractmethod
    def save(self, key: str, round_idx: int, tensors: Mapping[str, np.ndarray]) -> None:
        """Store ``tensors`` as the version of ``key`` written at round ``round_idx``."""

    @abstractmethod
    def keys(self) -> list[str]:
        """The keys that hold at least one version."""


class MemoryStateStore(ClientStateStore):
    """In-memory client state (the simulated pool keeps one per client)."""

    def __init__(self) -> None:
        self._data: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}

    def load(self, key: str, before_round: int) -> dict[str, np.ndarray] | None:
        for r, t in sorted(self._data.get(key, ()), key=lambda v: -v[0]):
            if r < before_round:
                return {k: v.copy() for k, v in t.items()}
        return None

    def save(self, key: str, round_idx: int, tensors: Mapping[str, np.ndarray]) -> None:
        versions = [v for v in self._data.get(key, []) if v[0] != round_idx]
        versions.append((int(round_idx), {k: np.array(v, copy=True) for k, v in tensors.items()}))
        versions.sort(key=lambda v: v[0])
        self._data[key] = versions[-KEEP_VERSIONS:]

    def keys(self) -> list[str]:
        return sorted(self._data)

    def snapshot(self) -> dict[str, Any]:
        """A copy of everything (``key → [(round, tensors)]``), for a resumable run's checkpoint."""
        return {k: [(r, {n: a.copy() for n, a in t.items()}) for r, t in v] for k, v in self._data.items()}

    @classmethod
    def restore(cls, snap: Mapping[str, Any]) -> "MemoryStateStore":
        s = cls()
        s._data = {k: [(int(r), {n: np.array(a, copy=True) for n, a in t.items()}) for r, t in v] for k, v in snap.items()}
        return s


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


class FolderStateStore(ClientStateStore):
    """Client state in a folder (the device agent's work folder): ``<key>/r<round>.safetensors`` with
    its SHA-256 in ``r<round>.sha256``. A version whose file is missing, unreadable or does not match
    its checksum is logged, deleted and skipped: the client falls back to the previous good version,
    or starts that state afresh when there is none — never training on garbage.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, key: str) -> Path:
        return self.root / _safe(key)

    def _versions(self, key: str) -> list[int]:
        d = self._dir(key)
        if not d.is_dir():
            return []
        out = []
        for p in d.glob("r*.safetensors"):
            m = re.fullmatch(r"r(\d+)\.safetensors", p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def load(self, key: str, before_round: int) -> dict[str, np.ndarray] | None:
        from safetensors.numpy import load as st_load

        for r in reversed(self._versions(key)):
            if r >= before_round:
                continue
            path = self._dir(key) / f"r{r}.safetensors"
            sha_path = path.with_suffix(".sha256")
            try:
                blob = path.read_bytes()
                want = sha_path.read_text().strip()
                if hashlib.sha256(blob).hexdigest() != want:
                    raise ValueError("checksum mismatch")
                return dict(st_load(blob))
            except (OSError, ValueError, json.JSONDecodeError) as e:
                log.warning("client state %s round %d (%s) is corrupt (%s): discarded; the client uses the previous "
                            "version if one is good, else starts that state afresh",
                            key, r, path, e)
                for p in (path, sha_path):
                    p.unlink(missing_ok=True)
        return None

    def save(self, key: str, round_idx: int, tensors: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save as st_save

        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        # (np.ascontiguousarray turns a 0-d array, e.g. a BatchNorm's num_batches_tracked, into shape (1,))
        blob = st_save({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()},
                       metadata={"key": key, "round": str(round_idx)})
        path = d / f"r{int(round_idx)}.safetensors"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        sha_tmp = path.with_suffix(".sha256.tmp")
        sha_tmp.write_text(hashlib.sha256(blob).hexdigest() + "\n")
        os.replace(sha_tmp, path.with_suffix(".sha256"))
        for r in self._versions(key)[:-KEEP_VERSIONS]:
            for p in (d / f"r{r}.safetensors", d / f"r{r}.sha256"):
                p.unlink(missing_ok=True)

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("r*.safetensors")))
