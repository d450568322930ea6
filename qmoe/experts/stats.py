"""What the expert store and the prefetcher measured: per layer and for the whole run.

Counted per MoE layer, once per routed expert per forward pass:
    hit     the expert was ready in the compute tier when the layer needed it
    late    it was on its way (a prefetch not yet finished, or still queued)
    miss    nothing had asked for it
    stall   seconds the model waited for transfers (late or missed experts)
and per prediction (one per layer and forward pass, P = predicted set, T = the
experts the router chose, both over the pass's tokens):
    precision = sum |P & T| / sum |P|,  recall = sum |P & T| / sum |T|
(a layer the policy makes no prediction for, like the first under cross-layer,
adds to |T| only: its recall counts the experts nobody predicted; with
--lookahead, the prediction scored is the last that came before the layer ran,
the layer's own when it was in time). A prediction
that arrives after its layer ran still counts here, for the predictor's accuracy;
`late_predictions` says how many came too late to prefetch anything. Passes that
the governor ran without prefetching (governor.py) are not scored.

For the run: bytes moved into each tier, transfer count and busy time (wall time
with at least one transfer running, including any simulated link time), and the
share of that busy time that overlapped compute, 1 - stall / busy: the model stalls
only while a transfer it needs is running or queued, so busy time not spent
stalling ran beside compute.

The store keeps the hits, stalls and transfer figures (StoreStats, under its lock), the
prefetcher's PredictionScorer the predictions' (PredictionStats); `report` puts them side
by side.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from qmoe.experts.governor import describe as describe_governor
from qmoe.experts.options import format_bytes

UNPREDICTED_KEPT = 1024  # routed passes whose late prediction may still be scored
LAYER_PRIOR = 8  # pseudo-counts of every layer's precision in a layer's own (rank_precisions)


@dataclass
class LayerStats:
    """The store's count for one MoE layer."""

    hits: int = 0
    late: int = 0
    misses: int = 0
    stall_s: float = 0.0


@dataclass
class StoreStats:
    """What the store counts (under its lock): residency per layer, transfers, prefetch requests."""

    layers: dict[int, LayerStats]
    bytes_into: dict[str, int] = field(default_factory=lambda: {"ram": 0, "fast": 0})
    transfers: int = 0
    transfer_s: float = 0.0  # wall time with any transfer running
    simulated_s: float = 0.0  # the workers' sleeps for the simulated link, summed (several at once: can exceed transfer_s)
    prefetch_requested: int = 0  # experts named by predictions in time to be useful
    prefetch_loaded: int = 0  # of those, transfers actually made
    prefetch_dropped: int = 0  # dropped unstarted: the layer had run, or no slot could be freed

    @classmethod
    def for_layers(cls, layers: list[int]) -> StoreStats:
        return cls({layer: LayerStats() for layer in layers})


@dataclass
class LayerScores:
    """The predictions' score for one MoE layer, summed over forward passes."""

    predicted: int = 0  # sum |P|
    actual: int = 0  # sum |T|
    correct: int = 0  # sum |P & T|


@dataclass
class PredictionStats:
    layers: dict[int, LayerScores]
    predictions: int = 0  # predictions made (one per MoE layer and forward pass, more with lookahead)
    late_predictions: int = 0  # predictions that arrived after their layer had been routed
    predict_s: float = 0.0  # the prefetcher's time computing them (the predictor's run-time cost)

    @classmethod
    def for_layers(cls, layers: list[int]) -> PredictionStats:
        return cls({layer: LayerScores() for layer in layers})


