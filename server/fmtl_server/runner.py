"""``fmtl-server serve``: the gRPC service, the job's devices and store, and the method runner over them.

One process: the gRPC server answers the agents on a thread pool while the main thread runs the job
with the method runner (:func:`fmtl_edge.runner.run_methods`) over a
:class:`~fmtl_edge.transport.pool.RemoteClientPool` — the runner of ``fmtl-edge simulate``; only the
pool and the checkpoint store (:class:`fmtl_server.store.MethodCheckpoints`) differ. After each
method the final per-task models are evaluated on the devices' test splits (each device returns loss
and metric sums, the server adds them up: the simulation's union-of-clients evaluation) and the
method's entry is stored; at the end ``results.json`` and the per-task models are written in the
simulation's layout, with this server's job, devices and counters under ``engine``.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmtl_edge.config import ConfigError
from fmtl_edge.plan import RoundCheckpoint, RoundFailed, RoundRecord
from fmtl_edge.results import results_document
from fmtl_edge.runner import RetryPolicy, RunHooks, RunSettings, prepare_methods, run_methods
from fmtl_edge.tasks import TaskSet
from fmtl_edge.transport.convert import task_from_pb, task_signature
from fmtl_edge.transport.pool import Device, PoolClosed, RegistrationRefused, RemoteClientPool, RoundPolicy
from fmtl_edge.transport.service import CoordinatorServicer, TLSConfig, start_server

from fmtl_server.auth import TokenError, TokenFile
from fmtl_server.config import JobConfig, ServerConfig
from fmtl_server.progress import Progress
from fmtl_server.store import MethodCheckpoints, StateMismatch, Store

log = logging.getLogger("fmtl_server")

#: DataInfo fields that must agree with the job's partition settings
_PARTITION = (("n_clients", "clients"), ("seed", "seed"), ("max_samples", "max_samples"), ("alpha", "alpha"),
              ("image_size", "image_size"))


class Stopped(Exception):
    """The server was asked to stop (signal) while waiting."""


class JobServer:
    """Runs one job (``[job]``) with the service settings (``[server]``)."""

    def __init__(self, srv: ServerConfig, job: JobConfig, echo=None):
        self.srv = srv
        self.job = job
        self.stop = threading.Event()
        self.echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
        self.store: Store | None = None
        self.pool: RemoteClientPool | None = None
        self.server = None
        self.port: int | None = None
        self.tasks: TaskSet | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._signature: str | None = None
        self._dataset_info: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.phase = "starting"
        self.current: dict[str, Any] = {}
        self.progress: Progress | None = None
        self._method = ""          # the method training now
        self._job_seen = ("", "")   # (method, job) of the last round started

    def say(self, msg: str) -> None:
        self.echo(f"{time.strftime('%H:%M:%S')} [fmtl-server] {msg}")

    # -- registration policy --------------------------------------------------------------------------
    def validate_registration(self, d: Device) -> None:
        """Refuse a device whose data cannot serve this job (wrong dataset, partition or tasks)."""
        sim = self.job.sim
        data = d.data
        if data.get("dataset", "") != sim.dataset:
            raise RegistrationRefused("FAILED_PRECONDITION",
                                      f"this job trains on {sim.dataset!r}, the device holds {data.get('dataset')!r}")
        for dk, jk in _PARTITION:
            dev_v = data.get(dk) or None
            job_v = getattr(sim, jk)
            if jk == "clients" and job_v is None:
                continue  # the dataset's default partition: the device reports it, checked across devices below
            if jk == "seed":
                dev_v, job_v = int(data.get("seed", 0)), int(sim.data_seed)
            if (dev_v or None) != (job_v or None) and not (isinstance(dev_v, (int, float)) and isinstance(job_v, (int, float))
                                                           and float(dev_v) == float(job_v)):
                key = jk.replace("_", "-") if jk != "clients" else "clients"
                raise RegistrationRefused(
                    "FAILED_PRECONDITION",
                    f"the device's partition has {jk}={dev_v}, the job uses {jk}={job_v}: "
                    f"join with --data {sim.dataset}:client={d.client_id},{key}={job_v}")
        try:
            tasks = [task_from_pb(_task_msg(t)) for t in data.get("tasks", [])]
        except ValueError as e:
            raise RegistrationRefused("INVALID_ARGUMENT", f"bad task definition: {e}") from None
        shape = tuple(int(s) for s in data.get("input_shape", []))
        if data.get("label_stats_json"):
            from fmtl_edge.loss_weights import check_label_stats

            dense = {t.name: int(np.prod(shape[1:])) * t.out_dim for t in tasks if t.kind == "dense"}
            try:
                check_label_stats(json.loads(data["label_stats_json"]), TaskSet(tasks), d.n_train, dense)
            except (ValueError, json.JSONDecodeError) as e:
                raise RegistrationRefused("INVALID_ARGUMENT", f"bad label statistics: {e}") from None
        sig = task_signature(tasks, shape)
        with self._lock:
            if self._signature is None:
                stored = self.store.get("task_signature") if self.store else None
                if stored is not None and stored != sig:
                    raise RegistrationRefused("FAILED_PRECONDITION", "the device's tasks or input shape differ from "
                                              "those this job started with")
                names = [t.name for t in tasks]
                if self.job.tasks:
                    missing = [t for t in self.job.tasks if t not in names]
                    if missing:
                        raise RegistrationRefused("FAILED_PRECONDITION", f"the device's data lack tasks {missing}")
                self._adopt(tasks, shape, sig, data)
            elif sig != self._signature:
                raise RegistrationRefused("FAILED_PRECONDITION",
                                          "the device's tasks or input shape differ from the other devices'")
            n_known = self.store.get("n_clients") if self.store else None
            if n_known is not None and data.get("n_clients") and int(data["n_clients"]) != int(n_known):
                raise RegistrationRefused("FAILED_PRECONDITION",
                                          f"the device's partition has {data['n_clients']} clients, the others {n_known}")
            if not 0 <= d.client_id < int(data.get("n_clients") or 1 << 30):
                raise RegistrationRefused("INVALID_ARGUMENT", f"client id {d.client_id} is outside the partition")

    def _adopt(self, tasks, shape, sig, data) -> None:
        all_tasks = TaskSet(tasks)
        self.tasks = all_tasks.subset(self.job.tasks) if self.job.tasks else all_tasks
        self.input_shape = shape
        self._signature = sig
        try:
            self._dataset_info = json.loads(data.get("info_json") or "{}")
        except json.JSONDecodeError:
            self._dataset_info = {}
        if self.store is not None:
            self.store.put("task_signature", sig)
            self.store.put("tasks", [[t.name, t.kind, t.out_dim, t.target_mean, t.target_std, t.units, t.description]
                                     for t in tasks])
            self.store.put("input_shape", list(shape))
            self.store.put("dataset_info", self._dataset_info)
            if data.get("n_clients"):
                self.store.put("n_clients", int(data["n_clients"]))
        if self.pool is not None:
            self.pool.model_info = self.job.sim.model_spec(shape).to_dict()
            self.pool.task_kinds = {t.name: t.kind for t in tasks}

    def _restore_tasks(self) -> None:
        from fmtl_edge.tasks import Task

        rows = self.store.get("tasks")
        if rows is None:
            return
        tasks = [Task(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), r[5], r[6]) for r in rows]
        shape = tuple(self.store.get("input_shape"))
        all_tasks = TaskSet(tasks)
        self.tasks = all_tasks.subset(self.job.tasks) if self.job.tasks else all_tasks
        self.input_shape = shape
        self._signature = self.store.get("task_signature")
        self._dataset_info = self.store.get("dataset_info", {})
        self.pool.model_info = self.job.sim.model_spec(shape).to_dict()
        self.pool.task_kinds = {t.name: t.kind for t in tasks}

    # -- status -----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = self.store.status()
        st["phase"] = self.phase
        st["current"] = dict(self.current)
        live = self.pool.status()
        st["devices"] = live["devices"]
        st["counters"] = live["counters"]
        st["round"] = live["round"]
        st["refusals"] = live.get("refusals", {})
        st["refused_calls"] = self.servicer.refused if getattr(self, "servicer", None) else 0
        st["listen"] = f"{self.srv.listen} (port {self.port})"
        return st

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._record("phase", phase)

    def _record(self, key: str, value: Any, event: bool = False) -> None:
        """A meta value (or an event) in the store; a full disk is logged, never raised (the round's
        own writes say what failed)."""
        try:
            if event:
                self.store.event(key, value)
            else:
                self.store.put(key, value)
        except (sqlite3.Error, OSError) as e:
            log.warning("could not record %s in the job state: %s", key, e)

    # -- serve --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the state, start the gRPC service (raises ConfigError/RuntimeError on bad setup)."""
        srv = self.srv
        try:
            tokens = TokenFile(srv.tokens)
        except FileNotFoundError:
            raise ConfigError("--tokens", f"no tokens file {srv.tokens!r}; create one with "
                              f"`fmtl-server token add DEVICE --tokens {srv.tokens}`") from None
        except TokenError as e:  # fail closed at start too: say which line
            raise ConfigError("--tokens", f"{e}; fix or delete that line") from None
        self.store = Store(srv.state_dir)
        try:
            resumed = self.store.claim(self.job.fingerprint(), self.job.name)
        except StateMismatch as e:
            raise ConfigError("--state-dir", str(e)) from None
        self.store.put("methods", list(self.job.sim.methods))
        policy = RoundPolicy(deadline_s=self.job.round_deadline_s, min_updates=self.job.min_updates,
                             max_attempts=self.job.max_attempts, dispatch_wait_s=self.job.dispatch_wait_s,
                             deadline_retries=self.job.deadline_retries, heartbeat_timeout_s=srv.heartbeat_timeout_s,
                             eval_timeout_s=self.job.eval_timeout_s)
        self.pool = RemoteClientPool(Path(srv.state_dir) / "work", policy, seed=self.job.sim.seed,
                                     max_update_bytes=srv.max_update_bytes, chunk_bytes=srv.chunk_bytes,
                                     validate_registration=self.validate_registration,
                                     on_device_change=self.store.save_device,
                                     max_update_norm_ratio=self.job.max_update_norm_ratio,
                                     max_client_samples=self.job.max_client_samples,
                                     on_round_start=self._on_round_start,
                                     max_samples_ratio=self.job.max_samples_ratio or None,
                                     max_update_norm_multiple=self.job.max_update_norm_multiple or None)
        self.pool.load_registry(self.store.devices())
        self._restore_tasks()
        self.servicer = CoordinatorServicer(self.pool, tokens, srv.heartbeat_interval_s, status=self.status,
                                            upload_first_chunk_s=srv.upload_first_chunk_s, upload_idle_s=srv.upload_idle_s,
                                            max_call_s=srv.max_call_s,
                                            max_streams_per_device=int(srv.max_streams_per_device),
                                            max_idle_streams=int(srv.max_idle_streams))
        tls = None if srv.insecure else TLSConfig(srv.tls_cert, srv.tls_key, srv.client_ca)
        self.server, self.port = start_server(self.servicer, srv.listen, tls, srv.max_workers)
        if srv.insecure:
            self.say("WARNING: --insecure: no TLS; bearer tokens and models travel in plaintext. "
                     "Use only on a trusted network or for tests.")
        self.say(f"listening on {srv.listen} (port {self.port}), "
                 f"{'TLS' + (' + client certificates' if srv.client_ca else '') if not srv.insecure else 'plaintext'}, "
                 f"{len(tokens)} tokens; state {srv.state_dir}" + (" (resuming)" if resumed else ""))

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.server is not None:
            self.server.stop(grace=2).wait(5)
        if self.store is not None:
            self.store.close()

    def run(self) -> int:
        """The whole job; returns the exit status."""
        job, sim = self.job, self.job.sim
        done_flag = self.store.get("results_path")
        if done_flag and self.store.get("phase") == "complete":
            self.say(f"job {job.name!r} is already complete: {done_flag}")
            return 0
        need = job.devices_needed
        known = [d.client_id for d in self.pool.devices()]
        self._set_phase("waiting for devices")
        if known and len(known) >= need:
            # a resumed job: give every device it knew time to come back, so rounds go where they went
            self.say(f"waiting for the {len(known)} known devices to reconnect "
                     f"(up to {max(30.0, 3 * self.srv.heartbeat_timeout_s):.0f} s)")
            self.pool.wait_for_devices(len(known), max(30.0, 3 * self.srv.heartbeat_timeout_s), self.stop, clients=known)
        self.say(f"waiting for {need} devices to join (job {job.name!r}: {sim.dataset}, methods {', '.join(sim.methods)}, "
                 f"K={sim.clients_per_round}, R={sim.rounds})")
        if not self.pool.wait_for_devices(need, job.start_timeout_s, self.stop):
            if self.stop.is_set():
                raise Stopped()
            self.say(f"only {self.pool.online_count()} of {need} devices joined within {job.start_timeout_s} s")
            return 4
        self.say(f"{self.pool.online_count()} devices online: starting")
        spec = sim.model_spec(self.input_shape)
        n_clients = len(self.pool.client_ids)
        if sim.clients_per_round > n_clients:
            self.say(f"K={sim.clients_per_round} but only {n_clients} clients joined")
            return 4
        methods = prepare_methods(sim, self.tasks, spec, self.pool.eligible, pooled=False)
        results = results_document(
            dataset=sim.dataset, dataset_info=self._dataset_info, tasks=self.tasks,
            clients=int(self.store.get("n_clients") or n_clients), config=sim.to_dict(), device=self._device_summary(),
            engine={"name": "fmtl-server"},
            # the simulation's injected --dropout does not apply: devices fail for real (history.refused)
            dropout=None)
        if not job.evaluate:
            self.say("evaluation skipped ([job] evaluate = false): test losses are null")
        results, models = self.train(methods, spec, results)
        self._write_results(results, models, spec)
        # the agents' next poll says so (not a lost connection); the server stops after this
        self.pool.close(f"job {job.name!r} is complete ({self.store.get('results_path')})", job_complete=True)
        return 0

    def train(self, methods, spec, results: dict[str, Any]):
        """Run ``methods`` over the devices with the method runner: this job's budgets,
        ``min_updates``, evaluation and round retries, every round committed to the store, progress
        in the log; returns the runner's ``(results, models)``."""
        from fmtl_edge.runner import model_key

        sim, job = self.job.sim, self.job
        self._model_key = model_key(spec)
        self.progress = Progress(sum(m.planned_rounds() for m in methods))
        hooks = RunHooks(on_method_start=self._on_method_start, on_round=self._on_round, on_round_end=self._on_round_end,
                         on_evaluate=self._on_evaluate, on_method_end=self._on_method_end,
                         on_method_resume=self._on_method_resume)
        settings = RunSettings(time_budget_s=sim.time_budget_s, energy_budget_j=sim.energy_budget_j,
                               min_updates=job.min_updates, evaluate=job.evaluate,
                               retry=RetryPolicy(job.max_round_retries, self._retry_wait))
        return run_methods(sim, methods, self.pool, spec, results, hooks=hooks, settings=settings,
                           store=MethodCheckpoints(self.store, [m.name for m in methods]))

    # -- the runner's hooks ---------------------------------------------------------------------------
    def _on_method_start(self, method) -> None:
        self._method = method.name
        self._set_phase(f"training {method.name}" + (f": {self.progress.text()}" if self.progress else ""))

    def _on_method_resume(self, method, rounds_done: int, entry) -> None:
        if self.progress is not None:
            self.progress.resumed(method.name, rounds_done)
        if entry is not None:
            self.say(f"{method.name}: already finished")
        else:
            self.say(f"{method.name}: resuming after {rounds_done} completed rounds")

    def _on_round(self, method, rec: RoundRecord) -> None:
        loss = sum(rec.train_loss.values())
        rep = "" if sorted(rec.executed) == sorted(rec.clients) else f" (ran on {sorted(rec.executed)})"
        if rec.refused:
            rep += f", {len(rec.refused)} slot(s) without update: " + "; ".join(m.get("message", "?") for m in rec.refused)
        energy = "—" if rec.energy_j is None else f"{rec.energy_j:.1f} J"
        overall = "" if self.progress is None else f"; overall {self.progress.text(pending=1)}"
        self.say(f"{method.name} {rec.job} round {rec.round + 1}: clients {rec.clients}{rep}, train loss {loss:.4f}, "
                 f"{rec.samples} samples, device {rec.device_s:.2f} s, {energy}, wall {rec.wall_s:.2f} s{overall}")

    def _on_round_start(self, job: str, rnd: int, tasks, clients) -> None:
        """The pool starts a round: name a job's tasks when it starts (a MAS split: its group)."""
        if (self._method, job) == self._job_seen:
            return
        self._job_seen = (self._method, job)
        when = "starts" if rnd == 0 else f"resumes at round {rnd + 1}"
        self.say(f"{self._method} {job} {when}: tasks {', '.join(tasks)}")

    def _learn_energy(self, ck: RoundCheckpoint) -> None:
        """The devices' energy profiles (J and s per sample-pass per device, power mode and model,
        metered apart from estimated), grown by the round's executions and kept in the store: they
        survive restarts and ``fmtl-server status`` shows them."""
        from fmtl_edge.energy_profile import EnergyProfiles

        if not ck.history:
            return
        raw = self.store.get("energy_profiles")
        profiles = EnergyProfiles.from_dict(raw) if raw else EnergyProfiles()
        model = self._model_key
        for c in ck.history[-1].per_client:
            if c.get("sample_passes"):
                profiles.observe(c["device"], c.get("mode"), model, int(c["sample_passes"]), float(c["device_s"]),
                                 c.get("energy_j"), str(c.get("source") or ""), bool(c.get("estimated")))
        self._record("energy_profiles", profiles.to_dict())

    def _on_round_end(self, method, ck: RoundCheckpoint) -> None:
        ri = self.pool.round_info
        fmt = lambda v: "—" if v is None else f"{v:.2f} s"  # noqa: E731
        log.info(f"timing of {ck.job.name} round {ck.round + 1}: model file {fmt(ri.get('model_write_s'))}, "
                 f"first update {fmt(ri.get('first_update_s'))}, last update {fmt(ri.get('last_update_s'))}, "
                 f"validation {fmt(ri.get('validate_s'))} (sum), aggregation {fmt(ri.get('consumer_s'))}")
        self.current = {"method": method.name, "job": ck.job.name, "rounds_done": ck.round + 1, "rounds": ck.job.rounds}
        self._learn_energy(ck)
        if self.progress is not None:  # the round is committed: it counts
            self.progress.round_done(method.name)
            self._record("progress", self.progress.as_dict())
            self._set_phase(f"training {method.name}: {self.progress.text()}")

    def _retry_wait(self, failures: int, e: RoundFailed) -> None:
        self._record("round_failed", str(e), event=True)
        retry = (f"retrying from the last checkpoint in {self.job.retry_wait_s:.0f} s "
                 f"({failures}/{self.job.max_round_retries})")
        self._set_phase(f"round failed: {e}; {retry}")
        self.say(f"{e}; {retry}")
        if self.stop.wait(self.job.retry_wait_s):
            raise Stopped()

    def _on_evaluate(self, method) -> None:
        self._set_phase(f"evaluating {method.name}")

    def _on_method_end(self, method, entry: dict[str, Any]) -> None:
        from fmtl_edge.report import loss_summary

        ev = entry["evaluation"]
        if ev["missing"]:
            self.say(f"evaluation: clients {ev['missing']} did not answer; test losses are over clients {ev['clients']}")
        self.say(f"{method.name}: {loss_summary(entry)}, splits {entry['splits']}, device {entry['device_s']:.1f} s")

    def _device_summary(self) -> dict[str, Any]:
        """The simulation's ``device`` entry, summarised over the devices (details: ``engine.devices``)."""
        infos = [d.info for d in self.pool.devices()]

        def join(key: str) -> str:
            return ", ".join(sorted({str(i.get(key) or "?") for i in infos})) or "?"

        budgets = [int(i["memory_budget_bytes"]) for i in infos if i.get("memory_budget_bytes")]
        return {"profile": join("profile_name"), "profile_source": "agents", "device_class": join("device_class"),
                "meter": join("meter"), "memory_budget_bytes": min(budgets) if budgets else None,
                "threads": "per agent (fmtl-edge join --threads)"}

    def _write_results(self, results: dict[str, Any], models, spec) -> None:
        from fmtl_edge.report import write_outputs

        results["engine"].update({
            "job": self.job.to_dict(),
            "server": {"listen": self.srv.listen, "tls": not self.srv.insecure, "client_certificates": bool(self.srv.client_ca)},
            "devices": [d.to_status(time.monotonic(), self.srv.heartbeat_timeout_s) for d in self.pool.devices()],
            "counters": dict(self.pool.counters)})
        out = write_outputs(self.srv.out, results, models, self.tasks, spec)
        self.store.put("results_path", str(out / "results.json"))
        self._set_phase("complete")
        self.say(f"job {self.job.name!r} complete: {out / 'results.json'}")


def _task_msg(d: dict[str, Any]):
    from fmtl_edge.transport import fmtl_edge_pb2 as pb

    return pb.TaskSpec(name=d.get("name", ""), kind=d.get("kind", ""), out_dim=int(d.get("out_dim", 1)),
                       target_mean=float(d.get("target_mean", 0.0)), target_std=float(d.get("target_std", 1.0)),
                       units=d.get("units", ""), description=d.get("description", ""))


def serve(srv: ServerConfig, job: JobConfig) -> int:
    """Start, run the job to the end, stop. Exit status 0 when the job is complete."""
    js = JobServer(srv, job)
    js.start()

    def _stop(signum, frame):
        js.say(f"signal {signum}: stopping (state is kept; run the same command to resume)")
        js.stop.set()
        if js.pool is not None:
            js.pool.close(f"the server is stopping (signal {signum}); it resumes the job when started again")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return js.run()
    except (Stopped, PoolClosed):
        return 130
    except RoundFailed as e:
        js.say(f"giving up: {e}")
        return 5
    finally:
        js.shutdown()
