// CUDA slice aggregation (compiled only when CMake finds a CUDA toolkit).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "aggregate.hpp"

namespace fmtl {
namespace cuda {

// Number of usable CUDA devices; 0 when there is no driver or no GPU.
int device_count();
// Human-readable runtime/driver versions, e.g. "runtime 13000, driver 13000".
std::string version_string();

// Weighted slice average of device-resident inputs into device-resident `out`
// (float32), on `stream` (a cudaStream_t; 0 = legacy default stream).  Same
// contract and bit-for-bit the same arithmetic as the CPU kernel.  When
// check_finite, the call waits for the stream to read the error flag and, on a
// non-finite result, restores out and reports the culprit; otherwise it is
// fully asynchronous.  Inputs' `data` are device pointers on CUDA device
// `device` (made current for the call; -1 = leave the current device).
AggError weighted_average_slices(float* out, const std::vector<Input>& inputs,
                                 const std::vector<double>& weights,
                                 const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                                 uintptr_t stream, bool check_finite, int device);

}  // namespace cuda
}  // namespace fmtl
