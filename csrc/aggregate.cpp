// CPU slice aggregation kernels.  See aggregate.hpp for the contracts.
#include "aggregate.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>

namespace fmtl {
namespace {

// Unaligned, alias-safe element types: raw byte payloads (e.g. a tensor inside a
// safetensors blob) need not be aligned to their element size.
typedef float f32u __attribute__((aligned(1), may_alias));
typedef uint16_t u16u __attribute__((aligned(1), may_alias));

constexpr int64_t kBlock = 2048;       // elements per inner block (8 KiB of fp32 accumulator)
constexpr int64_t kChunk = 1 << 16;    // elements per scheduled work item

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

// Same as axpy for four clients of one dtype at once, keeping the rounding
// order ((acc + w0 x0) + w1 x1) + ... so results equal four single calls.
template <DType D>
inline void axpy4_t(float* __restrict acc, const void* const* src, int64_t i0, int64_t n, const float* w) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  if constexpr (D == DType::F32) {
    const f32u* a = static_cast<const f32u*>(src[0]) + i0;
    const f32u* b = static_cast<const f32u*>(src[1]) + i0;
    const f32u* c = static_cast<const f32u*>(src[2]) + i0;
    const f32u* d = static_cast<const f32u*>(src[3]) + i0;
    for (int64_t i = 0; i < n; ++i) {
      float r = acc[i];
      r = r + w0 * a[i]; r = r + w1 * b[i]; r = r + w2 * c[i]; r = r + w3 * d[i];
      acc[i] = r;
    }
  } else {
    const u16u* a = static_cast<const u16u*>(src[0]) + i0;
    const u16u* b = static_cast<const u16u*>(src[1]) + i0;
    const u16u* c = static_cast<const u16u*>(src[2]) + i0;
    const u16u* d = static_cast<const u16u*>(src[3]) + i0;
    auto cvt = [](uint16_t h) { return D == DType::F16 ? half_to_float(h) : bf16_to_float(h); };
    for (int64_t i = 0; i < n; ++i) {
      float r = acc[i];
      r = r + w0 * cvt(a[i]); r = r + w1 * cvt(b[i]); r = r + w2 * cvt(c[i]); r = r + w3 * cvt(d[i]);
      acc[i] = r;
    }
  }
}

inline void axpy4(float* acc, const Input* const* x, int64_t i0, int64_t n, const float* w) {
  const void* src[4] = {x[0]->data, x[1]->data, x[2]->data, x[3]->data};
  switch (x[0]->dtype) {
    case DType::F32: axpy4_t<DType::F32>(acc, src, i0, n, w); break;
    case DType::F16: axpy4_t<DType::F16>(acc, src, i0, n, w); break;
    case DType::BF16: axpy4_t<DType::BF16>(acc, src, i0, n, w); break;
  }
}

// acc[i] /= d; returns true if any result is non-finite.
inline bool scale_check(float* __restrict acc, int64_t n, float d) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float r = acc[i] / d;
    acc[i] = r;
    bad |= uint32_t((f2u(r) & 0x7f800000u) == 0x7f800000u);
  }
  return bad != 0;
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

AggError weighted_average_slices(float* out, const std::vector<Input>& inputs,
                                 const std::vector<double>& weights,
                                 const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                                 int n_threads) {
  const size_t K = inputs.size(), S = slices.size();
  std::vector<SlicePlan> plan(S);
  std::vector<uint8_t> use(S, 0);
  for (size_t s = 0; s < S; ++s) {
    double tot = 0.0, ref = 0.0;
    for (size_t k = 0; k < K; ++k) {
      if (!contrib[s * K + k]) continue;
      if (ref == 0.0) ref = weights[k];
      plan[s].clients.push_back(int(k));
      plan[s].w.push_back(float(weights[k] / ref));
      tot += weights[k];
    }
    if (!plan[s].clients.empty()) {
      plan[s].div = float(tot / ref);
      use[s] = 1;
    }
  }
  int64_t total = 0;
  const std::vector<Work> work = make_work(slices, use, &total);
  if (work.empty()) return AggError{};

  // Atomicity: results are committed block by block; the previous contents of
  // every committed block are saved so that a failure found later (a
  // non-finite value, checked on the result in registers) can be rolled back.
  std::unique_ptr<float[]> backup(new float[size_t(total)]);
  std::vector<int64_t> committed(work.size(), 0);
  std::atomic<bool> failed{false};
  std::atomic<int64_t> bad_slice{INT64_MAX};

  parallel_for(int64_t(work.size()), threads_for(total * int64_t(std::max<size_t>(K, 1)) / 4, n_threads),
               [&](int64_t wi) {
    if (failed.load(std::memory_order_relaxed)) return;
    const Work& wk = work[wi];
    const SlicePlan& p = plan[wk.slice];
    alignas(64) float acc[kBlock];
    const size_t m = p.clients.size();
    for (int64_t b = wk.begin; b < wk.end; b += kBlock) {
      const int64_t n = std::min(kBlock, wk.end - b);
      std::fill(acc, acc + n, 0.0f);
      size_t j = 0;
      while (j < m) {
        if (j + 4 <= m) {
          const Input* x4[4] = {&inputs[p.clients[j]], &inputs[p.clients[j + 1]],
                                &inputs[p.clients[j + 2]], &inputs[p.clients[j + 3]]};
          if (x4[1]->dtype == x4[0]->dtype && x4[2]->dtype == x4[0]->dtype && x4[3]->dtype == x4[0]->dtype) {
            axpy4(acc, x4, b, n, &p.w[j]);
            j += 4;
            continue;
          }
        }
        axpy(acc, inputs[p.clients[j]], b, n, p.w[j]);
        ++j;
      }
      if (scale_check(acc, n, p.div)) {
        failed.store(true, std::memory_order_relaxed);
        atomic_min(bad_slice, wk.slice);
        return;
      }
      float* o = out + b;
      std::memcpy(backup.get() + wk.pos + (b - wk.begin), o, size_t(n) * 4);
      std::memcpy(o, acc, size_t(n) * 4);
      committed[wi] = b + n - wk.begin;
    }
  });

  if (!failed.load()) return AggError{};
  // Roll back, then find the culprit deterministically.
  for (size_t wi = 0; wi < work.size(); ++wi)
    if (committed[wi] > 0)
      std::memcpy(out + work[wi].begin, backup.get() + work[wi].pos, size_t(committed[wi]) * 4);
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
