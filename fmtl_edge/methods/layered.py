"""``layered``: layer-typed sharing (seed 000): every parameter is pre-trained (frozen), common
(averaged over every sampled client), task-specific (averaged over the sampled clients of the task's
client group) or personal (never leaves the client), chosen by glob patterns over parameter names.

Clients may hold labels for one task only (``--task-groups``); with ``per-group`` sampling K
clients are drawn from each task's client group per round ("clients are chosen randomly from each
client group with the same task", seed 000 §III). Defaults: the backbone θ_s common, each head θ_i
task-specific. ``--pretrained FILE.safetensors`` loads the ``pretrained`` layers (default pattern
``backbone.*``) from an earlier run's model and freezes them: no gradient, no running-statistics
update, never sent back.

Patterns (``[layers]`` in the TOML file, or ``--layers KIND=PATTERN,...``) match names such as
``backbone.layers.0.0.weight`` or ``heads.<task>.fc.weight``; ``task`` patterns may only match head
tensors (a task-specific tensor belongs to one task; the backbone is shared by every task).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

import numpy as np

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method
from fmtl_edge.tasks import TaskSet

LAYER_KINDS = ("pretrained", "common", "task", "personal")


class LayerTypes:
    """Resolved layer types of a model: which tensor is frozen, common, task-specific or personal.

    Args:
        patterns: kind → glob patterns (kinds: ``pretrained``, ``common``, ``task``, ``personal``).

    Raises:
        ValueError: an unknown kind or a pattern that is not a string (names ``[layers]``).
    """

    def __init__(self, patterns: Mapping[str, Sequence[str]] | None):
        patterns = dict(patterns or {})
        unknown = sorted(set(patterns) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"[layers]: unknown layer type {unknown[0]!r}; use {', '.join(LAYER_KINDS)}")
        self.patterns: dict[str, tuple[str, ...]] = {}
        for k in LAYER_KINDS:
            v = patterns.get(k, ())
            if isinstance(v, str):
                v = [v]
            if not all(isinstance(p, str) and p for p in v):
                raise ValueError(f"[layers].{k}: give a list of glob patterns over parameter names, e.g. [\"heads.*\"]")
            self.patterns[k] = tuple(v)

    def check(self, names: Sequence[str]) -> None:
        """Validate the patterns against a model's float tensor ``names``.

        Raises:
            ValueError: a pattern matches no tensor, a tensor matches patterns of two kinds, or a
                ``task`` pattern matches a backbone tensor (the message names the pattern and the fix).
        """
        example = ", ".join(n for n in list(names)[:2])
        for kind, pats in self.patterns.items():
            for p in pats:
                hits = [n for n in names if fnmatch.fnmatchcase(n, p)]
                if not hits:
                    raise ValueError(f"[layers].{kind}: pattern {p!r} matches no parameter of the model "
                                     f"(names look like {example}; `fmtl-edge simulate --help` shows the layout)")
                if kind == "task" and any(not n.startswith("heads.") for n in hits):
                    bad = next(n for n in hits if not n.startswith("heads."))
                    raise ValueError(f"[layers].task: pattern {p!r} matches the backbone tensor {bad!r}; task-specific "
                                     "layers are a task's head (heads.<task>.*): make backbone layers common, "
                                     "pretrained or personal")
        for n in names:
            kinds = [k for k, pats in self.patterns.items() if any(fnmatch.fnmatchcase(n, p) for p in pats)]
            if len(kinds) > 1:
                raise ValueError(f"[layers]: tensor {n!r} matches both a {kinds[0]} and a {kinds[1]} pattern; "
                                 "make the patterns disjoint")


class Layered(Method):
    """Args:
        layers: kind → glob patterns (see :class:`LayerTypes`).
        pretrained: tensors of a pre-trained model (``name → array``, e.g. read from an earlier run's
            ``models/<method>/<task>.safetensors``); the ``pretrained`` layers are loaded from it and
            frozen. None: nothing pre-trained.
        sampling: ``uniform`` or ``per-group``.

    Raises:
        ValueError: bad patterns, or pretrained layers without a pretrained file (and the reverse).
    """

    name = "layered"
    summary = ("layer-typed sharing: pre-trained (frozen), common, task-specific and personal layers from "
               "[layers] patterns (default: backbone common, heads task-specific), clients grouped by task")
    personalised = True
    uses_pretrained = True

    def __init__(self, tasks: TaskSet, rounds: int, layers: Mapping[str, Sequence[str]] | None = None,
                 pretrained: Mapping[str, np.ndarray] | None = None, sampling: str = "uniform", **kw):
        super().__init__(tasks, rounds, **kw)
        types = LayerTypes(layers)
        if pretrained is not None and not types.patterns["pretrained"]:
            types.patterns["pretrained"] = ("backbone.*",)
        if pretrained is None and types.patterns["pretrained"]:
            raise ValueError("[layers].pretrained names layers but no --pretrained FILE.safetensors gives their weights")
        self.types = types
        self.pretrained = None if pretrained is None else {k: np.asarray(v) for k, v in pretrained.items()}
        self.sampling = sampling
        # with personal layers the global model lacks them: only per-client models are meaningful
        self.global_model = not types.patterns["personal"]

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        return {"layers": cfg.layers, "sampling": cfg.resolved_sampling()}

    def job(self) -> Job:
        p = self.types.patterns
        return Job("layered", tuple(self.tasks.names), self.rounds, sampling=self.sampling,
                   personal=p["personal"], frozen=p["pretrained"], common=p["common"])

    def check(self, state: Mapping[str, np.ndarray]) -> None:
        """Validate the layer patterns and the pre-trained tensors against the model's ``state``.

        Raises:
            ValueError: see :meth:`LayerTypes.check`; a pre-trained layer missing from the file or
                of another shape.
        """
        floats = [n for n, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        self.types.check(floats)
        if self.pretrained is not None:
            for n in self._pretrained_names(state):
                if n not in self.pretrained:
                    raise ValueError(f"--pretrained: the file has no tensor {n!r} (a pretrained layer of this model); "
                                     "use a model file of the same architecture (same --width, input size)")
                if tuple(self.pretrained[n].shape) != tuple(np.shape(state[n])):
                    raise ValueError(f"--pretrained: tensor {n!r} has shape {tuple(self.pretrained[n].shape)} in the file "
                                     f"but {tuple(np.shape(state[n]))} in the model; use a model of the same architecture")

    def _pretrained_names(self, state: Mapping[str, np.ndarray]) -> list[str]:
        pats = self.types.patterns["pretrained"]
        return [n for n in state if any(fnmatch.fnmatchcase(n, p) for p in pats)]

    def initial_state(self, job: Job, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.pretrained is None:
            return state
        self.check(state)
        out = dict(state)
        for n in self._pretrained_names(state):
            out[n] = np.array(self.pretrained[n], dtype=np.asarray(state[n]).dtype, copy=True)
        return out

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        return [] if "layered" in done else [self.job()]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "layered" for t in self.tasks.names}
