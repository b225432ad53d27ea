"""``fmtl-edge profile-modes``: a short fixed training workload under each Jetson power mode.

For every requested mode the device is switched (only with ``--allow-power-mode``), left to settle,
warmed up (unmetered), and then trains exactly ``samples`` sample-passes (forward + backward per
sample) of a small fixed model on fixed synthetic data inside one meter window. Each row gives the
mode by name, s/sample and J/sample, the meter's source and whether the energy is ``estimated``.
Without ``--allow-power-mode`` only the current mode is profiled, and the report says so. The
original mode is restored afterwards, also after Ctrl-C (:class:`~.power_modes.PowerModeGuard`).

Workloads (the same bytes and seeds every time, so rows of two modes or two devices compare):

* ``mlp`` — 561 → 256 → 256 → 6 (UCI HAR-sized feature vectors, 6 classes);
* ``conv`` — 3×64×64 images → two stride-2 3×3 convolutions (16, 32 channels) → pooling → 5
  classes (UTKFace-sized images).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .power_modes import PowerModeControl, PowerModeError

WORKLOADS = ("mlp", "conv")


@dataclass
class ModeRow:
    """One profiled mode.

    Attributes:
        mode: the power mode's name as the meter (or nvpmodel) reports it; ``unknown`` if neither does.
        samples: metered sample-passes.
        wall_s, energy_j: the window's seconds and joules (``energy_j`` None when the meter cannot tell).
        s_per_sample, j_per_sample: per sample-pass (``j_per_sample`` None with unknown energy).
        source, estimated, total_scope: the meter's (estimated energy is a model, not a measurement).
    """

    mode: str
    samples: int
    wall_s: float
    energy_j: float | None
    s_per_sample: float
    j_per_sample: float | None
    source: str
    estimated: bool
    total_scope: str
    mode_id: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModesReport:
    """What ``profile-modes`` prints (``--json``: :meth:`to_dict`)."""

    workload: str
    samples: int
    batch_size: int
    device: str
    meter: dict[str, Any]
    rows: list[ModeRow]
    original_mode: str | None
    switched: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = d.pop("rows")
        return d


def make_workload(workload: str, samples: int, batch_size: int, device: str = "cpu",
                  seed: int = 0) -> Callable[[int], int]:
    """A training closure ``run(n) -> sample-passes done``: trains a freshly seeded model of
    ``workload`` on the first ``n`` samples of a fixed synthetic set of ``samples`` items, in
    batches of ``batch_size`` (the last one partial).

    Raises:
        ValueError: unknown workload, ``samples`` or ``batch_size`` < 1.
    """
    import torch
    from torch import nn

    if workload not in WORKLOADS:
        raise ValueError(f"--workload: unknown {workload!r}; known: {', '.join(WORKLOADS)}")
    if samples < 1 or batch_size < 1:
        raise ValueError("--samples and --batch-size must be >= 1")
    g = torch.Generator().manual_seed(seed)
    if workload == "mlp":
        x = torch.randn(samples, 561, generator=g)
        y = torch.randint(0, 6, (samples,), generator=g)

        def build() -> nn.Module:
            return nn.Sequential(nn.Linear(561, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 6))
    else:
        x = torch.randn(samples, 3, 64, 64, generator=g)
        y = torch.randint(0, 5, (samples,), generator=g)

        def build() -> nn.Module:
            return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    x, y = x.to(device), y.to(device)

    def run(n: int) -> int:
        torch.manual_seed(seed)
        model = build().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        done = 0
        n = min(int(n), samples)
        while done < n:
            b = min(batch_size, n - done)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[done:done + b]), y[done:done + b])
            loss.backward()
            opt.step()
            done += b
        return done

    return run


def profile_modes(meter, control: PowerModeControl, modes: Sequence[str] | None, samples: int, *,
                  workload: str = "mlp", batch_size: int = 32, device: str = "cpu",
                  warmup_samples: int = 64, settle_s: float = 1.0,
                  log: Callable[[str], None] | None = None) -> ModesReport:
    """Profile ``modes`` (names or ids; None = every mode of ``nvpmodel.conf``) with ``meter``.

    Without ``control.allow`` (or on a machine without power modes) only the current mode is
    profiled and :attr:`ModesReport.note` says why. The original mode is restored before returning.

    Raises:
        PowerModeError: an unknown mode name; switching allowed but the machine has no power modes
            or the current mode cannot be read; a switch failed.
        ValueError: bad workload, samples or batch size.
    """
    log = log or (lambda _m: None)
    run = make_workload(workload, samples + max(0, warmup_samples), batch_size, device)
    conf = control.conf
    current = control.current()
    names: list[str] = []
    if conf is not None:
        names = [m.name for m in conf.modes] if modes is None else [control.resolve(m).name for m in modes]
    elif control.allow:
        raise PowerModeError("--allow-power-mode: this machine has no /etc/nvpmodel.conf, so no power modes to "
                             "switch; run without it to profile the machine as it is")
    note = ""
    if not control.allow or conf is None:
        here = current.name if current is not None else "unknown"
        others = [n for n in names if n != here]
        if conf is None:
            note = "this machine has no nvpmodel power modes: profiled it as it is"
        elif others:
            note = (f"profiled the current mode {here} only; switching to {', '.join(others)} needs "
                    "--allow-power-mode (and root)")
        names = []

    meter_info = {"backend": getattr(meter, "backend", "?"), "source": meter.source, "estimated": bool(meter.estimated),
                  "total_scope": meter.total_scope}

    def measure(label: str) -> ModeRow:
        if warmup_samples > 0:
            run(warmup_samples)
        with meter.window(f"profile-modes/{label}") as win:
            done = run(samples)
        m = win.measurement
        name = m.power_mode
        mode_id = None
        if name is None:
            now = control.current()
            name = now.name if now is not None else "unknown"
        if conf is not None and conf.by_name(name) is not None:
            mode_id = conf.by_name(name).id
        j = m.total_j
        return ModeRow(mode=name, samples=done, wall_s=m.wall_s, energy_j=j, s_per_sample=m.wall_s / done,
                       j_per_sample=None if j is None else j / done, source=m.source, estimated=m.estimated,
                       total_scope=m.total_scope, mode_id=mode_id, warnings=list(m.warnings))

    rows: list[ModeRow] = []
    switched = False
    if not names:
        meter.refresh_power_mode()
        rows.append(measure("current"))
    else:
        with control.guard() as g:
            for name in names:
                g.set(name)
                switched = switched or g.switched
                meter.refresh_power_mode()
                log(f"power mode {name}: settling {settle_s:g} s, then {samples} samples")
                if settle_s > 0:
                    time.sleep(settle_s)
                rows.append(measure(name))
        if g.restore_error:
            note = (note + "; " if note else "") + f"could not restore the original mode: {g.restore_error}"
    return ModesReport(workload=workload, samples=samples, batch_size=batch_size, device=device, meter=meter_info,
                       rows=rows, original_mode=current.name if current is not None else None, switched=switched,
                       note=note)


def format_report(rep: ModesReport) -> str:
    """The human-readable table of a :class:`ModesReport`."""
    m = rep.meter
    how = "ESTIMATED (a model of CPU energy, not a measurement)" if m["estimated"] else "measured"
    lines = [f"profile-modes: {rep.workload} workload, {rep.samples} sample-passes per mode, batch {rep.batch_size}, "
             f"{rep.device}; meter {m['backend']} ({m['source']}), energy {how}, scope {m['total_scope']}"]
    w = max([4] + [len(r.mode) for r in rep.rows])
    lines.append(f"  {'mode':<{w}}  {'id':>3}  {'s/sample':>11}  {'J/sample':>11}  {'energy_j':>10}  {'wall_s':>8}")
    for r in rep.rows:
        jps = "unknown" if r.j_per_sample is None else f"{r.j_per_sample:.4e}"
        ej = "unknown" if r.energy_j is None else f"{r.energy_j:.3f}"
        mid = "-" if r.mode_id is None else str(r.mode_id)
        flag = "  estimated" if r.estimated else ""
        lines.append(f"  {r.mode:<{w}}  {mid:>3}  {r.s_per_sample:11.4e}  {jps:>11}  {ej:>10}  {r.wall_s:8.3f}{flag}")
    if rep.original_mode is not None:
        lines.append(f"original mode: {rep.original_mode}" + (" (restored)" if rep.switched else ""))
    if rep.note:
        lines.append(f"note: {rep.note}")
    return "\n".join(lines)
