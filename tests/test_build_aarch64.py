"""The aarch64 (Jetson) build path: csrc/ compiles with an aarch64 cross compiler, and CMake adds no
x86-only flag when it targets aarch64.

Needs ``aarch64-linux-gnu-g++`` (Debian/Ubuntu: ``apt-get install g++-aarch64-linux-gnu``); skipped
where it is absent. ``csrc/bindings.cpp`` is not compiled here: it needs aarch64 Python headers
(pyconfig.h is per architecture), which a cross toolchain from the package registry does not carry.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("aarch64-linux-gnu-g++")
EM_AARCH64 = 183

pytestmark = pytest.mark.skipif(CXX is None, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return struct.unpack_from("<H", head, 18)[0]


@pytest.mark.parametrize("source", ["aggregate.cpp", "affinity.cpp"])
def test_cpu_kernels_compile_for_aarch64(tmp_path, source):
    obj = tmp_path / (source + ".o")
    # the flags CMake uses for the kernels (CMakeLists.txt), with -mcpu for Jetson Orin's Cortex-A78AE
    cmd = [CXX, "-std=c++17", "-O3", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra",
           "-Wno-maybe-uninitialized", "-Werror", "-mcpu=cortex-a78ae", "-I", str(ROOT / "csrc"), "-c",
           str(ROOT / "csrc" / source), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _elf_machine(obj) == EM_AARCH64


def test_cmake_adds_no_x86_flags_for_aarch64(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 not installed")
    import sysconfig

    build = tmp_path / "build"
    # FindPython cannot probe an aarch64 interpreter from here; the host's headers only let CMake
    # configure (bindings.cpp, the one file that includes them, is not compiled below).
    r = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-G", "Unix Makefiles",
                        f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'cmake' / 'aarch64-linux-gnu.cmake'}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                        f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
                        "-DFMTL_WITH_CUDA=OFF"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "target processor aarch64 (aarch64), cross compiling: TRUE" in r.stdout
    flags = "\n".join(p.read_text() for p in build.rglob("flags.make"))
    assert "-O3" in flags and "-ffp-contract=off" in flags
    for x86 in ("-march=native", "-mcpu=native", "-mavx", "-msse", "-mfma"):
        assert x86 not in flags
    # the object files build through CMake with the aarch64 compiler
    r = subprocess.run(["make", "-C", str(build), "csrc/aggregate.cpp.o", "csrc/affinity.cpp.o"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    objs = list(build.rglob("aggregate.cpp.o")) + list(build.rglob("affinity.cpp.o"))
    assert len(objs) == 2 and all(_elf_machine(o) == EM_AARCH64 for o in objs)
