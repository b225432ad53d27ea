"""Task losses on one scale (issue 20 item 3) and comparisons that can fail (item 4): chance losses
from per-client label statistics, --loss-weights in the objective and the lookahead, normalised
totals, paired per-seed differences with their t-interval, combined single-seed runs, the split oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fmtl_edge.config import ConfigError
from fmtl_edge.loss_weights import (chance_loss, chance_losses, client_label_stats, combine_label_stats,
                                    normalised_total, parse_loss_weights, resolve_loss_weights)
from fmtl_edge.results import paired_differences, paired_verdict
from fmtl_edge.tasks import Task, TaskSet

from conftest import make_toy_dataset

TASKS = TaskSet([Task("cls", "classification", 3), Task("bin", "binary"),
                 Task("reg", "regression", target_mean=2.0, target_std=4.0), Task("den", "dense", 1)])


def test_chance_losses_are_the_best_constant_predictors_losses_by_hand():
    a = {"cls": np.array([0, 0, 1, 2]), "bin": np.array([1.0, 0.0, 0.0, 0.0]), "reg": np.array([2.0, 6.0, 10.0, 2.0]),
         "den": np.array([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])}
    b = {"cls": np.array([0, 1]), "bin": np.array([1.0, 1.0])}  # a client without reg/den labels
    total = combine_label_stats([client_label_stats(a, TASKS), client_label_stats(b, TASKS)])
    c = chance_losses(TASKS, total)
    p = np.array([3, 2, 1]) / 6
    assert c["cls"] == pytest.approx(-(p * np.log(p)).sum())
    assert c["bin"] == pytest.approx(-(0.5 * math.log(0.5)) * 2)  # 3 of 6 positive
    z = (np.array([2.0, 6.0, 10.0, 2.0]) - 2.0) / 4.0
    assert c["reg"] == pytest.approx(z.var())
    assert c["den"] == pytest.approx(np.array([0.0, 1.0, 1.0, 1.0]).var())
    assert total["cls"]["n"] == 6 and total["den"]["n"] == 4
    assert chance_loss(TASKS["reg"], None) is None


def test_the_chance_loss_is_the_loss_of_predicting_the_constant(toy_dataset):
    """Train-set loss of the constant prediction = the chance loss (what the statistics stand for)."""
    stats = combine_label_stats(client_label_stats(c.y_train, toy_dataset.tasks) for c in toy_dataset.clients)
    for t in toy_dataset.tasks:
        y = torch.from_numpy(np.concatenate([c.y_train[t.name] for c in toy_dataset.clients]))
        s = stats[t.name]
        if t.kind == "classification":
            pred = torch.log(torch.tensor(s["counts"], dtype=torch.float32) / s["n"]).expand(len(y), -1)
        elif t.kind == "binary":
            p = s["positives"] / s["n"]
            pred = torch.full((len(y), 1), math.log(p / (1 - p)))
        else:
            pred = torch.full((len(y), *y.shape[1:]) if t.kind == "dense" else (len(y), 1), s["sum"] / s["n"])
        assert float(t.loss(pred, y)) == pytest.approx(chance_loss(t, s), rel=1e-4), t.name


def test_loss_weights_values_and_errors():
    chance = {"cls": 2.0, "bin": 0.5, "reg": 1.0, "den": 0.25}
    assert resolve_loss_weights("uniform", TASKS, chance) == {t: 1.0 for t in TASKS.names}
    w = resolve_loss_weights("chance", TASKS, chance)
    assert sum(w.values()) == pytest.approx(len(TASKS))  # mean weight 1: the learning rate keeps its meaning
    assert w["den"] / w["cls"] == pytest.approx(8.0) and w["bin"] / w["reg"] == pytest.approx(2.0)
    assert resolve_loss_weights("cls=0.5,den=2", TASKS, chance) == {"cls": 0.5, "bin": 1.0, "reg": 1.0, "den": 2.0}
    with pytest.raises(ConfigError, match="--loss-weights.*'nope'"):
        resolve_loss_weights("nope=1", TASKS, chance)
    with pytest.raises(ConfigError, match="constant"):
        resolve_loss_weights("chance", TASKS, {**chance, "bin": 0.0})
    for bad in ("cls", "cls=-1", "cls=x", "=2"):
        with pytest.raises(ConfigError, match="--loss-weights"):
            parse_loss_weights(bad)
    assert normalised_total({"cls": 1.0, "den": 0.5}, chance) == pytest.approx(0.5 + 2.0)
    assert normalised_total({"cls": 1.0}, {"cls": None}) is None


def _train(ds, weights, weight_decay=1e-4):
    from fmtl_edge.client import train_round
    from fmtl_edge.messages import Assignment, TrainConfig
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import state_to_numpy

    spec = ModelSpec(ds.input_shape, width=4)
    g = state_to_numpy(MultiTaskModel(spec, ds.tasks, seed=0).state_dict())
    a = Assignment("all", 0, tuple(ds.tasks.names), g, 0.1, TrainConfig(batch_size=8, weight_decay=weight_decay),
                   loss_weights=weights)
    return g, train_round(ds.clients[0], spec, ds.tasks, a).state


def test_weights_enter_the_objective_bit_equal_at_one(toy_dataset):
    g, base = _train(toy_dataset, {})
    _, ones = _train(toy_dataset, {t: 1.0 for t in toy_dataset.tasks.names})
    assert all(np.array_equal(base[k], ones[k]) for k in base)
    _, zero = _train(toy_dataset, {"cls": 0.0}, weight_decay=0.0)
    _, free = _train(toy_dataset, {}, weight_decay=0.0)
    head = [k for k in zero if k.startswith("heads.cls.")]
    assert head and all(np.array_equal(zero[k], g[k]) for k in head)  # weight 0: no gradient into its head
    assert not all(np.array_equal(free[k], g[k]) for k in head)
    assert not all(np.array_equal(zero[k], free[k]) for k in zero if k.startswith("backbone."))


def test_a_tasks_weight_scales_its_lookahead_step_like_its_learning_rate():
    from fmtl_edge.affinity import lookahead_affinity
    from fmtl_edge.models import ModelSpec, MultiTaskModel

    ds = make_toy_dataset()
    model = MultiTaskModel(ModelSpec(ds.input_shape, width=4), ds.tasks, seed=0)
    model.train()
    x = torch.from_numpy(ds.clients[0].x_train[:8])
    ys = {t: torch.from_numpy(ds.clients[0].y_train[t][:8]) for t in ds.tasks.names}

    def measure(lr, weights):
        outs = model(x)
        losses = {t: ds.tasks[t].loss(outs[t], ys[t]) for t in ds.tasks.names}
        return lookahead_affinity(model, x, ys, losses, lr, 0.0, list(ds.tasks.names), weights=weights)

    doubled = measure(0.05, {t: 2.0 for t in ds.tasks.names})
    np.testing.assert_allclose(doubled, measure(0.1, None), rtol=1e-5, atol=1e-7)
    assert not np.allclose(doubled, measure(0.05, None))


def test_paired_differences_and_their_t_interval_by_hand():
    from scipy import stats

    a, b = [1.0, 2.0, 3.5, 2.5], [1.5, 2.0, 4.5, 3.5]
    p = paired_differences(a, b)
    d = np.array(a) - np.array(b)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert p["diffs"] == d.tolist() and p["mean"] == pytest.approx(d.mean())
    assert p["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert paired_verdict(p) == "not separated"  # the interval holds 0
    clear = paired_differences([1.0, 1.1, 0.9, 1.0], [2.0, 2.05, 2.0, 2.1])
    assert paired_verdict(clear) == "lower" and clear["p"] < 0.01
    assert paired_differences([1.0, None], [1.0, 2.0]) is None


def test_separate_seed_runs_combine_as_a_seeds_run(tmp_path, capsys):
    """Two single-seed runs on one partition (each resumable) give the --seeds run's figures."""
    from fmtl_edge.cli import main

    base = ["simulate", "--methods", "all-in-one,one-by-one", "--rounds", "2", "--max-samples", "300", "--clients", "4",
            "--meter", "null", "--no-progress", "--log-level", "warning", "--loss-weights", "chance"]
    assert main([*base, "--seeds", "0,1", "--paired-with", "all-in-one", "--out", str(tmp_path / "both")]) == 0
    for s in (0, 1):
        assert main([*base, "--seed", str(s), "--partition-seed", "0", "--out", str(tmp_path / f"s{s}")]) == 0
    assert main(["report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--paired-with", "all-in-one",
                 "--write", str(tmp_path / "combined.json")]) == 0
    assert "paired vs all-in-one" in capsys.readouterr().out
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    comb = json.loads((tmp_path / "combined.json").read_text())
    for m in ("all-in-one", "one-by-one"):
        assert comb["methods"][m]["mean"] == both["methods"][m]["mean"] or all(
            (comb["methods"][m]["mean"][k] == both["methods"][m]["mean"][k]) for k in
            ("total_test_loss", "normalised_total_test_loss", "sample_passes"))
    pb, pc = both["methods"]["one-by-one"]["paired"], comb["methods"]["one-by-one"]["paired"]
    assert pc["normalised_total_test_loss"]["diffs"] == pb["normalised_total_test_loss"]["diffs"]
    assert main([*base, "--seed", "1", "--out", str(tmp_path / "other")]) == 0  # partition of seed 1
    assert main(["report", str(tmp_path / "s0"), str(tmp_path / "other")]) == 2
    assert "partitions differ" in capsys.readouterr().err


