"""Issue 22.3: a verdict a user can read. The summary marks the best method per column, prints one
line saying which method is best on loss and on cost and whether the spread separates them (one
seed: it cannot), warns when a task's accuracy is at the majority-class rate, and says that R counts
rounds over all jobs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from conftest import make_toy_dataset
from fmtl_edge.report import BEST, summary_tables
from fmtl_edge.verdict import best_methods, chance_accuracies, chance_warnings, separation, verdict_line

TASKS = ["a", "b"]


def _entry(loss, device, energy, metric=0.9, reference=False, pers=None, pmetric=None):
    per_task = {t: {"test_loss": None if loss is None else loss / 2, "metric_name": "accuracy",
                    "metric": None if loss is None else metric, "test_samples": 100} for t in TASKS}
    if pers is not None:
        for t in TASKS:
            per_task[t].update(personalised_test_loss=pers / 2, personalised_metric=pmetric)
    return {"total_test_loss": loss, "personalised_total_test_loss": pers, "per_task": per_task, "device_s": device,
            "critical_path_s": device / 2, "energy_j": energy, "energy_source": "estimate:cpu_time*15W",
            "energy_scope": "process", "energy_estimated": True, "client_executions": 4, "sample_passes": 1000,
            "lookahead_passes": 0, "flops_estimate": None, "cpu_s": device, "rounds": 4, "rounds_per_task": 4,
            "splits": [TASKS], "reference": reference, "history": [], "jobs": []}


def _results(**methods):
    return {"dataset": "toy", "tasks": TASKS, "clients": 4, "methods": methods}


def _render(res, width=80) -> str:
    from rich.console import Console

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False, color_system=None)
    for part in summary_tables(res):
        con.print(part)
    return buf.getvalue()


def _row(text: str, name: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(f"│ {name} "))


def test_the_best_of_each_column_is_marked_and_references_are_not_ranked():
    res = _results(**{"mas-2": _entry(0.9, 20.0, 300.0), "all-in-one": _entry(1.1, 10.0, 150.0),
                      "centralized": _entry(0.5, 5.0, 50.0, reference=True)})
    assert best_methods(res["methods"], "total_test_loss") == {"mas-2"}
    assert best_methods(res["methods"], "device_s") == {"all-in-one"}  # centralized is a reference
    text = _render(res, width=120)
    mas, aio, cen = _row(text, "mas-2"), _row(text, "all-in-one"), _row(text, "centralized†")
    assert f"0.900 {BEST}" in mas and f"10.0 {BEST}" in aio and f"150.0* {BEST}" in aio
    assert BEST not in cen and f"20.0 {BEST}" not in mas
    assert f"{BEST} lowest of its column (references † not ranked)" in text
    assert "R: rounds summed over all jobs" in text


def test_one_seed_verdict_names_best_on_loss_and_cost_and_says_it_cannot_separate_them():
    res = _results(**{"mas-2": _entry(0.9, 20.0, 300.0), "all-in-one": _entry(1.1, 10.0, 150.0)})
    line = verdict_line(res)
    assert line.startswith("verdict: lowest total loss: mas-2 0.900 (next all-in-one 1.100)")
    assert "least device time: all-in-one 10.0 s (next mas-2 20.0 s)" in line
    assert "one seed cannot tell them apart" in line
    assert "least energy" not in line  # the same method as device time
    assert line in " ".join(_render(res, width=400).split("\n"))
    assert verdict_line(_results(only=_entry(1.0, 1.0, 1.0))) is None  # nothing to compare
    # with chance losses the verdict ranks the normalised total (the figure that compares methods)
    res["methods"]["mas-2"]["normalised_total_test_loss"] = 0.95
    res["methods"]["all-in-one"]["normalised_total_test_loss"] = 0.80
    assert verdict_line(res).startswith("verdict: lowest normalised loss: all-in-one 0.800 (next mas-2 0.950)")


def _seeded(entry, losses, devices):
    e = dict(entry)
    e["seeds"] = {str(s): {**entry, "total_test_loss": lo, "device_s": d} for s, (lo, d) in enumerate(zip(losses, devices))}
    e["total_test_loss"], e["device_s"] = float(np.mean(losses)), float(np.mean(devices))
    e["std"] = {"total_test_loss": float(np.std(losses, ddof=1)), "device_s": float(np.std(devices, ddof=1))}
    e["mean"] = {"total_test_loss": e["total_test_loss"], "device_s": e["device_s"]}
    return e


def test_with_seeds_the_verdict_says_whether_the_paired_differences_separate_them():
    # the seeds pair the runs: a loss lower on every seed by about 0.3 is separated although the
    # seeds' spread (0.1) is large; device time alternates and is not
    a = _seeded(_entry(1, 1, 1), [0.90, 1.00, 0.80], [10.0, 30.0, 20.0])
    b = _seeded(_entry(1, 1, 1), [1.20, 1.31, 1.09], [12.0, 28.0, 25.0])
    res = _results(**{"mas-2": a, "all-in-one": b})
    res["seeds"] = [0, 1, 2]
    how, p = separation(a, b, "total_test_loss")
    assert how == "lower" and p["ci95"][1] < 0 and p["n"] == 3
    how, p = separation(a, b, "device_s")
    assert how == "not separated" and p["ci95"][0] < 0 < p["ci95"][1]
    line = verdict_line(res)
    assert "lowest total loss: mas-2 0.900 ± 0.100 (next all-in-one 1.200 ± 0.110, paired difference -0.300 ± " in line
    assert ": separated)" in line
    assert "least device time: mas-2 20.0 ± 10.0 s (next all-in-one 21.7 ± 8.5 s, paired difference -1.7 ± " in line
    assert "s: not separated by these seeds)" in line and "one seed" not in line


def test_chance_accuracies_are_the_majority_class_rates_of_the_test_labels():
    ds = make_toy_dataset(n_clients=3)
    got = chance_accuracies(ds.tasks, ds.clients)
    assert set(got) == {"cls", "bin"}  # classification and binary only
    for t in ("cls", "bin"):
        ys = [np.rint(np.asarray(c.y_test[t], dtype=float)).astype(int) for c in ds.clients]
        allv = np.concatenate(ys)
        n = len(allv)
        assert got[t]["test_samples"] == n
        assert got[t]["majority_rate"] == pytest.approx(np.bincount(allv).max() / n)
        assert got[t]["client_majority_rate"] == pytest.approx(sum(np.bincount(y).max() for y in ys) / n)
        assert got[t]["client_majority_rate"] >= got[t]["majority_rate"]


def test_accuracy_at_the_majority_class_rate_is_warned_in_the_summary():
    res = _results(**{"mas-2": _entry(0.9, 20.0, 300.0, metric=0.905),
                      "ditto": _entry(1.1, 10.0, 150.0, metric=0.95, pers=0.8, pmetric=0.97)})
    res["chance_accuracy"] = {"a": {"majority_rate": 0.9, "client_majority_rate": 0.965, "test_samples": 100},
                     "b": {"majority_rate": 0.5, "client_majority_rate": 0.6, "test_samples": 100}}
    lines = chance_warnings(res)
    assert lines == [
        "warning: mas-2: a accuracy 0.905 is at chance level: predicting the most frequent class of the union "
        "test set scores 0.900",
        "warning: ditto: a personalised accuracy 0.970 is at chance level: predicting the most frequent class of "
        "each client's own test split scores 0.965"]
    text = " ".join(_render(res, width=400).split("\n"))
    assert lines[0] in text and lines[1] in text
    res["chance_accuracy"] = None  # fmtl-server / Flower: no data, no warning
    assert chance_warnings(res) == []


def test_simulate_records_the_chance_accuracies_and_prints_the_verdict(tmp_path, capsys):
    from fmtl_edge.cli import main

    rc = main(["simulate", "--methods", "all-in-one,one-by-one", "--rounds", "1", "--max-samples", "200",
               "--clients-per-round", "2", "--meter", "estimate", "--no-progress", "--out", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(res["chance_accuracy"]) == {"digit", "parity", "ge5"}
    assert 0.5 <= res["chance_accuracy"]["parity"]["majority_rate"] <= res["chance_accuracy"]["parity"]["client_majority_rate"] <= 1
    assert "verdict: lowest normalised loss:" in out and "one seed cannot tell them apart" in " ".join(out.split())
