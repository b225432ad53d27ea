"""The model API (issue 20): ``--model`` references, loading a factory, building and validating a model.

A model is built by a **factory**, ``function(input_shape, tasks)``:

- ``input_shape``: the per-sample input shape, a tuple of ints, ``(C, H, W)`` or ``(D,)``;
- ``tasks``: a tuple of :class:`TaskInfo` (``name``, ``kind``, ``out_shape``) in the job's task order;
- keyword parameters named ``width``, ``depth`` or ``head_hidden`` (``--width``, ``--depth``,
  ``--head-hidden``) are passed when the function declares them (or takes ``**kwargs``);
- it returns a ``torch.nn.Module`` with attributes ``backbone`` (the shared layers θ_s, an
  ``nn.Module``) and ``heads`` (an ``nn.ModuleDict`` with one head θ_i per task name), every
  parameter and buffer under one of the two; the output for task ``t`` is
  ``heads[t](backbone(x))``: float, ``(B, *out_shape)``. The module's own ``forward`` is not used.

:class:`~fmtl_edge.models.MultiTaskModel` adopts the returned ``backbone`` and ``heads``, so
parameter names are ``backbone.*`` and ``heads.<task>.*`` whatever the factory, and every method,
aggregation scope, resume and export works on it unchanged. A job trains a subset of the tasks
(MAS's groups, one-by-one), so the factory is called with different task tuples: the backbone must
not depend on which tasks are asked for, nor a task's head on the other tasks.

References (``--model``, TOML ``model``): a built-in family (:data:`fmtl_edge.backbones.FAMILIES`:
``auto``, ``conv``, ``mlp``, ``resnet``, ``mobilenet``), ``package.module:function`` (imported;
the current folder is searched first) or ``path/to/file.py:function`` (the file is executed as a
module of its own, its folder importable while it loads; no bytecode is written).

:func:`validate_model` checks a reference once before training; every problem is one
:class:`ModelError` that the runner reports as a ``ConfigError`` naming ``--model``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from fmtl_edge.backbones import FAMILIES
from fmtl_edge.backbones.common import ModelError

if TYPE_CHECKING:
    from fmtl_edge.models import ModelSpec

__all__ = ["ModelError", "TaskInfo", "task_infos", "check_reference", "normalise_reference", "resolve_factory",
           "build_network", "validate_model", "describe_model"]

#: keyword parameters a factory may declare to receive the spec's values
SPEC_OPTIONS = ("width", "depth", "head_hidden")


@dataclass(frozen=True)
class TaskInfo:
    """What a factory learns of a task.

    Attributes:
        name: the task name (the key of its head in ``heads``).
        kind: ``classification | binary | regression | dense`` (:mod:`fmtl_edge.tasks`).
        out_shape: the head's per-sample output shape: ``(out_dim,)`` (classes for classification,
            1 for binary and regression), or ``(out_dim, H, W)`` for dense tasks (``H, W`` = the input's).
    """

    name: str
    kind: str
    out_shape: tuple[int, ...]

    @property
    def out_dim(self) -> int:
        return int(self.out_shape[0])


def task_infos(input_shape: Sequence[int], tasks: Iterable) -> tuple[TaskInfo, ...]:
    """:class:`TaskInfo` of each :class:`~fmtl_edge.tasks.Task`, in order.

    Raises:
        ModelError: a dense task on a vector input (there is no ``H, W`` to predict).
    """
    out = []
    for t in tasks:
        if t.kind == "dense":
            if len(input_shape) != 3:
                raise ModelError(f"task {t.name!r} is dense but the input {tuple(input_shape)} is not an image")
            shape = (int(t.out_dim), int(input_shape[1]), int(input_shape[2]))
        else:
            shape = (int(t.out_dim),)
        out.append(TaskInfo(t.name, t.kind, shape))
    return tuple(out)


# ------------------------------------------------------------------------------ references ---

def _parse(ref: str) -> tuple[str, str, str]:
    """``(kind, target, function)``: kind ``builtin`` (target = family), ``module`` or ``file``."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(f"{ref!r} is not a model reference; give a built-in family ({', '.join(FAMILIES)}), "
                         "module:function or path/to/file.py:function")
    ref = ref.strip()
    if ref in FAMILIES:
        return "builtin", ref, FAMILIES[ref][1]
    target, sep, fn = ref.rpartition(":")
    if not sep or not target or not fn:
        raise ModelError(f"{ref!r} is neither a built-in family ({', '.join(FAMILIES)}) nor module:function "
                         "nor path/to/file.py:function")
    if not fn.isidentifier():
        raise ModelError(f"{ref!r}: {fn!r} is not a function name")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return "file", target, fn
    if not all(part.isidentifier() for part in target.split(".")):
        raise ModelError(f"{ref!r}: {target!r} is not a module name (a file needs its .py suffix)")
    return "module", target, fn


