// CPU slice aggregation kernels.  See aggregate.hpp for the contracts.
#include "aggregate.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <type_traits>

#include <sys/mman.h>
#if defined(__SSE2__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fmtl {
namespace {

// Unaligned, alias-safe element types: raw byte payloads (e.g. a tensor inside a
// safetensors blob) need not be aligned to their element size.
typedef float f32u __attribute__((aligned(1), may_alias));
typedef uint16_t u16u __attribute__((aligned(1), may_alias));

constexpr int64_t kBlock = 2048;       // elements per inner block (8 KiB of fp32 accumulator)
constexpr int64_t kChunk = 1 << 17;    // elements per scheduled work item

struct Work {
  int32_t slice;
  int64_t begin;   // absolute element index
  int64_t end;
  int64_t pos;     // position of `begin` in a compact per-call buffer
};

// Splits the given slices (where use[s]) into work items of <= kChunk elements.
std::vector<Work> make_work(const std::vector<SliceSpec>& slices,
                            const std::vector<uint8_t>& use, int64_t* total) {
  std::vector<Work> w;
  int64_t pos = 0;
  for (size_t s = 0; s < slices.size(); ++s) {
    if (!use[s] || slices[s].length <= 0) continue;
    const int64_t off = slices[s].offset, len = slices[s].length;
    for (int64_t b = 0; b < len; b += kChunk) {
      const int64_t e = std::min(len, b + kChunk);
      w.push_back(Work{int32_t(s), off + b, off + e, pos});
      pos += e - b;
    }
  }
  if (total) *total = pos;
  return w;
}

int threads_for(int64_t n_elems, int n_threads) {
  if (n_threads <= 0) n_threads = default_threads();
  // Spawning threads costs ~tens of microseconds; not worth it for small work.
  const int64_t per_thread_min = 1 << 17;
  const int64_t cap = std::max<int64_t>(1, n_elems / per_thread_min);
  return int(std::min<int64_t>(n_threads, cap));
}

// acc[i] = acc[i] + w * x[i0 + i], i in [0, n)   (separate mul and add roundings)
template <DType D>
inline void axpy_t(float* __restrict acc, const void* __restrict src, int64_t i0, int64_t n, float w) {
  if constexpr (D == DType::F32) {
    const f32u* s = static_cast<const f32u*>(src) + i0;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * s[i];
  } else if constexpr (D == DType::F16) {
    const u16u* s = static_cast<const u16u*>(src) + i0;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * half_to_float(s[i]);
  } else {
    const u16u* s = static_cast<const u16u*>(src) + i0;
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * bf16_to_float(s[i]);
  }
}

inline void axpy(float* acc, const Input& x, int64_t i0, int64_t n, float w) {
  switch (x.dtype) {
    case DType::F32: axpy_t<DType::F32>(acc, x.data, i0, n, w); break;
    case DType::F16: axpy_t<DType::F16>(acc, x.data, i0, n, w); break;
    case DType::BF16: axpy_t<DType::BF16>(acc, x.data, i0, n, w); break;
  }
}

inline bool any_nonfinite(const float* a, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= uint32_t((f2u(a[i]) & 0x7f800000u) == 0x7f800000u);
  return bad != 0;
}

// First non-finite element in [i0, i1) of x, or -1.
int64_t first_nonfinite_range(const Input& x, int64_t i0, int64_t i1) {
  for (int64_t b = i0; b < i1; b += kBlock) {
    const int64_t n = std::min(kBlock, i1 - b);
    uint32_t bad = 0;
    if (x.dtype == DType::F32) {
      const f32u* s = static_cast<const f32u*>(x.data) + b;
      for (int64_t i = 0; i < n; ++i) bad |= uint32_t((f2u(s[i]) & 0x7f800000u) == 0x7f800000u);
    } else if (x.dtype == DType::F16) {
      const u16u* s = static_cast<const u16u*>(x.data) + b;
      for (int64_t i = 0; i < n; ++i) bad |= uint32_t((s[i] & 0x7c00u) == 0x7c00u);
    } else {
      const u16u* s = static_cast<const u16u*>(x.data) + b;
      for (int64_t i = 0; i < n; ++i) bad |= uint32_t((s[i] & 0x7f80u) == 0x7f80u);
    }
    if (bad) {
      for (int64_t i = b; i < b + n; ++i) {
        float v;
        if (x.dtype == DType::F32) v = static_cast<const f32u*>(x.data)[i];
        else if (x.dtype == DType::F16) v = half_to_float(static_cast<const u16u*>(x.data)[i]);
        else v = bf16_to_float(static_cast<const u16u*>(x.data)[i]);
        if (!is_finite_bits(v)) return i;
      }
    }
  }
  return -1;
}

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// Decodes x[i0, i0+n) into dst as float32.
inline void decode(float* __restrict dst, const Input& x, int64_t i0, int64_t n) {
  if (x.dtype == DType::F32) {
    std::memcpy(dst, static_cast<const char*>(x.data) + i0 * 4, size_t(n) * 4);
  } else if (x.dtype == DType::F16) {
    const u16u* s = static_cast<const u16u*>(x.data) + i0;
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    const u16u* s = static_cast<const u16u*>(x.data) + i0;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

// Finds the first (lowest client index, then lowest element) non-finite value
// among contributing inputs.  Slow path, used only after a failure or before
// the robust kernels.
AggError locate_nonfinite(const std::vector<Input>& inputs, const std::vector<SliceSpec>& slices,
                          const uint8_t* contrib, int n_threads) {
  const size_t K = inputs.size(), S = slices.size();
  std::vector<uint8_t> mask(S);
  for (size_t k = 0; k < K; ++k) {
    bool anyc = false;
    for (size_t s = 0; s < S; ++s) { mask[s] = contrib[s * K + k] ? 1 : 0; anyc |= mask[s] != 0; }
    if (!anyc) continue;
    const int64_t idx = find_nonfinite(inputs[k], slices, mask.data(), n_threads);
    if (idx >= 0) {
      AggError e; e.kind = 1; e.client = int(k); e.index = idx;
      for (size_t s = 0; s < S; ++s)
        if (idx >= slices[s].offset && idx < slices[s].offset + slices[s].length) e.slice = int64_t(s);
      return e;
    }
  }
  return AggError{};
}

struct SlicePlan {
  std::vector<int> clients;      // contributing client indices, increasing
  std::vector<float> w;          // float(w_k / w_first) per contributing client
  float div = 1.f;               // float(sum of double weights / w_first)
};

}  // namespace

int64_t find_nonfinite(const Input& x, const std::vector<SliceSpec>& slices, const uint8_t* mask,
                       int n_threads) {
  std::vector<uint8_t> use(slices.size(), 1);
  if (mask) for (size_t s = 0; s < slices.size(); ++s) use[s] = mask[s] ? 1 : 0;
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices, use, &total);
  std::atomic<int64_t> best{INT64_MAX};
  parallel_for(int64_t(work.size()), threads_for(total, n_threads), [&](int64_t wi) {
    const Work& w = work[wi];
    if (w.begin >= best.load(std::memory_order_relaxed)) return;
    const int64_t i = first_nonfinite_range(x, w.begin, w.end);
    if (i >= 0) atomic_min(best, i);
  });
  const int64_t b = best.load();
  return b == INT64_MAX ? -1 : b;
}

namespace {

constexpr int64_t kWBlock = 32768;  // accumulator block (128 KiB of fp32: stays in L2)
constexpr int kGroup = 8;           // clients folded per pass over a block (register accumulation)

// acc[j] = (((first ? 0 : acc[j]) + w0 x0[j]) + w1 x1[j]) + ... over G clients of
// one dtype, for j in [0, n).  The rounding order is the client order, so any
// grouping gives the same bits as one client at a time.
template <DType D, int G>
bool fold_group(float* __restrict acc, const void* const* src, const float* w, int64_t i0, int64_t n, bool first,
                bool last, float div) {
  typedef typename std::conditional<D == DType::F32, float, uint16_t>::type E;
  typedef E T __attribute__((aligned(1), may_alias));
  const T* p[G];
  float ww[G];
  for (int g = 0; g < G; ++g) { p[g] = static_cast<const T*>(src[g]) + i0; ww[g] = w[g]; }
  auto cvt = [](E v) -> float {
    if constexpr (D == DType::F32) return v;
    else if constexpr (D == DType::F16) return half_to_float(v);
    else return bf16_to_float(v);
  };
  const float z = 0.0f;
  uint32_t bad = 0;
  if (last) {
    for (int64_t j = 0; j < n; ++j) {
      float r = first ? z : acc[j];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) r = r + ww[g] * cvt(p[g][j]);
      r = r / div;
      bad |= uint32_t((f2u(r) & 0x7f800000u) == 0x7f800000u);
      acc[j] = r;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      float r = first ? z : acc[j];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) r = r + ww[g] * cvt(p[g][j]);
      acc[j] = r;
    }
  }
  return bad != 0;
}

