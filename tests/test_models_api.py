"""The model API (issue 20): a user's factory by module:function or file.py:function trains with the
methods, and every way a factory can be wrong is one clear `--model` error before training."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtl_edge.cli import main
from fmtl_edge.config import ConfigError, SimulationConfig, build_config
from fmtl_edge.export import load_task_model
from fmtl_edge.model_factory import ModelError, TaskInfo, task_infos
from fmtl_edge.models import ModelSpec, MultiTaskModel, validate_model
from fmtl_edge.tasks import Task, TaskSet

QUICK = ["--rounds", "2", "--r0", "1", "--max-samples", "160", "--clients-per-round", "2", "--no-progress",
         "--meter", "estimate"]

#: a small factory in the contract's shape (image input; pooled heads, upsampling dense heads)
GOOD = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

class Dense(nn.Module):
    def __init__(self, c, out_shape):
        super().__init__()
        self.up = nn.Upsample(size=tuple(out_shape[1:]), mode="nearest")
        self.conv = nn.Conv2d(c, out_shape[0], 3, padding=1)
    def forward(self, f):
        return self.conv(self.up(f))

def build(input_shape, tasks, *, width=16):
    backbone = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, stride=2, padding=1), nn.BatchNorm2d(width),
                             nn.ReLU())
    heads = nn.ModuleDict()
    for t in tasks:
        if t.kind == "dense":
            heads[t.name] = Dense(width, t.out_shape)
        else:
            heads[t.name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, t.out_shape[0]))
    return Net(backbone, heads)
'''


def _write(folder: Path, name: str, body: str) -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(body))
    return p


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_file_factory_trains_every_method_and_its_models_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "mynet.py", GOOD)
    out = tmp_path / "run"
    methods = "mas-2,all-in-one,one-by-one,ditto,loop,layered"
    rc = main(["simulate", *QUICK, "--model", "mynet.py:build", "--width", "6", "--methods", methods,
               "--layers", "personal=heads.*", "--out", str(out)])
    assert rc == 0
    res = _results(out)
    assert res["config"]["model"] == f"{tmp_path / 'mynet.py'}:build"  # absolute: an export elsewhere finds it
    assert set(res["methods"]) == set(methods.split(","))
    for name, m in res["methods"].items():
        total = m["total_test_loss"] if m["total_test_loss"] is not None else m["personalised_total_test_loss"]
        assert np.isfinite(total), name
    # the per-task file rebuilds through the factory (metadata: model, width) and predicts
    model, task = load_task_model(out / "models" / "mas-2" / "reconstruct.safetensors")
    assert model.spec.model == res["config"]["model"] and model.spec.width == 6
    assert [k for k in model.state_dict() if not k.startswith(("backbone.", "heads.reconstruct."))] == []
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 8, 8))["reconstruct"].shape == (3, 1, 8, 8)
    # loop's global model stacks one copy of the factory's head per node
    stacked = load_task_model(out / "models" / "loop" / "digit.safetensors")[0]
    assert any(".nodes.1." in k for k in stacked.state_dict())
    assert not (tmp_path / "__pycache__").exists()  # loading the file wrote no bytecode


def test_module_factory_trains_with_all_in_one_and_mas(tmp_path, monkeypatch):
    pkg = tmp_path / "fmtl_test_zoo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg, "small.py", GOOD)
    monkeypatch.chdir(tmp_path)  # the current folder is searched for the module
    out = tmp_path / "run"
    rc = main(["simulate", *QUICK, "--model", "fmtl_test_zoo.small:build", "--methods", "all-in-one,mas-2",
               "--out", str(out)])
    assert rc == 0
    res = _results(out)
    assert res["config"]["model"] == "fmtl_test_zoo.small:build"
    allin = res["methods"]["all-in-one"]
    assert np.isfinite(allin["total_test_loss"]) and len(res["methods"]["mas-2"]["splits"]) == 2
    state = load_task_model(out / "models" / "all-in-one" / "digit.safetensors")[0].state_dict()
    assert state["backbone.0.weight"].shape == (16, 1, 3, 3)  # width given to the factory: 16 by default


BAD = {
    "raises": ("def build(input_shape, tasks):\n    raise RuntimeError('no GPU for this one')\n",
               "raised RuntimeError: no GPU for this one"),
    "not-a-module": ("def build(input_shape, tasks):\n    return {'backbone': None}\n", "not a torch.nn.Module"),
    "no-backbone": ("from torch import nn\ndef build(input_shape, tasks):\n    m = nn.Module()\n"
                    "    m.heads = nn.ModuleDict()\n    return m\n", "without a backbone module"),
    "heads-a-dict": ("from torch import nn\ndef build(input_shape, tasks):\n    m = nn.Module()\n"
                     "    m.backbone = nn.Flatten()\n    m.heads = {t.name: nn.Identity() for t in tasks}\n    return m\n",
                     "heads of type dict"),
    "missing-head": (GOOD + "\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                     "    del net.heads['parity']\n    return net\n", "no head for task 'parity'"),
    "extra-head": (GOOD + "\nfrom torch import nn as _nn\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                   "    net.heads['lanes'] = _nn.Identity()\n    return net\n", "'lanes', which is not a task"),
    "wrong-shape": (GOOD + "\nfrom torch import nn as _nn\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                    "    net.heads['digit'] = _nn.Sequential(_nn.AdaptiveAvgPool2d(1), _nn.Flatten(), _nn.Linear(16, 7))\n"
                    "    return net\n", "head of task 'digit' (classification) outputs (2, 7)"),
    "outside": (GOOD + "\nfrom torch import nn as _nn\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                "    net.temperature = _nn.Parameter(_nn.init.ones_(_nn.Parameter(__import__('torch').empty(1))))\n"
                "    return net\n", "parameter 'temperature' is outside backbone and heads"),
    "outside-buffer": (GOOD + "\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                       "    net.register_buffer('steps', __import__('torch').zeros(1))\n    return net\n",
                       "buffer 'steps' is outside backbone and heads"),
    "backbone-depends-on-tasks": (GOOD + "\ndef bad(input_shape, tasks):\n    return build(input_shape, tasks, "
                                  "width=4 * len(tasks))\n", "backbone built for task 'digit' alone differs"),
    "forward-fails": (GOOD + "\nfrom torch import nn as _nn\ndef bad(input_shape, tasks):\n    net = build(input_shape, tasks)\n"
                      "    net.backbone = _nn.Linear(3, 3)\n    return net\n", "the backbone's forward on a batch of 2 zero"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_factory_is_one_model_error_before_training(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    body, expected = BAD[case]
    _write(tmp_path, f"bad_{case.replace('-', '_')}.py", body)
    fn = "bad" if "def bad(" in body else "build"
    out = tmp_path / "run"
    rc = main(["simulate", *QUICK, "--methods", "all-in-one", "--model", f"bad_{case.replace('-', '_')}.py:{fn}",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--model" in err and expected in err, err
    assert not out.exists() and not list(tmp_path.glob(".run.resume*"))  # nothing written


@pytest.mark.parametrize("ref, expected", [
    ("no_such_module_fmtl:build", "cannot import module 'no_such_module_fmtl'"),
    ("missing/net.py:build", "no such file"),
    ("resnett", "neither a built-in family (auto, conv, mlp, resnet, mobilenet)"),
    ("mynet.py:nope", "mynet.py:nope: the file has no function 'nope' (its functions: build)"),
    ("broken.py:build", "broken.py has a syntax error (line 1)"),
    ("mynet.py:2x", "'2x' is not a function name"),
])
def test_bad_reference_is_one_model_error(ref, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "mynet.py", GOOD)
    _write(tmp_path, "broken.py", "def build(:\n")
    out = tmp_path / "run"
    assert main(["simulate", *QUICK, "--model", ref, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and expected in err, err
    assert not out.exists()


def test_builtin_family_that_needs_images_on_vectors_names_model():
    tasks = TaskSet([Task("a", "classification", 3), Task("b", "binary")])
    with pytest.raises(ModelError, match=r"resnet needs an image input \(C, H, W\).*\(265,\).*use mlp") as e:
        validate_model(ModelSpec((265,), model="resnet"), tasks)
    assert e.value.field == "--model"
    with pytest.raises(ModelError, match=r"task 'd' is dense but the input \(265,\) is not an image"):
        validate_model(ModelSpec((265,), model="mlp"), TaskSet([Task("d", "dense", 1)]))
    # the runner's check before training reports it as a ConfigError naming the flag
    from fmtl_edge.config import SimulationConfig as Cfg
    from fmtl_edge.runner import prepare_methods

    with pytest.raises(ConfigError, match="resnet needs an image input") as e:
        prepare_methods(Cfg(methods=("all-in-one",)), tasks, ModelSpec((265,), model="resnet"))
    assert e.value.field == "--model"
    validate_model(ModelSpec((265,), model="auto"), tasks)  # no error


def test_validate_model_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    validate_model(ModelSpec((1, 8, 8), model="resnet", width=4), TaskSet([Task("a", "classification", 3)]))
    assert torch.equal(torch.rand(4), expected)


def test_factory_gets_shapes_tasks_and_the_options_it_declares(tmp_path, monkeypatch):
    seen = {}
    body = GOOD + "\nSEEN = []\ndef spy(input_shape, tasks, **kw):\n    SEEN.append((input_shape, tasks, kw))\n" \
                  "    return build(input_shape, tasks)\n"
    p = _write(tmp_path, "spy.py", body)
    tasks = TaskSet([Task("c", "classification", 4), Task("r", "regression"), Task("d", "dense", 2)])
    spec = ModelSpec((1, 6, 5), width=3, depth=2, model=f"{p}:spy", head_hidden=7)
    MultiTaskModel(spec, tasks)
    import sys

    mod = [m for n, m in sys.modules.items() if n.startswith("fmtl_edge_user_model_") and hasattr(m, "SEEN")][-1]
    shape, infos, kw = mod.SEEN[-1]
    seen.update(kw)
    assert shape == (1, 6, 5) and kw == {"width": 3, "depth": 2, "head_hidden": 7}
    assert infos == (TaskInfo("c", "classification", (4,)), TaskInfo("r", "regression", (1,)),
                     TaskInfo("d", "dense", (2, 6, 5)))
    assert task_infos((265,), [Task("c", "classification", 4)])[0].out_dim == 4
    with pytest.raises(ModelError, match="is dense but the input"):
        task_infos((265,), [Task("d", "dense", 1)])


def test_model_heads_follow_task_order_and_seed_is_reproducible(tmp_path):
    body = GOOD + "\ndef reversed_heads(input_shape, tasks):\n    net = build(input_shape, tasks)\n" \
                  "    net.heads = nn.ModuleDict(reversed(list(net.heads.items())))\n    return net\n"
    p = _write(tmp_path, "rev.py", body)
    tasks = TaskSet([Task("a", "classification", 3), Task("b", "binary")])
    spec = ModelSpec((1, 8, 8), model=f"{p}:reversed_heads")
    m1, m2 = MultiTaskModel(spec, tasks, seed=5), MultiTaskModel(spec, tasks, seed=5)
    assert list(m1.heads) == ["a", "b"]
    for (k, v), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_config_flags_and_toml_keys(tmp_path):
    cfg = build_config({"model": "resnet", "depth": 2, "head_hidden": 32})
    spec = cfg.model_spec((3, 16, 16))
    assert (spec.model, spec.depth, spec.head_hidden, spec.width) == ("resnet", 2, 32, 16)
    toml = tmp_path / "job.toml"
    toml.write_text('model = "mobilenet"\nhead-hidden = 8\ndepth = 1\n')
    cfg = build_config({}, toml)
    assert (cfg.model, cfg.head_hidden) == ("mobilenet", 8)
    assert cfg.to_dict()["model"] == "mobilenet"
    for flags, field in (({"depth": 0}, "--depth"), ({"head_hidden": -1}, "--head-hidden"),
                         ({"model": "bogus"}, "--model"), ({"model": "nope/x.py:f"}, "--model")):
        with pytest.raises(ConfigError) as e:
            build_config(flags)
        assert e.value.field == field
    assert SimulationConfig().model_spec((1, 8, 8)) == ModelSpec((1, 8, 8))  # auto, width 16, depth 1


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchvision_model.py"


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


@pytest.mark.skipif(not _has_torchvision(), reason="torchvision is not installed here (the example's resnet18 needs it)")
def test_torchvision_example_trains_one_round(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "--model", f"{EXAMPLE}:resnet18_heads", "--methods", "all-in-one", "--rounds", "1",
               "--max-samples", "64", "--clients-per-round", "2", "--no-progress", "--meter", "estimate",
               "--out", str(out)])
    assert rc == 0
    res = _results(out)
    assert np.isfinite(res["methods"]["all-in-one"]["total_test_loss"])
    model, _ = load_task_model(out / "models" / "all-in-one" / "digit.safetensors")
    assert sum(p.numel() for p in model.backbone.parameters()) > 10_000_000  # ResNet-18's


@pytest.mark.skipif(_has_torchvision(), reason="torchvision is installed: the example trains instead")
def test_torchvision_example_without_torchvision_is_a_model_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--model", f"{EXAMPLE}:resnet18_heads", *QUICK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "raised ModuleNotFoundError" in err and "torchvision" in err
    assert not out.exists()
