// CUDA slice aggregation: one launch computes every contributing slice.
// Arithmetic matches the CPU kernel exactly (compiled with --fmad=false):
// acc = 0; acc = acc + float(w_k / w_first) * x_k (client order);
// out = acc / float(W / w_first).
#include "aggregate_cuda.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fmtl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // elements per CUDA block

struct DevChunk {
  int64_t begin;      // absolute element index
  int64_t end;
  int64_t pos;        // position in the backup buffer
  int32_t slice;
  int32_t pad;
};

struct DevSlice {
  int32_t first;      // index into the contributor arrays
  int32_t count;
  float div;
  int32_t pad;
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fmtl_edge CUDA aggregation: ") + what + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ float load_elem(const void* p, int dt, int64_t i) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  const unsigned short b = static_cast<const unsigned short*>(p)[i];
  if (dt == 2) return __uint_as_float(uint32_t(b) << 16);
  // binary16 -> binary32, exact (same bit trick as the CPU path)
  const uint32_t sign = uint32_t(b & 0x8000u) << 16;
  const uint32_t em = b & 0x7fffu;
  uint32_t bits = __float_as_uint(__fmul_rn(__uint_as_float(em << 13), 0x1p112f));
  bits |= (em >= 0x7c00u) ? 0x7f800000u : 0u;
  return __uint_as_float(bits | sign);
}

__global__ void wavg_kernel(float* __restrict__ out, float* __restrict__ backup,
                            const DevChunk* __restrict__ chunks, const DevSlice* __restrict__ slices,
                            const int32_t* __restrict__ client, const float* __restrict__ w,
                            const void* const* __restrict__ ptrs, const int32_t* __restrict__ dts,
                            int* __restrict__ flag) {
  const DevChunk c = chunks[blockIdx.x];
  const DevSlice s = slices[c.slice];
  bool bad = false;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < s.count; ++j) {
      const int k = client[s.first + j];
      acc = __fadd_rn(acc, __fmul_rn(w[s.first + j], load_elem(ptrs[k], dts[k], i)));
    }
    const float r = __fdiv_rn(acc, s.div);
    bad |= (__float_as_uint(r) & 0x7f800000u) == 0x7f800000u;
    if (backup) backup[c.pos + (i - c.begin)] = out[i];
    out[i] = r;
  }
  if (bad) atomicOr(flag, 1);
}

__global__ void restore_kernel(float* __restrict__ out, const float* __restrict__ backup,
                               const DevChunk* __restrict__ chunks) {
  const DevChunk c = chunks[blockIdx.x];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) out[i] = backup[c.pos + (i - c.begin)];
}

// first_bad[k] = min index of a non-finite contributing element of client k.
__global__ void scan_kernel(const DevChunk* __restrict__ chunks, const DevSlice* __restrict__ slices,
                            const int32_t* __restrict__ client, const void* const* __restrict__ ptrs,
                            const int32_t* __restrict__ dts, unsigned long long* __restrict__ first_bad) {
  const DevChunk c = chunks[blockIdx.x];
  const DevSlice s = slices[c.slice];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    for (int j = 0; j < s.count; ++j) {
      const int k = client[s.first + j];
      const float v = load_elem(ptrs[k], dts[k], i);
      if ((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u)
        atomicMin(&first_bad[k], (unsigned long long)i);
    }
  }
}

// Stream-ordered allocation where the driver supports memory pools, else a
// plain (synchronising) cudaMalloc.  `pooled` says which free to use.
cudaError_t dev_alloc(void** p, size_t bytes, cudaStream_t stream, bool* pooled) {
  cudaError_t e = cudaMallocAsync(p, bytes, stream);
  if (e == cudaSuccess) { *pooled = true; return e; }
  cudaGetLastError();
  *pooled = false;
  return cudaMalloc(p, bytes);
}

void dev_free(void* p, cudaStream_t stream, bool pooled) {
  if (!p) return;
  if (pooled) cudaFreeAsync(p, stream);
  else { cudaStreamSynchronize(stream); cudaFree(p); }
}

template <class T>
size_t append(std::vector<char>& buf, const std::vector<T>& v) {
  const size_t off = (buf.size() + 15) & ~size_t(15);
  buf.resize(off + v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(buf.data() + off, v.data(), v.size() * sizeof(T));
  return off;
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  return n;
}

std::string version_string() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  cudaGetLastError();
  return "runtime " + std::to_string(rt) + ", driver " + std::to_string(drv);
}