def check_reference(ref: str) -> None:
    """Check a reference without importing anything: its form, and that a file exists.

    Raises:
        ModelError: a malformed reference, an unknown family, a missing file.
    """
    kind, target, _ = _parse(ref)
    if kind == "file":
        p = Path(target).expanduser()
        if not p.is_file():
            raise ModelError(f"{ref}: no such file {str(p)!r}")


def normalise_reference(ref: str) -> str:
    """The reference with a file's path made absolute (so an export or a resume elsewhere finds it);
    built-in names and ``module:function`` unchanged. A malformed reference is returned as it is."""
    try:
        kind, target, fn = _parse(ref)
    except ModelError:
        return ref
    if kind == "file":
        return f"{Path(target).expanduser().resolve()}:{fn}"
    return ref.strip()


@dataclass(frozen=True)
class Factory:
    """A resolved reference: ``fn`` (the callable), ``label`` (for messages), ``options`` (the
    :data:`SPEC_OPTIONS` it accepts), ``builtin``."""

    fn: Callable[..., Any]
    label: str
    options: tuple[str, ...]
    builtin: bool


@contextlib.contextmanager
def _on_path(folder: str):
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _load_file(path: Path) -> types.ModuleType:
    name = "fmtl_edge_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise ModelError(f"{path} has a syntax error (line {e.lineno}): {e.msg}") from None
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        with _on_path(str(path.parent)):
            exec(code, module.__dict__)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported as such
        del sys.modules[name]
        raise ModelError(f"loading {path} raised {type(e).__name__}: {e}") from None
    return module


def _import_module(target: str) -> types.ModuleType:
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ModelError(f"cannot import module {target!r} ({e}); check the name, install it, or run from "
                             "the folder that holds it") from None
        raise ModelError(f"importing module {target!r} raised ModuleNotFoundError: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"importing module {target!r} raised {type(e).__name__}: {e}") from None


def _options(fn: Callable[..., Any]) -> tuple[str, ...]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return SPEC_OPTIONS
    ok = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(n for n in SPEC_OPTIONS if n in params and params[n].kind in ok)


@functools.lru_cache(maxsize=32)
def resolve_factory(ref: str) -> Factory:
    """The factory a reference names (loaded once per process).

    Raises:
        ModelError: malformed reference, unknown family, missing file, a module that does not
            import, a file that does not load, no such function, not callable.
    """
    kind, target, name = _parse(ref)
    if kind == "builtin":
        module = importlib.import_module(FAMILIES[target][0])
        fn = getattr(module, name)
        return Factory(fn, target, _options(fn), True)
    if kind == "file":
        p = Path(target).expanduser()
        if not p.is_file():
            raise ModelError(f"{ref}: no such file {str(p)!r}")
        module = _load_file(p.resolve())
        where = "the file"
    else:
        module = _import_module(target)
        where = f"module {target!r}"
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                        and v.__module__ == module.__name__)
        hint = f" (its functions: {', '.join(public[:8])})" if public else ""
        raise ModelError(f"{ref}: {where} has no function {name!r}{hint}")
    if not callable(fn):
        raise ModelError(f"{ref}: {name!r} in {where} is a {type(fn).__name__}, not a function")
    return Factory(fn, ref.strip(), _options(fn), False)


# ------------------------------------------------------------------------------- building ---

def _call(factory: Factory, spec: "ModelSpec", infos: tuple[TaskInfo, ...]) -> Any:
    kwargs = {k: getattr(spec, k) for k in factory.options}
    try:
        return factory.fn(tuple(int(s) for s in spec.input_shape), infos, **kwargs)
    except ModelError as e:
        if factory.builtin:
            raise
        raise ModelError(f"the factory {factory.label} raised: {e}") from None
    except Exception as e:  # noqa: BLE001 - a user factory may raise anything; say which and why
        raise ModelError(f"the factory {factory.label} raised {type(e).__name__}: {e}") from None


