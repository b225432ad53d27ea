"""``loop``: Loop Improvement (Li et al., "Loop Improvement: An Efficient Approach for Extracting
Shared Features from Heterogeneous Data without Central Server", 2024, arXiv 2403.14371; reference
code axedge1983/LI; docs/design.md §4).

No server aggregation: the nodes sit on a ring in a seeded order, the one shared backbone travels
around it, each node keeps its own head. A round is one pass over the ring; per visit the client
procedure ``loop`` (:mod:`fmtl_edge.procedures.loop`) trains the head only, then the backbone only,
optionally every layer (``--loop-steps 3``), each step with its own optimiser; the backbone (not the
head) goes to the next node. After the last pass every node takes the final backbone and fine-tunes
its head (``--loop-finetune-epochs``, 0 = off): one extra round of the same job, with
``phase = finetune``, run in parallel (the nodes do not depend on each other) and leaving the
backbone as it is.

``--loop-nodes clients`` (personalised FL, the default): the nodes are the clients; the heads are
client state (``personal = heads.*``): they never leave their node; evaluation is personalised
(each node's head + the final backbone on its own test split).

``--loop-nodes tasks`` (multi-task learning): the nodes are the tasks; a visit to task t is one
FedAvg round over K sampled clients holding t that train only task t (step 1 its head, step 2 the
backbone); the heads are then task heads on the server (scope ``task:<t>``), evaluation is global.
The job has R·T rounds (T visits per pass), plus T fine-tuning rounds.

Dual-loop fault skip (§3.5): a node that fails or refuses is skipped with the last good backbone;
it rejoins in the next pass (the ring is recomputed every round); nothing trained before is lost. A
round with no surviving node raises :class:`~fmtl_edge.coordinator.RoundFailed`. In the tasks ring a
node (a task) fails only when all its K clients do.

Global model (§3.4, solution 2; clients ring, ``--loop-global-rounds G``, 0 = none): after the ring,

1. ``loop-gather`` (one ring pass): the explicit step where heads leave their nodes: each node puts
   the head it kept into its slot of a stacked-head model (:func:`fmtl_edge.models.stacked_head_model`,
   slots in client-id order) that travels the ring to the server;
2. ``loop-global`` (G ring passes): each node trains only the small integrating network over the
   stacked head outputs on its own data (backbone and heads frozen, so only the integrator travels;
   the reference code trains it on pooled data, which is not FL).

Its model is the method's global model (evaluated on the union test set, exported per task); each
node's own head on the final backbone stays its personalised model.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fmtl_edge.plan import Job, JobOutcome
from fmtl_edge.methods.base import Method, Option, option
from fmtl_edge.models import stack_head_state
from fmtl_edge.strategy import (Aggregation, ClientTask, FedAvgAggregation, KeepAggregation, RoundContext,
                                SequentialStrategy, Strategy, sample_uniform)
from fmtl_edge.tasks import TaskSet

NODES = ("clients", "tasks")


def ring_order(items, seed: int, job: str) -> list:
    """The ring: ``items`` in an order seeded by ``(seed, job, "ring")``, the same every round."""
    from fmtl_edge.seeding import derive_seed

    rng = np.random.default_rng(derive_seed(seed, job, "ring"))
    items = list(items)
    return [items[i] for i in rng.permutation(len(items))]


class ClientRing(SequentialStrategy):
    """The clients ring: every client holding a task of the job, in a seeded fixed order, one after
    another (each from the backbone the last good visit left); rounds ``>= train_rounds`` are the
    fine-tuning round(s): every node in parallel with ``phase = finetune``, the backbone kept."""

    def __init__(self, procedure: str, method_config: Mapping[str, Any], train_rounds: int):
        super().__init__(procedure, method_config)
        self.train_rounds = int(train_rounds)
        self.finetune = ClientTask(procedure, {**dict(method_config), "phase": "finetune"})

    def configure_train(self, ctx: RoundContext) -> list[tuple[int, ClientTask]]:
        nodes = ring_order(ctx.eligible(tuple(ctx.job.tasks)), ctx.seed, ctx.job.name)
        task = self.finetune if ctx.round >= self.train_rounds else self.task
        return [(int(c), task) for c in nodes]

    def is_sequential_round(self, r: int) -> bool:
        return r < self.train_rounds

    def round_aggregation(self, r: int, n_params: int, table: np.ndarray) -> Aggregation:
        return super().round_aggregation(r, n_params, table) if r < self.train_rounds else KeepAggregation()


class TaskRing(Strategy):
    """The tasks ring: round r visits task ``ring[r mod T]``: K clients holding it (seeded by
    ``(seed, job, r, task)``; fewer when fewer hold it) train only that task; FedAvg by scope.
    Rounds ``>= train_rounds`` fine-tune each task's head the same way (``phase = finetune``)."""

    def __init__(self, procedure: str, method_config: Mapping[str, Any], tasks, train_rounds: int):
        self.procedure = procedure
        self.config = dict(method_config)
        self.tasks = tuple(tasks)
        self.train_rounds = int(train_rounds)

    def configure_train(self, ctx: RoundContext) -> list[tuple[int, ClientTask]]:
        ring = ring_order(self.tasks, ctx.seed, ctx.job.name)
        t = ring[ctx.round % len(ring)]
        k = min(ctx.clients_per_round, len(ctx.eligible((t,))))
        chosen = sample_uniform(ctx, (t,), max(k, 1), salt=(t,))
        cfg = {**self.config, "task": t}
        if ctx.round >= self.train_rounds:
            cfg["phase"] = "finetune"
        task = ClientTask(self.procedure, cfg)
        return [(c, task) for c in chosen]

    def aggregation(self, n_params: int, table: np.ndarray) -> Aggregation:
        return FedAvgAggregation(n_params, table)


