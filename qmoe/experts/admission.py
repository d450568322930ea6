"""Which predicted experts are worth a speculative read: prediction must never cost.

On a drive that is busy, a wrong prefetch takes a read's worth of bandwidth from the
demand misses behind it; measured on a 32 GB model streamed from a 0.7 GB/s disk,
cross-layer prefetching with a fixed k' read 45 % more and ran no faster than none
(issue 14). So a prediction (experts most wanted first) is trimmed before the store
queues it:

    resident       kept unless its rank has been wrong at least as often as right:
                   protecting a slab costs no read, but it holds a slot that LRU would
                   otherwise give to what is used (a wide, poorly ranked prediction
                   protecting wrong slabs made pre-attn read more than none)
    spare reads    the reads the drive can finish before the layer needs them, beside
                   what is queued already: admitted in rank order, right or wrong,
                   since the drive would otherwise sit idle
    beyond those   a read that competes with demand misses: admitted only for a rank
                   that has been right more often than wrong (its measured precision
                   > 1/2), where a right guess saves the stall of one demand read and a
                   wrong one adds one read to the queue

The spare reads come from two measurements the store keeps (store.spare_reads): the
time between a layer's prediction and its forward pass, and the time one slab read
takes. Rank precision comes from scoring every prediction, whole, against the routing
(stats.PredictionScorer). Before either is measured, every candidate is admitted, so
the first steps measure both.
"""

from __future__ import annotations

from collections.abc import Callable

BREAK_EVEN = 0.5  # a competing read pays off when its guess is right more often than wrong


def admit(ranked: list[int], resident: Callable[[int], bool], spare_reads: int | None,
          rank_precision: Callable[[int], float | None]) -> list[int]:
    """The experts of `ranked` (most wanted first) worth prefetching; see the module docstring.

    resident(e): the expert's slab is in the compute tier already; spare_reads: reads the
    drive has time for before the layer runs (None: not measured yet: admit all);
    rank_precision(r): how often rank r was right (None: not scored yet).
    """
    if spare_reads is None:
        return list(ranked)
    kept, free = [], spare_reads
    for rank, expert in enumerate(ranked):
        precision = rank_precision(rank)
        if resident(expert):
            if precision is None or precision > BREAK_EVEN:
                kept.append(expert)
        elif free > 0:
            kept.append(expert)
            free -= 1
        elif precision is not None and precision > BREAK_EVEN:
            kept.append(expert)
    return kept