#if defined(__AVX512F__)
// float16 with the hardware converter (vcvtph2ps is exact, like half_to_float).
template <int G>
bool fold_f16_avx512(float* __restrict acc, const void* const* src, const float* w, int64_t i0, int64_t n,
                     bool first, bool last, float div) {
  const uint16_t* p[G];
  __m512 ww[G];
  for (int g = 0; g < G; ++g) { p[g] = static_cast<const uint16_t*>(src[g]) + i0; ww[g] = _mm512_set1_ps(w[g]); }
  const __m512 vd = _mm512_set1_ps(div);
  const __m512i expm = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 r = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + j);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
      r = _mm512_add_ps(r, _mm512_mul_ps(ww[g], _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[g] + j)))));
    if (last) {
      r = _mm512_div_ps(r, vd);
      const __m512i e = _mm512_and_si512(_mm512_castps_si512(r), expm);
      bad |= _mm512_cmpeq_epi32_mask(e, expm);
    }
    _mm512_storeu_ps(acc + j, r);
  }
  uint32_t bad_tail = 0;
  for (; j < n; ++j) {
    float r = first ? 0.0f : acc[j];
    for (int g = 0; g < G; ++g) {
      uint16_t h;
      std::memcpy(&h, p[g] + j, 2);
      r = r + w[g] * half_to_float(h);
    }
    if (last) {
      r = r / div;
      bad_tail |= uint32_t(!is_finite_bits(r));
    }
    acc[j] = r;
  }
  return bad != 0 || bad_tail != 0;
}
#endif

