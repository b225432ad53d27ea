"""The coordinator: runs a method's plan of FL jobs over a client pool, round by round.

It knows nothing of transport, files or meters (docs/architecture.md): a
:class:`~fmtl_edge.pool.ClientPool` executes assignments — in-process clients in simulation, device
agents over gRPC, Flower nodes — and the same coordinator code aggregates the updates. Per round of
a job the method's strategy (:mod:`fmtl_edge.strategy`) chooses the clients and what each runs; the
coordinator sends each the global state (the personal and frozen tensor names, the client-state
key, the round's learning rate) and combines the returned states slice by slice with the
strategy's aggregation — by default FedAvg (``common`` over all, ``task:<t>`` over the clients that
trained t, weighted by samples used) with the streaming :class:`fmtl_edge.aggregation.Accumulator`,
so the server holds O(P) memory. Personal and frozen slices are never uploaded nor aggregated.

What the runner (:mod:`fmtl_edge.runner`) builds on:

- ``on_round_end(RoundCheckpoint)`` after every round: everything needed to resume the job at the
  next round boundary (global state, affinity per round, energy tally, history). Client sampling and
  client batch order are derived from ``(seed, job, round[, client])``, so no RNG state is carried.
- ``run_job(..., resume=checkpoint)`` / ``run_method(..., done=..., resume=...)`` continue a plan from
  its finished jobs and the last completed round of the running job.
- ``min_updates``: a round with fewer usable updates raises :class:`~fmtl_edge.plan.RoundFailed`
  (the pool's deadline and retry policy decides how many arrive; the in-process pool always returns
  all of them).
- An update whose ``state`` has an ``as_flat(layout)`` method (a memory-mapped upload) is aggregated
  from that flat float32 vector without a copy, which keeps the server at about three model sizes
  (global vector, accumulator, one mapped update) whatever K is; the pool may supply the global
  vector's storage (:meth:`~fmtl_edge.pool.ClientPool.global_vector_buffer`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fmtl_edge.affinity.measure import AffinityAverager
from fmtl_edge.messages import Assignment, ClientUpdate, TrainConfig
from fmtl_edge.models import ModelSpec, MultiTaskModel
from fmtl_edge.partition import FROZEN, PERSONAL, ParameterLayout, select_state, state_to_numpy
from fmtl_edge.plan import EnergyTally, Job, JobOutcome, RoundCheckpoint, RoundFailed, RoundRecord
from fmtl_edge.pool import ClientPool
from fmtl_edge.seeding import derive_seed
from fmtl_edge.strategy import ClientTask, FedAvgStrategy, RoundContext, Strategy
from fmtl_edge.tasks import TaskSet


class _RoundTotals:
    """What the coordinator tallies of one round's updates (losses, samples, cost, affinity, refusals)."""

    def __init__(self, tasks: Sequence[str], record: Callable[[ClientUpdate], dict]):
        self.record = record
        self.per_client: list[dict] = []
        self.tally = EnergyTally()
        self.loss_num = {t: 0.0 for t in tasks}
        self.loss_den = {t: 0 for t in tasks}
        self.samples = 0
        self.matrices: list[np.ndarray | None] = []
        self.stopped = 0
        self.executed: list[int] = []
        self.refused: list[dict] = []
        self.device_times: list[float] = []

    def refuse(self, upd: ClientUpdate) -> None:
        self.refused.append({"client_id": int(upd.client_id), **upd.error})
        self.per_client.append(self.record(upd))

    def count(self, upd: ClientUpdate) -> bool:
        """Tally an update that trained; False when it used no sample (nothing to aggregate)."""
        self.executed.append(int(upd.client_id))
        self.per_client.append(self.record(upd))
        self.device_times.append(float(upd.device_s))
        self.tally.add(upd.device_s, upd.energy, upd.sample_passes, upd.lookahead_passes, upd.cpu_s)
        if upd.n_samples <= 0:
            return False
        for t, v in upd.train_loss.items():
            if t in self.loss_num:
                self.loss_num[t] += v * upd.n_samples
                self.loss_den[t] += upd.n_samples
        self.samples += upd.n_samples
        self.matrices.append(upd.affinity)
        self.stopped += upd.stopped_by is not None
        return True

    def train_loss(self) -> dict[str, float]:
        return {t: v / max(self.loss_den[t], 1) for t, v in self.loss_num.items() if self.loss_den[t] or not self.samples}

    def critical_path(self, sequential: bool) -> float:
        """Sequential: every execution's seconds one after another; parallel: the slowest one's."""
        return float(sum(self.device_times)) if sequential else max(self.device_times, default=0.0)

    def detail(self) -> str:
        return "; ".join(sorted({e.get("message", "") for e in self.refused} - {""}))


