// CPU slice aggregation kernels (weighted average, streaming accumulator,
// coordinate-wise median, trimmed mean).  Pure C++: no Python types here.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common.hpp"

namespace fmtl {

// One client's parameter vector: `n_elems` little-endian elements of `dtype`.
struct Input {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t n_elems = 0;
};

// A parameter slice [offset, offset + length) of the flat parameter vector.
struct SliceSpec {
  int64_t offset = 0;
  int64_t length = 0;
};

// Outcome of a kernel call.  kind: 0 ok, 1 non-finite value in client `client`
// at flat element `index`, 2 the float32 weighted sum overflowed in slice
// `slice` (all inputs finite).  On kind != 0 the output was left untouched.
struct AggError {
  int kind = 0;
  int client = -1;
  int64_t index = -1;
  int64_t slice = -1;
};

// out[off:off+len] = sum_k w_k x_k / sum_k w_k for every slice with at least one
// contributor (contrib is S x K row-major, nonzero = contributes).  Float32
// accumulation in client order with weights relative to the slice's first
// contributor f: acc = 0; acc = acc + float(w_k / w_f) * x_k; then
// out = acc / float(W / w_f), W = sum_k w_k in double.  (A single client, or
// equal weights, thus multiply by exactly 1.)  With rollback (default) the
// call is atomic: on error nothing is written (costs one extra read and one
// extra write of the written part of out).  Without it, out is written with
// non-temporal stores and may be partly updated when an error is returned.
// Shapes/ranges must have been validated by the caller.
AggError weighted_average_slices(float* out, const std::vector<Input>& inputs,
                                 const std::vector<double>& weights,
                                 const std::vector<SliceSpec>& slices,
                                 const uint8_t* contrib, int n_threads, bool rollback = true);

// Bytes held by the process-wide rollback scratch of weighted_average_slices
// (grows to the largest P aggregated; reused), and a way to free it.
size_t scratch_bytes();
void release_scratch();

// Coordinate-wise median / trimmed mean over the contributing clients of each
// slice (unweighted).  trimmed: drops floor(trim_fraction * m) smallest and
// largest of the m contributors per coordinate, averages the rest (double sum).
// Median of an even count is the mean of the two middle values.
AggError coordinate_median(float* out, const std::vector<Input>& inputs,
                           const std::vector<SliceSpec>& slices,
                           const uint8_t* contrib, int n_threads);
AggError trimmed_mean(float* out, const std::vector<Input>& inputs,
                      const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                      double trim_fraction, int n_threads);

// Index of the first non-finite element of x within the given slices (-1 if
// none); only slices with mask[s] != 0 are scanned (mask may be null = all).
int64_t find_nonfinite(const Input& x, const std::vector<SliceSpec>& slices,
                       const uint8_t* mask, int n_threads);

// Streaming weighted average: O(P) state, one client at a time.  Gives bit-for-
// bit the result of weighted_average_slices over the same clients in the same
// order.
class Accumulator {
 public:
  Accumulator(int64_t n_params, std::vector<SliceSpec> slices);
  // Adds w * x to the slices with contrib[s] != 0.  Validates x first: on a
  // non-finite element returns kind 1 (client = -1) and changes nothing.
  AggError add(const Input& x, double weight, const uint8_t* contrib, int n_threads);
  // Writes acc / total weight into out for slices with total weight > 0.
  void result(float* out, int n_threads) const;
  void reset();
  int64_t n_params() const { return n_params_; }
  int64_t n_added() const { return n_added_; }
  int64_t n_slices() const { return int64_t(slices_.size()); }
  const std::vector<double>& total_weight() const { return wsum_; }
  int64_t state_bytes() const { return int64_t(acc_size_) * 4 + int64_t(wsum_.size()) * 8; }
  bool poisoned() const { return poisoned_; }

 private:
  int64_t n_params_;
  std::vector<SliceSpec> slices_;
  std::vector<int64_t> acc_off_;  // offset of each slice in acc_
  std::unique_ptr<float[]> acc_;
  size_t acc_size_ = 0;
  std::vector<double> wsum_;
  std::vector<double> wref_;  // weight of the first contributor per slice
  int64_t n_added_ = 0;
  bool poisoned_ = false;
};

}  // namespace fmtl