class Loop(Method):
    """Args:
        nodes: ``clients`` | ``tasks`` (see the module docstring).
        steps: 2 (head, backbone) or 3 (+ all layers).
        epochs: epochs of each step per visit.
        optimizer: ``adamw`` | ``sgd``.
        lr_head, lr_backbone, lr_all: each step's learning rate (halved every ``decay_every`` passes).
        weight_decay: AdamW's (decoupled) weight decay.
        finetune_epochs, finetune_lr: the final head fine-tuning (0 epochs: none).

    Raises:
        ValueError: a setting out of range (names the flag).
    """

    name = "loop"
    summary = ("Loop Improvement (Li et al. 2024): a seeded ring of nodes (--loop-nodes clients|tasks); the "
               "backbone travels, each node keeps its head; per visit head, backbone (, all) steps")
    OPTIONS = (
        Option("loop_nodes", str, "clients", "loop: the ring's nodes: clients (personalised, heads stay on "
               "each client) or tasks (each task a node over all clients; default clients)", NODES),
        Option("loop_steps", int, 2, "loop: steps per visit, 2 (head, backbone) or 3 (+ all layers; default 2)"),
        Option("loop_epochs", int, 2, "loop: epochs of each step per visit (reference: 2)"),
        Option("loop_optimizer", str, "adamw", "loop: each step's optimiser (default adamw, wd --loop-weight-decay; "
               "sgd: the run's momentum and weight decay)", ("adamw", "sgd")),
        Option("loop_lr_head", float, 1e-4, "loop: step 1 (head) learning rate, x0.5 every 10 passes (1e-4)"),
        Option("loop_lr_backbone", float, 4e-4, "loop: step 2 (backbone) learning rate (4e-4)"),
        Option("loop_lr_all", float, 5e-4, "loop: step 3 (all layers) learning rate (5e-4)"),
        Option("loop_weight_decay", float, 0.1, "loop: AdamW weight decay (reference: 0.1)"),
        Option("loop_finetune_epochs", int, 6, "loop: final head fine-tuning epochs on the final backbone "
               "(reference: 6; 0 = off)"),
        Option("loop_finetune_lr", float, 2e-5, "loop: final head fine-tuning learning rate (2e-5)"),
        Option("loop_global_rounds", int, 2, "loop, clients ring: ring passes training the stacked-head global "
               "model's integrator after the heads are gathered (LI §3.4; default 2, 0 = no global model)"),
        Option("loop_global_epochs", int, 1, "loop: integrator epochs per visit (default 1)"),
        Option("loop_global_lr", float, 1e-3, "loop: integrator learning rate (default 1e-3)"),
    )

    def __init__(self, tasks: TaskSet, rounds: int, nodes: str = "clients", steps: int = 2, epochs: int = 2,
                 optimizer: str = "adamw", lr_head: float = 1e-4, lr_backbone: float = 4e-4, lr_all: float = 5e-4,
                 weight_decay: float = 0.1, finetune_epochs: int = 6, finetune_lr: float = 2e-5,
                 decay_every: int = 10, global_rounds: int = 2, global_epochs: int = 1, global_lr: float = 1e-3,
                 **kw):
        super().__init__(tasks, rounds, **kw)
        if nodes not in NODES:
            raise ValueError(f"--loop-nodes: {nodes!r} is not clients or tasks")
        if steps not in (2, 3):
            raise ValueError(f"--loop-steps: must be 2 or 3, got {steps}")
        if epochs < 1:
            raise ValueError(f"--loop-epochs: must be >= 1, got {epochs}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--loop-optimizer: {optimizer!r} is not adamw or sgd")
        for flag, v in (("--loop-lr-head", lr_head), ("--loop-lr-backbone", lr_backbone), ("--loop-lr-all", lr_all),
                        ("--loop-finetune-lr", finetune_lr)):
            if not v > 0:
                raise ValueError(f"{flag}: must be > 0, got {v}")
        if weight_decay < 0:
            raise ValueError(f"--loop-weight-decay: must be >= 0, got {weight_decay}")
        if global_rounds < 0:
            raise ValueError(f"--loop-global-rounds: must be >= 0 (0 = no global model), got {global_rounds}")
        if global_epochs < 1:
            raise ValueError(f"--loop-global-epochs: must be >= 1, got {global_epochs}")
        if not global_lr > 0:
            raise ValueError(f"--loop-global-lr: must be > 0, got {global_lr}")
        if finetune_epochs < 0:
            raise ValueError(f"--loop-finetune-epochs: must be >= 0 (0 = off), got {finetune_epochs}")
        self.nodes = nodes
        self.finetune_epochs = int(finetune_epochs)
        self.ring_length = 1 if nodes == "clients" else len(tasks.names)
        self.config: dict[str, Any] = {
            "steps": int(steps), "epochs": int(epochs), "optimizer": optimizer, "lr_head": float(lr_head),
            "lr_backbone": float(lr_backbone), "lr_all": float(lr_all), "weight_decay": float(weight_decay),
            "decay_every": int(decay_every), "decay_factor": 0.5, "finetune_epochs": self.finetune_epochs,
            "finetune_lr": float(finetune_lr), "pass_length": self.ring_length,
        }
        self.global_rounds = int(global_rounds) if nodes == "clients" else 0
        self.global_config: dict[str, Any] = {"epochs": int(global_epochs), "lr": float(global_lr), "optimizer": optimizer,
                                              "weight_decay": float(weight_decay)}
        self.personalised = nodes == "clients"
        self.global_model = nodes == "tasks" or self.global_rounds > 0

    @classmethod
    def settings(cls, cfg: Any) -> dict[str, Any]:
        def o(name):
            return option(cfg, name)

        return dict(nodes=o("loop_nodes"), steps=o("loop_steps"), epochs=o("loop_epochs"),
                   optimizer=o("loop_optimizer"), lr_head=o("loop_lr_head"), lr_backbone=o("loop_lr_backbone"),
                   lr_all=o("loop_lr_all"), weight_decay=o("loop_weight_decay"),
                    finetune_epochs=o("loop_finetune_epochs"), finetune_lr=o("loop_finetune_lr"),
                    global_rounds=o("loop_global_rounds"), global_epochs=o("loop_global_epochs"),
                    global_lr=o("loop_global_lr"))

    @property
    def train_rounds(self) -> int:
        return self.rounds * self.ring_length

    def job(self) -> Job:
        extra = self.ring_length if self.finetune_epochs else 0
        if self.nodes == "clients":
            return Job("loop", tuple(self.tasks.names), self.train_rounds + extra, procedure="loop",
                       method_config=dict(self.config), sampling="all", personal=("heads.*",))
        return Job("loop", tuple(self.tasks.names), self.train_rounds + extra, procedure="loop",
                   method_config=dict(self.config))

    def global_jobs(self, nodes: list[int]) -> tuple[Job, Job]:
        """The gather pass and the integrator passes of the stacked-head global model over ``nodes``
        (the ring's client ids; the slots' order)."""
        base = {"nodes": [int(n) for n in nodes], "heads_from": "loop"}
        tasks = tuple(self.tasks.names)
        gather = Job("loop-gather", tasks, 1, init_from="loop", procedure="loop-global",
                     method_config={**base, "phase": "gather"})
        train = Job("loop-global", tasks, self.global_rounds, init_from="loop-gather", procedure="loop-global",
                    method_config={**base, **self.global_config, "phase": "train"},
                    frozen=("backbone.*", "heads.*.nodes.*"))
        return gather, train

    def strategy(self, job: Job) -> Strategy:
        if job.name in ("loop-gather", "loop-global"):
            return ClientRing(job.procedure, job.method_config, job.rounds)
        if self.nodes == "clients":
            return ClientRing(job.procedure, job.method_config, self.train_rounds)
        return TaskRing(job.procedure, job.method_config, job.tasks, self.train_rounds)

    def initial_state(self, job: Job, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if job.name == "loop-gather":
            return stack_head_state(state, self.tasks.subset(job.tasks), len(job.method_config["nodes"]))
        return state

    def next_jobs(self, done: Mapping[str, JobOutcome]) -> list[Job]:
        if "loop" not in done:
            return [self.job()]
        if not self.global_rounds:
            return []
        gather, train = self.global_jobs(sorted(int(c) for c in done["loop"].history[0].clients))
        return [j for j in (gather, train) if j.name not in done][:1]

    def final_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "loop-global" if self.global_rounds else "loop" for t in self.tasks.names}

    def personalised_jobs(self, done: Mapping[str, JobOutcome]) -> dict[str, str]:
        return {t: "loop" for t in self.tasks.names}

    def planned_rounds(self) -> int:
        return self.job().rounds + (1 + self.global_rounds if self.global_rounds else 0)
