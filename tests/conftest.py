"""Shared fixtures: small synthetic multi-task data and the shared-data locator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmtl_edge.data.base import ClientData, FederatedDataset
from fmtl_edge.tasks import Task, TaskSet


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (override: FMTL_EDGE_SHARED_DATA)."""
    env = os.environ.get("FMTL_EDGE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_toy_dataset(n_clients: int = 4, n_per_client: int = 24, seed: int = 0, size: int = 8) -> FederatedDataset:
    """Tiny image dataset with a classification, a binary, a regression and a dense task."""
    rng = np.random.default_rng(seed)
    tasks = TaskSet([
        Task("cls", "classification", 3),
        Task("bin", "binary"),
        Task("reg", "regression", target_mean=2.0, target_std=1.5, units="u"),
        Task("den", "dense", 1),
    ])
    clients = []
    for c in range(n_clients):
        def split(n):
            x = rng.random((n, 1, size, size), dtype=np.float32)
            m = x.mean(axis=(1, 2, 3))
            y = {
                "cls": (m * 3 * 1.999).astype(np.int64).clip(0, 2),
                "bin": (x[:, 0, 0, 0] > 0.5).astype(np.float32),
                "reg": (m * 4).astype(np.float32),
                "den": (1 - x).astype(np.float32),
            }
            return x, y
        xtr, ytr = split(n_per_client)
        xte, yte = split(max(4, n_per_client // 4))
        clients.append(ClientData(c, xtr, ytr, xte, yte))
    return FederatedDataset("toy", tasks, clients, (1, size, size), {"source": "synthetic"})


@pytest.fixture
def toy_dataset() -> FederatedDataset:
    return make_toy_dataset()


def interrupt_then_resume(monkeypatch, main, args: list[str], out: Path, stop_at) -> None:
    """``fmtl-edge simulate`` Ctrl-C'd at the first client execution whose assignment satisfies
    ``stop_at`` (rc 130), then run again with ``--resume`` (rc 0): the resume tests' pattern."""
    from fmtl_edge.simulated_pool import InProcessClientPool

    orig = InProcessClientPool.execute_many

    def interrupt(self, work):
        if any(stop_at(a) for _, a in work):
            raise KeyboardInterrupt
        yield from orig(self, work)

    monkeypatch.setattr(InProcessClientPool, "execute_many", interrupt)
    assert main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert main([*args, "--out", str(out), "--resume"]) == 0


def assert_same_layout(a: dict, b: dict) -> None:
    """Two ``results.json`` documents have the same layout key for key (top level, every method
    entry, its per-task rows, jobs, history rows and evaluation record); ``engine`` may differ
    below its ``name`` (each program's own details)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    assert a["config"].keys() == b["config"].keys()
    assert a["methods"].keys() == b["methods"].keys()
    for m in a["methods"]:
        x, y = a["methods"][m], b["methods"][m]
        assert x.keys() == y.keys(), (m, set(x) ^ set(y))
        assert x["evaluation"].keys() == y["evaluation"].keys()
        for t in x["per_task"]:
            assert x["per_task"][t].keys() == y["per_task"][t].keys(), (m, t)
        for rows in ("jobs", "history"):
            assert [r.keys() for r in x[rows]] == [r.keys() for r in y[rows]], (m, rows)
