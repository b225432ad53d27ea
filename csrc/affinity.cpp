// Task-affinity kernels; see affinity.hpp.
#include "affinity.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "common.hpp"

namespace fmtl {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

inline int ctz32(uint32_t v) { return __builtin_ctz(v); }
inline int popc32(uint32_t v) { return __builtin_popcount(v); }

// Parallel loop over [0, n) in blocks, dynamically scheduled.
template <class Fn>
void for_masks(uint64_t n, int n_threads, Fn&& fn) {
  const uint64_t block = 1024;
  const int64_t n_blocks = int64_t((n + block - 1) / block);
  if (n < 4096) n_threads = 1;
  parallel_for(n_blocks, n_threads, [&](int64_t b) {
    const uint64_t lo = uint64_t(b) * block, hi = std::min<uint64_t>(n, lo + block);
    for (uint64_t m = lo; m < hi; ++m) fn(uint32_t(m));
  });
}

// max over sub ⊆ mask containing mask's lowest bit of f[sub] + prev[mask \ sub];
// returns the value and (optionally) the arg.  Deterministic scan order.
inline double best_split(const double* f, const double* prev, uint32_t mask, uint32_t* arg) {
  const uint32_t low = mask & (~mask + 1u);
  const uint32_t r = mask ^ low;
  double bv = kNegInf;
  uint32_t ba = 0;
  for (uint32_t s = r;; s = (s - 1) & r) {
    const double v = f[s | low] + prev[r ^ s];
    if (v > bv) { bv = v; ba = s | low; }
    if (s == 0) break;
  }
  if (arg) *arg = ba;
  return bv;
}

}  // namespace

std::vector<double> self_affinity(const double* S, int n) {
  std::vector<double> out(S, S + size_t(n) * n);
  for (int i = 0; i < n; ++i) {
    double s = 0.0;
    for (int j = 0; j < n; ++j)
      if (j != i) s += S[size_t(i) * n + j] + S[size_t(j) * n + i];
    out[size_t(i) * n + i] = n > 1 ? s / double(2 * n - 2) : 0.0;
  }
  return out;
}

std::vector<double> subset_scores(const double* Sd, int n, int /*n_threads*/) {
  const uint32_t N = 1u << n;
  std::vector<double> pair(N, 0.0), score(N, 0.0);
  // T[b][i] = S[i,b] + S[b,i]
  std::vector<double> T(size_t(n) * n);
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < n; ++i) T[size_t(b) * n + i] = Sd[size_t(i) * n + b] + Sd[size_t(b) * n + i];
  for (uint32_t m = 1; m < N; ++m) {
    const int b = ctz32(m);
    const uint32_t rest = m & (m - 1);
    double cross = 0.0;
    for (uint32_t r = rest; r; r &= r - 1) cross += T[size_t(b) * n + ctz32(r)];
    pair[m] = pair[rest] + cross;
    const int pc = popc32(m);
    score[m] = pc == 1 ? Sd[size_t(b) * n + b] : pair[m] / double(pc - 1);
  }
  return score;
}

PartitionResult best_partition(const std::vector<double>& f, int n, int k, bool at_most,
                               int n_threads) {
  const uint32_t N = 1u << n, full = N - 1;
  k = std::min(k, n);
  // layers[j] = best value of a partition of mask into exactly j+1 groups.
  std::vector<std::unique_ptr<double[]>> layers;
  layers.emplace_back(new double[N]);
  {
    double* L1 = layers[0].get();
    for (uint32_t m = 0; m < N; ++m) L1[m] = f[m];
    L1[0] = kNegInf;
  }
  for (int j = 2; j <= k - 1; ++j) {
    layers.emplace_back(new double[N]);
    const double* prev = layers[j - 2].get();
    double* cur = layers[j - 1].get();
    for_masks(N, n_threads, [&](uint32_t m) {
      cur[m] = popc32(m) >= j ? best_split(f.data(), prev, m, nullptr) : kNegInf;
    });
  }
  // Values for the full set with exactly j groups, j = 1..k.
  std::vector<double> full_val(k + 1, kNegInf);
  full_val[1] = layers[0][full];
  for (int j = 2; j <= k; ++j) full_val[j] = best_split(f.data(), layers[j - 2].get(), full, nullptr);
  int kk = k;
  if (at_most) {
    kk = 1;
    for (int j = 2; j <= k; ++j) if (full_val[j] > full_val[kk]) kk = j;
  }
  PartitionResult res;
  res.score = full_val[kk];
  if (!(res.score > kNegInf)) return res;
  uint32_t mask = full;
  for (int j = kk; j >= 2; --j) {
    uint32_t g = 0;
    best_split(f.data(), layers[j - 2].get(), mask, &g);
    res.groups.push_back(g);
    mask ^= g;
  }
  res.groups.push_back(mask);
  std::sort(res.groups.begin(), res.groups.end(),
            [](uint32_t a, uint32_t b) { return ctz32(a) < ctz32(b); });
  return res;
}

