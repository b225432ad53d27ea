// Task-affinity kernels (MAS seed 003, TAG): self-affinity (MAS Eq. 4), the
// 2^n subset scores, the exact split search (DP over subsets) and TAG's
// overlapping group selection.  Matrices are row-major n x n doubles with
// S[i*n + j] = effect of task i's lookahead step on task j's loss.
#pragma once

#include <cstdint>
#include <vector>

namespace fmtl {

constexpr int kMaxTasks = 20;  // largest n the subset kernels accept

// Copy of S with S[i,i] = sum_{j!=i} (S[i,j] + S[j,i]) / (2n - 2); 0 for n == 1.
std::vector<double> self_affinity(const double* S, int n);

// score[mask] for every subset (bit i = task i) of a matrix whose diagonal holds
// the self-affinity: |G| >= 2: sum of the off-diagonal entries inside G divided
// by |G| - 1 (= sum_{j in G} mean_{i in G\{j}} S[i,j]); |G| == 1: S[j,j];
// score[0] = 0.
std::vector<double> subset_scores(const double* Sd, int n, int n_threads);

struct PartitionResult {
  std::vector<uint32_t> groups;  // bitmasks, ordered by lowest task
  double score = 0.0;
};

// Best partition of {0..n-1} into exactly k (at_most: 1..k) non-empty groups
// maximising the sum of f over the groups (f = subset scores, size 2^n).
// Entries of f may be -inf (group not allowed).  Exact DP, O(k 3^n).
// Tie-break: the group holding the lowest remaining task is chosen first; among
// equal sums the candidate with the numerically largest bitmask wins (submasks
// are scanned in decreasing order, strict '>'); with at_most, fewer groups win
// ties.  Returns score = -inf and no groups when no partition is feasible.
PartitionResult best_partition(const std::vector<double>& f, int n, int k, bool at_most,
                               int n_threads);

struct TagResult {
  std::vector<uint32_t> groups;       // chosen groups (bitmasks), sorted by lowest task then mask
  std::vector<int> assignment;        // per task: index into groups of its best group
  double score = 0.0;                 // sum_j max_{G chosen, j in G} onto(j, G)
};

// TAG network selection (Fifty et al. 2021): at most max_groups possibly
// overlapping groups of size >= 2 (size 1 only when n == 1) covering every task,
// maximising sum_j max_{G ∋ j} mean_{i in G\{j}} S[i,j].  Exact: the optimum
// equals the best partition of the tasks into <= max_groups parts T with value
// h(T) = max_{G ⊇ T, |G| >= 2} sum_{j in T} onto(j, G).  O(3^n + x 3^n).
TagResult tag_select(const double* Sd, int n, int max_groups, int n_threads);

}  // namespace fmtl