def adopt(net: Any, infos: Sequence[TaskInfo], label: str, full: bool = False) -> tuple[nn.Module, nn.ModuleDict]:
    """Check a factory's result against the contract; its ``backbone`` and its heads (in task order).

    ``full=False`` (every model construction) checks the structure only; ``full=True``
    (:func:`validate_model`, once per run) also walks every parameter and buffer.

    Raises:
        ModelError: not an ``nn.Module``; no ``backbone`` module; ``heads`` not an ``nn.ModuleDict``;
            a task without a head or a head for no task; with ``full``: a parameter or buffer
            outside ``backbone``/``heads`` (it would not be trained nor aggregated), a parameter
            shared by the backbone and a head.
    """
    if not isinstance(net, nn.Module):
        raise ModelError(f"{label} returned a {type(net).__name__}, not a torch.nn.Module with backbone and heads")
    backbone = getattr(net, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ModelError(f"{label} returned a {type(net).__name__} without a backbone module "
                         "(set self.backbone = the shared layers, an nn.Module)")
    heads = getattr(net, "heads", None)
    if not isinstance(heads, nn.ModuleDict):
        got = "no heads" if heads is None else f"heads of type {type(heads).__name__}"
        raise ModelError(f"{label} returned a module with {got}; set self.heads = nn.ModuleDict({{task name: head}})")
    names = [t.name for t in infos]
    missing = [n for n in names if n not in heads]
    if missing:
        raise ModelError(f"{label}: no head for task {', '.join(repr(n) for n in missing)} "
                         f"(heads has {', '.join(repr(k) for k in heads) or 'none'}); build one head per task "
                         "of the tasks argument")
    extra = [k for k in heads if k not in names]
    if extra:
        raise ModelError(f"{label}: heads has {', '.join(repr(k) for k in extra)}, which is not a task of this "
                         f"job ({', '.join(names)}); build heads only for the tasks argument")
    if not full:
        return backbone, nn.ModuleDict((n, heads[n]) for n in names)
    for kind, named in (("parameter", net.named_parameters()), ("buffer", net.named_buffers())):
        for n, _ in named:
            if not (n.startswith("backbone.") or n.startswith("heads.")):
                raise ModelError(f"{label}: {kind} {n!r} is outside backbone and heads; every {kind} must belong "
                                 "to the backbone (shared) or to a task's head (move that module into one)")
    shared = {id(p) for p in backbone.parameters()}
    for n in names:
        for pn, p in heads[n].named_parameters():
            if id(p) in shared:
                raise ModelError(f"{label}: heads.{n}.{pn} is also a backbone parameter; a head must own its tensors")
    return backbone, nn.ModuleDict((n, heads[n]) for n in names)


def build_network(spec: "ModelSpec", tasks: Iterable) -> tuple[nn.Module, nn.ModuleDict]:
    """``(backbone, heads)`` of ``spec.model`` for ``tasks`` (checked by :func:`adopt`), built with
    the global torch RNG as it is (seed it before for a reproducible initialisation).

    Raises:
        ModelError: as :func:`resolve_factory`, :func:`task_infos` and :func:`adopt`, or the factory raised.
    """
    factory = resolve_factory(spec.model)
    infos = task_infos(spec.input_shape, tasks)
    return adopt(_call(factory, spec, infos), infos, factory.label)


def _signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]


def _first_difference(a, b) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x[0]} {x[1]} vs {y[0]} {y[1]}"
    if len(a) != len(b):
        longer = a if len(a) > len(b) else b
        return f"{longer[min(len(a), len(b))][0]} only in one of them"
    return "none"


def _check_forward(backbone: nn.Module, heads: nn.ModuleDict, spec: "ModelSpec",
                   infos: Sequence[TaskInfo], label: str) -> None:
    shape = (2, *[int(s) for s in spec.input_shape])
    x = torch.zeros(shape, dtype=torch.float32)
    backbone.train()
    heads.train()
    with torch.no_grad():
        try:
            f = backbone(x)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{label}: the backbone's forward on a batch of 2 zero inputs {shape} raised "
                             f"{type(e).__name__}: {e}") from None
        for t in infos:
            try:
                y = heads[t.name](f)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"{label}: the head of task {t.name!r} raised {type(e).__name__} on the backbone's "
                                 f"output: {e}") from None
            if not isinstance(y, torch.Tensor):
                raise ModelError(f"{label}: the head of task {t.name!r} returned a {type(y).__name__}, not a tensor")
            if tuple(y.shape) != (2, *t.out_shape):
                raise ModelError(f"{label}: the head of task {t.name!r} ({t.kind}) outputs {tuple(y.shape)} for a "
                                 f"batch of 2, but the task needs {(2, *t.out_shape)} (batch first)")
            if not y.is_floating_point():
                raise ModelError(f"{label}: the head of task {t.name!r} outputs {y.dtype}; the losses need floats")


