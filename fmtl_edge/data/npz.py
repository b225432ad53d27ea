"""``npz``: bring your own federated multi-task data.

Layout (see ``docs/data.md``)::

    my_data/
      tasks.toml          # one [tasks.<name>] table per task, in the order results use
      client_0.npz        # one file per client: x, split, y_<task> for the tasks it holds labels for
      client_1.npz
      ...

``tasks.toml``::

    description = "optional, one line"

    [tasks.digit]
    kind = "classification"   # classification | binary | regression | dense
    classes = 10              # required for classification
    description = "optional"

    [tasks.age]
    kind = "regression"
    units = "years"           # optional, for reports

    [tasks.edges]
    kind = "dense"
    channels = 1              # optional; checked against y_edges.shape[1]

``client_<id>.npz`` (``np.savez``; no pickled objects):

- ``x``: ``(N, D)`` vectors or ``(N, C, H, W)`` images, any real dtype (cast to float32 as is:
  scale images to [0, 1] yourself); the same per-sample shape in every file.
- ``split``: ``(N,)`` with 0 for train and 1 for test; every client needs a train sample.
- ``y_<task>``: ``(N,)`` integers in ``[0, classes)`` (classification), 0/1 (binary), finite
  numbers (regression), or ``(N, C, H, W)`` with ``x``'s ``H, W`` (dense).

Clients are numbered in the order of their ids (numerically when every id is an integer). Every
problem raises a :class:`~fmtl_edge.data.base.DataError` naming the file, the key and the fix.
:func:`write_npz_dataset` writes any :class:`FederatedDataset` in this layout.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fmtl_edge.data._common import build_clients, client_sizes, regression_stats, reject_option, seed_streams
from fmtl_edge.data.base import DataError, DataOptions, FederatedDataset
from fmtl_edge.data.partition import stratified_subsample
from fmtl_edge.tasks import TASK_KINDS, Task, TaskSet

try:  # Python 3.11+
    import tomllib as _toml
except ImportError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ImportError:
        _toml = None  # type: ignore[assignment]

TASKS_FILE = "tasks.toml"
CLIENT_PATTERN = re.compile(r"^client_([A-Za-z0-9_-]+)\.npz$")
_TASK_KEYS = {"kind", "classes", "channels", "units", "description"}
_TOP_KEYS = {"tasks", "description"}
_LAYOUT = "a folder with tasks.toml and one client_<id>.npz per client (see docs/data.md)"


# -- tasks.toml -----------------------------------------------------------------------------------


def read_tasks_toml(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Parse and check ``tasks.toml``; returns one dict per task (``name``, ``kind``, ...) in file
    order, and the optional data set description.

    Raises:
        DataError: unreadable TOML, no ``[tasks.<name>]`` table, an unknown key or kind, a
            classification task without ``classes >= 2``, or a bad task name.
    """
    if _toml is None:  # pragma: no cover
        raise DataError(f"npz: reading {path} needs tomllib (Python >= 3.11) or `pip install tomli`")
    if not path.is_file():
        raise DataError(
            f"npz: {path} is missing; write a tasks.toml naming each task's kind, e.g. "
            '[tasks.label] kind = "classification" classes = 10 (see docs/data.md)'
        )
    try:
        doc = _toml.loads(path.read_text(encoding="utf-8"))
    except (_toml.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"npz: {path} is not valid TOML ({e}); fix the syntax (see docs/data.md)") from e
    extra = sorted(set(doc) - _TOP_KEYS)
    if extra:
        raise DataError(f"npz: {path}: unknown top-level key(s) {extra}; allowed: tasks (tables), description")
    tables = doc.get("tasks")
    if not isinstance(tables, dict) or not tables:
        raise DataError(
            f"npz: {path} defines no tasks; add one table per task, e.g. "
            '[tasks.label] with kind = "classification" and classes = 10'
        )
    specs = []
    for name, t in tables.items():
        where = f"npz: {path}: [tasks.{name}]"
        if not isinstance(t, dict):
            raise DataError(f"{where} must be a table with at least kind = \"...\"")
        extra = sorted(set(t) - _TASK_KEYS)
        if extra:
            raise DataError(f"{where}: unknown key(s) {extra}; allowed: {sorted(_TASK_KEYS)}")
        kind = t.get("kind")
        if kind not in TASK_KINDS:
            raise DataError(f"{where}: kind = {kind!r} is not one of {list(TASK_KINDS)}; set kind to one of them")
        spec: dict[str, Any] = {"name": name, "kind": kind}
        if kind == "classification":
            c = t.get("classes")
            if isinstance(c, bool) or not isinstance(c, int) or c < 2:
                raise DataError(f"{where}: a classification task needs classes = <integer >= 2>, got {c!r}")
            spec["classes"] = c
        elif "classes" in t:
            raise DataError(f"{where}: classes only applies to kind = \"classification\"; remove it")
        if "channels" in t:
            ch = t["channels"]
            if kind != "dense":
                raise DataError(f"{where}: channels only applies to kind = \"dense\"; remove it")
            if isinstance(ch, bool) or not isinstance(ch, int) or ch < 1:
                raise DataError(f"{where}: channels must be an integer >= 1, got {ch!r}")
            spec["channels"] = ch
        for key in ("units", "description"):
            if key in t:
                if not isinstance(t[key], str):
                    raise DataError(f"{where}: {key} must be a string, got {t[key]!r}")
                spec[key] = t[key]
        if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
            raise DataError(f"{where}: task names use letters, digits, '_' and '-' only; rename the table")
        specs.append(spec)
    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise DataError(f"npz: {path}: description must be a string")
    return specs, desc