// Folds G (1..8) clients of dtype D into acc; on the last group also divides
// by `div` and returns whether any result is non-finite.
template <DType D>
bool fold_dispatch(int G, float* acc, const void* const* src, const float* w, int64_t i0, int64_t n, bool first,
                   bool last, float div) {
#if defined(__AVX512F__)
  if constexpr (D == DType::F16) {
    switch (G) {
      case 1: return fold_f16_avx512<1>(acc, src, w, i0, n, first, last, div);
      case 2: return fold_f16_avx512<2>(acc, src, w, i0, n, first, last, div);
      case 3: return fold_f16_avx512<3>(acc, src, w, i0, n, first, last, div);
      case 4: return fold_f16_avx512<4>(acc, src, w, i0, n, first, last, div);
      case 5: return fold_f16_avx512<5>(acc, src, w, i0, n, first, last, div);
      case 6: return fold_f16_avx512<6>(acc, src, w, i0, n, first, last, div);
      case 7: return fold_f16_avx512<7>(acc, src, w, i0, n, first, last, div);
      default: return fold_f16_avx512<8>(acc, src, w, i0, n, first, last, div);
    }
  }
#endif
  switch (G) {
    case 1: return fold_group<D, 1>(acc, src, w, i0, n, first, last, div);
    case 2: return fold_group<D, 2>(acc, src, w, i0, n, first, last, div);
    case 3: return fold_group<D, 3>(acc, src, w, i0, n, first, last, div);
    case 4: return fold_group<D, 4>(acc, src, w, i0, n, first, last, div);
    case 5: return fold_group<D, 5>(acc, src, w, i0, n, first, last, div);
    case 6: return fold_group<D, 6>(acc, src, w, i0, n, first, last, div);
    case 7: return fold_group<D, 7>(acc, src, w, i0, n, first, last, div);
    default: return fold_group<D, 8>(acc, src, w, i0, n, first, last, div);
  }
}

// Saves out[0, n) to backup (non-temporal stores) and writes acc into out, in
// one pass.
inline void commit_block(float* __restrict out, float* __restrict backup, const float* __restrict acc, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(backup + i) & 63u); ++i) { backup[i] = out[i]; out[i] = acc[i]; }
  for (; i + 16 <= n; i += 16) {
    _mm512_stream_ps(backup + i, _mm512_loadu_ps(out + i));
    _mm512_storeu_ps(out + i, _mm512_loadu_ps(acc + i));
  }
  for (; i < n; ++i) { backup[i] = out[i]; out[i] = acc[i]; }
#elif defined(__AVX__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(backup + i) & 31u); ++i) { backup[i] = out[i]; out[i] = acc[i]; }
  for (; i + 8 <= n; i += 8) {
    _mm256_stream_ps(backup + i, _mm256_loadu_ps(out + i));
    _mm256_storeu_ps(out + i, _mm256_loadu_ps(acc + i));
  }
  for (; i < n; ++i) { backup[i] = out[i]; out[i] = acc[i]; }