def test_the_split_oracle_ranks_the_affinity_choice_and_keeps_mas_bit_equal(tmp_path):
    from fmtl_edge.cli import main

    out = tmp_path / "o"
    assert main(["simulate", "--methods", "mas-2", "--oracle-splits", "--rounds", "3", "--r0", "1", "--max-samples",
                 "300", "--clients", "4", "--meter", "null", "--no-progress", "--log-level", "warning",
                 "--loss-weights", "chance", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    mas, orc = res["methods"]["mas-2"], res["methods"]["mas-oracle-2"]
    assert orc["total_test_loss"] == mas["total_test_loss"] and orc["splits"] == mas["splits"]
    o = orc["oracle"]
    assert o["partitions"] == 15 and len(o["rows"]) == 15  # Stirling(5, 2)
    losses = [r["normalised_total_test_loss"] for r in o["rows"]]
    assert losses == sorted(losses) and 1 <= o["rank"] <= 15
    chosen = next(r for r in o["rows"] if r["partition"] == o["chosen"])
    assert chosen["normalised_total_test_loss"] == pytest.approx(mas["normalised_total_test_loss"])
    assert -1 <= o["spearman_score_vs_loss"] <= 1 and mas["oracle"] is None


def test_paired_and_oracle_settings_are_checked_before_anything_runs(tmp_path, capsys):
    from fmtl_edge.cli import main

    assert main(["simulate", "--methods", "all-in-one", "--paired-with", "one-by-one", "--out", str(tmp_path / "a")]) == 2
    assert "--paired-with" in capsys.readouterr().err
    assert main(["simulate", "--methods", "all-in-one", "--seeds", "0,1", "--paired-with", "all-in-one",
                 "--oracle-splits", "--out", str(tmp_path / "b")]) == 2
    assert "--oracle-splits" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
