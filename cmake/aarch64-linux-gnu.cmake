# Cross compiling fmtl-edge's kernels for aarch64 (Jetson) from an x86 Debian/Ubuntu host:
#   apt-get install g++-aarch64-linux-gnu
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -Dpybind11_DIR=$(python -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(which python)
# The CPU kernels (csrc/aggregate.cpp, csrc/affinity.cpp) compile with this alone; linking the
# Python module also needs aarch64 Python headers/libraries (a sysroot, e.g. from a Jetson), so the
# supported way to get a working module on the device is still `pip install .` on the Jetson itself.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