#else
  std::memcpy(backup, out, size_t(n) * 4);
  std::memcpy(out, acc, size_t(n) * 4);
#endif
}

// out[0, n) = acc[0, n) with non-temporal stores (no read-for-ownership of out).
inline void stream_store(float* __restrict out, const float* __restrict acc, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 63u); ++i) out[i] = acc[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(out + i, _mm512_loadu_ps(acc + i));
  for (; i < n; ++i) out[i] = acc[i];
#elif defined(__AVX__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 31u); ++i) out[i] = acc[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(out + i, _mm256_loadu_ps(acc + i));
  for (; i < n; ++i) out[i] = acc[i];
#else
  std::memcpy(out, acc, size_t(n) * 4);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// Process-wide scratch for the rollback copy, reused across calls so that large
// calls do not page-fault a fresh P-sized buffer every time.  A concurrent
// call that finds it busy allocates its own.
struct Scratch {
  std::mutex m;
  float* ptr = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(ptr); }
};
Scratch g_scratch;

struct ScratchLease {
  std::unique_lock<std::mutex> lock;
  float* own = nullptr;
  float* ptr = nullptr;
  ~ScratchLease() { std::free(own); }
};

float* alloc_floats(size_t n) {
  const size_t bytes = ((n * 4 + 4095) / 4096) * 4096;
  void* p = std::aligned_alloc(4096, std::max<size_t>(bytes, 4096));
  if (!p) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  if (bytes >= (size_t(4) << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return static_cast<float*>(p);
}

void lease_scratch(ScratchLease& l, size_t n) {
  l.lock = std::unique_lock<std::mutex>(g_scratch.m, std::try_to_lock);
  if (l.lock.owns_lock()) {
    if (g_scratch.cap < n) {
      std::free(g_scratch.ptr);
      g_scratch.ptr = nullptr;
      g_scratch.cap = 0;
      g_scratch.ptr = alloc_floats(n);
      g_scratch.cap = n;
    }
    l.ptr = g_scratch.ptr;
  } else {
    l.own = alloc_floats(n);
    l.ptr = l.own;
  }
}

}  // namespace

size_t scratch_bytes() {
  std::lock_guard<std::mutex> g(g_scratch.m);
  return g_scratch.cap * 4;
}

void release_scratch() {
  std::lock_guard<std::mutex> g(g_scratch.m);
  std::free(g_scratch.ptr);
  g_scratch.ptr = nullptr;
  g_scratch.cap = 0;
}

AggError weighted_average_slices(float* out, const std::vector<Input>& inputs,
                                 const std::vector<double>& weights,
                                 const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                                 int n_threads, bool rollback) {
  const size_t K = inputs.size(), S = slices.size();
  std::vector<SlicePlan> plan(S);
  std::vector<uint8_t> use(S, 0);
  int64_t extent = 0;  // 1 + last element written
  for (size_t s = 0; s < S; ++s) {
    double tot = 0.0, ref = 0.0;
    for (size_t k = 0; k < K; ++k) {
      if (!contrib[s * K + k]) continue;
      if (ref == 0.0) ref = weights[k];
      plan[s].clients.push_back(int(k));
      plan[s].w.push_back(float(weights[k] / ref));
      tot += weights[k];
    }
    if (!plan[s].clients.empty() && slices[s].length > 0) {
      plan[s].div = float(tot / ref);
      use[s] = 1;
      extent = std::max(extent, slices[s].offset + slices[s].length);
    }
  }
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices, use, &total);
  if (work.empty()) return AggError{};

  // Atomicity: every block is checked (non-finite results, in registers) before
  // it is committed, and the previous contents of each committed block are
  // streamed to a scratch copy with the same layout as `out`, so a failure found
  // later can be rolled back.  Cost: one extra P-sized write; the old values are
  // read anyway (write-allocate of out).
  ScratchLease lease;
  if (rollback) lease_scratch(lease, size_t(extent));
  float* backup = lease.ptr;
  std::vector<int64_t> committed(work.size(), 0);
  std::atomic<bool> failed{false};
  std::atomic<int64_t> bad_slice{INT64_MAX};

  parallel_for(int64_t(work.size()), threads_for(total * int64_t(std::max<size_t>(K, 1)) / 4, n_threads),
               [&](int64_t wi) {
    if (failed.load(std::memory_order_relaxed)) return;
    const Work& wk = work[wi];
    const SlicePlan& p = plan[wk.slice];
    thread_local std::unique_ptr<float[]> acc_buf;
    if (!acc_buf) acc_buf.reset(new float[kWBlock + 16]);
    float* acc = acc_buf.get();
    const size_t m = p.clients.size();
    for (int64_t b = wk.begin; b < wk.end; b += kWBlock) {
      const int64_t n = std::min(kWBlock, wk.end - b);
      size_t j = 0;
      bool first = true, bad = false;
      while (j < m) {
        const DType d = inputs[p.clients[j]].dtype;
        const void* src[kGroup];
        int G = 0;
        while (G < kGroup && j + G < m && inputs[p.clients[j + G]].dtype == d) {
          src[G] = inputs[p.clients[j + G]].data;
          ++G;
        }
        const bool last = j + size_t(G) == m;
        switch (d) {
          case DType::F32: bad = fold_dispatch<DType::F32>(G, acc, src, &p.w[j], b, n, first, last, p.div); break;
          case DType::F16: bad = fold_dispatch<DType::F16>(G, acc, src, &p.w[j], b, n, first, last, p.div); break;
          case DType::BF16: bad = fold_dispatch<DType::BF16>(G, acc, src, &p.w[j], b, n, first, last, p.div); break;
        }
        first = false;
        j += size_t(G);
      }
      if (bad) {
        failed.store(true, std::memory_order_relaxed);
        atomic_min(bad_slice, wk.slice);
        break;
      }
      float* o = out + b;
      if (rollback) commit_block(o, backup + b, acc, n);
      else stream_store(o, acc, n);
      committed[wi] = b + n - wk.begin;
    }
    store_fence();
  });

  if (!failed.load()) return AggError{};
  // Roll back, then find the culprit deterministically.
  for (size_t wi = 0; rollback && wi < work.size(); ++wi)
    if (committed[wi] > 0)
      std::memcpy(out + work[wi].begin, backup + work[wi].begin, size_t(committed[wi]) * 4);
  AggError e = locate_nonfinite(inputs, slices, contrib, n_threads);
  if (e.kind == 0) { e.kind = 2; e.slice = bad_slice.load(); }
  return e;
}

