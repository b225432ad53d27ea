"""Energy meters and device budgets for FL clients on edge devices.

::

    from fmtl_edge.runtime import make_meter, DeviceLease, RoundBudget, load_profile

    profile = load_profile()                       # detected device class, or $FMTL_EDGE_PROFILE
    meter = profile.make_meter()                   # "auto": jetson > nvml > rapl > estimate
    with DeviceLease("local"):                     # one FL task at a time on this device
        with meter.window("client-3/round-2") as win:
            ...                                    # win.peek().total_j for energy budgets
    m = win.measurement                            # Measurement: wall_s, total_j, total_scope, domains...

Backends: ``jetson`` (INA3221 rails, integrated), ``nvml`` (GPU energy counter or integrated power),
``rapl`` (CPU package / DRAM counters), ``estimate`` (CPU seconds × W, always ``estimated``), ``null``
(time only). See :mod:`fmtl_edge.runtime.measurement` for scopes and methods.
"""

from .budgets import (
    BudgetExceeded,
    PeakMemoryWatcher,
    RoundBudget,
    check_memory,
    estimate_job_memory_bytes,
    rss_peak_bytes,
    watch_peak_memory,
)
from .factory import BACKENDS, ProbeResult, make_meter, probe_all
from .lease import DeviceBusy, DeviceLease
from .measurement import DomainEnergy, Measurement
from .meter import Meter, MeterUnavailable, NullMeter, Window
from .profile import DeviceProfile, builtin_profile, detect_device_class, load_profile

__all__ = [
    "BACKENDS",
    "BudgetExceeded",
    "DeviceBusy",
    "DeviceLease",
    "DeviceProfile",
    "DomainEnergy",
    "Measurement",
    "Meter",
    "MeterUnavailable",
    "NullMeter",
    "PeakMemoryWatcher",
    "ProbeResult",
    "RoundBudget",
    "Window",
    "builtin_profile",
    "check_memory",
    "detect_device_class",
    "estimate_job_memory_bytes",
    "load_profile",
    "make_meter",
    "probe_all",
    "rss_peak_bytes",
    "watch_peak_memory",
]