class PredictionScorer:
    """Scores each prediction against the routing of the forward pass it was made for.

    The prefetcher reports both sides: `predicted` when a prediction is made (for pass
    `step` of its layer, `distance` MoE layers ahead: 0 for the layer's own, 1.. for
    lookahead guesses), `routed` when the layer's router has chosen. Whichever comes
    second scores the pair. Of several predictions for one pass, the last one before the
    routing (the nearest) counts in the layer's precision and recall; one that arrives after
    it is late, and the first late one is still scored against that routing (kept for the
    last UNPREDICTED_KEPT unpredicted passes), so that its accuracy counts all the same.

    Every distance's latest prediction is also scored rank by rank, apart, and apart for
    the candidates that were resident when it was made and those that were not: what a
    speculative read is admitted by (admission.py). A guess made a layer ahead, from a
    residual stream that lacks that layer's expert output, is right less often than the
    layer's own prediction at the same rank, so it must not borrow the latter's precision.
    Nor may an absent candidate borrow a resident one's: the pool holds the experts the
    router chooses most, so at the same rank an absent one tends to be right less often
    (on the 48-layer bench file two layers ahead, 0.60 against 0.70 at rank 6), and the
    absent ones are the only ones read.
    Thread-safe: predictions may come from a worker thread.
    """

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.stats = PredictionStats.for_layers(self.layers)
            # layer -> (step, distance -> the latest prediction at that distance, and which of its
            # candidates were resident)
            self.pending: dict[int, tuple[int, dict[int, tuple[list[int], list[bool]]]]] = {}
            self.routed_steps: dict[int, int] = {}  # layer -> passes routed so far
            self.unpredicted: dict[tuple[int, int], set[int]] = {}  # (layer, step) routed unpredicted
            # Per (distance, rank, resident) of the ranked predictions (most wanted first): how
            # often such a candidate was named, and right, over every layer (rank_*) and per
            # layer (layer_*, keyed (layer, distance, rank, resident)).
            self.rank_named: dict[tuple[int, int, bool], int] = defaultdict(int)
            self.rank_correct: dict[tuple[int, int, bool], int] = defaultdict(int)
            self.layer_named: dict[tuple[int, int, int, bool], int] = defaultdict(int)
            self.layer_correct: dict[tuple[int, int, int, bool], int] = defaultdict(int)

    def predicted(self, layer: int, step: int, experts: list[int], seconds: float, distance: int = 0,
                  resident: Sequence[bool] | None = None) -> None:
        """resident: for each of `experts`, whether its slab was in the compute tier (None: none was)."""
        resident = [False] * len(experts) if resident is None else list(resident)
        with self.lock:
            self.stats.predictions += 1
            self.stats.predict_s += seconds
            if step < self.routed_steps.get(layer, 0):
                self.stats.late_predictions += 1
                actual = self.unpredicted.pop((layer, step), None)
                if actual is not None:
                    self._score(layer, {distance: (list(experts), resident)}, actual)
                return
            pending = self.pending.get(layer)
            if pending is None or pending[0] != step:
                pending = self.pending[layer] = (step, {})
            pending[1][distance] = (list(experts), resident)

    def routed(self, layer: int, step: int, actual: set[int]) -> None:
        with self.lock:
            self.stats.layers[layer].actual += len(actual)
            self.routed_steps[layer] = step + 1
            pending = self.pending.pop(layer, None)
            if pending is not None and pending[0] == step:
                self._score(layer, pending[1], actual)
                return
            self.unpredicted[layer, step] = actual  # the prediction may still come
            if len(self.unpredicted) > UNPREDICTED_KEPT:
                del self.unpredicted[next(iter(self.unpredicted))]  # the oldest

    def _score(self, layer: int, by_distance: dict[int, tuple[list[int], list[bool]]], actual: set[int]) -> None:
        s = self.stats.layers[layer]
        predicted = set(by_distance[min(by_distance)][0])
        s.predicted += len(predicted)
        s.correct += len(predicted & actual)
        for distance, (ranked, resident) in by_distance.items():
            for rank, (e, was_resident) in enumerate(zip(ranked, resident, strict=True)):
                right = e in actual
                self.rank_named[distance, rank, was_resident] += 1
                self.rank_correct[distance, rank, was_resident] += right
                self.layer_named[layer, distance, rank, was_resident] += 1
                self.layer_correct[layer, distance, rank, was_resident] += right

    def rank_precisions(self, layer: int, resident: Sequence[bool], distance: int = 0) -> list[float | None]:
        """For each rank of a prediction for `layer`, `distance` MoE layers ahead, whose candidates'
        residency is `resident`: how often a candidate of that rank and residency was routed to
        (None: not scored yet). One list under one lock, as the store admits a whole prediction
        at once.

        The layer's own count decides, shrunk towards every layer's by LAYER_PRIOR pseudo-counts
        while it has few: a predictor is right far less often in some layers than in others
        (on the 48-layer bench file, trained predictors match the router's top-8 exactly for
        78 % of tokens in the first layer and 4-8 % in the last ten), so a rank that pays off
        in one layer may read mostly wrong slabs in another.
        """
        with self.lock:
            out = []
            for rank, r in enumerate(resident):
                n_all = self.rank_named.get((distance, rank, r), 0)
                if not n_all:
                    out.append(None)
                    continue
                prior = self.rank_correct[distance, rank, r] / n_all
                key = (layer, distance, rank, r)
                out.append((self.layer_correct.get(key, 0) + LAYER_PRIOR * prior)
                           / (self.layer_named.get(key, 0) + LAYER_PRIOR))
            return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def report(stats: StoreStats, scores: PredictionStats | None, tiers: dict, governor: dict | None = None) -> dict:
    """A JSON-ready summary: the tiers (as the store describes them), per-layer and total figures.

    scores: the predictions' (None without a prefetcher: nothing was predicted); governor: its
    summary (governor.py; None where prefetching is not governed)."""
    scores = scores or PredictionStats.for_layers(list(stats.layers))
    total = {}
    layers = {}
    for layer in sorted(stats.layers):
        merged = asdict(stats.layers[layer]) | asdict(scores.layers[layer])
        for name, value in merged.items():
            total[name] = total.get(name, 0) + value
        layers[str(layer)] = _layer_summary(merged)
    stall = total.get("stall_s", 0.0)
    return {
        "tiers": tiers,
        "layers": layers,
        "total": _layer_summary(total),
        "bytes_into": dict(stats.bytes_into),
        "transfers": stats.transfers,
        "transfer_s": stats.transfer_s,
        "simulated_link_s": stats.simulated_s,
        "stall_s": stall,
        "overlap": max(0.0, 1.0 - stall / stats.transfer_s) if stats.transfer_s > 0 else None,
        "prefetch": {
            "requested": stats.prefetch_requested,
            "loaded": stats.prefetch_loaded,
            "dropped": stats.prefetch_dropped,
            "late_predictions": scores.late_predictions,
            "predictions": scores.predictions,
            "predict_s": scores.predict_s,
            "governor": governor,
        },
    }


