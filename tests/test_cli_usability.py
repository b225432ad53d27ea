"""`simulate` a user can leave running, and the small CLI fixes (issue 12, items 3 and 4)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fmtl_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--methods", "mas-2,one-by-one", "--rounds", "2", "--r0", "1", "--max-samples", "200",
        "--clients-per-round", "2", "--meter", "estimate", "--no-progress"]


# ---- --out, --overwrite, runs/<UTC time> and runs/latest -----------------------------------------

def test_out_with_an_earlier_result_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *TINY, "--out", str(out)]) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(["simulate", *TINY, "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "--overwrite" in err[0]
    assert (out / "results.json").read_text() == first  # untouched
    assert main(["simulate", *TINY, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1


def test_default_out_is_a_new_timestamped_run_with_latest_pointing_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", *TINY]) == 0
    assert main(["simulate", *TINY]) == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all(re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", p.name) for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == max(runs, key=lambda p: p.stat().st_mtime).resolve()
    assert (latest / "results.json").is_file() and (latest / "models").is_dir()
    for p in runs:  # both results kept
        assert json.loads((p / "results.json").read_text())["config"]["out"] == f"runs/{p.name}"


# ---- logging ----------------------------------------------------------------------------------

def test_no_progress_logs_one_line_per_round(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    n_rounds = sum(m["rounds"] for m in res["methods"].values())
    round_lines = [ln for ln in err.splitlines() if re.search(r" round \d+: train loss ", ln)]
    assert len(round_lines) == n_rounds == 1 + 2 * 1 + 2 * 5
    assert all(" INFO fmtl_edge.simulate: " in ln for ln in round_lines)
    assert main(["simulate", *TINY, "--log-level", "warning", "--out", str(tmp_path / "q")]) == 0
    assert " round " not in capsys.readouterr().err
    assert main(["simulate", *TINY, "-v", "--out", str(tmp_path / "v")]) == 0
    assert logging.getLogger("fmtl_edge").level == logging.DEBUG


# ---- the device lease ---------------------------------------------------------------------------

def test_lease_wait_is_reported_with_the_holders_pid(tmp_path):
    from fmtl_edge.runtime import DeviceLease, DeviceBusy

    seen = []
    with DeviceLease("dev", runtime_dir=tmp_path, owner="holder-A"):
        waiter = DeviceLease("dev", runtime_dir=tmp_path, timeout_s=0.4, notify_after_s=0.1,
                             on_wait=lambda holder, waited: seen.append((holder, waited)))
        with pytest.raises(DeviceBusy):
            waiter.acquire()
    assert len(seen) == 1 and seen[0][0]["pid"] == os.getpid() and seen[0][0]["owner"] == "holder-A"
    assert seen[0][1] >= 0.1


def test_simulate_says_it_waits_for_the_lease(tmp_path, monkeypatch, capsys):
    from fmtl_edge.runtime import DeviceLease

    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path / "rt"))
    holder = DeviceLease("local", owner="another job").acquire()
    threading.Timer(2.6, holder.release).start()  # the other job finishes after the 2 s notice
    try:
        assert main(["simulate", *TINY, "--methods", "one-by-one", "--out", str(tmp_path / "r")]) == 0
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert "waiting for device 'local'" in err and f"pid {os.getpid()} (another job)" in err


def test_lease_wait_s_zero_fails_at_once_when_busy(tmp_path, monkeypatch, capsys):
    from fmtl_edge.runtime import DeviceLease

    monkeypatch.setenv("FMTL_EDGE_RUNTIME_DIR", str(tmp_path / "rt"))
    with DeviceLease("local", owner="another job"):
        rc = main(["simulate", *TINY, "--methods", "one-by-one", "--lease-wait-s", "0", "--out", str(tmp_path / "r")])
    assert rc == 1 and "busy" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["simulate", *TINY, "--lease-wait-s", "-1", "--out", str(tmp_path / "r")]) == 2


# ---- bad devices, data without test samples, unreadable images ------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this torch has CUDA")
def test_device_cuda_without_cuda_is_one_line_rc_2(tmp_path, capsys):
    assert main(["simulate", *TINY, "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fmtl-edge simulate: error: --device: cuda: ")
    assert "no CUDA" in err[0] and "--device cpu" in err[0]
    assert not (tmp_path / "r").exists()


def test_run_without_test_samples_warns(caplog):
    from fmtl_edge.config import build_config
    from fmtl_edge.data.base import ClientData, FederatedDataset
    from fmtl_edge.simulation import run_simulation
    from conftest import make_toy_dataset

    ds = make_toy_dataset()
    empty = [ClientData(c.client_id, c.x_train, c.y_train, c.x_test[:0], {k: v[:0] for k, v in c.y_test.items()})
             for c in ds.clients]
    ds = FederatedDataset(ds.name, ds.tasks, empty, ds.input_shape, ds.info)
    cfg = build_config({"rounds": 1, "methods": "all-in-one", "clients_per_round": 2, "meter": "estimate",
                        "width": 4})
    with caplog.at_level(logging.WARNING, logger="fmtl_edge"):
        results, _ = run_simulation(cfg, ds)
    assert any("no client has test samples" in r.getMessage() for r in caplog.records)
    assert all(v["test_samples"] == 0 for v in results["methods"]["all-in-one"]["per_task"].values())


# ---- the summary at 80 columns ---------------------------------------------------------------------

def test_summary_is_readable_at_80_columns(tmp_path):
    from rich.console import Console

    from fmtl_edge.report import summary_tables

    assert main(["simulate", *TINY, "--methods", "mas-2,all-in-one,one-by-one", "--out", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=False, color_system=None)
    for part in summary_tables(res):
        con.print(part)
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "total test loss" in text and "…" not in text  # headers not wrapped, nothing cut
    g1, g2 = res["methods"]["mas-2"]["splits"]
    assert f"1: {', '.join(g1)}" in text and f"2: {', '.join(g2)}" in text
    assert "each task alone (5 groups)" in text
    assert any(ln.startswith("groups (") and ln.endswith("):") for ln in text.splitlines())  # not wrapped


# ---- small fixes ----------------------------------------------------------------------------------

def test_docs_data_uses_the_real_flag():
    text = (ROOT / "docs" / "data.md").read_text()
    assert "--data npz" not in text and "--dataset npz" in text


def test_report_plot_into_a_missing_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["simulate", *TINY, "--methods", "all-in-one", "--out", str(tmp_path / "r")]) == 0
    png = tmp_path / "new" / "figs" / "summary.png"
    assert main(["report", str(tmp_path / "r"), "--plot", str(png)]) == 0
    assert png.is_file()
    (tmp_path / "afile").write_text("x")
    assert main(["report", str(tmp_path / "r"), "--plot", str(tmp_path / "afile" / "s.png")]) == 2
    assert "cannot write the figure" in capsys.readouterr().err


def test_info_json_into_a_closed_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-m", "fmtl_edge.cli", "info", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=str(ROOT))
    p.stdout.close()  # like `| head` exiting before the output is written
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 141


def test_meter_missing_command_reports_no_energy(capsys):
    rc = main(["meter", "--backend", "estimate", "--json", "--", "no-such-command-fmtl"])
    cap = capsys.readouterr()
    assert rc == 127 and cap.out == ""
    assert "command not found: no-such-command-fmtl" in cap.err and "nothing was measured" in cap.err
    assert " J " not in cap.err


def test_rapl_reason_mentions_vms(tmp_path):
    from fmtl_edge.runtime import MeterUnavailable, make_meter

    with pytest.raises(MeterUnavailable) as ei:
        make_meter("rapl", sysfs_root=str(tmp_path))
    assert "virtual machine" in str(ei.value)


def test_config_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    from fmtl_edge.config import build_config

    monkeypatch.chdir(tmp_path)
    d = build_config({"data_dir": "data/../mine"}).to_dict()
    assert d["data_dir"] == str(tmp_path.resolve() / "mine")


def test_unknown_toml_key_suggests_the_nearest(tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text("lr2 = 0.1\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean lr?" in capsys.readouterr().err
    cfg.write_text("client-per-round = 2\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean clients-per-round?" in capsys.readouterr().err


def test_token_add_help_has_a_description():
    from fmtl_server.cli import main as server_main

    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        server_main(["token", "add", "--help"])
    text = out.getvalue()
    assert "Create a bearer token" in text and "example: fmtl-server token add" in text


def test_results_record_the_kernels_mode(tmp_path):
    assert main(["simulate", *TINY, "--methods", "all-in-one", "--out", str(tmp_path / "r")]) == 0
    v = json.loads((tmp_path / "r" / "results.json").read_text())["versions"]
    assert v["kernels"] in ("native", "python-reference")
    np.testing.assert_equal(v["kernels"] == "native", v["kernels_version"] is not None)