TagResult tag_select(const double* Sd, int n, int max_groups, int n_threads) {
  TagResult res;
  if (n == 1) {
    res.groups = {1u};
    res.assignment = {0};
    res.score = Sd[0];
    return res;
  }
  const uint32_t N = 1u << n;
  // h[T] = max over G ⊇ T, |G| >= 2 of sum_{j in T} onto(j, G); argG[T] the G.
  // Each thread keeps its own tables; merged in thread order (deterministic).
  int nt = n_threads <= 0 ? default_threads() : n_threads;
  if (n < 12) nt = 1;
  std::vector<std::vector<double>> hs(nt, std::vector<double>(N, kNegInf));
  std::vector<std::vector<uint32_t>> gs(nt, std::vector<uint32_t>(N, 0));
  const int64_t n_blocks = int64_t(N + 255) / 256;
  // One item per thread slot; blocks of G are strided over the slots.
  parallel_for(nt, nt, [&](int64_t tid) {
    double* h = hs[tid].data();
    uint32_t* ga = gs[tid].data();
    std::vector<double> sub(size_t(1) << n);
    std::vector<uint32_t> tmask(size_t(1) << n);
    double a[32];
    int idx[32];
    for (int64_t b = tid; b < n_blocks; b += nt) {
      const uint32_t lo = uint32_t(b) * 256, hi = std::min<uint32_t>(N, lo + 256);
      for (uint32_t G = lo; G < hi; ++G) {
        const int g = popc32(G);
        if (g < 2) continue;
        int c = 0;
        for (uint32_t r = G; r; r &= r - 1) {
          const int j = ctz32(r);
          double s = 0.0;
          for (uint32_t q = G; q; q &= q - 1) {
            const int i = ctz32(q);
            if (i != j) s += Sd[size_t(i) * n + j];
          }
          a[c] = s / double(g - 1);
          idx[c] = j;
          ++c;
        }
        // Enumerate T ⊆ G via compressed index t in [1, 2^g).
        sub[0] = 0.0;
        tmask[0] = 0;
        const uint32_t ng = 1u << g;
        for (uint32_t t = 1; t < ng; ++t) {
          const int lb = ctz32(t);
          const uint32_t rest = t & (t - 1);
          const double v = sub[rest] + a[lb];
          const uint32_t T = tmask[rest] | (1u << idx[lb]);
          sub[t] = v;
          tmask[t] = T;
          if (v > h[T]) { h[T] = v; ga[T] = G; }
        }
      }
    }
  });
  std::vector<double> h = std::move(hs[0]);
  std::vector<uint32_t> argG = std::move(gs[0]);
  for (int t = 1; t < nt; ++t)
    for (uint32_t T = 0; T < N; ++T)
      if (hs[t][T] > h[T] || (hs[t][T] == h[T] && gs[t][T] < argG[T])) { h[T] = hs[t][T]; argG[T] = gs[t][T]; }
  // Ties: the numerically smallest G wins (within a thread G is scanned in
  // increasing order with strict '>'; the merge applies the same rule), so the
  // result does not depend on the thread count.
  h[0] = 0.0;
  PartitionResult part = best_partition(h, n, std::min(max_groups, n), true, n_threads);
  // Chosen groups: distinct argG of the parts.
  std::vector<uint32_t> chosen;
  for (uint32_t T : part.groups) chosen.push_back(argG[T]);
  std::sort(chosen.begin(), chosen.end(), [](uint32_t a, uint32_t b) {
    const int la = ctz32(a), lb = ctz32(b);
    return la != lb ? la < lb : a < b;
  });
  chosen.erase(std::unique(chosen.begin(), chosen.end()), chosen.end());
  res.groups = chosen;
  res.assignment.assign(n, -1);
  res.score = 0.0;
  for (int j = 0; j < n; ++j) {
    double best = kNegInf;
    for (size_t gi = 0; gi < chosen.size(); ++gi) {
      const uint32_t G = chosen[gi];
      if (!(G >> j & 1u)) continue;
      double s = 0.0;
      for (uint32_t q = G; q; q &= q - 1) {
        const int i = ctz32(q);
        if (i != j) s += Sd[size_t(i) * n + j];
      }
      const double v = s / double(popc32(G) - 1);
      if (v > best) { best = v; res.assignment[j] = int(gi); }
    }
    res.score += best;
  }
  return res;
}

}  // namespace fmtl
