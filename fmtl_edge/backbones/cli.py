"""``fmtl-edge models``: the built-in model families with their size and forward FLOPs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

MODELS_HELP = """\
List the built-in model families (--model) with their parameters and forward FLOPs per sample for an
input shape and a data set's tasks, so you can pick one that fits your device before training.

A model is a shared backbone (θ_s, trained by every task of a group) plus one head per task: a
pooled head (a linear layer, or a hidden layer of --head-hidden units first) for classification,
binary and regression tasks, a decoder back to the input's H x W for dense tasks. "params" counts
both; the per-task head sizes are in --json. MFLOPs are of one forward pass (backbone + every head,
a multiply-add = 2 FLOPs) per sample, counted by torch.utils.flop_counter; a training step costs
about 3 times that.

Families:
{families}

Your own network: --model package.module:function or path/to/file.py:function, where
function(input_shape, tasks) returns an nn.Module with .backbone and .heads (see README, "Your own
network"); give it here too to see its size.

examples:
  fmtl-edge models                                   # UTKFace's 7 tasks on 3x64x64 images
  fmtl-edge models --tasks uci-har                   # 265-D vectors, 3 tasks
  fmtl-edge models --input-shape 3,128,128 --width 32 --head-hidden 64
  fmtl-edge models --model examples/torchvision_model.py:resnet18_heads --json
"""

#: the task sets of the bundled data sets and their default input shape
TASK_SETS = ("digits", "utkface", "uci-har")


def _families_help() -> str:
    from fmtl_edge.backbones import FAMILIES

    return "\n".join(f"  {name:<10} {desc}" for name, (_, _, desc) in FAMILIES.items())


def register(subparsers) -> None:
    """Add the ``models`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "models", help="list the built-in model families (--model) with parameters and FLOPs",
        description=MODELS_HELP.replace("{families}", _families_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input-shape", metavar="C,H,W|D", help="per-sample input shape (default: the --tasks data "
                   "set's: digits 1,8,8; utkface 3,64,64; uci-har 265)")
    p.add_argument("--tasks", choices=TASK_SETS, help="whose tasks get heads (default: utkface for images, "
                   "uci-har for vectors)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage / MLP size (default 16)")
    p.add_argument("--depth", type=int, default=1, help="blocks per stage (default 1)")
    p.add_argument("--head-hidden", type=int, default=0, metavar="UNITS",
                   help="hidden units of the pooled heads (default 0: linear)")
    p.add_argument("--model", metavar="MODULE:FUNCTION|FILE.py:FUNCTION", help="also describe your factory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_models)


def _task_set(name: str):
    if name == "digits":
        from fmtl_edge.data.digits import TASKS

        return TASKS, (1, 8, 8)
    if name == "utkface":
        from fmtl_edge.data.utkface import DEFAULT_SIZE, make_tasks

        return make_tasks(), (3, DEFAULT_SIZE, DEFAULT_SIZE)
    from fmtl_edge.data.uci_har import TASKS

    return TASKS, (265,)


def _parse_shape(text: str) -> tuple[int, ...]:
    from fmtl_edge.config import ConfigError

    parts = [s.strip() for s in text.lower().replace("x", ",").split(",")]
    shape = tuple(int(s) for s in parts) if all(s.isdigit() for s in parts) else ()
    if len(shape) not in (1, 3) or min(shape, default=0) < 1:
        raise ConfigError("--input-shape", f"{text!r} is not C,H,W (an image, e.g. 3,64,64) or D (a vector, e.g. 265)")
    return shape


def describe_families(input_shape, tasks, width: int = 16, depth: int = 1, head_hidden: int = 0,
                      extra: str | None = None) -> list[dict[str, Any]]:
    """One row per built-in family (``auto`` omitted: it is ``conv`` or ``mlp``) and for ``extra``:
    :func:`fmtl_edge.model_factory.describe_model`'s figures, or ``error`` when the family cannot
    take this input or these tasks."""
    from fmtl_edge.backbones import FAMILIES
    from fmtl_edge.model_factory import ModelError, describe_model, normalise_reference
    from fmtl_edge.models import ModelSpec

    rows = []
    names = [n for n in FAMILIES if n != "auto"] + ([extra] if extra else [])
    for name in names:
        row: dict[str, Any] = {"family": name, "description": FAMILIES[name][2] if name in FAMILIES else "your factory"}
        spec = ModelSpec(tuple(input_shape), width, depth, normalise_reference(name), head_hidden)
        try:
            row.update(describe_model(spec, tasks))
        except ModelError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    from fmtl_edge.config import ConfigError

    try:
        for flag, v, low in (("--width", args.width, 1), ("--depth", args.depth, 1), ("--head-hidden", args.head_hidden, 0)):
            if v < low:
                raise ConfigError(flag, f"must be a whole number >= {low}, got {v}")
        shape = _parse_shape(args.input_shape) if args.input_shape else None
        name = args.tasks or ("uci-har" if shape is not None and len(shape) == 1 else "utkface")
        tasks, default_shape = _task_set(name)
        shape = shape or default_shape
        if len(shape) == 1 and any(t.kind == "dense" for t in tasks):
            raise ConfigError("--input-shape", f"{name} has dense tasks, which need an image input C,H,W; "
                              "use --tasks uci-har for vectors")
        if args.model:
            from fmtl_edge.model_factory import ModelError, check_reference, resolve_factory

            try:
                check_reference(args.model)
                resolve_factory(args.model)
            except ModelError as e:
                raise ConfigError("--model", str(e)) from None
    except ConfigError as e:
        print(f"fmtl-edge models: error: {e}", file=sys.stderr)
        return 2
    rows = describe_families(shape, tasks, args.width, args.depth, args.head_hidden, args.model)
    from fmtl_edge.model_factory import task_infos

    if args.json:
        infos = [{"name": t.name, "kind": t.kind, "out_shape": list(t.out_shape)} for t in task_infos(shape, tasks)]
        print(json.dumps({"input_shape": list(shape), "tasks_of": name, "tasks": infos, "width": args.width,
                          "depth": args.depth, "head_hidden": args.head_hidden, "families": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{'x'.join(map(str, shape))} inputs, {name}'s {len(tasks)} tasks, width {args.width}, "
                        f"depth {args.depth}, head hidden {args.head_hidden}")
    for col, just in (("--model", "left"), ("backbone params", "right"), ("head params", "right"),
                      ("params", "right"), ("MB", "right"), ("MFLOPs / sample", "right")):
        table.add_column(col, justify=just, overflow="fold")
    skipped = []
    for r in rows:
        if "error" in r:
            skipped.append(f"{r['family']}: {r['error'].split(', but')[0].split(';')[0]}")
            continue
        table.add_row(r["family"], f"{r['backbone_params']:,}", f"{sum(r['head_params'].values()):,}",
                      f"{r['params']:,}", f"{r['weight_bytes'] / 1e6:.2f}", f"{r['forward_mflops_per_sample']:.2f}")
    Console().print(table)
    for line in skipped:
        Console().print(f"[dim]not listed: {line}[/]")
    Console(stderr=True).print("auto (the default) = conv for images, mlp for vectors; forward FLOPs, eval mode; "
                               "a training step is about 3x")
    return 0
