"""Task affinity: lookahead measurement (client), averaging and split search (server).

Public API (stable):

- :func:`self_affinity` — Eq. 4 of MAS, fills the diagonal.
- :func:`best_partition` — exact split of the tasks into ``n_splits`` groups maximising the total
  affinity onto each task within its group (DP over subsets in C++; MAS Alg. 1 line 14).
- :func:`best_partition_at_most`, :func:`subset_scores`, :func:`group_score`, :func:`tag_groups`.
- :func:`lookahead_affinity` and :class:`AffinityAverager` — Eq. 3 and the server average.

Convention: ``S[i, j]`` = effect of task i's lookahead step on task j's loss.
"""

from fmtl_edge.affinity.measure import AffinityAverager, lookahead_affinity
from fmtl_edge.affinity.search import (
    MAX_TASKS,
    Partition,
    TagSelection,
    best_partition,
    best_partition_at_most,
    best_partition_reference,
    group_score,
    self_affinity,
    set_partitions,
    subset_scores,
    tag_groups,
)

__all__ = [
    "MAX_TASKS",
    "AffinityAverager",
    "Partition",
    "TagSelection",
    "best_partition",
    "best_partition_at_most",
    "best_partition_reference",
    "group_score",
    "lookahead_affinity",
    "self_affinity",
    "set_partitions",
    "subset_scores",
    "tag_groups",
]
