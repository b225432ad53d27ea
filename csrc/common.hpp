// Shared helpers for the fmtl-edge native kernels: dtype codes, bit casts,
// half/bfloat16 decoding and a small std::thread parallel-for.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace fmtl {

// Element types accepted by the aggregation kernels (little-endian storage).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, +-0,
// +-Inf, NaN payloads).  Branch-free so that loops over it vectorise.
// Needs IEEE subnormal arithmetic (no -ffast-math / DAZ).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Reinterpreting em<<13 as binary32 gives the value scaled by 2^-112 (the
  // exponent-bias difference), for subnormals as well; multiply it back.
  uint32_t bits = f2u(u2f(em << 13) * 0x1p112f);
  bits |= (em >= 0x7c00u) ? 0x7f800000u : 0u;  // Inf / NaN keep their payload
  return u2f(bits | sign);
}

inline float bf16_to_float(uint16_t b) { return u2f(uint32_t(b) << 16); }

inline bool is_finite_bits(float f) { return (f2u(f) & 0x7f800000u) != 0x7f800000u; }

// Number of worker threads: FMTL_NUM_THREADS if set, else hardware concurrency.
inline int default_threads() {
  if (const char* s = std::getenv("FMTL_NUM_THREADS")) {
    int v = std::atoi(s);
    if (v > 0) return v;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : int(hc);
}

// Runs fn(item) for item in [0, n_items) on up to n_threads threads with dynamic
// scheduling (an atomic counter).  The calling thread takes part.  fn must not
// throw.  Items are handed out in increasing order.
template <class Fn>
void parallel_for(int64_t n_items, int n_threads, Fn&& fn) {
  if (n_items <= 0) return;
  if (n_threads <= 0) n_threads = default_threads();
  n_threads = int(std::min<int64_t>(n_threads, n_items));
  if (n_threads <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      fn(i);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace fmtl
