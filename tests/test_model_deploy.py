"""A user's network beyond simulate (issue 20 item 1): the job names the factory, fmtl-server's
agents build the same model from it (the Flower side is in test_flower.py), and an agent whose
factory builds another network refuses the work, naming the first tensor that differs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class Head(nn.Module):
        def __init__(self, c, out):
            super().__init__()
            self.fc = nn.Linear(c, out)

        def forward(self, f):
            return self.fc(f.mean(dim=(2, 3)))


    def build(input_shape, tasks):
        c = {channels}
        net = nn.Module()
        net.backbone = nn.Sequential(nn.Conv2d(input_shape[0], c, 3, padding=1), nn.ReLU())
        net.heads = nn.ModuleDict()
        for t in tasks:
            if t.kind == "dense":
                net.heads[t.name] = nn.Conv2d(c, t.out_shape[0], 1)
            else:
                net.heads[t.name] = Head(c, t.out_shape[0])
        return net
''')


def _factory(folder: Path, channels: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "usernet.py").write_text(FACTORY.format(channels=channels))
    return folder


def test_an_agent_building_another_network_refuses_the_work_naming_the_tensor(tmp_path):
    pytest.importorskip("grpc")
    pytest.importorskip("fmtl_server")
    from deploy_helpers import SERVER_TABLE, Proc, agent_cmd, python_path, server_cmd, wait_until
    from fmtl_edge.transport.service import free_port
    from fmtl_server.auth import add_token

    same, other = _factory(tmp_path / "same", 6), _factory(tmp_path / "other", 5)
    (tmp_path / "job.toml").write_text(
        '[job]\nname = "byo"\ndataset = "digits"\nclients = 2\nmax_samples = 200\nmethods = ["all-in-one"]\n'
        'rounds = 2\nclients_per_round = 2\nmodel = "usernet:build"\ndispatch_wait_s = 1.0\nmax_attempts = 1\n'
        'deadline_retries = 0\nmax_round_retries = 0\n' + SERVER_TABLE)
    addr = f"127.0.0.1:{free_port()}"
    env = {"FMTL_EDGE_RUNTIME_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    procs = []

    def env_with(folder):  # the server and agent 0 import the factory of 6 channels, agent 1 one of 5
        return {**env, "PYTHONPATH": f"{folder}:{python_path()}"}

    try:
        server = Proc(server_cmd(tmp_path / "job.toml", addr, "--insecure"), tmp_path / "server.log",
                      env=env_with(same), cwd=tmp_path)
        procs.append(server)
        for c, folder in ((0, same), (1, other)):
            token = add_token(tmp_path / "tokens.txt", f"dev-{c}")
            p = Proc(agent_cmd(addr, f"digits:client={c},clients=2,max-samples=200", f"--token={token}", "--insecure",
                               "--lease", f"b-{c}", "--meter", "estimate", "--threads", "1", "--max-backoff-s", "1",
                               "--poll-wait-s", "2"), tmp_path / f"agent{c}.log", env=env_with(folder))
            procs.append(p)
        wait_until(lambda: "builds another network" in (tmp_path / "agent1.log").read_text(errors="replace"), 180,
                   "agent 1's refusal", procs)
        text = (tmp_path / "agent1.log").read_text(errors="replace")
        assert "tensor 'backbone.0." in text and "(6" in text and "(5" in text, text[-2000:]
        wait_until(lambda: "builds another network" in server.text(), 60, "the refusal in the server's log", procs)
        assert server.wait(180) == 0, server.text()[-3000:]  # the job goes on with the device that builds it
    finally:
        for p in procs:
            p.kill()
    assert "builds another network" not in (tmp_path / "agent0.log").read_text(errors="replace")
    import json

    m = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["all-in-one"]
    assert all(h["executed_by"] == [0] for h in m["history"]) and m["total_test_loss"] is not None
    assert m["evaluation"]["complete"] is False and m["evaluation"]["missing"] == [1]  # said, not hidden


def test_the_table_says_when_an_evaluation_missed_clients(tmp_path):
    """An evaluation that did not reach every client is marked in the table, not only in results."""
    import io
    import json

    from rich.console import Console

    from fmtl_edge.cli import main
    from fmtl_edge.report import summary_tables

    out = tmp_path / "r"
    assert main(["simulate", "--methods", "all-in-one", "--rounds", "1", "--max-samples", "200", "--clients", "4",
                 "--meter", "null", "--no-progress", "--log-level", "warning", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["all-in-one"]["evaluation"]["complete"] is True
    res["methods"]["all-in-one"]["evaluation"].update(complete=False, clients=[0, 1, 2], missing=[3])
    buf = io.StringIO()
    for part in summary_tables(res):
        Console(file=buf, width=100).print(part)
    assert "all-in-one‡" in buf.getvalue() and "evaluated on 3 of 4 clients (missing 3)" in buf.getvalue()
