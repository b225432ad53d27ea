"""Fake device trees and a fake pynvml for the runtime tests (built in tmp_path, read through
``FMTL_EDGE_SYSFS_ROOT``). Layouts and rail names follow the real boards' L4T sysfs."""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

# board -> (driver, model string, L4T release line, [(bus-addr, [labels of channels])], input/total info)
BOARDS: dict[str, dict] = {
    "nano": {
        "driver": "iio",
        "model": "NVIDIA Jetson Nano Developer Kit",
        "release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022",
        "devices": [("6-0040", ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"])],
        "scope": "board_input",
        "total": ["POM_5V_IN"],
        "modes": [(0, "MAXN"), (1, "5W")],
    },
    "tx2": {
        "driver": "iio",
        "model": "NVIDIA Jetson TX2 Developer Kit",
        "release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19 17:07:00 UTC 2022",
        "devices": [
            ("0-0040", ["VDD_SYS_GPU", "VDD_SYS_SOC", "VDD_4V0_WIFI"]),
            ("0-0041", ["VDD_IN", "VDD_SYS_CPU", "VDD_SYS_DDR"]),
        ],
        "scope": "board_input",
        "total": ["VDD_IN"],
        "modes": [(0, "MAXN"), (1, "MAXQ"), (2, "MAXP_CORE_ALL"), (3, "MAXP_CORE_ARM")],
    },
    "xavier-nx": {
        "driver": "iio",
        "model": "NVIDIA Jetson Xavier NX Developer Kit",
        "release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19 17:07:00 UTC 2022",
        "devices": [("7-0040", ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"])],
        "scope": "board_input",
        "total": ["VDD_IN"],
        "modes": [(0, "MODE_15W_2CORE"), (2, "MODE_15W_6CORE"), (3, "MODE_10W_2CORE")],
    },
    "xavier-nx-jp5": {
        "driver": "hwmon",
        "model": "NVIDIA Jetson Xavier NX Developer Kit",
        "release": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
        "devices": [("7-0040", ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"])],
        "scope": "board_input",
        "total": ["VDD_IN"],
        "modes": [(8, "MODE_20W_6CORE")],
    },
    "agx-xavier": {
        "driver": "iio",
        "model": "Jetson-AGX",
        "release": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19 17:07:00 UTC 2022",
        "devices": [("1-0040", ["GPU", "CPU", "SOC"]), ("1-0041", ["CV", "VDDRQ", "SYS5V"])],
        "scope": "sum_of_rails",
        "total": ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"],
        "modes": [(0, "MAXN"), (3, "MODE_30W_ALL")],
    },
    "orin-nano": {
        "driver": "hwmon",
        "model": "NVIDIA Jetson Orin Nano Developer Kit",
        "release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024",
        "devices": [("1-0040", ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"])],
        "scope": "board_input",
        "total": ["VDD_IN"],
        "modes": [(0, "15W"), (1, "7W")],
    },
    "agx-orin": {
        "driver": "hwmon",
        "model": "NVIDIA Jetson AGX Orin Developer Kit",
        "release": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
        "devices": [("1-0040", ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]), ("1-0041", ["NC", "VDDQ_VDD2_1V8AO", "NC"])],
        "scope": "sum_of_rails",
        "total": ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"],
        # nvpmodel_p3701_0000.conf (JetPack 5/6): ids and names as L4T ships them; boot default MODE_30W
        "modes": [(0, "MAXN"), (1, "MODE_15W"), (2, "MODE_30W"), (3, "MODE_50W")],
    },
}

SIX_BOARDS = ["nano", "tx2", "xavier-nx", "agx-xavier", "orin-nano", "agx-orin"]


@dataclass
class FakeJetson:
    """A Jetson sysfs tree under ``root``; ``set_power(label, watts)`` rewrites the rail's files in
    place (same inode, so the meter's open descriptors see the new value)."""

    root: Path
    board: str
    rails: dict[str, tuple[str, int]] = field(default_factory=dict)  # label -> (logical dir, channel)
    watts: dict[str, float] = field(default_factory=dict)  # exact watts the files encode

    @property
    def spec(self) -> dict:
        return BOARDS[self.board]

    @property
    def driver(self) -> str:
        return self.spec["driver"]

    def file(self, logical: str) -> Path:
        return self.root / logical.lstrip("/")

    def _write(self, logical: str, text: str) -> None:
        p = self.file(logical)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w") as f:  # truncate + write in place
            f.write(text + "\n")

    def set_power(self, label: str, watts: float, volts: float = 5.0) -> float:
        """Encode ``watts`` as the driver would; returns the exact watts the files now say."""
        d, ch = self.rails[label]
        if self.driver == "iio":
            mw = int(round(watts * 1000))
            mv = int(volts * 1000)
            self._write(f"{d}/in_power{ch}_input", str(mw))
            self._write(f"{d}/in_voltage{ch}_input", str(mv))
            self._write(f"{d}/in_current{ch}_input", str(int(round(mw * 1000 / mv))))
            exact = mw / 1000
        else:
            mv = int(volts * 1000)
            ma = int(round(watts * 1e6 / mv))
            self._write(f"{d}/in{ch}_input", str(mv))
            self._write(f"{d}/curr{ch}_input", str(ma))
            exact = mv * ma / 1e6
        self.watts[label] = exact
        return exact

    def power_file(self, label: str) -> Path:
        d, ch = self.rails[label]
        return self.file(f"{d}/in_power{ch}_input" if self.driver == "iio" else f"{d}/curr{ch}_input")

    def label_file(self, label: str) -> Path:
        d, ch = self.rails[label]
        return self.file(f"{d}/rail_name_{ch}" if self.driver == "iio" else f"{d}/in{ch}_label")


def build_jetson(root: Path, board: str, powers: dict[str, float] | None = None, mode_id: int | None = None) -> FakeJetson:
    spec = BOARDS[board]
    fake = FakeJetson(Path(root), board)
    fake._write("/etc/nv_tegra_release", spec["release"])
    p = fake.file("/sys/firmware/devicetree/base/model")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(spec["model"].encode() + b"\x00")
    conf = "\n".join(f"< POWER_MODEL ID={i} NAME={n} >\nCPU_ONLINE CORE_0 1" for i, n in spec["modes"])
    fake._write("/etc/nvpmodel.conf", "# fake nvpmodel.conf\n" + conf)
    mid = spec["modes"][0][0] if mode_id is None else mode_id
    fake._write("/var/lib/nvpmodel/status", f"pmode:{mid:04d} fmode:quiet")
    for k, (bus, labels) in enumerate(spec["devices"]):
        if spec["driver"] == "iio":
            d = f"/sys/bus/i2c/drivers/ina3221x/{bus}/iio:device{k}"
            fake._write(f"{d}/name", "ina3221x")
            for ch, label in enumerate(labels):
                fake._write(f"{d}/rail_name_{ch}", label)
                if label != "NC":
                    fake.rails[label] = (d, ch)
                else:
                    fake._write(f"{d}/in_power{ch}_input", "0")
        else:
            d = f"/sys/bus/i2c/drivers/ina3221/{bus}/hwmon/hwmon{k + 1}"
            fake._write(f"{d}/name", "ina3221")
            for ch, label in enumerate(labels, start=1):
                fake._write(f"{d}/in{ch}_label", label)
                fake._write(f"{d}/in{ch}_enable", "1")
                fake._write(f"{d}/in{ch + 3}_input", "12")  # shunt voltage channels 4-6: not rails
                if label != "NC":
                    fake.rails[label] = (d, ch)
                else:
                    fake._write(f"{d}/in{ch}_input", "0")
                    fake._write(f"{d}/curr{ch}_input", "0")
            fake._write(f"{d}/in7_label", "sum of shunt voltages")
            fake._write(f"{d}/in7_input", "36")
            fake._write(f"{d}/curr4_input", "999")  # summation channel: not a rail
    powers = dict(powers or {})
    for i, label in enumerate(fake.rails):
        fake.set_power(label, powers.get(label, 1.0 + i))
    return fake


FAKE_NVPMODEL = r"""#!{python}
# fake nvpmodel for the tests: -q prints the mode as JetPack's nvpmodel does, -m ID switches the
# fake tree's /var/lib/nvpmodel/status (and, when set, the rails' power for that mode); every call
# is appended to the log
import json, pathlib, re, sys
root = pathlib.Path({root!r})
log = pathlib.Path({log!r})
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
conf = (root / "etc/nvpmodel.conf").read_text()
modes = {{int(i): n for i, n in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", conf)}}
status = root / "var/lib/nvpmodel/status"
args = sys.argv[1:]
if args[:1] == ["-q"]:
    i = int(re.search(r"pmode:(\d+)", status.read_text()).group(1))
    print("NV Fan Mode:quiet")
    print("NV Power Mode: " + modes[i])
    print(i)
elif args[:1] == ["-m"] and len(args) == 2:
    i = int(args[1])
    if i not in modes:
        print("NVPM ERROR: Invalid power mode " + args[1], file=sys.stderr)
        sys.exit(1)
    if {fail_on!r} is not None and i == {fail_on!r}:
        print("NVPM ERROR: failed to set power mode (not root?)", file=sys.stderr)
        sys.exit(1)
    status.write_text("pmode:%04d fmode:quiet\n" % i)
    writes = root / "etc/fake_nvpmodel_rails.json"
    if writes.exists():
        for path, text in json.loads(writes.read_text()).get(str(i), {{}}).items():
            with open(root / path.lstrip("/"), "w") as f:  # in place: the meter's descriptors stay valid
                f.write(text + "\n")
else:
    print("usage: nvpmodel -q | -m ID", file=sys.stderr)
    sys.exit(2)
"""


def install_fake_nvpmodel(fake: FakeJetson, log: Path, mode_watts: dict[int, dict[str, float]] | None = None,
                          fail_on: int | None = None) -> Path:
    """An executable fake ``nvpmodel`` for ``fake``'s tree (point ``FMTL_EDGE_NVPMODEL`` at it).

    ``mode_watts``: mode id -> {rail label: watts} written to the rails when that mode is set.
    ``fail_on``: a mode id whose ``-m`` fails like an unprivileged nvpmodel. Every call is appended
    to ``log`` (``-q``, ``-m 1``...).
    """
    if mode_watts:
        table: dict[str, dict[str, str]] = {}
        saved = dict(fake.watts)
        for mid, rails in mode_watts.items():
            files: dict[str, str] = {}
            for label, w in rails.items():
                fake.set_power(label, w)
                d, ch = fake.rails[label]
                names = [f"in_power{ch}_input"] if fake.driver == "iio" else [f"in{ch}_input", f"curr{ch}_input"]
                for n in names:
                    files[f"{d}/{n}"] = fake.file(f"{d}/{n}").read_text().strip()
            table[str(mid)] = files
        for label, w in saved.items():  # back to the tree's own values until a mode is set
            fake.set_power(label, w)
        (fake.root / "etc/fake_nvpmodel_rails.json").write_text(json.dumps(table))
    path = fake.root / "fake-nvpmodel"
    path.write_text(FAKE_NVPMODEL.format(python=sys.executable, root=str(fake.root), log=str(log), fail_on=fail_on))
    os.chmod(path, 0o755)
    return path


# ---- RAPL ---------------------------------------------------------------------------------------


@dataclass
class FakeRapl:
    root: Path
    zones: dict[str, str] = field(default_factory=dict)  # domain-ish name -> logical zone dir

    def set_energy_uj(self, zone: str, uj: int) -> None:
        with open(self.root / self.zones[zone].lstrip("/") / "energy_uj", "w") as f:
            f.write(f"{uj}\n")

    def energy_file(self, zone: str) -> Path:
        return self.root / self.zones[zone].lstrip("/") / "energy_uj"


def build_rapl(
    root: Path,
    packages: int = 1,
    dram: bool = True,
    psys: bool = True,
    mmio: bool = True,
    max_range_uj: int = 262143328850,
    max_power_uw: int | None = 125_000_000,
) -> FakeRapl:
    """``/sys/class/powercap`` as intel_rapl_common lays it out (flat class directory)."""
    fake = FakeRapl(Path(root))
    base = "/sys/class/powercap"

    def zone(dirname: str, name: str, key: str) -> None:
        d = f"{base}/{dirname}"
        p = fake.root / d.lstrip("/")
        p.mkdir(parents=True, exist_ok=True)
        (p / "name").write_text(name + "\n")
        (p / "energy_uj").write_text("1000\n")
        (p / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        (p / "enabled").write_text("1\n")
        if max_power_uw is not None:
            (p / "constraint_0_max_power_uw").write_text(f"{max_power_uw}\n")
            (p / "constraint_0_power_limit_uw").write_text(f"{max_power_uw // 2}\n")
            (p / "constraint_0_name").write_text("long_term\n")
        fake.zones[key] = d

    (fake.root / base.lstrip("/") / "intel-rapl").mkdir(parents=True, exist_ok=True)
    for k in range(packages):
        zone(f"intel-rapl:{k}", f"package-{k}", f"package-{k}")
        zone(f"intel-rapl:{k}:0", "core", f"core-{k}")
        zone(f"intel-rapl:{k}:1", "uncore", f"uncore-{k}")
        if dram:
            zone(f"intel-rapl:{k}:2", "dram", f"dram-{k}")
    if psys:
        zone(f"intel-rapl:{packages}", "psys", "psys")
    if mmio:
        zone("intel-rapl-mmio:0", "package-0", "mmio")
    return fake


# ---- pynvml ---------------------------------------------------------------------------------------


class _NVMLError(Exception):
    def __init__(self, value: int):
        self.value = value
        super().__init__(f"NVML error {value}")


def fake_pynvml(
    devices: list[dict] | None = None,
    init_error: int | None = None,
) -> types.ModuleType:
    """A module with the nvidia-ml-py functions the NVML meter uses.

    Each device dict: ``name``, ``energy_mj`` (int, or None = NOT_SUPPORTED; a list makes successive
    reads return successive values), ``power_mw`` (same), ``limit_mw``, ``uuid``.
    """
    mod = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.NVML_SUCCESS = 0
    mod.NVML_ERROR_UNINITIALIZED = 1
    mod.NVML_ERROR_NOT_SUPPORTED = 3
    mod.NVML_ERROR_LIBRARY_NOT_FOUND = 12
    mod.NVML_ERROR_UNKNOWN = 999
    devs = [dict(d) for d in (devices or [])]
    state = {"init": 0, "shutdown": 0, "calls": []}
    mod._state = state
    mod._devices = devs

    def _next(d, key):
        v = d.get(key)
        if isinstance(v, list):
            v = v.pop(0) if len(v) > 1 else v[0]
        if v is None:
            raise _NVMLError(mod.NVML_ERROR_NOT_SUPPORTED)
        if isinstance(v, Exception):
            raise v
        return v

    def nvmlInit():
        if init_error is not None:
            raise _NVMLError(init_error)
        state["init"] += 1

    def nvmlShutdown():
        state["shutdown"] += 1

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = nvmlShutdown
    mod.nvmlDeviceGetCount = lambda: len(devs)

    def by_index(i):
        if not 0 <= i < len(devs):
            raise _NVMLError(2)
        return devs[i]

    mod.nvmlDeviceGetHandleByIndex = by_index

    def by_uuid(u):
        for d in devs:
            if d.get("uuid") == u:
                return d
        raise _NVMLError(6)

    mod.nvmlDeviceGetHandleByUUID = by_uuid
    mod.nvmlDeviceGetName = lambda h: h.get("name", "Fake GPU")
    mod.nvmlDeviceGetTotalEnergyConsumption = lambda h: _next(h, "energy_mj")
    mod.nvmlDeviceGetPowerUsage = lambda h: _next(h, "power_mw")

    def limit(h):
        v = h.get("limit_mw")
        if v is None:
            raise _NVMLError(mod.NVML_ERROR_NOT_SUPPORTED)
        return v

    mod.nvmlDeviceGetEnforcedPowerLimit = limit
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    return mod
