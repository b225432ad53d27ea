"""The thread policy of client executions (issue 18): passive OpenMP waiting, intra-op threads per
execution (``--threads N|auto``), CPU seconds beside device seconds, and the policy in results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fmtl_edge.runtime.threads import FLOPS_PER_THREAD, ThreadPolicy, auto_threads, parse_threads


def test_auto_gives_one_thread_per_flops_quantum_within_the_usable_cores():
    assert auto_threads(FLOPS_PER_THREAD * 0.1, cores=8) == 1
    assert auto_threads(FLOPS_PER_THREAD * 2.5, cores=8) == 2
    assert auto_threads(FLOPS_PER_THREAD * 100, cores=8) == 8
    assert auto_threads(FLOPS_PER_THREAD * 100, cores=2) == 2
    assert auto_threads(None, cores=3) == 3  # not countable: torch's own default, every core
    assert 1 <= auto_threads(1e15) <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value, expect", [("auto", None), (None, None), ("AUTO", None), ("3", 3), (2, 2)])
def test_threads_values(value, expect):
    assert parse_threads(value) == expect


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_threads_value_names_the_flag(bad):
    with pytest.raises(ValueError, match="--threads"):
        parse_threads(bad)


def test_simulate_refuses_a_bad_threads_value_before_anything_runs(tmp_path, capsys):
    from fmtl_edge.cli import main

    rc = main(["simulate", "--threads", "0", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _python(code: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_fmtl_edge_makes_openmp_wait_passively_before_torch_loads():
    got = _python("import json, os, fmtl_edge, torch\n"
                  "from fmtl_edge.runtime.threads import prepare_process\n"
                  "print(json.dumps({'env': os.environ['OMP_WAIT_POLICY'], **prepare_process()}))")
    assert got["env"] == "PASSIVE" and got["omp_wait_policy_set_by"] == "fmtl-edge" and got["applied"] is True


def test_the_users_wait_policy_wins_and_a_late_import_is_reported():
    got = _python("import json, os, fmtl_edge\nfrom fmtl_edge.runtime.threads import prepare_process\n"
                  "print(json.dumps({'env': os.environ['OMP_WAIT_POLICY'], **prepare_process()}))",
                  OMP_WAIT_POLICY="active")
    assert got["env"] == "active" and got["omp_wait_policy"] == "ACTIVE" and got["omp_wait_policy_set_by"] == "user"
    spin = _python("import json, os, fmtl_edge\nfrom fmtl_edge.runtime.threads import prepare_process\n"
                   "print(json.dumps({'env': os.environ.get('OMP_WAIT_POLICY'), **prepare_process()}))",
                   GOMP_SPINCOUNT="300000")
    assert spin["env"] is None and spin["omp_wait_policy"] == "DEFAULT" and spin["gomp_spincount"] == "300000"
    late = _python("import json, torch, fmtl_edge\nfrom fmtl_edge.runtime.threads import prepare_process\n"
                   "print(json.dumps(prepare_process()))")
    assert late["applied"] is False


def test_an_execution_runs_on_the_policys_threads_and_reports_cpu_seconds(toy_dataset):
    from fmtl_edge.client import execute
    from fmtl_edge.messages import Assignment, TrainConfig
    from fmtl_edge.models import ModelSpec, MultiTaskModel
    from fmtl_edge.partition import state_to_numpy
    from fmtl_edge.runtime import make_meter

    spec = ModelSpec(toy_dataset.input_shape, width=4)
    state = state_to_numpy(MultiTaskModel(spec, toy_dataset.tasks, seed=0).state_dict())
    a = Assignment("all", 0, tuple(toy_dataset.tasks.names), state, 0.05, TrainConfig(batch_size=8))
    old = torch.get_num_threads()
    try:
        for meter in (None, make_meter("estimate")):
            upd = execute(toy_dataset.clients[0], spec, toy_dataset.tasks, a, meter, threads=ThreadPolicy(1))
            assert torch.get_num_threads() == 1 and upd.threads == 1
            assert upd.cpu_s is not None and 0 < upd.cpu_s < 60 and upd.device_s > 0
        torch.set_num_threads(2)
        auto = execute(toy_dataset.clients[0], spec, toy_dataset.tasks, a, None, threads=ThreadPolicy())
        assert auto.threads == 1  # a toy model is far below one thread's share of FLOPs
        keep = execute(toy_dataset.clients[0], spec, toy_dataset.tasks, a, None)
        assert keep.threads == torch.get_num_threads() == 1  # no policy: threads left as they are
    finally:
        torch.set_num_threads(old)


def test_results_carry_the_policy_and_cpu_seconds_and_a_setting_is_reproducible(tmp_path):
    from fmtl_edge.cli import main

    args = ["simulate", "--methods", "all-in-one,one-by-one", "--rounds", "2", "--max-samples", "300", "--clients", "4",
            "--meter", "estimate", "--no-progress", "--log-level", "warning"]
    losses = []
    for i in range(2):
        assert main([*args, "--threads", "1", "--out", str(tmp_path / f"r{i}")]) == 0
        res = json.loads((tmp_path / f"r{i}" / "results.json").read_text())
        th = res["device"]["threads"]
        assert th["intra_op"] == 1 and th["inter_op"] == 1 and th["omp_wait_policy"] in ("PASSIVE", "ACTIVE", "DEFAULT")
        for m in res["methods"].values():
            assert m["cpu_s"] is not None and m["cpu_s"] > 0
            assert abs(sum(j["cpu_s"] for j in m["jobs"]) - m["cpu_s"]) < 1e-6
            assert all(h["cpu_s"] is not None for h in m["history"])
        losses.append({n: m["total_test_loss"] for n, m in res["methods"].items()})
    assert losses[0] == losses[1]
