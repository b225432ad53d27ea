"""A run's energy policy: which clients train and in which power mode, decided from joules.

:class:`EnergyPolicy` binds the pure policies of :mod:`fmtl_edge.selection` (``--selection
uniform|energy|utility``, ``--power-mode keep|max|auto``, per-device budgets) to one run: it knows
which device each client runs on and its power modes (a simulated ``--fleet``, or the devices the
pool describes), predicts a client's round from that (the fleet model, or the per-device
:class:`~fmtl_edge.energy_profile.EnergyProfiles` learned from the metered history), and reads the
finished history — every round's per-client records, which the checkpoints carry — so a resumed
run selects exactly what the first attempt selected.

The coordinator asks it once per round (:meth:`select` through the strategy's
``RoundContext.sample``, then :meth:`power_modes`); every client execution's energy record is
observed into the profiles (:meth:`observe`), which results report per device and mode.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from fmtl_edge.energy_profile import EnergyProfiles
from fmtl_edge.selection import (POLICIES, POWER_MODE_POLICIES, BudgetLedger, ClientRecord, DeviceModes, Selection,
                                 choose_power_modes, passes_per_device, select_clients)


class EnergyPolicy:
    """Selection and power modes for one run (see the module docstring).

    Args:
        selection: ``uniform`` | ``energy`` | ``utility``.
        power_mode: ``keep`` | ``max`` | ``auto``.
        fleet: a :class:`~fmtl_edge.fleet.Fleet` (simulation: client k on device k mod N, costs
            from its model), or None (devices as the pool names them, costs from the profiles).
        device_of: client → device id when there is no fleet (default ``client-<id>``).
        modes_of: device id → its :class:`~fmtl_edge.selection.DeviceModes`, or None when the
            device does not report power modes (no fleet).
        train_sizes: client → its training samples (a round's predicted sample-passes are
            ``samples × local epochs``).
        local_epochs: E.
        model: the model key of the profiles (the architecture the run trains).
        candidates: ``--energy-candidates`` (``energy`` selection among a seeded uniform draw of
            this many clients; None: among every eligible client).

    Raises:
        ValueError: an unknown policy; ``max``/``auto`` power modes with neither a fleet nor
            devices that report their modes.
    """

    def __init__(self, selection: str = "uniform", power_mode: str = "keep", fleet=None,
                 device_of: Callable[[int], str] | None = None,
                 modes_of: Callable[[str], DeviceModes | None] | None = None,
                 train_sizes: Mapping[int, int] | None = None, local_epochs: int = 1, model: str = "",
                 candidates: int | None = None):
        if selection not in POLICIES:
            raise ValueError(f"--selection: {selection!r} is not one of {', '.join(POLICIES)}")
        if power_mode not in POWER_MODE_POLICIES:
            raise ValueError(f"--power-mode: {power_mode!r} is not one of {', '.join(POWER_MODE_POLICIES)}")
        if power_mode != "keep" and fleet is None and modes_of is None:
            raise ValueError(f"--power-mode {power_mode}: the devices' power modes are unknown; give --fleet (simulation) "
                             "or run on devices that report theirs (fmtl-edge join --allow-power-mode on a Jetson)")
        self.selection = selection
        self.power_mode = power_mode
        self.fleet = fleet
        self._device_of = device_of or (lambda c: f"client-{int(c)}")
        self._modes_of = modes_of
        self.train_sizes = {int(c): int(n) for c, n in (train_sizes or {}).items()}
        self.local_epochs = int(local_epochs)
        self.model = model
        self.candidates = candidates
        self.profiles = EnergyProfiles()

    @property
    def active(self) -> bool:
        """Whether the policy changes anything of a plain uniform run (a fleet prices the executions
        even under ``uniform``/``keep``)."""
        return self.selection != "uniform" or self.power_mode != "keep" or self.fleet is not None

    # -- devices ---------------------------------------------------------------------------------
    def device(self, client_id: int) -> str:
        """The device client ``client_id`` runs on."""
        if self.fleet is not None:
            return self.fleet.device_of(int(client_id)).name
        return self._device_of(int(client_id))

    def modes(self, device: str) -> DeviceModes | None:
        """The device's power modes (None: unknown)."""
        if self.fleet is not None:
            d = self.fleet.device(device)
            return DeviceModes(d.name, tuple(d.mode_names), d.max_mode.name)
        return self._modes_of(device) if self._modes_of is not None else None

    def passes(self, client_id: int) -> int:
        """A client's predicted sample-passes for one round (``samples × E``; 0 when unknown)."""
        return self.train_sizes.get(int(client_id), 0) * self.local_epochs

    # -- predictions -----------------------------------------------------------------------------
    def cost(self, device: str, mode: str | None, passes: int) -> tuple[float, float] | None:
        """``(device_s, energy_j)`` of ``passes`` sample-passes on ``device`` in ``mode``: the fleet
        model, else the profiles (metered first), else None."""
        if passes <= 0:
            return None
        if self.fleet is not None:
            return self.fleet.cost(self.fleet.device(device).index, mode, passes, self.model or None)
        p = self.profiles.predict(device, mode, self.model, passes)
        return None if p is None else (p.device_s, p.energy_j)

    def _mode_for_prediction(self, device: str) -> str | None:
        m = self.modes(device)
        if m is None:
            return None
        return m.max_mode if self.power_mode in ("max", "auto") else (
            self.fleet.device(device).default_mode.name if self.fleet is not None else None)

    # -- the round --------------------------------------------------------------------------------
    def select(self, eligible: Sequence[int], k: int, seed_parts: Sequence[Any],
               history: Sequence[ClientRecord]) -> Selection:
        """The round's clients (:func:`fmtl_edge.selection.select_clients`) under the run's budgets
        (a fleet's per-device J per round and per run, spent = ``history``)."""
        if self.fleet is None:  # predictions come from the profiles; a fleet's model needs none
            self._learn(history)
        ledger = BudgetLedger.from_fleet(self.fleet, history) if self.fleet is not None else None
        costs: dict[int, tuple[float, float] | None] = {}

        def cost_of(c: int) -> tuple[float, float] | None:
            if c not in costs:
                dev = self.device(c)
                costs[c] = self.cost(dev, self._mode_for_prediction(dev), self.passes(c))
            return costs[c]

        def predict(c: int) -> float | None:
            got = cost_of(c)
            return None if got is None else got[1]

        def predict_time(c: int) -> float | None:
            got = cost_of(c)
            return None if got is None else got[0]

        return select_clients(self.selection, eligible, k, seed_parts, predict_energy=predict, budget=ledger,
                              device_of=self.device, history=history, predict_time=predict_time,
                              candidates=self.candidates)

    def power_modes(self, clients: Sequence[int]) -> dict[int, str | None]:
        """client → the power mode it trains in this round (None: the device as it is)."""
        if self.power_mode == "keep":
            return {int(c): None for c in clients}
        per_device = passes_per_device(clients, self.device, self.passes)
        devices = [m for m in (self.modes(d) for d in per_device) if m is not None]
        chosen = choose_power_modes(self.power_mode, devices, per_device, self.cost)
        return {int(c): chosen.get(self.device(c)) for c in clients}

    # -- history ----------------------------------------------------------------------------------
    def record(self, upd, job: str, round_idx: int) -> ClientRecord:
        """The history record of one client execution (what :meth:`select` reads back)."""
        return ClientRecord.from_update(upd, self.device(upd.client_id)) if upd.error is None else ClientRecord(
            int(upd.client_id), job, int(round_idx), self.device(upd.client_id), 0, 0.0, None)

    def _learn(self, history: Sequence[ClientRecord]) -> None:
        """The profiles from the finished history alone (so a resumed run predicts the same)."""
        self.profiles = EnergyProfiles()
        for r in history:
            if r.sample_passes > 0 and r.energy_j is not None and math.isfinite(r.energy_j):
                self.profiles.observe(r.device, r.mode, self.model, r.sample_passes, r.device_s, r.energy_j,
                                      r.source, r.estimated)

    def audit(self, records: Sequence[ClientRecord]) -> dict[str, Any]:
        """A method's energy account from its per-client records: the per-device profiles (J and s
        per sample-pass per power mode, with their spread and count, the energy kind kept apart) and
        every budget the executions exceeded (a fleet's J per round and per run): ``{"profiles",
        "budget_violations"}`` — the latter must be empty."""
        self._learn(records)
        violations = []
        if self.fleet is not None:
            per_round: dict[tuple[str, str, int], float] = {}
            per_run: dict[str, float] = {}
            for r in records:
                if r.energy_j is None:
                    continue
                key = (r.device, r.job, r.round)
                per_round[key] = per_round.get(key, 0.0) + r.energy_j
                per_run[r.device] = per_run.get(r.device, 0.0) + r.energy_j
            for (dev, job, rnd), j in per_round.items():
                b = self.fleet.device(dev).round_energy_j
                if b is not None and j > b * (1 + 1e-9):
                    violations.append({"device": dev, "job": job, "round": rnd, "spent_j": j, "budget_j": b})
            for dev, j in per_run.items():
                b = self.fleet.device(dev).run_energy_j
                if b is not None and j > b * (1 + 1e-9):
                    violations.append({"device": dev, "spent_j": j, "budget_j": b, "per": "run"})
        return {"profiles": self.profiles.summary(), "budget_violations": violations}

    def describe(self) -> dict[str, Any]:
        """``results.json``'s ``energy_policy``."""
        return {"selection": self.selection, "power_mode": self.power_mode, "energy_candidates": self.candidates,
                "fleet": None if self.fleet is None else self.fleet.to_dict()}