// ---------------------------------------------------------------- robust ----

namespace {

template <class Reduce>
AggError robust_impl(float* out, const std::vector<Input>& inputs,
                     const std::vector<SliceSpec>& slices, const uint8_t* contrib, int n_threads,
                     Reduce reduce) {
  const size_t K = inputs.size(), S = slices.size();
  AggError e = locate_nonfinite(inputs, slices, contrib, n_threads);
  if (e.kind) return e;
  std::vector<std::vector<int>> clients(S);
  std::vector<uint8_t> use(S, 0);
  for (size_t s = 0; s < S; ++s) {
    for (size_t k = 0; k < K; ++k) if (contrib[s * K + k]) clients[s].push_back(int(k));
    use[s] = clients[s].empty() ? 0 : 1;
  }
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices, use, &total);
  constexpr int64_t kTile = 256;
  parallel_for(int64_t(work.size()), threads_for(total * int64_t(std::max<size_t>(K, 1)) / 2, n_threads),
               [&](int64_t wi) {
    const Work& wk = work[wi];
    const std::vector<int>& cl = clients[wk.slice];
    const size_t m = cl.size();
    std::vector<float> tile(m * kTile), vals(m);
    for (int64_t b = wk.begin; b < wk.end; b += kTile) {
      const int64_t n = std::min(kTile, wk.end - b);
      for (size_t j = 0; j < m; ++j) decode(tile.data() + j * kTile, inputs[cl[j]], b, n);
      for (int64_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < m; ++j) vals[j] = tile[j * kTile + i];
        out[b + i] = reduce(vals);
      }
    }
  });
  return AggError{};
}

}  // namespace

AggError coordinate_median(float* out, const std::vector<Input>& inputs,
                           const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                           int n_threads) {
  return robust_impl(out, inputs, slices, contrib, n_threads, [](std::vector<float>& v) -> float {
    const size_t m = v.size(), h = m / 2;
    std::nth_element(v.begin(), v.begin() + h, v.end());
    const float hi = v[h];
    if (m % 2) return hi;
    const float lo = *std::max_element(v.begin(), v.begin() + h);
    return float((double(lo) + double(hi)) * 0.5);
  });
}