AggError weighted_average_slices(float* out, const std::vector<Input>& inputs,
                                 const std::vector<double>& weights,
                                 const std::vector<SliceSpec>& slices, const uint8_t* contrib,
                                 uintptr_t stream_handle, bool check_finite, int device) {
  // This module links its own (static) CUDA runtime, whose current device is
  // independent of the caller's (e.g. torch's): select the tensors' device.
  struct DeviceGuard {
    int prev = -1;
    explicit DeviceGuard(int d) {
      if (cudaGetDevice(&prev) != cudaSuccess) { cudaGetLastError(); prev = -1; }
      if (d >= 0 && d != prev) check(cudaSetDevice(d), "cudaSetDevice");
    }
    ~DeviceGuard() { if (prev >= 0) cudaSetDevice(prev); }
  } guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t K = inputs.size(), S = slices.size();
  std::vector<DevSlice> ds(S);
  std::vector<int32_t> cl;
  std::vector<float> wf;
  std::vector<DevChunk> chunks;
  int64_t pos = 0;
  for (size_t s = 0; s < S; ++s) {
    double tot = 0.0, ref = 0.0;
    ds[s].first = int32_t(cl.size());
    for (size_t k = 0; k < K; ++k) {
      if (!contrib[s * K + k]) continue;
      if (ref == 0.0) ref = weights[k];
      cl.push_back(int32_t(k));
      wf.push_back(float(weights[k] / ref));
      tot += weights[k];
    }
    ds[s].count = int32_t(cl.size()) - ds[s].first;
    ds[s].div = ds[s].count ? float(tot / ref) : 1.0f;
    ds[s].pad = 0;
    if (!ds[s].count || slices[s].length <= 0) continue;
    for (int64_t b = 0; b < slices[s].length; b += kChunk) {
      const int64_t e = std::min(slices[s].length, b + kChunk);
      chunks.push_back(DevChunk{slices[s].offset + b, slices[s].offset + e, pos, int32_t(s), 0});
      pos += e - b;
    }
  }
  if (chunks.empty()) return AggError{};
  if (chunks.size() > 0x7fffffffu) throw std::runtime_error("fmtl_edge CUDA aggregation: too many chunks");
  std::vector<const void*> ptrs(K);
  std::vector<int32_t> dts(K);
  for (size_t k = 0; k < K; ++k) { ptrs[k] = inputs[k].data; dts[k] = int32_t(inputs[k].dtype); }
  std::vector<char> host;
  const size_t o_chunks = append(host, chunks), o_slices = append(host, ds), o_cl = append(host, cl),
               o_w = append(host, wf), o_ptrs = append(host, ptrs), o_dts = append(host, dts);
  const size_t o_flag = append(host, std::vector<unsigned long long>(K + 1, ~0ull));

  char* dev = nullptr;
  bool dev_pooled = false, backup_pooled = false;
  check(dev_alloc(reinterpret_cast<void**>(&dev), host.size(), stream, &dev_pooled), "allocate descriptors");
  float* backup = nullptr;
  AggError result;
  try {
    check(cudaMemcpyAsync(dev, host.data(), host.size(), cudaMemcpyHostToDevice, stream), "upload descriptors");
    int* flag = reinterpret_cast<int*>(dev + o_flag);
    unsigned long long* first_bad = reinterpret_cast<unsigned long long*>(dev + o_flag) + 1;
    check(cudaMemsetAsync(flag, 0, sizeof(int), stream), "memset flag");
    if (check_finite)
      check(dev_alloc(reinterpret_cast<void**>(&backup), size_t(pos) * 4, stream, &backup_pooled), "allocate backup");
    const auto* dc = reinterpret_cast<const DevChunk*>(dev + o_chunks);
    const auto* dsl = reinterpret_cast<const DevSlice*>(dev + o_slices);
    const auto* dcl = reinterpret_cast<const int32_t*>(dev + o_cl);
    const auto* dw = reinterpret_cast<const float*>(dev + o_w);
    const auto* dp = reinterpret_cast<const void* const*>(dev + o_ptrs);
    const auto* ddt = reinterpret_cast<const int32_t*>(dev + o_dts);
    wavg_kernel<<<unsigned(chunks.size()), kThreads, 0, stream>>>(out, backup, dc, dsl, dcl, dw, dp, ddt, flag);
    check(cudaGetLastError(), "launch wavg_kernel");
    if (check_finite) {
      int hflag = 0;
      check(cudaMemcpyAsync(&hflag, flag, sizeof(int), cudaMemcpyDeviceToHost, stream), "read flag");
      check(cudaStreamSynchronize(stream), "synchronize");
      if (hflag) {
        restore_kernel<<<unsigned(chunks.size()), kThreads, 0, stream>>>(out, backup, dc);
        check(cudaGetLastError(), "launch restore_kernel");
        scan_kernel<<<unsigned(chunks.size()), kThreads, 0, stream>>>(dc, dsl, dcl, dp, ddt, first_bad);
        check(cudaGetLastError(), "launch scan_kernel");
        std::vector<unsigned long long> fb(K);
        if (K) check(cudaMemcpyAsync(fb.data(), first_bad, K * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream), "read scan");
        check(cudaStreamSynchronize(stream), "synchronize");
        result.kind = 2;
        for (size_t k = 0; k < K; ++k) {
          if (fb[k] != ~0ull) {
            result.kind = 1; result.client = int(k); result.index = int64_t(fb[k]);
            break;
          }
        }
        for (size_t s = 0; s < S; ++s)
          if (result.index >= slices[s].offset && result.index < slices[s].offset + slices[s].length) result.slice = int64_t(s);
      }
    }
  } catch (...) {
    cudaStreamSynchronize(stream);
    dev_free(backup, stream, backup_pooled);
    dev_free(dev, stream, dev_pooled);
    throw;
  }
  dev_free(backup, stream, backup_pooled);
  dev_free(dev, stream, dev_pooled);
  // No final synchronisation: a host-to-device cudaMemcpyAsync from pageable
  // memory returns only once the source has been staged, so `host` may go.
  return result;
}

}  // namespace cuda
}  // namespace fmtl