def validate_model(spec: "ModelSpec", tasks: Iterable) -> None:
    """Check ``spec.model`` for ``tasks`` once, before training: the reference resolves, the factory
    builds a model that keeps the contract for all tasks (:func:`adopt`), a forward pass of a batch of
    2 zero inputs gives every head its task's output shape (float), and the factory called with each
    task alone builds the same backbone and the same head (names, shapes, dtypes) as with all tasks.
    The global torch RNG is left as it was. :func:`fmtl_edge.runner.prepare_methods` calls it and
    turns the error into a ``ConfigError("--model", ...)``.

    Raises:
        ModelError: the first problem found, with what to fix (``field`` = ``--model``).
    """
    tasks = list(tasks)
    check_reference(spec.model)
    factory = resolve_factory(spec.model)
    label = factory.label
    infos = task_infos(spec.input_shape, tasks)
    with torch.random.fork_rng(devices=[]):
        backbone, heads = adopt(_call(factory, spec, infos), infos, label, full=True)
        _check_forward(backbone, heads, spec, infos, label)
        if len(infos) > 1:
            ref_b = _signature(backbone)
            for t, info in zip(tasks, infos):
                b1, h1 = adopt(_call(factory, spec, (info,)), (info,), label, full=True)
                if _signature(b1) != ref_b:
                    raise ModelError(f"{label}: the backbone built for task {t.name!r} alone differs from the "
                                     f"one built for all tasks ({_first_difference(_signature(b1), ref_b)}); "
                                     "the backbone must not depend on the tasks asked for (jobs train "
                                     "subsets of the tasks)")
                if _signature(h1[t.name]) != _signature(heads[t.name]):
                    raise ModelError(f"{label}: the head of task {t.name!r} differs when it is built alone "
                                     f"({_first_difference(_signature(h1[t.name]), _signature(heads[t.name]))}); "
                                     "a head must depend on its own task only")


# ------------------------------------------------------------------------------ describing ---

def forward_flops_per_sample(backbone: nn.Module, heads: nn.ModuleDict, input_shape: Sequence[int],
                             batch: int = 2) -> float:
    """FLOPs of one forward pass (backbone and every head, eval mode) per sample, counted with
    :func:`fmtl_edge.flops.flop_counter` on a batch of ``batch`` zero inputs (a
    multiply-add counts 2 FLOPs; element-wise operations, BatchNorm and pooling are not counted)."""
    from fmtl_edge.flops import flop_counter

    was = backbone.training, heads.training
    backbone.eval()
    heads.eval()
    x = torch.zeros((batch, *[int(s) for s in input_shape]), dtype=torch.float32)
    try:
        with torch.no_grad(), flop_counter() as fc:
            f = backbone(x)
            for h in heads.values():
                h(f)
    finally:
        backbone.train(was[0])
        heads.train(was[1])
    return float(fc.get_total_flops()) / batch


def describe_model(spec: "ModelSpec", tasks: Iterable) -> dict[str, Any]:
    """Size and cost of ``spec.model`` for ``tasks``: ``backbone_params``, ``head_params`` (task →
    count), ``params`` (total), ``forward_mflops_per_sample`` (:func:`forward_flops_per_sample` / 1e6),
    ``weight_bytes`` (float parameters and buffers).

    Raises:
        ModelError: the model cannot be built for this input and these tasks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone, heads = build_network(spec, tasks)
    bb = sum(p.numel() for p in backbone.parameters())
    hp = {n: sum(p.numel() for p in h.parameters()) for n, h in heads.items()}
    tensors = [*backbone.state_dict().values(), *heads.state_dict().values()]
    return {
        "backbone_params": int(bb), "head_params": hp, "params": int(bb + sum(hp.values())),
        "forward_mflops_per_sample": forward_flops_per_sample(backbone, heads, spec.input_shape) / 1e6,
        "weight_bytes": int(sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())),
    }