# -- client files ---------------------------------------------------------------------------------


def _client_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for p in folder.iterdir():
        m = CLIENT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((m.group(1), p))
    if all(cid.isdigit() for cid, _ in found):
        found.sort(key=lambda t: (int(t[0]), t[0]))
    else:
        found.sort(key=lambda t: t[0])
    return found


def _check_labels(where: str, key: str, y: np.ndarray, spec: dict[str, Any], n: int, x: np.ndarray) -> np.ndarray:
    kind = spec["kind"]
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"{where}: {key!r} has dtype {y.dtype}; store numbers")
    if kind == "dense":
        if y.ndim != 4 or len(y) != n:
            raise DataError(
                f"{where}: {key!r} has shape {y.shape}; a dense task needs (N, C, H, W) with N = {n} (x's rows)"
            )
        if x.ndim != 4 or y.shape[2:] != x.shape[2:]:
            raise DataError(
                f"{where}: {key!r} has spatial size {y.shape[2:]} but x has shape {x.shape}; a dense target "
                "needs x as (N, C, H, W) images with the same H, W"
            )
        if "channels" in spec and y.shape[1] != spec["channels"]:
            raise DataError(
                f"{where}: {key!r} has {y.shape[1]} channels but tasks.toml says channels = {spec['channels']}"
            )
        if not np.isfinite(y).all():
            raise DataError(f"{where}: {key!r} holds NaN or inf")
        return y.astype(np.float32, copy=False)
    if y.shape != (n,):
        raise DataError(
            f"{where}: {key!r} has shape {y.shape}; a {kind} task needs one value per sample, shape ({n},) "
            "(x's rows; use .reshape(-1))"
        )
    if kind == "regression":
        if not np.isfinite(y).all():
            raise DataError(f"{where}: {key!r} holds NaN or inf; drop or impute those samples")
        return y.astype(np.float32, copy=False)
    if kind == "binary":
        if not np.isin(y, (0, 1)).all():
            bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
            raise DataError(f"{where}: {key!r} must hold 0/1 for a binary task, found {bad}")
        return y.astype(np.float32)
    # classification
    if not np.issubdtype(y.dtype, np.integer):
        if y.dtype == bool or not np.all(np.mod(y, 1) == 0):
            raise DataError(f"{where}: {key!r} has dtype {y.dtype}; store class indices as integers")
    c = spec["classes"]
    if n and (y.min() < 0 or y.max() >= c):
        raise DataError(
            f"{where}: {key!r} has class indices in [{y.min()}, {y.max()}] but classes = {c}; use 0..{c - 1} "
            "or raise classes in tasks.toml"
        )
    return y.astype(np.int64)


