"""Prefetch policies, and where they run: beside the model in a worker thread, or in its thread.

The prefetcher is an Observer of the forward pass (models/base.py). At each MoE
layer l the model thread hands it l's attn_norm output (`pre_attention`) and,
after routing, l's router input and choice (`routed`). The prediction it makes
asks the store to prefetch experts, which the store's transfer workers bring in
while the model computes. Where the prediction itself runs (`--predict-in`):

    worker  a worker thread, while the model's thread goes on to attention (numba
            and torch release the GIL): the paper's schedule. The default on CUDA,
            where the predictor is launched on a stream of its own and the GPU runs
            it beside attention.
    model   the model's thread, before attention. The default on the CPU: there a
            prediction is one compiled call of 1-2 % of a decode step
            (kernels.MLPTopK), and handing it to a thread costs more than that: the
            worker's Python turns at the GIL land on the model's path (with nothing
            to transfer, pre-attn decoded the tiny model at 175-184 tokens/s with a
            worker and 196-197 without; A3B shapes alike either way:
            bench/results/offload-worker, offload).

Policies (`--prefetch`):
    none         no prefetcher at all: the store loads on demand and its LRU cache
                 is all there is (what llama.cpp's MoE cache does).
    cross-layer  FATE-style gate reuse: when layer l-1 routes, layer l's router is
                 applied to l-1's router input (its ffn_norm output). Training-free
                 and early, but it has no prediction for the first MoE layer.
    pre-attn     ours: layer l's trained predictor on layer l's own attn_norm
                 output, started before l's attention.
    oracle       the true routing, as the upper bound: replayed from a recording
                 of the same generation (`RoutingTrace`). The store guarantees that
                 tokens do not depend on budgets or policy, so a first run records
                 exactly what the measured run will route. It is issued at the moment
                 pre-attn first predicts the layer (with the same lookahead), so oracle
                 vs pre-attn isolates the cost of prediction errors. Its precision and recall are 100%
                 unless the run left the recording (possible only where results are
                 not bit-identical: a dense fast tier with cpu misses, or sampling
                 without a seed).

Lookahead (`--lookahead N`, pre-attn and oracle; default 2): a layer's own
prediction can only start after the previous layer is done, so its transfers
overlap one attention at most (about 1 ms on the CPU, where a slab read from the
drive takes 2.5-4). With lookahead, right after block i's attention (`attended`)
the prefetcher guesses MoE layer i+N's experts from that residual stream, through
that layer's attn_norm and predictor, so its transfers also overlap the experts
and attention of the N blocks between. Each layer is predicted once a step, at
the earliest point (a layer no lookahead reaches, the first N, at its own
pre-attention). The residual stream still lacks the blocks between, so a guess
is right less often than the layer's own prediction; admission reads only the
ranks its own scores admit (admission.py). Guessing again on the way and at the
layer itself (as this module once did) cost more than it saved: on the 12-layer
A3B-shaped bench file under a 4 GiB pool, with lookahead 2, predicting each layer
three times a step took 14 ms of a 170-180 ms step against 7-10 ms once, for
5.6-5.7 tokens/s against 6.0-6.1 (none: 4.3-4.5). N = 0 is the paper's schedule.

Whether to prefetch at all is measured as the run goes (governor.py, pre-attn and
cross-layer): the prefetcher predicts a layer only where its governor says that layer
prefetches in this pass, and the governor, which times the halves of passes in which
one half prefetches, keeps prefetching only while it makes passes faster
(`--always-prefetch` prefetches in every pass).

Each prediction is a list of experts, most wanted first: for one token its
top-k' (k' >= k over-provisions), for several tokens (prefill) the union of their
top-k', most often named first. The prefetcher scores them against the router's
choice, per layer and forward pass (stats.PredictionScorer: precision, recall, and
those that came too late), and hands them to the store, which moves the slabs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.experts.governor import PrefetchGovernor
from qmoe.experts.stats import PredictionScorer
from qmoe.experts.store import ExpertStore
from qmoe.predictor.runtime import Predictors


def ranked_union(top: np.ndarray) -> list[int]:
    """The experts in `top` [T, count] (each row best first), most often named first; one row as it is."""
    if top.shape[0] == 1:
        return top[0].tolist()  # plain ints in one call: a comprehension over numpy scalars took 46 us a layer
    experts, votes = np.unique(top, return_counts=True)
    return [int(e) for e in experts[np.argsort(-votes, kind="stable")]]


class PreAttentionPolicy:
    """Ours: layer l's trained predictor on layer l's attn_norm output."""

    hook = "pre_attention"

    def __init__(self, predictors: Predictors, k_prime: int):
        self.predictors = predictors  # predictor/runtime.py: the kernels on the CPU, torch on CUDA
        self.k_prime = k_prime

    def predict(self, layer: int, x: torch.Tensor) -> list[int]:
        return ranked_union(self.predictors.predict_topk(layer, x, self.k_prime))  # from [T, k']


class CrossLayerPolicy:
    """FATE-style: layer l's router on layer l-1's router input (the previous MoE layer's `routed` call)."""

    hook = "routed"

    def __init__(self, routers: dict[int, torch.Tensor], k_prime: int):
        self.routers = routers  # MoE layer -> router weight [E, n_embd]
        self.k_prime = k_prime

    def predict(self, layer: int, x: torch.Tensor) -> list[int]:
        logits = x.float() @ self.routers[layer].float().T  # [T, E]
        return ranked_union(logits.topk(self.k_prime, dim=-1).indices.cpu().numpy())


class RoutingTrace:
    """The experts each MoE layer routed to, forward pass after forward pass, in a recorded run."""

    def __init__(self):
        self.calls: dict[int, list[list[int]]] = defaultdict(list)


class TraceRecorder:
    """Observer that records a run's routing into a `RoutingTrace` (for the oracle)."""

    def __init__(self, trace: RoutingTrace):
        self.trace = trace

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        pass

    def attended(self, layer: int, h: torch.Tensor) -> None:
        pass

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.trace.calls[layer].append(ranked_union(ids.cpu().numpy()))


class OraclePolicy:
    """The true routing, replayed from a recorded run of the same generation."""

    hook = "pre_attention"

    def __init__(self, trace: RoutingTrace):
        self.trace = trace
        self.position: dict[int, int] = defaultdict(int)  # layer -> forward passes replayed

    def predict(self, layer: int, x: torch.Tensor) -> list[int]:
        calls = self.trace.calls[layer]
        i = self.position[layer]
        self.position[layer] += 1
        return calls[i] if i < len(calls) else []


Policy = PreAttentionPolicy | CrossLayerPolicy | OraclePolicy


class Prefetcher:
    """Observer that predicts each MoE layer's experts and prefetches them (module docstring).

    With a worker on CUDA, the worker runs its predictions on a stream of its own,
    so that they overlap attention on the model's stream; each activation comes
    with an event recorded on the model's stream, which the worker's stream waits
    for before reading it.
    """

    def __init__(self, store: ExpertStore, policy: Policy, moe_layers: list[int],
                 attn_norms: list[Callable[[torch.Tensor], torch.Tensor]], lookahead: int = 0,
                 worker: bool = True, govern: bool = True):
        """attn_norms: every block's input norm; lookahead: MoE layers guessed ahead; worker: predict
        in a worker thread, else in the model's (module docstring); govern: prefetch only while
        it measures faster than not (governor.py; never for the oracle, the upper bound)."""
        self.store = store
        governed = govern and not isinstance(policy, OraclePolicy) and len(moe_layers) >= 2  # two halves to compare
        self.governor = PrefetchGovernor(moe_layers) if governed else None
        self.scorer = PredictionScorer(moe_layers)
        self.policy = policy
        self.next_layer = dict(zip(moe_layers, moe_layers[1:]))
        self.attn_norms = attn_norms
        # block -> [(MoE layer, distance)]: the layers guessed right after the block's attention,
        # each by the earliest block whose lookahead reaches it (the first block guesses the first
        # N MoE layers after it); the layers no block reaches predict themselves
        self.guesses: dict[int, list[tuple[int, int]]] = {}
        self.guessed: set[int] = set()
        for i in range(len(attn_norms)):
            for distance, m in enumerate([n for n in moe_layers if n > i][:lookahead], start=1):
                if m not in self.guessed:
                    self.guessed.add(m)
                    self.guesses.setdefault(i, []).append((m, distance))
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.stream: torch.cuda.Stream | None = None  # worker only, created on the first CUDA activation
        self.thread: threading.Thread | None = None
        if worker:
            self.thread = threading.Thread(target=self._work, name="qmoe-prefetch", daemon=True)
            self.thread.start()

    # model thread

    def passed(self, start: float, end: float, n_tokens: int) -> None:
        """The engine's report of each forward pass (time.perf_counter() at its start and end)."""
        if self.governor is not None:
            self.governor.passed(start, end, n_tokens)

    def _on(self, layer: int) -> bool:
        return self.governor is None or self.governor.enabled(layer)

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        self._raise_if_failed()
        if self.governor is not None and layer == self.governor.split_layer:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)  # the first half's time, not its launch's
            self.governor.split(time.perf_counter())
        if self.policy.hook == "pre_attention" and layer not in self.guessed and self._on(layer):
            self._predict(layer, x)

    def attended(self, layer: int, h: torch.Tensor) -> None:
        if self.policy.hook == "pre_attention":
            for ahead, distance in self.guesses.get(layer, ()):
                if self._on(ahead):
                    self._predict(ahead, h, normalize=True, distance=distance)

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        if self._on(layer):  # a layer that made no prediction is not scored: precision and recall are prediction's
            # a set of the plain list: with torch's unique this call took 128 us a layer, now 41-54
            self.scorer.routed(layer, self.store.step(layer), set(ids.reshape(-1).tolist()))
        nxt = self.next_layer.get(layer)
        if self.policy.hook == "routed" and nxt is not None and self._on(nxt):
            self._predict(nxt, x)

    def _predict(self, layer: int, x: torch.Tensor, normalize: bool = False, distance: int = 0) -> None:
        """Predict `layer` from x (its attn_norm output), or from a residual stream `distance` MoE
        layers before it, to normalize with the layer's attn_norm first: here and now, or queued
        for the worker."""
        if self.thread is None:
            try:
                self._prefetch(layer, self.store.step(layer), x, None, normalize, distance)
            except QmoeError:
                raise
            except Exception as exc:
                raise QmoeError(f"expert prediction failed: {exc}") from exc
            return
        ready = None
        if x.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # on the model's stream, after x was computed
        self.messages.put(("predict", layer, self.store.step(layer), (x, ready, normalize, distance)))

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise QmoeError(f"expert prediction failed: {self.error}") from self.error

    # worker thread

    def _work(self) -> None:
        # One kernel thread for the predictions: the model's thread keeps the other cores.
        kernels.set_num_threads(1)
        while (message := self.messages.get()) is not None:
            kind, layer, step, payload = message
            if kind == "flush":
                payload.set()
                continue
            if self.error is not None:
                continue
            try:
                self._prefetch(layer, step, *payload)
            except BaseException as exc:  # noqa: BLE001 - reported to the model thread at the next layer
                self.error = exc

    def _prefetch(self, layer: int, step: int, x: torch.Tensor, ready: torch.cuda.Event | None, normalize: bool,
                  distance: int) -> None:
        start = time.perf_counter()
        if ready is None:
            experts = self.policy.predict(layer, self.attn_norms[layer](x) if normalize else x)
        else:
            if self.stream is None:
                self.stream = torch.cuda.Stream(x.device)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                x.record_stream(self.stream)  # x's memory is not reused before this stream is done with it
                experts = self.policy.predict(layer, self.attn_norms[layer](x) if normalize else x)
        # how each rank scores, apart for the candidates resident now and those that are not
        resident = self.store.resident(layer, experts)
        self.scorer.predicted(layer, step, experts, time.perf_counter() - start, distance, resident)
        # those worth a read, by the precision of such candidates of this layer made as far ahead
        self.store.prefetch(layer, experts, step, self.scorer.rank_precisions(layer, resident, distance))

    def set_policy(self, policy: Policy) -> None:
        """Switch policies between runs (the oracle gets its recording this way)."""
        self.drain()
        self.policy = policy

    def drain(self) -> None:
        """Wait until every message so far has been handled."""
        if self.thread is None or not self.thread.is_alive():
            return
        done = threading.Event()
        self.messages.put(("flush", -1, None, done))
        done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the worker. Idempotent."""
        if self.thread is not None and self.thread.is_alive():
            self.messages.put(None)
            self.thread.join()
