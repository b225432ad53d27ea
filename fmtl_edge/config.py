"""Run configuration of ``fmtl-edge simulate``: defaults, per-dataset presets, TOML files, validation.

Precedence: built-in defaults < the dataset's preset < ``--config FILE.toml`` < command-line flags.
TOML keys are the flag names without ``--`` (``clients-per-round`` or ``clients_per_round``).

The paper's defaults (MAS §4): K = 4 clients per round, E = 1, R = 100, R0 ∈ [30, 40], ρ = 5,
SGD momentum 0.9, wd 1e-4, lr 0.1 with poly decay. The dataset presets scale R and R0 down so the
default runs finish in minutes on two CPU cores; they never change the logic.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

if TYPE_CHECKING:
    from fmtl_edge.data.base import DataOptions
    from fmtl_edge.models import ModelSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib


class ConfigError(ValueError):
    """An impossible or malformed setting. ``field`` names the offending key (flag name)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


DEFAULT_METHODS = ("mas-2", "all-in-one", "one-by-one")

#: Per-dataset presets (R, R0 and sizes scaled down from the paper for 2-core machines).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"rounds": 30, "r0": 10, "batch_size": 32},
    "utkface": {"rounds": 30, "r0": 10, "batch_size": 64},
    "uci-har": {"rounds": 30, "r0": 10, "batch_size": 32},
    "npz": {"rounds": 30, "r0": 10},
}


