"""Energy decides (issue 21): a simulated fleet prices every execution (model:fleet), the
selection and power-mode policies run through every method's strategy, budgets are never
exceeded, and --resume is exact under the energy policy."""

from __future__ import annotations

import json

import pytest

from fmtl_edge.cli import main

from conftest import interrupt_then_resume

BASE = ["simulate", "--dataset", "digits", "--max-samples", "400", "--clients", "12", "--clients-per-round", "3",
        "--rounds", "4", "--meter", "null", "--no-progress", "--log-level", "warning"]

def _kind(name: str, default: str, modes: dict[str, tuple[float, float]], idle_w: float, budgets: str = "") -> str:
    """One ``[[kind]]`` table of a fleet file, 2 devices: modes name -> (speed, watts)."""
    rows = [f'[[kind]]\nname = "{name}"\ncount = 2\nidle_w = {idle_w}\ndefault_mode = "{default}"\n{budgets}']
    rows += [f'  [[kind.mode]]\n  name = "{m}"\n  speed = {v}\n  watts = {w}\n' for m, (v, w) in modes.items()]
    return "".join(rows)


# two small devices with tight budgets (1 J per round, 2.5 J per run) and two big ones without
TIGHT = ('name = "tight"\nsample_passes_per_s = 1000.0\n'
         + _kind("small", "fast", {"slow": (0.5, 4.0), "fast": (1.0, 10.0)}, 1.0,
                 "round_energy_j = 1.0\nrun_energy_j = 2.5\n")
         + _kind("big", "max", {"eco": (0.4, 6.0), "max": (1.0, 20.0)}, 2.0))


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert main([*BASE, *extra, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_a_fleet_prices_every_execution_by_its_device_and_mode(tmp_path):
    res = _run(tmp_path, "f", "--methods", "all-in-one", "--fleet", "orin-mix", "--power-mode", "max")
    m = res["methods"]["all-in-one"]
    assert m["energy_source"] == "model:fleet:orin-mix" and m["energy_estimated"]
    assert res["energy_policy"]["fleet"]["name"] == "orin-mix"
    from fmtl_edge.fleet import Fleet

    fleet = Fleet.load("orin-mix")
    for h in m["history"]:
        for c in h["per_client"]:
            dev = fleet.device_of(c["client_id"])
            assert c["device"] == dev.name and c["mode"] == dev.max_mode.name
            s, j = fleet.cost(c["client_id"], c["mode"], c["sample_passes"])
            assert c["device_s"] == pytest.approx(s) and c["energy_j"] == pytest.approx(j)
    assert m["energy_j"] == pytest.approx(sum(c["energy_j"] for h in m["history"] for c in h["per_client"]))
    kinds = {p["kind"] for p in m["energy"]["profiles"]}
    assert kinds == {"model:fleet"} and m["energy"]["budget_violations"] == []


def test_energy_selection_and_auto_modes_spend_less_than_uniform_at_max(tmp_path):
    base = _run(tmp_path, "u", "--methods", "all-in-one", "--fleet", "orin-mix", "--power-mode", "max")
    eco = _run(tmp_path, "e", "--methods", "all-in-one", "--fleet", "orin-mix", "--selection", "energy",
               "--power-mode", "auto")
    b, e = base["methods"]["all-in-one"], eco["methods"]["all-in-one"]
    assert e["energy_j"] < b["energy_j"]
    assert e["energy"]["budget_violations"] == [] and b["energy"]["budget_violations"] == []


def test_budgets_are_never_exceeded_and_a_spent_fleet_does_not_stall(tmp_path):
    f = tmp_path / "tight.toml"
    f.write_text(TIGHT)
    res = _run(tmp_path, "t", "--methods", "all-in-one,one-by-one", "--fleet", str(f), "--selection", "energy",
               "--power-mode", "auto")
    for m in res["methods"].values():
        assert m["energy"]["budget_violations"] == []
        spent: dict[str, float] = {}
        for h in m["history"]:
            per_round: dict[str, float] = {}
            for c in h["per_client"]:
                per_round[c["device"]] = per_round.get(c["device"], 0.0) + c["energy_j"]
                spent[c["device"]] = spent.get(c["device"], 0.0) + c["energy_j"]
            assert all(j <= 1.0 + 1e-9 for d, j in per_round.items() if d.startswith("small"))
        assert all(j <= 2.5 + 1e-9 for d, j in spent.items() if d.startswith("small"))
        assert m["rounds"] >= 4  # the rounds ran (some with fewer clients) instead of failing


def test_resume_is_exact_under_the_energy_policy(tmp_path, monkeypatch):
    args = [*BASE, "--methods", "all-in-one,mas-2", "--r0", "2", "--fleet", "orin-mix", "--selection", "energy",
            "--power-mode", "auto"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "resumed"
    interrupt_then_resume(monkeypatch, main, args, out, lambda a: a.state_key == "mas-2/split-0" and a.round == 1)
    a = json.loads((ref / "results.json").read_text())["methods"]
    b = json.loads((out / "results.json").read_text())["methods"]
    for m in a:
        assert [h["clients"] for h in a[m]["history"]] == [h["clients"] for h in b[m]["history"]]
        assert [[c["mode"] for c in h["per_client"]] for h in a[m]["history"]] == \
               [[c["mode"] for c in h["per_client"]] for h in b[m]["history"]]
        assert a[m]["total_test_loss"] == b[m]["total_test_loss"] and a[m]["energy_j"] == b[m]["energy_j"]


def test_power_modes_need_known_devices(tmp_path, capsys):
    out = tmp_path / "x"
    assert main([*BASE, "--methods", "all-in-one", "--power-mode", "auto", "--out", str(out)]) == 2
    assert "--power-mode" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".*.resume"))  # refused before anything was written


def test_energy_candidates_keep_the_federation_covered(tmp_path):
    greedy = _run(tmp_path, "g", "--methods", "all-in-one", "--fleet", "orin-mix", "--selection", "energy")
    drawn = _run(tmp_path, "d", "--methods", "all-in-one", "--fleet", "orin-mix", "--selection", "energy",
                 "--energy-candidates", "6")

    def seen(res):
        return {c for h in res["methods"]["all-in-one"]["history"] for c in h["clients"]}

    assert len(seen(drawn)) > len(seen(greedy))
    assert drawn["energy_policy"]["energy_candidates"] == 6
