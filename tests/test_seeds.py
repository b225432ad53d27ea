"""``--seeds``: every method once per training seed on one partition; per-seed figures and mean/std
(issue 10 item 6)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from fmtl_edge.cli import main
from fmtl_edge.config import ConfigError, build_config
from fmtl_edge.results import SEED_FIGURES

TINY = ["--methods", "mas-2,all-in-one", "--rounds", "2", "--r0", "1", "--max-samples", "200",
        "--clients-per-round", "2", "--meter", "estimate", "--no-progress"]


def test_two_seed_run_holds_per_seed_figures_and_their_mean_and_sample_std(tmp_path):
    from rich.console import Console

    from fmtl_edge.report import summary_tables

    assert main(["simulate", *TINY, "--seeds", "0,1", "--out", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["partition_seed"] == 0
    for name, m in res["methods"].items():
        assert set(m["seeds"]) == {"0", "1"}
        for k in SEED_FIGURES:
            vals = [m["seeds"][s].get(k) for s in ("0", "1")]
            if any(v is None for v in vals):
                assert m["std"][k] is None
                continue
            assert m["mean"][k] == pytest.approx(np.mean(vals))
            assert m["std"][k] == pytest.approx(np.std(vals, ddof=1))
        assert m["total_test_loss"] == m["mean"]["total_test_loss"]
        # the training seed changes the run (init, sampling, batch order)
        assert m["seeds"]["0"]["total_test_loss"] != m["seeds"]["1"]["total_test_loss"]
    buf = io.StringIO()
    con = Console(file=buf, width=100, force_terminal=False, color_system=None)
    for part in summary_tables(res):
        con.print(part)
    assert "±" in buf.getvalue() and "ddof=1" in buf.getvalue()


def test_one_seed_run_is_the_plain_run(tmp_path):
    assert main(["simulate", *TINY, "--methods", "all-in-one", "--seeds", "3", "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())["methods"]["all-in-one"]
    assert a["std"]["total_test_loss"] == 0.0 and list(a["seeds"]) == ["3"]


@pytest.mark.parametrize("bad", ["0,0", "a,b", ""])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(ConfigError, match="seeds"):
        build_config({"seeds": bad})


def test_seeds_parse_from_flag_and_resume_is_refused(tmp_path, capsys):
    assert build_config({"seeds": "0,1,2"}).seeds == (0, 1, 2)
    assert main(["simulate", *TINY, "--seeds", "0,1", "--resume", "--out", str(tmp_path / "r")]) == 2
    assert "--seeds" in capsys.readouterr().err
