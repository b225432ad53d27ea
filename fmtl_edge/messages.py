"""What the coordinator sends to a client and what comes back (transport-independent).

Model states are ``name → NumPy array`` maps (Flower-style records); the gRPC transport sends them as
safetensors bytes, the in-process pool passes them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainConfig:
    """Local-training hyper-parameters, the same for every client of a job.

    Attributes:
        local_epochs: E, passes over the client's training data per round.
        batch_size: samples per SGD step.
        lr: base learning rate η₀; round r of a job of R rounds uses η₀·(1 − r/R)^0.9 (poly decay).
        momentum: SGD momentum (0.9 in MAS).
        weight_decay: L2 weight decay ``wd`` (1e-4 in MAS); also used by the lookahead step (Eq. 3).
        affinity_every: ρ, measure task affinity every ρ batches (MAS default 5).
        affinity_divide_by_lr: divide S by η as TAG and the MAS reference code do (off by default).
        device: torch device for local training (``cpu``, ``cuda``).
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    affinity_every: int = 5
    affinity_divide_by_lr: bool = False
    device: str = "cpu"


def poly_lr(base_lr: float, round_idx: int, total_rounds: int, power: float = 0.9) -> float:
    """η_r = η₀·(1 − r/R)^power for round ``r`` in ``0..R-1`` of a job of ``R`` rounds (MAS §4)."""
    if total_rounds <= 0:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    return base_lr * (1.0 - round_idx / total_rounds) ** power


@dataclass
class Assignment:
    """One client execution: train ``tasks`` from ``state`` for one round of job ``job``.

    Attributes:
        job: job name (``merge``, ``split-0``, ``task-age``, ...).
        round: 0-based round index inside the job.
        tasks: the job's tasks (the model has exactly these heads).
        state: global model state, ``name → array``.
        lr: this round's learning rate (already decayed).
        config: local-training hyper-parameters.
        measure_affinity: run the lookahead every ``config.affinity_every`` batches.
        seed: seeds the client's batch order.
        time_budget_s, energy_budget_j: per-round budgets (None = unlimited); training stops early
            when one is spent and the update reports the samples actually used.
        procedure: name of the client procedure that trains (:mod:`fmtl_edge.procedures`: ``sgd``,
            ``fedprox``, ``ditto``, ...).
        method_config: the procedure's settings (JSON-ready values: numbers, strings, booleans,
            lists); crosses the wire once as one field.
        state_key: namespace of the client state this assignment reads and writes
            (``<method>/<job>``); client state never leaves the client.
        personal: names of the tensors that are personal layers: kept in the client state across
            rounds, never uploaded (the broadcast value is only used before the client has its own).
        frozen: names of pre-trained (frozen) tensors: no gradient, no running-statistics update,
            never uploaded.
        personalised: for an evaluation, evaluate the client's own model (global slices + its
            state, as its procedure defines it) instead of the global model.
        power_mode: the power mode the server asks the device to train in, by name (``MODE_30W``;
            :mod:`fmtl_edge.runtime.power_modes`); None leaves the device as it is. A device switches
            only when its agent runs with ``--allow-power-mode``; its energy record names the mode
            actually used.
        loss_weights: task → w_t of the local objective Σ_t w_t·L_t (``--loss-weights``,
            :mod:`fmtl_edge.loss_weights`); a task it does not name weighs 1.
    """

    job: str
    round: int
    tasks: tuple[str, ...]
    state: dict[str, np.ndarray]
    lr: float
    config: TrainConfig
    measure_affinity: bool = False
    seed: int = 0
    time_budget_s: float | None = None
    energy_budget_j: float | None = None
    procedure: str = "sgd"
    method_config: dict[str, Any] = field(default_factory=dict)
    state_key: str = ""
    personal: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    personalised: bool = False
    power_mode: str | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)

    def weight(self, task: str) -> float:
        """w_t of ``task`` in the local objective (1 when :attr:`loss_weights` does not name it)."""
        return float(self.loss_weights.get(task, 1.0))

    def uploaded_names(self, names) -> list[str]:
        """The tensor names of ``names`` that an update may carry: all but personal and frozen."""
        skip = set(self.personal) | set(self.frozen)
        return [n for n in names if n not in skip]


@dataclass
class ClientUpdate:
    """Result of one client execution.

    Attributes:
        client_id: who ran it.
        job, round: echo of the assignment.
        state: updated local model state, ``name → array`` (floating and integer entries), without
            the personal and frozen tensors (those never leave the client).
        n_samples: training samples actually used (the FedAvg weight); fewer than the client holds
            when a budget stopped training early.
        train_loss: task → mean training loss over the round.
        affinity: ``(n, n)`` float64 mean lookahead affinity over the measured steps, rows/columns
            in ``tasks`` order (``S[i, j]``: effect of task i's step on task j), or None.
        affinity_steps: number of lookahead measurements averaged into ``affinity``.
        device_s: measured seconds of the execution (wall clock on the device).
        energy: the meter's :meth:`Measurement.to_dict` for the execution window.
        stopped_by: ``"time"``/``"energy"`` if a budget ended training early, else None.
        peak_memory_bytes: peak memory observed during the execution, if watched.
        error: a structured refusal (``BudgetExceeded.to_dict()``, ``DeviceBusy.to_dict()``) when the
            client did not train; such an update has ``n_samples == 0`` and is not aggregated.
        sample_passes: training cost independent of the machine's load: Σ over the steps of the
            batch size (forward + backward per sample) plus ``lookahead_passes`` (per lookahead
            measurement ``n_tasks × B``); see :class:`fmtl_edge.procedures.base.LocalResult`.
        lookahead_passes: the lookahead's share of ``sample_passes``.
        cpu_s: the process's CPU seconds over the execution (all threads, user + system); beside
            ``device_s`` it shows contention: ``cpu_s / device_s`` far below ``threads`` means the
            device's cores were busy with other work. None when not measured.
        threads: intra-op threads the execution ran on (None: not reported).
    """

    client_id: int
    job: str
    round: int
    tasks: tuple[str, ...]
    state: dict[str, np.ndarray]
    n_samples: int
    train_loss: dict[str, float]
    affinity: np.ndarray | None
    affinity_steps: int
    device_s: float
    energy: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None
    peak_memory_bytes: int | None = None
    error: dict[str, Any] | None = None
    sample_passes: int = 0
    lookahead_passes: int = 0
    cpu_s: float | None = None
    threads: int | None = None
