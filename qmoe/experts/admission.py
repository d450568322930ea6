"""Which predicted experts are worth a speculative read: prediction must never cost.

On a drive that is busy, a wrong prefetch takes a read's worth of bandwidth from the
demand misses behind it; measured on a 32 GB model streamed from a 0.7 GB/s disk,
cross-layer prefetching with a fixed k' read 45 % more and ran no faster than none
(issue 14). So a prediction (experts most wanted first) is trimmed before the store
queues it, by how often each of its ranks has been right (its measured precision,
scored apart for predictions made a layer or more ahead, and apart for candidates that
were resident and absent: stats.PredictionScorer):

    resident       kept unless its rank has been wrong at least as often as right:
                   protecting a slab costs no read, but it holds a slot that LRU would
                   otherwise give to what is used (a wide, poorly ranked prediction
                   protecting wrong slabs made pre-attn read more than none)
    absent         read only for a rank right more often than wrong (precision > 1/2):
                   a right guess saves the stall of one demand read, a wrong one costs a
                   read and a slot, whether or not the drive had time to spare

A read into the drive's idle time before the layer is not free either: it takes a pool
slot from the working set, and on a virtual drive the reads slow the kernels beside them.
Admitting such reads in rank order, right or wrong (as an earlier rule did), made pre-attn
with one layer of lookahead read 135 MB a token on the 12-layer bench file against none's
57, 1.4 GB of it never used; by precision alone it read 62. The width of a prediction is
thus the ranks its scores admit, not a fixed k'. A rank not scored yet reads nothing: the
scoring needs no reads, as every prediction is scored against the routing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

BREAK_EVEN = 0.5  # a read pays off when its guess is right more often than wrong


def admit(ranked: list[int], resident: Callable[[int], bool],
          precisions: Sequence[float | None]) -> list[int]:
    """The experts of `ranked` (most wanted first) worth prefetching; see the module docstring.

    resident(e): the expert's slab is in the compute tier already; precisions[r]: how
    often a candidate of rank r, resident or absent as ranked[r] was when predicted, was
    right (None: not scored yet), for every rank of `ranked`.
    """
    kept = []
    for expert, precision in zip(ranked, precisions, strict=True):
        if resident(expert):
            if precision is None or precision > BREAK_EVEN:
                kept.append(expert)
        elif precision is not None and precision > BREAK_EVEN:
            kept.append(expert)
    return kept