AggError trimmed_mean(float* out, const std::vector<Input>& inputs,
                      const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                      double trim_fraction, int n_threads) {
  return robust_impl(out, inputs, slices, contrib, n_threads, [trim_fraction](std::vector<float>& v) -> float {
    const size_t m = v.size();
    const size_t t = size_t(std::floor(trim_fraction * double(m)));
    std::sort(v.begin(), v.end());
    double sum = 0.0;
    for (size_t i = t; i < m - t; ++i) sum += double(v[i]);
    return float(sum / double(m - 2 * t));
  });
}

// ----------------------------------------------------------- accumulator ----

Accumulator::Accumulator(int64_t n_params, std::vector<SliceSpec> slices)
    : n_params_(n_params), slices_(std::move(slices)) {
  acc_off_.resize(slices_.size());
  size_t pos = 0;
  for (size_t s = 0; s < slices_.size(); ++s) {
    acc_off_[s] = int64_t(pos);
    pos += size_t(std::max<int64_t>(0, slices_[s].length));
  }
  acc_size_ = pos;
  acc_.reset(new float[std::max<size_t>(acc_size_, 1)]);
  wsum_.assign(slices_.size(), 0.0);
  wref_.assign(slices_.size(), 0.0);
  reset();
}

void Accumulator::reset() {
  std::vector<uint8_t> use(slices_.size(), 1);
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices_, use, &total);
  float* acc = acc_.get();
  parallel_for(int64_t(work.size()), threads_for(total, 0), [&](int64_t wi) {
    std::fill(acc + work[wi].pos, acc + work[wi].pos + (work[wi].end - work[wi].begin), 0.0f);
  });
  std::fill(wsum_.begin(), wsum_.end(), 0.0);
  std::fill(wref_.begin(), wref_.end(), 0.0);
  n_added_ = 0;
  poisoned_ = false;
}

AggError Accumulator::add(const Input& x, double weight, const uint8_t* contrib, int n_threads) {
  const int64_t bad = find_nonfinite(x, slices_, contrib, n_threads);
  if (bad >= 0) {
    AggError e; e.kind = 1; e.index = bad;
    for (size_t s = 0; s < slices_.size(); ++s)
      if (bad >= slices_[s].offset && bad < slices_[s].offset + slices_[s].length) e.slice = int64_t(s);
    return e;
  }
  std::vector<uint8_t> use(slices_.size());
  for (size_t s = 0; s < slices_.size(); ++s) use[s] = contrib[s] ? 1 : 0;
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices_, use, &total);
  std::vector<float> mult(slices_.size(), 0.0f);
  for (size_t s = 0; s < slices_.size(); ++s)
    if (use[s]) mult[s] = float(weight / (wref_[s] == 0.0 ? weight : wref_[s]));
  float* acc = acc_.get();
  std::atomic<int64_t> overflow_slice{INT64_MAX};
  parallel_for(int64_t(work.size()), threads_for(total, n_threads), [&](int64_t wi) {
    const Work& wk = work[wi];
    float* a = acc + acc_off_[wk.slice] + (wk.begin - slices_[wk.slice].offset);
    axpy(a, x, wk.begin, wk.end - wk.begin, mult[wk.slice]);
    if (any_nonfinite(a, wk.end - wk.begin)) atomic_min(overflow_slice, wk.slice);
  });
  for (size_t s = 0; s < slices_.size(); ++s) {
    if (!use[s]) continue;
    if (wref_[s] == 0.0) wref_[s] = weight;
    wsum_[s] += weight;
  }
  ++n_added_;
  if (overflow_slice.load() != INT64_MAX) {
    poisoned_ = true;
    AggError e; e.kind = 2; e.slice = overflow_slice.load();
    return e;
  }
  return AggError{};
}

void Accumulator::result(float* out, int n_threads) const {
  std::vector<uint8_t> use(slices_.size());
  for (size_t s = 0; s < slices_.size(); ++s) use[s] = wsum_[s] > 0.0 ? 1 : 0;
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices_, use, &total);
  const float* acc = acc_.get();
  parallel_for(int64_t(work.size()), threads_for(total, n_threads), [&](int64_t wi) {
    const Work& wk = work[wi];
    const float d = float(wsum_[wk.slice] / wref_[wk.slice]);
    const float* a = acc + acc_off_[wk.slice] + (wk.begin - slices_[wk.slice].offset);
    float* o = out + wk.begin;
    for (int64_t i = 0, n = wk.end - wk.begin; i < n; ++i) o[i] = a[i] / d;
  });
}

}  // namespace fmtl