@dataclass
class SimulationConfig:
    """Every setting of a simulation run (see ``fmtl-edge simulate --help`` for each)."""

    dataset: str = "digits"
    data_dir: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    #: ``--tasks a,b``: train only these tasks of the data set (None: every task)
    tasks: tuple[str, ...] | None = None
    rounds: int = 100
    r0: int = 35
    clients: int | None = None
    clients_per_round: int = 4
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    affinity_every: int = 5
    affinity_divide_by_lr: bool = False
    seed: int = 0
    #: ``--seeds 0,1,2``: every method runs once per seed (the training seed: model init, client
    #: sampling, batch order, dropout); the data partition stays the one of ``seed``; None: one run
    seeds: tuple[int, ...] | None = None
    #: ``--partition-seed S``: the data partition's seed when it differs from the training seed (one
    #: seed of a ``--seeds`` study run as its own resumable run); None: ``seed``
    partition_seed: int | None = None
    device: str = "cpu"
    out: str | None = None  # None: a new timestamped run folder runs/<UTC time>, runs/latest → it
    meter: str | None = None
    profile: str | None = None
    max_samples: int | None = None
    image_size: int | None = None
    alpha: float | None = None
    #: pathological split (every client holds exactly this many classes) instead of Dirichlet
    classes_per_client: int | None = None
    width: int = 16
    #: ``--depth``: blocks per stage of the conv families (MLP: hidden layers − 1)
    depth: int = 1
    #: ``--model``: a built-in family (auto, conv, mlp, resnet, mobilenet) or module:function /
    #: path/to/file.py:function (:mod:`fmtl_edge.model_factory`)
    model: str = "auto"
    #: ``--head-hidden``: hidden units of the built-in families' pooled heads (0: linear heads)
    head_hidden: int = 0
    time_budget_s: float | None = None
    energy_budget_j: float | None = None
    aggregator: str = "fedavg"
    trim_fraction: float = 0.1
    sampling: str | None = None
    task_groups: int | None = None
    layers: dict[str, list[str]] | None = None
    pretrained: str | None = None
    #: probability that a sampled client fails mid-round (simulated fault injection, seeded)
    dropout: float = 0.0
    #: ``--eval-every N``: test-loss curve points every N rounds of every job and at its end (0: off)
    eval_every: int = 0
    #: the methods' own settings (:attr:`fmtl_edge.methods.Method.OPTIONS`), by config key
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def option(self, name: str) -> Any:
        """A method option's value: set by the run, else the option's default.

        Raises:
            KeyError: no registered method declares ``name``.
        """
        from fmtl_edge.methods import method_options

        opts = method_options()
        if name not in opts:
            raise KeyError(f"no method declares the option {name!r}")
        return self.method_options.get(name, opts[name].default)

    @property
    def data_seed(self) -> int:
        """The seed of the data partition: ``partition_seed`` when set, else ``seed``."""
        return int(self.seed if self.partition_seed is None else self.partition_seed)

    def data_options(self) -> "DataOptions":
        """The data set's loading options (:class:`~fmtl_edge.data.base.DataOptions`), seeded with the
        partition seed :attr:`data_seed`."""
        from fmtl_edge.data.base import DataOptions

        return DataOptions(data_dir=self.data_dir, n_clients=self.clients, seed=self.data_seed, alpha=self.alpha,
                           image_size=self.image_size, max_samples=self.max_samples, task_groups=self.task_groups,
                           classes_per_client=self.classes_per_client)

    def train_config(self):
        """The clients' local-training settings (:class:`~fmtl_edge.messages.TrainConfig`)."""
        from fmtl_edge.messages import TrainConfig

        return TrainConfig(local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                           momentum=self.momentum, weight_decay=self.weight_decay, affinity_every=self.affinity_every,
                           affinity_divide_by_lr=self.affinity_divide_by_lr, device=self.device)

    def resolved_sampling(self) -> str:
        """``--sampling``, or its default: ``per-group`` with ``--task-groups``, else ``uniform``."""
        if self.sampling is not None:
            return self.sampling
        return "per-group" if self.task_groups else "uniform"
    lease_wait_s: float = 600.0
    #: ``--threads N|auto``: intra-op threads of each client execution (:mod:`fmtl_edge.runtime.threads`)
    threads: str = "auto"
    #: ``--loss-weights uniform|chance|TASK=W,...``: task weights of the objective (:mod:`fmtl_edge.loss_weights`)
    loss_weights: str = "uniform"
    #: ``--paired-with METHOD`` (with ``--seeds``): per-seed paired differences against METHOD, 95 % t-interval
    paired_with: str | None = None
    #: ``--oracle-splits``: beside every mas-x, mas-oracle-x trains every x-split from the merged weights
    oracle_splits: bool = False
    #: ``--fleet FILE.toml|NAME``: simulated devices (client k on device k mod N), modelled time and energy
    fleet: str | None = None
    #: ``--selection uniform|energy|utility``: who trains in a round (:mod:`fmtl_edge.selection`)
    selection: str = "uniform"
    #: ``--power-mode keep|max|auto``: each selected device's power mode (:mod:`fmtl_edge.selection`)
    power_mode: str = "keep"
    #: ``--energy-candidates D``: ``energy`` selection takes its K among D clients drawn uniformly per round
    energy_candidates: int | None = None

    def model_spec(self, input_shape) -> "ModelSpec":
        """The :class:`~fmtl_edge.models.ModelSpec` of this run for per-sample ``input_shape``
        (``--model`` with a file's path made absolute, ``--width``, ``--depth``, ``--head-hidden``).

        Raises:
            ValueError: an input shape that is neither ``(C, H, W)`` nor ``(D,)``.
        """
        from fmtl_edge.model_factory import normalise_reference
        from fmtl_edge.models import ModelSpec

        return ModelSpec(tuple(int(s) for s in input_shape), width=self.width, depth=self.depth,
                         model=normalise_reference(self.model), head_hidden=self.head_hidden)

    def to_dict(self) -> dict[str, Any]:
        """The config as results.json stores it (``data_dir`` absolute and resolved; a ``model``
        file's path absolute)."""
        d = dataclasses.asdict(self)
        from fmtl_edge.model_factory import normalise_reference

        d["model"] = normalise_reference(self.model)
        d["methods"] = list(self.methods)
        d["tasks"] = None if self.tasks is None else list(self.tasks)
        d["seeds"] = None if self.seeds is None else list(self.seeds)
        if self.data_dir is not None:
            d["data_dir"] = str(Path(self.data_dir).expanduser().resolve())
        return d

    # -- validation that needs no data -----------------------------------------------------------
    def validate(self) -> None:
        """Check values that are wrong whatever the data.

        Raises:
            ConfigError: naming the field (as its flag) and the fix.
        """
        _positive_int(self, "rounds")
        _positive_int(self, "r0")
        _positive_int(self, "clients_per_round")
        _positive_int(self, "local_epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "affinity_every")
        _positive_int(self, "width")
        _positive_int(self, "depth")
        if isinstance(self.head_hidden, bool) or not isinstance(self.head_hidden, int) or self.head_hidden < 0:
            raise ConfigError("--head-hidden", f"must be a whole number >= 0 (hidden units; 0: linear heads), "
                              f"got {self.head_hidden!r}")
        from fmtl_edge.model_factory import ModelError, check_reference

        try:
            check_reference(self.model)
        except ModelError as e:
            raise ConfigError("--model", str(e)) from None
        if self.clients is not None:
            _positive_int(self, "clients")
        if self.max_samples is not None:
            _positive_int(self, "max_samples")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError("--image-size", f"must be >= 8 pixels, got {self.image_size}")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("--momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if not self.methods:
            raise ConfigError("--methods", "name at least one method, e.g. mas-2,all-in-one,one-by-one")
        if any(m.startswith("mas-") for m in self.methods) and self.r0 >= self.rounds:
            raise ConfigError(
                "--r0", f"the merge phase R0={self.r0} must be shorter than R={self.rounds} rounds; "
                f"lower --r0 (e.g. {max(1, self.rounds // 3)}) or raise --rounds"
            )
        if self.clients is not None and self.clients_per_round > self.clients:
            raise ConfigError(
                "--clients-per-round", f"K={self.clients_per_round} is more than the {self.clients} "
                "clients; lower --clients-per-round or raise --clients"
            )
        if self.device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError("--device", f"{self.device!r} is not cpu, cuda or cuda:N")
        from fmtl_edge.runtime.factory import BACKENDS

        if self.meter is not None and self.meter not in ("auto", *BACKENDS):
            raise ConfigError("--meter", f"{self.meter!r} is not auto or one of {', '.join(BACKENDS)}")
        from fmtl_edge.runtime.threads import parse_threads

        try:
            n = parse_threads(self.threads)
        except ValueError as e:
            raise ConfigError("--threads", str(e).removeprefix("--threads: ")) from None
        self.threads = "auto" if n is None else str(n)
        from fmtl_edge.loss_weights import parse_loss_weights

        self.loss_weights = parse_loss_weights(self.loss_weights)
        from fmtl_edge.selection import POLICIES, POWER_MODE_POLICIES

        if self.selection not in POLICIES:
            raise ConfigError("--selection", f"{self.selection!r} is not one of {', '.join(POLICIES)}")
        if self.power_mode not in POWER_MODE_POLICIES:
            raise ConfigError("--power-mode", f"{self.power_mode!r} is not one of {', '.join(POWER_MODE_POLICIES)}")
        if self.energy_candidates is not None:
            if self.selection != "energy":
                raise ConfigError("--energy-candidates", "applies to --selection energy")
            if not self.energy_candidates >= self.clients_per_round:
                raise ConfigError("--energy-candidates", f"must be at least K = {self.clients_per_round}, "
                                  f"got {self.energy_candidates}")
        if self.fleet is not None:
            from fmtl_edge.fleet import Fleet

            Fleet.load(self.fleet)  # a bad file or name is refused here (ConfigError --fleet)
        if self.oracle_splits and not any(re.fullmatch(r"mas-\d+", m) for m in self.methods):
            raise ConfigError("--oracle-splits", "checks the split of a mas-x method: add one to --methods (e.g. mas-2)")
        if self.paired_with is not None:
            if self.paired_with not in self.methods:
                raise ConfigError("--paired-with", f"{self.paired_with!r} is not one of --methods "
                                  f"({', '.join(self.methods)}); name the method to compare against")
            if not self.seeds or len(self.seeds) < 2:
                raise ConfigError("--paired-with", "paired differences need several seeds: add --seeds (e.g. 0,1,2,3,4)")
        if not self.lease_wait_s >= 0:
            raise ConfigError("--lease-wait-s", f"must be >= 0 seconds (0: refuse at once if busy), got {self.lease_wait_s}")
        for name in ("time_budget_s", "energy_budget_j"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError("--" + name.replace("_", "-"), f"must be > 0, got {v}")
        from fmtl_edge.strategy import AGGREGATORS, FedAvgStrategy

        if self.aggregator not in AGGREGATORS:
            raise ConfigError("--aggregator", f"{self.aggregator!r} is not one of {', '.join(AGGREGATORS)}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError("--eval-every", f"must be a whole number >= 0 (rounds; 0: off), got {self.eval_every!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("--dropout", f"must be in [0, 1) (a probability per client and round), got {self.dropout}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("--trim-fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        if self.sampling is not None and self.sampling not in FedAvgStrategy.SAMPLINGS:
            raise ConfigError("--sampling", f"{self.sampling!r} is not one of {', '.join(FedAvgStrategy.SAMPLINGS)}")
        if self.task_groups is not None:
            _positive_int(self, "task_groups")
        if self.classes_per_client is not None:
            _positive_int(self, "classes_per_client")
            if self.alpha is not None:
                raise ConfigError("--classes-per-client", "gives the pathological split, --alpha the Dirichlet "
                                  "one: pass one of them")
        from fmtl_edge.methods import method_options

        opts = method_options()
        for k, v in self.method_options.items():
            if k not in opts:
                raise ConfigError(k, "no method declares this option")
            self.method_options[k] = _coerce_option(opts[k], v)
        if self.layers is not None:
            from fmtl_edge.methods.layered import LayerTypes

            try:
                LayerTypes(self.layers)
            except ValueError as e:
                raise ConfigError("--layers", str(e)) from None
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise ConfigError("--pretrained", f"no such file {self.pretrained!r}; give a .safetensors model file "
                              "(e.g. runs/<run>/models/<method>/<task>.safetensors)")

    def validate_against(self, n_tasks: int, n_clients: int) -> None:
        """Checks that need the loaded dataset (task and client counts).

        Raises:
            ConfigError: K > clients, or a ``mas-x`` with more splits than tasks.
        """
        if self.clients_per_round > n_clients:
            raise ConfigError(
                "--clients-per-round", f"K={self.clients_per_round} but the dataset has {n_clients} "
                "clients; lower --clients-per-round"
            )
        if self.task_groups is not None and self.task_groups > n_tasks:
            raise ConfigError("--task-groups", f"{self.task_groups} groups but the dataset has {n_tasks} tasks; "
                              f"use at most {n_tasks}")
        for m in self.methods:
            mm = re.fullmatch(r"mas-(\d+)", m)
            if mm and not 1 <= int(mm.group(1)) <= n_tasks:
                raise ConfigError(
                    "--methods", f"{m} asks for {mm.group(1)} splits but there are {n_tasks} tasks; "
                    f"use mas-1..mas-{n_tasks}"
                )


def check_device(device: str) -> None:
    """Check that torch can use ``device`` here (``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ConfigError: (``--device``) a CUDA device where this torch has no CUDA, or N ≥ the device count.
    """
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) sees no CUDA device")
        raise ConfigError("--device", f"{device}: {why} (torch {torch.__version__}); use --device cpu, or install "
                          "a CUDA build of torch (on a Jetson: NVIDIA's JetPack wheel)")
    n = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= n:
        raise ConfigError("--device", f"{device}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")


def _positive_int(cfg: SimulationConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError("--" + name.replace("_", "-"), f"must be a whole number >= 1, got {v!r}")


_FIELDS = {f.name: f for f in fields(SimulationConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Coerce a TOML value to the field's type, or raise ConfigError naming the key."""
    if name == "seeds":
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            if not isinstance(value, (list, tuple)) or isinstance(value, bool):
                raise ValueError
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError("seeds", f"must be a comma list of whole numbers (e.g. 0,1,2), got {value!r}") from None
        if not out or len(set(out)) != len(out):
            raise ConfigError("seeds", f"name each seed once, at least one: got {value!r}")
        return out
    if name in ("methods", "tasks"):
        if value is None and name == "tasks":
            return None
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, "must be a list of names or a comma-separated string")
        return tuple(v.strip() for v in value)
    default = _FIELDS[name].default
    kind = type(default) if default is not None else None
    if value is None:
        return None
    if name == "layers":
        if not isinstance(value, dict):
            raise ConfigError("layers", "must be a table: [layers] personal = [\"heads.*\"], pretrained = [...]")
        return {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in value.items()}
    if name in ("clients", "max_samples", "image_size", "task_groups", "classes_per_client", "partition_seed",
                "energy_candidates"):
        kind = int
    elif name in ("alpha", "time_budget_s", "energy_budget_j"):
        kind = float
    elif name in ("data_dir", "meter", "profile", "sampling", "pretrained", "out", "paired_with", "fleet"):
        kind = str
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    return value


def _coerce_option(opt, value: Any) -> Any:
    """A method option's value as its declared kind, or ConfigError naming its flag."""
    if opt.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(opt.flag, f"must be a number, got {value!r}")
        value = float(value)
    elif opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(opt.flag, f"must be a whole number, got {value!r}")
    elif opt.kind is str:
        if not isinstance(value, str):
            raise ConfigError(opt.flag, f"must be a string, got {value!r}")
        if opt.choices and value not in opt.choices:
            raise ConfigError(opt.flag, f"{value!r} is not one of {', '.join(opt.choices)}")
    return value


def read_toml(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
        ConfigError: (naming ``flag``) the file is missing or not valid TOML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(flag, f"no such file {str(p)!r}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(flag, f"{p} is not valid TOML: {e}") from None


def load_toml(path: str | Path, skip: Collection[str] = ()) -> dict[str, Any]:
    """Read a config file; keys may use ``-`` or ``_``; an optional ``[simulate]`` table is accepted.
    Keys in ``skip`` (spelled with ``-``) are left out: another program's own keys (the Flower apps').

    Raises:
        ConfigError: missing file, bad TOML, unknown key or wrong type (naming the key).
    """
    p = Path(path)
    raw = read_toml(p)
    if "simulate" in raw and isinstance(raw["simulate"], dict):
        raw = {**{k: v for k, v in raw.items() if k != "simulate"}, **raw["simulate"]}
    from fmtl_edge.methods import method_options

    opts = method_options()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if key.replace("_", "-") in skip:
            continue
        if name in opts:
            out[name] = value
            continue
        if name not in _FIELDS or name == "method_options":
            import difflib

            known = sorted([*(k.replace("_", "-") for k in [*_FIELDS, *opts] if k != "method_options"), *skip])
            near = difflib.get_close_matches(key.replace("_", "-"), known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"{p}: {key}", f"unknown key; {hint}known keys: {', '.join(known)}")
        out[name] = _coerce(name, value)
    return out


def build_config(overrides: Mapping[str, Any], config_file: str | Path | None = None,
                 skip: Collection[str] = ()) -> SimulationConfig:
    """Defaults < dataset preset < TOML file < ``overrides`` (flags given on the command line).

    ``overrides`` holds only values the user set (None means "not given"); ``skip``: keys of the
    file that another program reads (:func:`load_toml`).

    Raises:
        ConfigError: as :func:`load_toml` and :meth:`SimulationConfig.validate`.
    """
    from fmtl_edge.methods import method_options

    from_file = load_toml(config_file, skip) if config_file else {}
    flags = {k: v for k, v in overrides.items() if v is not None}
    opts = method_options()
    # method options (flags or TOML keys named by a method's OPTIONS) go into method_options
    chosen = {**{k: v for k, v in from_file.items() if k in opts}, **dict(flags.get("method_options") or {}),
              **{k: v for k, v in flags.items() if k in opts}}
    from_file = {k: v for k, v in from_file.items() if k not in opts}
    flags = {k: v for k, v in flags.items() if k not in opts and k != "method_options"}
    dataset = flags.get("dataset", from_file.get("dataset", SimulationConfig.dataset))
    merged: dict[str, Any] = dict(PRESETS.get(dataset, {}))
    merged.update(from_file)
    merged.update(flags)
    explicit = {**from_file, **flags}
    if "rounds" in explicit and "r0" not in explicit:
        # R0 follows R (a third, as the presets and the paper's R0 ≈ 0.3–0.4·R) unless set.
        merged["r0"] = max(1, min(int(merged["rounds"]) - 1, round(int(merged["rounds"]) / 3)))
    for key in ("methods", "tasks"):
        if key in merged:
            merged[key] = _coerce(key, merged[key])
    if "seeds" in merged:
        merged["seeds"] = _coerce("seeds", merged["seeds"])
    merged["method_options"] = chosen
    cfg = SimulationConfig(**merged)
    cfg.validate()
    return cfg