class Coordinator:
    """Runs jobs and whole methods over a :class:`ClientPool`; a method's :class:`~fmtl_edge.strategy.Strategy`
    decides who trains in a round and how the replies combine, the coordinator does the rest.

    Args:
        pool: where clients execute.
        spec: model architecture.
        tasks: the dataset's task set.
        train: local-training hyper-parameters.
        clients_per_round: K, clients sampled (without replacement) per round (per task group
            with ``per-group`` sampling).
        seed: run seed; client sampling of job ``j`` round ``r`` uses ``derive_seed(seed, j, r)``.
        on_round: optional callback ``(RoundRecord) -> None`` (progress bars, logs).
        affinity_rounds: which rounds of an affinity-measuring job are averaged (None: all).
        time_budget_s, energy_budget_j: per-round budgets sent with every assignment.
        on_round_end: optional ``(RoundCheckpoint) -> None`` called after every round (persistence).
        min_updates: fewest usable updates a round may aggregate; fewer raise :class:`RoundFailed`.
        loss_weights: task → w_t of the clients' objective Σ_t w_t·L_t (None: every w_t = 1).
        energy_policy: an :class:`~fmtl_edge.energy_policy.EnergyPolicy`: who trains (through the
            strategy's ``RoundContext.select``) and each client's power mode, from the seed and the
            finished rounds' per-client records (None: uniform sampling, devices as they are).

    Raises:
        ValueError: K < 1 or min_updates outside 1..K.
    """

    def __init__(self, pool: ClientPool, spec: ModelSpec, tasks: TaskSet, train: TrainConfig,
                 clients_per_round: int, seed: int = 0,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 affinity_rounds: Sequence[int] | None = None,
                 time_budget_s: float | None = None, energy_budget_j: float | None = None,
                 on_round_end: Callable[[RoundCheckpoint], None] | None = None, min_updates: int = 1,
                 loss_weights: Mapping[str, float] | None = None, energy_policy=None):
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not 1 <= min_updates <= clients_per_round:
            raise ValueError(f"min_updates must be in 1..{clients_per_round} (K), got {min_updates}")
        self.pool = pool
        self.spec = spec
        self.tasks = tasks
        self.train = train
        self.k = clients_per_round
        self.seed = seed
        self.on_round = on_round
        self.affinity_rounds = affinity_rounds
        self.time_budget_s = time_budget_s
        self.energy_budget_j = energy_budget_j
        self.on_round_end = on_round_end
        self.min_updates = min_updates
        #: task → w_t of the clients' objective (``--loss-weights``), sent with every assignment
        self.loss_weights = dict(loss_weights or {})
        #: the run's :class:`~fmtl_edge.energy_policy.EnergyPolicy` (selection, power modes), or None
        self.energy_policy = energy_policy
        #: the per-client records of the method's finished jobs (the energy policy's history)
        self.prior_records: list = []
        self._modes: dict[int, str | None] = {}
        #: prefix of the client-state keys (the method's name while :meth:`run_method` runs)
        self.namespace = ""

    # -- one job ---------------------------------------------------------------------------------
    def initial_state(self, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """Fresh weights for a model with ``tasks``' heads; the backbone init is the same for every
        job and method of a run (seeded by the run seed), so methods start from the same θ_s."""
        model = MultiTaskModel(self.spec, self.tasks.subset(tasks), seed=derive_seed(self.seed, "init"))
        return state_to_numpy(model.state_dict())

    def client_record(self, upd: ClientUpdate) -> dict:
        """One client execution as the round's ``per_client`` history keeps it (its device, power
        mode, samples, sample-passes, seconds, joules, train loss: what the energy policy reads)."""
        from fmtl_edge.selection import ClientRecord

        device = self.energy_policy.device(upd.client_id) if self.energy_policy is not None else f"client-{upd.client_id}"
        return ClientRecord.from_update(upd, device).to_dict()

    def _selector(self, history: Sequence[RoundRecord]):
        """``RoundContext.select`` of a round: the energy policy over the method's finished rounds,
        or None (the strategy's uniform draw) when the policy is not selecting."""
        policy = self.energy_policy
        if policy is None or policy.selection == "uniform" and policy.fleet is None:
            return None
        from fmtl_edge.selection import ClientRecord

        past = list(self.prior_records) + [ClientRecord.from_dict(d) for rec in history for d in rec.per_client]

        def select(eligible: Sequence[int], k: int, seed_parts: Sequence[Any]) -> list[int]:
            return policy.select(eligible, k, seed_parts, past).clients

        return select

    def state_key(self, job: Job) -> str:
        """The client-state key of ``job``: ``<method>/<job>``."""
        return f"{self.namespace}/{job.name}" if self.namespace else job.name

    def layout(self, job: Job, state: Mapping[str, np.ndarray]) -> ParameterLayout:
        """The slice layout of ``job``'s model with the job's scope overrides.

        Raises:
            ValueError: a tensor matches two kinds of pattern.
        """
        return ParameterLayout.from_state(state, frozen=job.frozen, personal=job.personal, common=job.common)

    def assignment(self, job: Job, r: int, task: ClientTask, state: Mapping[str, np.ndarray], lr: float,
                   layout: ParameterLayout, cid: int = -1) -> Assignment:
        """The assignment of one client in round ``r`` (what the strategy chose + the job's settings)."""
        return Assignment(job=job.name, round=r, tasks=tuple(job.tasks), state=state, lr=lr, config=self.train,
                          measure_affinity=job.measure_affinity, seed=self.seed, time_budget_s=self.time_budget_s,
                          energy_budget_j=self.energy_budget_j, procedure=task.procedure,
                          method_config=dict(task.method_config), state_key=self.state_key(job),
                          personal=layout.names_in(PERSONAL), frozen=layout.names_in(FROZEN),
                          loss_weights={t: self.loss_weights[t] for t in job.tasks if t in self.loss_weights},
                          power_mode=self._modes.get(int(cid)))

    def run_job(self, job: Job, init_state: Mapping[str, np.ndarray] | None = None,
                resume: RoundCheckpoint | None = None, strategy: Strategy | None = None) -> JobOutcome:
        """Train ``job`` for ``job.rounds`` rounds from ``init_state`` (fresh init if None), or
        continue it after the completed round of ``resume`` (``init_state`` is then ignored).

        Args:
            strategy: who trains and how updates combine (default: FedAvg over K uniformly sampled
                clients running ``job.procedure``).

        Raises:
            RoundFailed: a round ended with fewer than ``min_updates`` usable updates, or its
                aggregate was not finite (nothing of that round is applied).
            ValueError: the pool cannot serve the job's sampling.
        """
        strategy = strategy or FedAvgStrategy(job.procedure, job.method_config, job.sampling)
        t_job = time.perf_counter()
        start = 0
        if resume is not None:
            if resume.job.name != job.name:
                raise ValueError(f"checkpoint of job {resume.job.name!r} cannot resume job {job.name!r}")
            state = dict(resume.state)
            start = resume.round + 1
            t_job -= resume.wall_s
        else:
            state = dict(init_state) if init_state is not None else self.initial_state(job.tasks)
        layout = self.layout(job, state)
        # A pool may supply the global vector's buffer (the gRPC pool: a file-backed mapping whose pages
        # it drops from RAM once the round's model file is written); the in-process pool does not.
        global_vec = layout.flatten(state, out=self.pool.global_vector_buffer(layout.n_params))
        # From here the float entries of ``state`` are views into ``global_vec`` (one copy of the model).
        state = {**state, **layout.unflatten(global_vec)}
        averager = AffinityAverager(len(job.tasks), self.affinity_rounds)
        tally = EnergyTally()
        history: list[RoundRecord] = []
        if resume is not None:
            averager.per_round.update({int(r): np.asarray(m, dtype=np.float64) for r, m in resume.affinity_per_round.items()})
            tally = resume.energy.copy()
            history = list(resume.history)
        for r in range(start, job.rounds):
            t_round = time.perf_counter()
            plan = strategy.configure_train(RoundContext(job, r, self.seed, self.k, self.pool.eligible,
                                                         self._selector(history)))
            policy = self.energy_policy
            self._modes = policy.power_modes([c for c, _ in plan]) if policy is not None else {}
            lr = job.lr(self.train.lr, r)
            totals = _RoundTotals(job.tasks, self.client_record)
            sequential = strategy.is_sequential_round(r)
            if sequential:
                global_vec = self._sequential_round(job, r, plan, lr, layout, state, global_vec, strategy, totals)
            else:
                global_vec = self._parallel_round(job, r, plan, lr, layout, state, global_vec, strategy, totals)
            state = {**state, **layout.unflatten(global_vec)}
            if job.measure_affinity:
                averager.add_round(r, totals.matrices)
            totals.tally.critical_path_s = totals.critical_path(sequential)
            tally.merge(totals.tally)
            rec = RoundRecord(job.name, r, [c for c, _ in plan], lr, totals.train_loss(), totals.samples,
                              totals.tally.device_s, totals.tally.total_j, time.perf_counter() - t_round,
                              totals.stopped, totals.executed, totals.refused, totals.tally.critical_path_s,
                              totals.tally.sample_passes, totals.tally.lookahead_passes, totals.tally.cpu_s,
                              totals.per_client)
            history.append(rec)
            if self.on_round:
                self.on_round(rec)
            if self.on_round_end:
                self.on_round_end(RoundCheckpoint(job, r, state, dict(averager.per_round), tally.copy(),
                                                  list(history), time.perf_counter() - t_job))
        final = {**state, **{k: v.copy() for k, v in layout.unflatten(global_vec).items()}}
        return JobOutcome(job, final, averager.result(), dict(averager.per_round), tally, history,
                          time.perf_counter() - t_job)

    def _parallel_round(self, job, r, plan, lr, layout, state, global_vec, strategy, totals) -> np.ndarray:
        """Every client of ``plan`` starts from the round's global model; the strategy's aggregation
        combines the updates in place (the server holds the global vector, the accumulator and one
        update: 3·P for FedAvg). A round whose plan is empty (every device's energy budget spent)
        leaves the model as it is."""
        if not plan:
            return global_vec
        work = [(cid, self.assignment(job, r, task, state, lr, layout, cid)) for cid, task in plan]
        agg = strategy.round_aggregation(r, layout.n_params, layout.table)
        scratch: list[np.ndarray] = []
        for upd in self.pool.execute_many(work):
            if upd.error is not None:
                totals.refuse(upd)
                continue
            if not totals.count(upd):
                continue
            agg.add(_update_vector(layout, upd.state, scratch), float(upd.n_samples), layout.contributes(upd.tasks))
        upd = None  # release the last update (a mapped upload) before the result is formed
        scratch.clear()
        if agg.n_added < self.min_updates:
            raise RoundFailed(job.name, r, agg.n_added, self.min_updates, totals.detail())
        try:
            return agg.result(global_vec)
        except ValueError as e:  # not finite: nothing is applied, the round fails (never the server)
            raise RoundFailed(job.name, r, 0, self.min_updates, f"aggregation failed: {e}") from None

    def _sequential_round(self, job, r, plan, lr, layout, state, global_vec, strategy, totals) -> np.ndarray:
        """The clients of ``plan`` one after another (a ring): each starts from the model the last
        successful one left; a client that fails or refuses is skipped with the last good model."""
        stepped = 0
        scratch: list[np.ndarray] = []
        # a pool that can hand a failed slot to another device (the gRPC pool) must not here: the
        # node is the client, and the ring skips it instead (ClientPool.execute_in_turn)
        for cid, task in plan:
            a = self.assignment(job, r, task, {**state, **layout.unflatten(global_vec)}, lr, layout, cid)
            for upd in self.pool.execute_in_turn(cid, a):
                if upd.error is not None:
                    totals.refuse(upd)
                    continue
                if not totals.count(upd):
                    continue
                agg = strategy.round_aggregation(r, layout.n_params, layout.table)
                agg.add(_update_vector(layout, upd.state, scratch), float(upd.n_samples), layout.contributes(upd.tasks))
                try:
                    global_vec = agg.result(global_vec)
                except ValueError as e:
                    raise RoundFailed(job.name, r, stepped, self.min_updates, f"step of client {cid} failed: {e}") from None
                stepped += 1
        if stepped < min(self.min_updates, max(len(plan), 1)):
            raise RoundFailed(job.name, r, stepped, self.min_updates, totals.detail())
        return global_vec

    def outcome_from_checkpoint(self, ckpt: RoundCheckpoint) -> JobOutcome:
        """The :class:`JobOutcome` of a job whose last round is ``ckpt`` (a finished job restored
        from persistence): the same affinity average as :meth:`run_job` would have returned."""
        if not ckpt.job_done:
            raise ValueError(f"job {ckpt.job.name!r} checkpoint is at round {ckpt.round}, not its last")
        averager = AffinityAverager(len(ckpt.job.tasks), self.affinity_rounds)
        averager.per_round.update({int(r): np.asarray(m, dtype=np.float64) for r, m in ckpt.affinity_per_round.items()})
        return JobOutcome(ckpt.job, dict(ckpt.state), averager.result(), dict(averager.per_round), ckpt.energy.copy(),
                          list(ckpt.history), ckpt.wall_s)

    # -- a whole method --------------------------------------------------------------------------
    def run_method(self, method, done: Mapping[str, JobOutcome] | None = None,
                   resume: RoundCheckpoint | None = None) -> dict[str, JobOutcome]:
        """Run ``method``'s plan to the end: ask it for the next jobs until it has none; each job runs
        with the method's strategy for it (:meth:`~fmtl_edge.methods.Method.strategy`).

        Args:
            done: jobs already finished (a resumed plan); the method decides what follows from them.
            resume: checkpoint of the job that was running; it must be the plan's next job.

        Returns:
            job name → :class:`JobOutcome`, in execution order.
        """
        done = dict(done or {})
        self.namespace = method.name
        while True:
            pending = [j for j in method.next_jobs(done) if j.name not in done]
            if not pending:
                return done
            job = pending[0]
            strategy = method.strategy(job)
            if self.energy_policy is not None:
                from fmtl_edge.selection import ClientRecord

                self.prior_records = [ClientRecord.from_dict(d) for o in done.values() for rec in o.history
                                      for d in rec.per_client]
            if resume is not None:
                if resume.job.name != job.name:
                    raise RuntimeError(
                        f"the plan's next job is {job.name!r} but the checkpoint is of job {resume.job.name!r}"
                    )
                done[job.name] = self.run_job(job, resume=resume, strategy=strategy)
                resume = None
                continue
            if job.init_from is not None:
                if job.init_from not in done:
                    raise RuntimeError(f"job {job.name!r} starts from {job.init_from!r}, which has not run")
                init = select_state(done[job.init_from].state, job.tasks)
            else:
                init = self.initial_state(job.tasks)
            done[job.name] = self.run_job(job, method.initial_state(job, init), strategy=strategy)


def _update_vector(layout: ParameterLayout, state: Mapping[str, Any], scratch: list[np.ndarray]) -> np.ndarray:
    """The update as a flat float32 vector in ``layout`` order: the state's own flat view when it
    offers one (``as_flat``), else a copy into a scratch vector allocated once per round. Slices the
    update does not carry (personal, frozen) are left as they are: they are never contributed."""
    as_flat = getattr(state, "as_flat", None)
    if as_flat is not None:
        vec = as_flat(layout)
        if vec is not None:
            return vec
    if not scratch:
        scratch.append(np.zeros(layout.n_params, dtype=np.float32))
    return layout.flatten(state, out=scratch[0], only_present=True)
