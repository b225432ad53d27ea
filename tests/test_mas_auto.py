"""``mas-auto``: R0 from a stable partition of the running-mean affinity, x from the relative gain of
one more group; the merge phase as one-round jobs continuing each other (plan, schedule, resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmtl_edge.affinity import group_score, self_affinity
from fmtl_edge.config import SimulationConfig
from fmtl_edge.coordinator import Coordinator
from fmtl_edge.plan import Job
from fmtl_edge.messages import TrainConfig, poly_lr
from fmtl_edge.methods import MASAuto, make_method
from fmtl_edge.methods.mas_auto import choose_x, partition_scores, round_decisions, stop_round
from fmtl_edge.models import ModelSpec

from conftest import interrupt_then_resume
from test_mas_ablations import _all_partitions
from test_mas_plan import S_TRUE, TASKS, ScriptedPool

# a helps c and b helps d (the other pairs hurt): the best split is {a, c}, {b, d}
S_AC = np.full((4, 4), -0.2)
S_AC[0, 2] = S_AC[2, 0] = S_AC[1, 3] = S_AC[3, 1] = 0.6
AB_CD, AC_BD = ((0, 1), (2, 3)), ((0, 2), (1, 3))


def _brute_best(S, x):
    """The best partition into x groups by enumeration (hand-checkable oracle)."""
    sd = self_affinity(S)
    scores = {p: sum(group_score(sd, g) for g in p) for p in _all_partitions(S.shape[0], x)}
    best = max(scores, key=scores.get)
    return best, scores[best]


def test_x_rule_against_a_hand_computation():
    # S_TRUE: score(1) = Σ off-diagonal / (n-1) = 0.4 / 3; score(2) = 0.5+0.4+0.6+0.5 = 2.0 ({a,b},{c,d});
    # score(3) = 1.1 + self(a) + self(b) = 1.1 + 2 * (0.1 / 6) ({c,d},{a},{b}); score(4) = Σ self = score(1)
    want = [0.4 / 3, 2.0, 1.1 + 0.2 / 6, 0.4 / 3]
    got = [p.score for p in partition_scores(S_TRUE)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    for x in (1, 2, 3, 4):
        assert got[x - 1] == pytest.approx(_brute_best(S_TRUE, x)[1])
    # x = 1 -> 2 gains 1.87 (> 0.05 * 2.0), x = 2 -> 3 loses: x = 2
    assert choose_x(got, 0.05) == 2
    # the tolerance is relative to the larger |score| of the two
    assert choose_x([1.0, 1.04, 1.5], 0.05) == 1  # 0.04 <= 0.05 * 1.04
    assert choose_x([1.0, 1.04, 1.5], 0.03) == 3  # 0.04 > 0.0312, 0.46 > 0.045: every group gains
    assert choose_x([0.0, 0.0, 0.0], 0.0) == 1
    assert choose_x([5.0], 0.05) == 1
    with pytest.raises(ValueError, match="--auto-epsilon"):
        choose_x([1.0, 2.0], -0.1)


def test_stable_partition_stops_the_merge_on_a_hand_built_sequence():
    # round 1 favours {a,c},{b,d}; from round 2 on the running mean is dominated by 3 * S_TRUE
    seq = [S_AC, 3 * S_TRUE, 3 * S_TRUE, 3 * S_TRUE, 3 * S_TRUE]
    dec = round_decisions(seq, 0.05, 4)
    assert [d.groups for d in dec] == [AC_BD, AB_CD, AB_CD, AB_CD, AB_CD]
    for m, d in enumerate(dec, start=1):  # each decision is on the running mean of rounds 1..m
        mean = np.mean(seq[:m], axis=0)
        assert d.groups == _brute_best(mean, d.x)[0]
        assert d.scores[d.x - 1] == pytest.approx(_brute_best(mean, d.x)[1])
    assert stop_round(dec, 1) == 1
    assert stop_round(dec, 2) == 3
    assert stop_round(dec, 3) == 4
    assert stop_round(dec, 5) is None
    # a round that measured nothing decides nothing until one did
    dec = round_decisions([None, S_TRUE, S_TRUE], 0.05, 4)
    assert dec[0].groups is None and not dec[0].measured and dec[1].groups == AB_CD
    assert stop_round(dec, 2) == 3


class SequencePool(ScriptedPool):
    """ScriptedPool whose merge round k reports ``seq[k]`` (clients ± 0.05 noise that averages out)."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def execute_many(self, work):
        for cid, a in work:
            if a.job.startswith("merge-"):
                self.S = self.seq[int(a.job.split("-")[1])]
            yield from super().execute_many([(cid, a)])


def _coord(pool):
    return Coordinator(pool, ModelSpec((1, 8, 8), 4), TASKS, TrainConfig(lr=0.1), clients_per_round=2, seed=1)


