"""Issue 22.5: 80 columns. Tables split their columns into parts by rule (the leading column repeated,
"(continued)"), never cutting a method name or a figure, on a terminal and in a pipe or log file;
the progress bars keep their width; `fmtl-server status` is readable in a pipe."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest

from test_verdict import TASKS, _entry

LONG = ["mas-2-worst-scratch", "all-in-one", "one-by-one", "mas-auto", "ditto", "layered", "centralized"]


def _console(width=80, terminal=False):
    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=terminal, color_system="standard" if terminal else None), buf


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _results():
    methods = {}
    for i, n in enumerate(LONG):
        pers = 1.0 + i / 100 if n in ("ditto", "layered") else None
        methods[n] = _entry(None if n == "layered" else 2.0 + i / 1000, 100.0 + i, 1000.0 + i, pers=pers, pmetric=0.8,
                            reference=n == "centralized")
    return {"dataset": "toy", "tasks": TASKS, "clients": 4, "methods": methods}


@pytest.mark.parametrize("terminal", [False, True])
def test_the_summary_at_80_columns_splits_columns_and_cuts_nothing(terminal):
    from fmtl_edge.report import summary_tables

    con, buf = _console(80, terminal)
    res = _results()
    for part in summary_tables(res):
        con.print(part)
    text = _plain(buf.getvalue())
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert "…" not in text
    for n in LONG:  # every method name whole in the main table's rows and as a per-task column header
        assert any(ln.startswith("│ " + n) for ln in lines), n
        assert f" {n} " in text
    for i, n in enumerate(LONG):  # every figure whole
        m = res["methods"][n]
        assert f"{m['device_s']:.1f}" in text and f"{m['energy_j']:.1f}*" in text
        if m["total_test_loss"] is not None:
            assert f"{m['total_test_loss']:.3f}" in text
    assert "(continued)" in text  # seven methods: the per-task table is split into parts
    # each part of the main table keeps the method column
    heads = [ln for ln in lines if ln.startswith("┃ method")]
    assert len(heads) >= 3


def test_a_fit_table_that_fits_is_one_plain_table_and_a_split_keeps_its_leading_columns():
    from fmtl_edge.tables import Col, FitTable

    t = FitTable("t", [Col("task", "left"), Col("metric", "left"), *[Col(f"method-{i:02d}") for i in range(9)]], keep=2,
                 caption="the caption")
    t.add_row("task-a", "accuracy", *[f"0.{i}00 / 0.9{i}0" for i in range(9)])
    con, buf = _console(200)
    con.print(t)
    assert buf.getvalue().count("┃ task") == 1 and "(continued)" not in buf.getvalue()
    con, buf = _console(60)
    con.print(t)
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 60 and "…" not in text
    assert text.count("┃ task   ┃ metric") >= 3 and "the caption" in text
    assert all(f"0.{i}00 / 0.9{i}0" in text and f"method-{i:02d}" in text for i in range(9))
    with pytest.raises(ValueError, match="cells"):
        t.add_row("x")


def test_progress_bars_keep_their_width_at_80_columns():
    from fmtl_edge.cli import BAR_WIDTH, make_progress, round_info, short_loss
    from fmtl_edge.plan import RoundRecord

    con, buf = _console(80, terminal=True)
    names = ["mas-2-worst-scratch", "all-in-one"]
    p = make_progress(con, names)
    a = p.add_task(names[0], total=50, info="")
    rec = RoundRecord.from_dict({"job": "split-0", "round": 11, "clients": [0, 1], "train_loss": {"a": 0.1, "b": 0.023},
                                 "samples": 10, "lr": 0.1, "device_s": 1.0, "energy_j": None, "wall_s": 1.0})
    p.update(a, advance=50, info=round_info(rec))
    b = p.add_task(names[1], total=30, info="")
    p.update(b, advance=30, info=short_loss({"total_test_loss": 0.2534, "personalised_total_test_loss": 0.1981}))
    con.print(p.make_tasks_table(p.tasks))
    lines = [_plain(ln) for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 2 and max(len(ln) for ln in lines) <= 80, lines
    assert lines[0].startswith("mas-2-worst-scratch ") and "split-0 r12 loss 0.123" in lines[0]
    assert "test 0.253, pers. 0.198" in lines[1] and "30/30" in lines[1]
    assert all(ln.count("━") >= BAR_WIDTH for ln in lines) and "…" not in "".join(lines)


def test_server_status_is_readable_in_a_pipe_at_80_columns():
    root = Path(__file__).resolve().parents[1]
    try:
        import fmtl_server  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(root / "server"))
    from fmtl_server.cli import _print_status

    now = time.time()
    st = {"job": "utk-groups", "phase": "training mas-2-worst-scratch", "results": None,
          "counters": {"updates_accepted": 12, "updates_rejected": 1},
          "jobs": [{"method": "mas-2-worst-scratch", "job": "split-1", "rounds_done": 7, "rounds": 20, "done": False,
                    "device_s": 123.4, "energy_j": 4567.8, "wall_s": 89.1}],
          "methods_done": [{"method": "all-in-one", "total_test_loss": 2.3456, "device_s": 99.9, "energy_j": 1234.5,
                            "splits": [["age", "age_group", "gender", "race", "autoencode"]]}],
          "devices": [{"client_id": c, "device": f"jetson-orin-nano-{c:02d}.lab", "state": "training",
                       "executions": 14, "rejected": 0, "failures": 1, "last_device_s": 12.345,
                       "last_energy_j": 98.765, "last_job": "mas-2-worst-scratch/split-1", "last_seen_unix_s": now}
                      for c in range(3)],
          "refusals": {"jetson-orin-nano-01.lab": {"total": 3, "by_rpc": {"UploadUpdate": 3},
                                                   "last": "update norm 12.3 is over the bound 4.5 of this round"}}}
    con, buf = _console(80, terminal=False)
    _print_status(st, con)
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80 and "…" not in text
    for c in range(3):
        assert f"jetson-orin-nano-{c:02d}.lab" in text
    assert "mas-2-worst-scratch/split-1" in text and "12.35" in text and "98.77" in text and "0 s ago" in text
    assert "age+age_group+gender+race+autoencode" in text.replace("\n", "").replace("│", "").replace(" ", "") or \
        "age+age_group+gender+race+autoencode" in text
    assert "update norm 12.3 is over the bound" in " ".join(text.split())
