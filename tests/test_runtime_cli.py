"""`fmtl-edge info` and `fmtl-edge meter` (registered through fmtl_edge.runtime.cli.register)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import pytest

import fmtl_edge

from fmtl_edge.runtime import cli as rcli
from runtime_fakes import build_jetson

JSON_KEYS = {"wall_s", "total_j", "total_scope", "estimated", "source", "domains", "sample_hz", "power_mode", "warnings"}
DOMAIN_KEYS = {"domain", "joules", "method", "source", "scope"}


def _parser():
    p = argparse.ArgumentParser(prog="fmtl-edge")
    sub = p.add_subparsers(dest="command", metavar="command")  # same dest as the main CLI
    rcli.register(sub)
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    return root


def test_meter_json_keys_and_exit_code(empty_root, capfd):
    rc = _run(["meter", "--json", "--", sys.executable, "-c", "import sys; sys.exit(7)"])
    assert rc == 7
    out = capfd.readouterr().out.strip().splitlines()
    obj = json.loads(out[-1])
    assert JSON_KEYS <= set(obj)
    assert obj["exit_code"] == 7 and obj["estimated"] is True and obj["total_j"] > 0
    assert obj["command"][0] == sys.executable
    for d in obj["domains"]:
        assert DOMAIN_KEYS <= set(d)


def test_meter_null_backend_prints_null_total(empty_root, capfd, tmp_path):
    out_file = tmp_path / "m.json"
    rc = _run(["meter", "--json", "--backend", "null", "-o", str(out_file), "--", "true"])
    assert rc == 0
    obj = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert obj["total_j"] is None and obj["domains"] == [] and obj["total_scope"] == "none"
    assert json.loads(out_file.read_text()) == obj


def test_meter_on_fake_jetson_reports_rails(tmp_path, monkeypatch, capfd):
    build_jetson(tmp_path, "tx2", powers={"VDD_IN": 6.0})
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    rc = _run(["meter", "--json", "--", sys.executable, "-c", "import time; time.sleep(0.1)"])
    assert rc == 0
    obj = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert obj["backend"] == "jetson" and obj["total_scope"] == "board_input" and not obj["estimated"]
    assert obj["total_j"] == pytest.approx(6.0 * obj["wall_s"], rel=0.02)
    assert obj["power_mode"] == "MAXN"
    assert {d["domain"] for d in obj["domains"]} == {"VDD_IN", "VDD_SYS_GPU", "VDD_SYS_SOC", "VDD_4V0_WIFI", "VDD_SYS_CPU", "VDD_SYS_DDR"}
    assert [d["domain"] for d in obj["domains"] if d["in_total"]] == ["VDD_IN"]
    assert obj["sample_hz"] == 50.0


def test_meter_human_report_and_errors(empty_root, capfd):
    rc = _run(["meter", "--backend", "estimate", "--power-w", "3", "--", sys.executable, "-c", "print('child says hi')"])
    assert rc == 0
    cap = capfd.readouterr()
    assert "child says hi" in cap.out
    assert "exited 0" in cap.err and "estimated" in cap.err and "cpu" in cap.err and "3W" in cap.err
    assert _run(["meter", "--", "/nonexistent/cmd-xyz"]) == 127
    assert _run(["meter"]) == 2
    assert _run(["meter", "--backend", "rapl", "--", "true"]) == 2  # unavailable: the command is not run
    assert "rapl meter unavailable" in capfd.readouterr().err


def test_meter_signal_exit_code(empty_root):
    rc = _run(["meter", "--backend", "null", "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert rc == 128 + 15


def test_info_json_on_fake_orin(tmp_path, monkeypatch, capsys):
    build_jetson(tmp_path, "agx-orin")
    monkeypatch.setenv("FMTL_EDGE_SYSFS_ROOT", str(tmp_path))
    monkeypatch.delenv("FMTL_EDGE_PROFILE", raising=False)
    fake_k = types.ModuleType("fmtl_edge._kernels")
    fake_k.cuda_compiled = True
    fake_k.cuda_available = lambda: False
    monkeypatch.setitem(sys.modules, "fmtl_edge._kernels", fake_k)
    # `from fmtl_edge import _kernels` reads the package attribute once the real module was imported
    monkeypatch.setattr(fmtl_edge, "_kernels", fake_k, raising=False)
    assert _run(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"]["device_class"] == "jetson-agx-orin"
    assert info["device"]["l4t"] == "L4T R35.4.1"
    meters = {m["backend"]: m for m in info["meters"]}
    assert meters["jetson"]["ok"] and meters["estimate"]["ok"] and meters["null"]["ok"]
    assert not meters["rapl"]["ok"] and meters["rapl"]["reason"]
    assert info["auto_meter"]["backend"] == "jetson"
    assert info["auto_meter"]["total_scope"] == "sum_of_rails"
    assert info["power_mode"] == "MAXN"
    assert info["profile"]["device_class"] == "jetson-agx-orin"
    assert info["kernels"] == {"built": True, "mode": "native", "version": None, "cuda_compiled": True, "cuda_available": False}


def test_info_text_without_kernels(empty_root, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fmtl_edge._kernels", None)  # import fails
    monkeypatch.delattr(fmtl_edge, "_kernels", raising=False)
    assert _run(["info"]) == 0
    out = capsys.readouterr().out
    assert "energy meters:" in out and "estimate" in out
    assert "native kernels: not built" in out and "python-reference" in out and "pip install ." in out
    assert "auto -> estimate" in out


def test_help_has_examples():
    p = _parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("info", "meter"):
        text = sub.choices[name].format_help()
        assert "examples:" in text and f"fmtl-edge {name}" in text


def test_registered_in_main_cli_if_present():
    main_cli = pytest.importorskip("fmtl_edge.cli")
    if not hasattr(main_cli, "build_parser"):
        pytest.skip("main CLI has no build_parser yet")
    args = main_cli.build_parser().parse_args(["meter", "--json", "--", "true"])
    assert args.func is rcli.cmd_meter and args.cmd[-1] == "true"


def test_meter_command_line_end_to_end(tmp_path):
    env = dict(os.environ, FMTL_EDGE_SYSFS_ROOT=str(tmp_path), PYTHONPATH=os.getcwd())
    r = subprocess.run(
        [sys.executable, "-m", "fmtl_edge.runtime.cli", "meter", "--json", "--backend", "estimate", "--", sys.executable, "-c", "pass"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert JSON_KEYS <= set(json.loads(r.stdout))
