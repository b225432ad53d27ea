"""``fmtl-edge simulate --resume``: a run killed (SIGKILL) or interrupted (Ctrl-C) mid-job continues
from its finished methods and the running job's last completed round, and ends with the same
results as an uninterrupted run; a resume with other settings is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fmtl_edge.cli import main
from fmtl_edge.simulated_pool import InProcessClientPool
from fmtl_edge.run_state import STATE, state_dir

# ditto keeps a personal model per client, layered its personal heads: client state must survive
ARGS = ["simulate", "--max-samples", "300", "--rounds", "3", "--clients-per-round", "2", "--meter", "estimate",
        "--no-progress", "--methods", "all-in-one,ditto,layered", "--layers", "personal=heads.*"]

# the CLI with each client execution slowed down, so the test can kill it mid-job
SLOW_CLI = """
import sys, time
from fmtl_edge import simulated_pool
orig = simulated_pool.InProcessClientPool.execute_many
def slow(self, work):
    for upd in orig(self, work):
        time.sleep(0.15)
        yield upd
simulated_pool.InProcessClientPool.execute_many = slow
from fmtl_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on the import path (the package may
    not be installed, or installed from another checkout)."""
    here = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def _run(out: Path, *extra: str) -> int:
    return main([*ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _run(out) == 0
    return out


def _record(monkeypatch, interrupt_at=None) -> list[tuple[str, int]]:
    """Record ``(state key, round)`` of every client execution; raise KeyboardInterrupt at the first
    execution whose key starts with ``interrupt_at`` (Ctrl-C mid-job)."""
    seen: list[tuple[str, int]] = []
    orig = InProcessClientPool.execute_many

    def wrapped(self, work):
        for _cid, a in work:
            if interrupt_at is not None and a.state_key.startswith(interrupt_at):
                raise KeyboardInterrupt
            seen.append((a.state_key, a.round))
        yield from orig(self, work)

    monkeypatch.setattr(InProcessClientPool, "execute_many", wrapped)
    return seen


def _state(out: Path) -> dict:
    return json.loads((state_dir(out) / STATE).read_text())


def _assert_same_results(a_dir: Path, b_dir: Path) -> None:
    a = json.loads((a_dir / "results.json").read_text())
    b = json.loads((b_dir / "results.json").read_text())
    assert list(a["methods"]) == list(b["methods"])
    for name, x in a["methods"].items():
        y = b["methods"][name]
        for k in ("total_test_loss", "personalised_total_test_loss", "per_task", "per_client", "splits", "affinity",
                  "rounds", "client_executions"):
            assert x.get(k) == y.get(k), (name, k)
        assert [h["train_loss"] for h in x["history"]] == [h["train_loss"] for h in y["history"]], name
        assert [h["clients"] for h in x["history"]] == [h["clients"] for h in y["history"]], name
    files_a = sorted(p.relative_to(a_dir) for p in (a_dir / "models").rglob("*.safetensors"))
    files_b = sorted(p.relative_to(b_dir) for p in (b_dir / "models").rglob("*.safetensors"))
    assert files_a == files_b and files_a
    for rel in files_a:
        ta, tb = load_file(a_dir / rel), load_file(b_dir / rel)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), (rel, k)


def test_sigkill_mid_job_then_resume_equals_uninterrupted(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                run = _state(out).get("running")
            except (FileNotFoundError, ValueError):
                run = None
            # ditto (a later method) has completed round 1 or 2 of its 3
            if run and run["method"] == "ditto" and run["jobs"] and 0 <= run["jobs"][-1]["round"] < 2:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no checkpoint of ditto mid-job appeared (rc {proc.poll()})")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    kept = _state(out)
    assert list(kept["finished"]) == ["all-in-one"]
    last = kept["running"]["jobs"][-1]
    assert kept["running"]["method"] == "ditto" and last["round"] < 2
    assert kept["running"]["clients"], "ditto's per-client state is saved with the checkpoint"

    assert _run(out) == 2  # without --resume: refused with the hint
    seen = _record(monkeypatch)
    assert _run(out, "--resume") == 0
    assert not any(k.startswith("all-in-one/") for k, _ in seen), "a finished method ran again"
    ditto_rounds = sorted({r for k, r in seen if k.startswith("ditto/")})
    assert ditto_rounds == list(range(last["round"] + 1, 3))
    assert not state_dir(out).exists()
    _assert_same_results(reference, out)


def test_sigint_keeps_finished_methods_and_resume_continues(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    _record(monkeypatch, interrupt_at="ditto/")
    assert _run(out) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "all-in-one" in err
    assert not out.exists()
    kept = _state(out)
    assert list(kept["finished"]) == ["all-in-one"] and kept["running"] is None
    monkeypatch.undo()
    seen = _record(monkeypatch)
    assert _run(out, "--resume") == 0
    assert not any(k.startswith("all-in-one/") for k, _ in seen)
    assert {r for k, r in seen if k.startswith("ditto/")} == {0, 1, 2}
    _assert_same_results(reference, out)


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path / "nothing", "--resume") == 2
    assert "no interrupted run" in capsys.readouterr().err
    _record(monkeypatch, interrupt_at="layered/")
    assert _run(out) == 130
    monkeypatch.undo()
    capsys.readouterr()
    before = (state_dir(out) / STATE).read_bytes()
    assert _run(out, "--resume", "--lr", "0.05") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "lr 0.1 -> 0.05" in err, err
    assert _run(out) == 2
    assert "add --resume, or --overwrite" in capsys.readouterr().err
    assert (state_dir(out) / STATE).read_bytes() == before, "a refused run must leave the state as it was"
    # --overwrite starts again (the interrupted state is dropped), and succeeds
    assert _run(out, "--overwrite", "--methods", "all-in-one") == 0
    assert not state_dir(out).exists()
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["all-in-one"]


def test_sigterm_says_terminated_and_keeps_the_run_state(tmp_path):
    """Issue 22.5: SIGTERM (a service manager, `kill`) stops `simulate` as Ctrl-C does: one line saying
    "terminated", what was kept and how to continue (--resume), exit 143; the run state stays."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                run = _state(out).get("running")
            except (FileNotFoundError, ValueError):
                run = None
            if run and run["method"] == "ditto" and run["jobs"]:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no checkpoint of ditto appeared (rc {proc.poll()})")
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "--resume" in err and "Traceback" not in err, err
    kept = _state(out)
    assert "all-in-one" in kept["finished"] and not (out / "results.json").exists()


def test_a_personalised_method_finished_before_the_interruption_keeps_its_client_models(tmp_path, reference,
                                                                                        monkeypatch):
    """ditto finishes, the run is interrupted in layered: the resumed run writes ditto's client models
    (models/ditto/clients/<id>.safetensors, issue 22.1) from the run state, equal to the uninterrupted run's."""
    out = tmp_path / "run"
    _record(monkeypatch, interrupt_at="layered/")
    assert _run(out) == 130
    assert "ditto" in _state(out)["finished"] and _state(out)["finished"]["ditto"]["clients"]
    monkeypatch.undo()
    seen = _record(monkeypatch)
    assert _run(out, "--resume") == 0
    assert not any(k.startswith("ditto/") for k, _ in seen)
    assert len(list((out / "models" / "ditto" / "clients").glob("*.safetensors"))) == 8
    _assert_same_results(reference, out)