def read_client_file(path: Path, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Load and check one ``client_<id>.npz`` against the task specs.

    Returns:
        ``{"x", "split", "y": {task: targets}, "ignored": [keys]}``.

    Raises:
        DataError: unreadable file, no ``y_`` key at all or an unknown one, a length mismatch, a bad
            split. A client without some tasks' ``y_`` arrays holds only the others (task groups).
    """
    where = f"npz: {path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            arrays = {k: z[k] for k in keys}
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError (object arrays)
        raise DataError(
            f"{where}: cannot read it as an .npz of plain arrays ({e}); save it with "
            "np.savez(path, x=..., split=..., y_<task>=...) and no object arrays"
        ) from e
    for k in ("x", "split"):
        if k not in arrays:
            raise DataError(f"{where}: missing key {k!r} (has {sorted(keys)}); every client file needs x, split and y_<task>")
    x = arrays["x"]
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{where}: 'x' has dtype {x.dtype}; store numbers")
    if x.ndim not in (2, 4):
        raise DataError(
            f"{where}: 'x' has shape {x.shape}; use (N, D) vectors or (N, C, H, W) images "
            "(add a channel axis to (N, H, W) images with x[:, None])"
        )
    n = len(x)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: 'x' holds NaN or inf; drop or impute those samples")
    split = arrays["split"]
    if split.shape != (n,):
        raise DataError(f"{where}: 'split' has shape {split.shape} but x has {n} rows; store one 0/1 per sample")
    if not np.isin(split, (0, 1)).all():
        bad = np.unique(split[~np.isin(split, (0, 1))])[:5].tolist()
        raise DataError(f"{where}: 'split' must be 0 (train) or 1 (test), found {bad}")
    split = split.astype(np.int64)
    if not (split == 0).any():
        raise DataError(f"{where}: no training sample (split == 0 nowhere); give this client at least one")
    names = {s["name"] for s in specs}
    extra = sorted(k for k in keys if k.startswith("y_") and k[2:] not in names)
    if extra:
        raise DataError(
            f"{where}: {extra} have no [tasks.<name>] in {TASKS_FILE}; add the task there or drop the array"
        )
    y = {}
    for s in specs:
        key = f"y_{s['name']}"
        if key not in arrays:
            continue  # this client holds no labels for that task (a client group of seed 000)
        y[s["name"]] = _check_labels(where, key, arrays[key], s, n, x)
    if not y:
        raise DataError(
            f"{where}: no y_<task> array at all; a client needs the labels of at least one task named in "
            f"{TASKS_FILE} (y_{specs[0]['name']}=...)"
        )
    ignored = sorted(k for k in keys if k not in ("x", "split") and not k.startswith("y_"))
    return {"x": x.astype(np.float32, copy=False), "split": split, "y": y, "ignored": ignored}


# -- loader ---------------------------------------------------------------------------------------


def load_npz(opts: DataOptions) -> FederatedDataset:
    """Load a bring-your-own-data folder (layout in the module docstring and ``docs/data.md``).

    One client per file; the train/test split is the files' ``split`` (``test_fraction`` is
    ignored with a warning when changed). ``max_samples`` keeps a seeded subset that keeps each
    client's train/test proportions. ``cache_dir`` is unused.

    Raises:
        DataError: no ``data_dir``, a missing folder or ``tasks.toml``, no client files, any file of
            the wrong layout, ``n_clients`` other than the number of files, ``alpha`` or
            ``image_size`` given.
    """
    if opts.data_dir is None:
        raise DataError(f"npz: pass --data-dir (data_dir=...) pointing at {_LAYOUT}")
    if opts.alpha is not None:
        reject_option("npz", "alpha", opts.alpha, "the clients are the files; drop --alpha")
    if opts.image_size is not None:
        reject_option("npz", "image_size", opts.image_size,
                      "inputs are used as stored; resize them when writing the files")
    if opts.test_fraction != 0.2:
        warnings.warn(f"npz: test_fraction={opts.test_fraction} ignored; the files' split arrays are used",
                      stacklevel=2)
    folder = Path(opts.data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"npz: data folder {str(folder)!r} does not exist or is not a folder; pass {_LAYOUT}")
    specs, description = read_tasks_toml(folder / TASKS_FILE)
    files = _client_files(folder)
    if not files:
        raise DataError(f"npz: no client_<id>.npz files in {folder}; expected {_LAYOUT}")
    if opts.n_clients is not None and opts.n_clients != len(files):
        raise DataError(
            f"npz: n_clients={opts.n_clients} but {folder} holds {len(files)} client files (one client per file); "
            f"drop --clients or pass {len(files)}"
        )

    loaded = [read_client_file(p, specs) for _, p in files]
    shape = loaded[0]["x"].shape[1:]
    for (cid, p), c in zip(files, loaded):
        if c["x"].shape[1:] != shape:
            raise DataError(
                f"npz: {p}: 'x' has per-sample shape {c['x'].shape[1:]} but {files[0][1].name} has {shape}; "
                "every client needs the same input shape"
            )
    dense_ch: dict[str, int] = {}
    for s in specs:
        if s["kind"] != "dense":
            continue
        for (cid, p), c in zip(files, loaded):
            if s["name"] not in c["y"]:
                continue
            ch = int(c["y"][s["name"]].shape[1])
            if dense_ch.setdefault(s["name"], ch) != ch:
                raise DataError(
                    f"npz: {p}: 'y_{s['name']}' has {ch} channels but {files[0][1].name} has "
                    f"{dense_ch[s['name']]}; every client needs the same"
                )

    # max_samples: a seeded subset stratified by (client, split), every client part kept if possible
    lengths = [len(c["x"]) for c in loaded]
    owner = np.repeat(np.arange(len(loaded)), lengths)
    split_all = np.concatenate([c["split"] for c in loaded])
    strata = owner * 2 + split_all
    (rng_sub,) = seed_streams(opts.seed, 1)
    keep = stratified_subsample(strata, opts.max_samples, rng_sub, cover=strata)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    splits_local = []
    for k, (c, (cid, p)) in enumerate(zip(loaded, files)):
        mine = keep[owner[keep] == k] - offsets[k]
        tr, te = mine[c["split"][mine] == 0], mine[c["split"][mine] == 1]
        if len(tr) == 0:
            raise DataError(
                f"npz: {p}: no training sample left after max_samples={opts.max_samples}; raise max_samples "
                f"(at least {2 * len(files)})"
            )
        splits_local.append((k, tr, te))

    reg = {s["name"]: regression_stats([loaded[k]["y"][s["name"]][tr] for k, tr, _ in splits_local
                                        if s["name"] in loaded[k]["y"]])
           for s in specs if s["kind"] == "regression"}
    unheld = [s["name"] for s in specs if not any(s["name"] in c["y"] for c in loaded)]
    if unheld:
        raise DataError(f"npz: no client file holds labels for task(s) {unheld}; add y_<task> arrays or remove "
                        f"the task from {TASKS_FILE}")
    tasks = []
    for s in specs:
        kind, name = s["kind"], s["name"]
        out_dim = s["classes"] if kind == "classification" else dense_ch.get(name, 1)
        mean, std = reg.get(name, (0.0, 1.0))
        try:
            tasks.append(Task(name, kind, out_dim, target_mean=mean, target_std=std,
                              units=s.get("units", ""), description=s.get("description", "")))
        except ValueError as e:
            raise DataError(f"npz: {folder / TASKS_FILE}: [tasks.{name}]: {e}") from e

    # Global positions let build_clients fetch by index; one client at a time.
    cur: dict[str, Any] = {}

    def get_x(idx: np.ndarray) -> np.ndarray:
        return cur["x"][idx]

    def get_y(idx: np.ndarray, _x: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in cur["y"].items()}

    clients = []
    for k, tr, te in splits_local:
        cur.update(loaded[k])
        (c,) = build_clients([(tr, te)], get_x, get_y)
        c.client_id = k
        clients.append(c)

    ignored = sorted({key for c in loaded for key in c["ignored"]})
    ds = FederatedDataset(
        name="npz",
        tasks=TaskSet(tasks),
        clients=clients,
        input_shape=tuple(int(s) for s in shape),
        info={
            "source": str(folder.resolve()),
            "description": description,
            "n_samples": int(len(keep)),
            "n_clients": len(clients),
            "client_files": [p.name for _, p in files],
            "partition": "one client per file",
            "split": "from file ('split' arrays)",
            "image_size": int(shape[-1]) if len(shape) == 3 else None,
            "seed": int(opts.seed),
            "max_samples": None if opts.max_samples is None else int(opts.max_samples),
            "skipped_files": 0,
            "ignored_keys": ignored,
            "client_sizes": client_sizes(clients),
        },
    )
    ds.validate()
    return ds


# -- writer ---------------------------------------------------------------------------------------


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_npz_dataset(ds: FederatedDataset, folder: str | Path, description: str = "") -> Path:
    """Write ``ds`` in the ``npz`` layout (``tasks.toml`` + ``client_<k>.npz``) so that
    ``load_dataset("npz", data_dir=folder)`` reads the same clients, splits and targets back.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"description = {_toml_str(description)}", ""] if description else []
    for t in ds.tasks:
        lines.append(f"[tasks.{t.name}]")
        lines.append(f"kind = {_toml_str(t.kind)}")
        if t.kind == "classification":
            lines.append(f"classes = {t.out_dim}")
        if t.kind == "dense":
            lines.append(f"channels = {t.out_dim}")
        if t.units:
            lines.append(f"units = {_toml_str(t.units)}")
        if t.description:
            lines.append(f"description = {_toml_str(t.description)}")
        lines.append("")
    (folder / TASKS_FILE).write_text("\n".join(lines), encoding="utf-8")
    for c in ds.clients:
        arrays = {
            "x": np.concatenate([c.x_train, c.x_test]),
            "split": np.concatenate([np.zeros(c.n_train, np.int8), np.ones(c.n_test, np.int8)]),
        }
        for t in ds.tasks:
            if t.name in c.y_train:
                arrays[f"y_{t.name}"] = np.concatenate([c.y_train[t.name], c.y_test[t.name]])
        np.savez(folder / f"client_{c.client_id}.npz", **arrays)
    return folder