def test_plan_merge_rounds_continue_each_other_then_split():
    seq = [S_AC, 3 * S_TRUE, 3 * S_TRUE, 3 * S_TRUE, 3 * S_TRUE, 3 * S_TRUE]
    pool = SequencePool(seq)
    coord = _coord(pool)
    m = MASAuto(TASKS, rounds=10, r0_max=6, stable_rounds=3)
    done = coord.run_method(m)
    assert list(done) == ["merge-0", "merge-1", "merge-2", "merge-3", "split-0", "split-1"]
    assert m.chosen_r0(done) == 4
    assert m.splits(done) == [["a", "b"], ["c", "d"]]
    for k in range(4):
        j = done[f"merge-{k}"].job
        assert j.rounds == 1 and j.measure_affinity and j.init_from == (f"merge-{k - 1}" if k else None)
        # the merge continues one R0max-round poly schedule
        assert done[f"merge-{k}"].history[0].lr == pytest.approx(poly_lr(0.1, k, 6))
    for g in ("split-0", "split-1"):
        assert done[g].job.init_from == "merge-3" and done[g].job.rounds == 10 - 4
        assert done[g].history[0].lr == pytest.approx(0.1)  # the split restarts it
    # every scripted round adds 1.0: the split continued the 4 merge rounds' weights
    k = "backbone.layers.0.0.weight"
    init = coord.initial_state(TASKS.names)
    np.testing.assert_allclose(done["split-0"].state[k], init[k] + 4 + 6, rtol=1e-6)
    # the affinity is the mean of the four rounds' (each the mean over its clients, who report
    # seq[k] + 0.05 (odd id) or - 0.05 (even id))
    per_round = [np.mean([seq[r] + (0.05 if c % 2 else -0.05) for c in done[f"merge-{r}"].history[0].clients], axis=0)
                 for r in range(4)]
    want = np.mean(per_round, axis=0)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(m.affinity(done)[off], want[off], atol=1e-12)
    d = m.decision(done)
    assert (d["r0"], d["x"], d["capped"], d["r0_max"]) == (4, 2, False, 6)
    assert d["groups"] == [["a", "b"], ["c", "d"]] and [r["round"] for r in d["per_round"]] == [1, 2, 3, 4]
    assert d["per_round"][0]["groups"] == [["a", "c"], ["b", "d"]]
    assert set(d["scores"]) == {"1", "2", "3", "4"}
    json.dumps(d)
    # the plan is a pure function of the finished jobs: from any prefix it asks for what ran next
    names = list(done)
    for i in range(len(names)):
        prefix = {n: done[n] for n in names[:i]}
        assert m.next_jobs(prefix)[0].name == names[i]
    assert m.next_jobs(done) == []


def test_an_unstable_partition_is_capped_at_r0():
    seq = [S_AC, 3 * S_TRUE, 9 * S_AC, 27 * S_TRUE]  # the running mean flips every round
    coord = _coord(SequencePool(seq))
    m = MASAuto(TASKS, rounds=6, r0_max=4, stable_rounds=2)
    done = coord.run_method(m)
    d = m.decision(done)
    assert d["r0"] == 4 and d["capped"] is True
    assert [tuple(map(tuple, r["groups"])) for r in d["per_round"]] == [
        (("a", "c"), ("b", "d")), (("a", "b"), ("c", "d")), (("a", "c"), ("b", "d")), (("a", "b"), ("c", "d"))]
    assert all(done[f"split-{g}"].job.rounds == 2 for g in range(2))


def test_options_from_the_config_and_their_errors():
    cfg = SimulationConfig(rounds=9, r0=5, method_options={"auto_stable_rounds": 2, "auto_epsilon": 0.1})
    cfg.validate()
    m = make_method("mas-auto", TASKS, cfg)
    assert (m.r0_max, m.stable_rounds, m.epsilon, m.name) == (5, 2, 0.1, "mas-auto")
    m = make_method("mas-auto", TASKS, SimulationConfig(rounds=9, r0=5))
    assert (m.stable_rounds, m.epsilon) == (3, 0.05)
    with pytest.raises(ValueError, match="--auto-stable-rounds"):
        MASAuto(TASKS, 9, 5, stable_rounds=0)
    with pytest.raises(ValueError, match="--auto-epsilon"):
        MASAuto(TASKS, 9, 5, epsilon=-1.0)
    with pytest.raises(ValueError, match="--r0"):
        MASAuto(TASKS, 5, 5)
    with pytest.raises(ValueError, match="takes no parameter"):
        make_method("mas-auto-2", TASKS, cfg)
    with pytest.raises(ValueError, match="lr_schedule"):
        Job("j", ("a",), 3, lr_schedule=(2, 4))
    j = Job("j", ("a",), 1, lr_schedule=(3, 4))
    assert Job.from_dict(json.loads(json.dumps(j.to_dict()))) == j


@pytest.mark.slow
def test_digits_end_to_end_and_resume_is_exact(tmp_path, monkeypatch):
    from fmtl_edge.cli import main
    args = ["simulate", "--methods", "mas-auto", "--rounds", "5", "--r0", "3", "--max-samples", "200",
            "--clients-per-round", "2", "--meter", "estimate", "--no-progress", "--auto-stable-rounds", "2"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())["methods"]["mas-auto"]
    d = ref["decision"]
    assert 2 <= d["r0"] <= 3 and 1 <= d["x"] <= 5 and len(ref["splits"]) == d["x"]
    assert d["groups"] == ref["splits"] and np.isfinite(ref["total_test_loss"])
    merges = [j for j in ref["jobs"] if j["name"].startswith("merge-")]
    assert len(merges) == d["r0"] and ref["merge_phase"]["rounds"] == d["r0"]
    assert all(j["rounds"] == 5 - d["r0"] for j in ref["jobs"] if j["name"].startswith("split-"))
    # Ctrl-C at the second merge round, then --resume: the same run
    interrupt_then_resume(monkeypatch, main, args, tmp_path / "run", lambda a: a.job == "merge-1")
    got = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["mas-auto"]
    for k in ("total_test_loss", "per_task", "splits", "affinity", "decision", "rounds"):
        assert got[k] == ref[k], k
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in ref["history"]]