def _layer_summary(s: dict) -> dict:
    return s | {
        "hit_rate": _ratio(s["hits"], s["hits"] + s["late"] + s["misses"]),
        "precision": _ratio(s["correct"], s["predicted"]),
        "recall": _ratio(s["correct"], s["actual"]),
    }


def _pct(value: float | None) -> str:
    return "     -" if value is None else f"{100 * value:6.1f}"


def format_table(summary: dict) -> str:
    """The summary as the table `qmoe run --stats` prints."""
    lines = []
    for name, tier in summary["tiers"].items():
        lines.append(f"tier {name}: {tier['description']}")
    lines.append(" layer   hit%  late%  miss%  prec%   rec%  stall ms")
    rows = [(layer, s) for layer, s in summary["layers"].items()] + [("all", summary["total"])]
    for layer, s in rows:
        n = s["hits"] + s["late"] + s["misses"]
        late = s["late"] / n if n else None
        miss = s["misses"] / n if n else None
        lines.append(
            f"{layer:>6} {_pct(s['hit_rate'])} {_pct(late)} {_pct(miss)} {_pct(s['precision'])} "
            f"{_pct(s['recall'])} {1e3 * s['stall_s']:9.1f}"
        )
    moved = ", ".join(f"into {tier} {format_bytes(n)}" for tier, n in summary["bytes_into"].items() if n)
    overlap = summary["overlap"]
    lines.append(
        f"moved: {moved or 'nothing'} in {summary['transfers']} transfers, busy {summary['transfer_s']:.3f} s "
        f"(simulated link {summary['simulated_link_s']:.3f} s), overlapped with compute: "
        + ("-" if overlap is None else f"{100 * overlap:.1f}%")
    )
    p = summary["prefetch"]
    lines.append(
        f"prefetch: {p['requested']} experts requested, {p['loaded']} loaded, {p['dropped']} dropped, "
        f"{p['late_predictions']} predictions too late; {p['predictions']} predictions took "
        f"{1e3 * p['predict_s']:.1f} ms"
    )
    if p["governor"] is not None:
        lines.append(describe_governor(p["governor"]))
    return "\n".join(lines)


def write_json(summary: dict, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
