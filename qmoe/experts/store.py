"""The expert store: routed experts served from budgeted tiers, with transfers in a thread of their own.

Tiers, from slow to fast:

    file        the GGUF, memory-mapped (the kernels can read a slab in place)
    RAM pool    quantized slabs in preallocated slots, filled by explicit reads
                (optionally O_DIRECT); `--ram-budget`. Without one, or with one
                that covers every expert (and the page cache allowed), the
                mapped file plays this part.
    fast tier   slabs ready to multiply: dequantized on CUDA, quantized for the
                CPU kernels in CPU memory (tiers.py); `--gpu-budget`.

The compute tier is the fast tier when there is one, else the RAM pool. The store
implements the models' `ExpertCompute`: for every expert the router chose it
computes that expert's output from the compute tier (a hit), from a slab on its
way there (late: wait for it), or, on a miss, as `on_miss` says: "wait" asks for
the slab and waits; "cpu" (fast tier only) computes it with the numba kernels
from the quantized slab in the pool, or in the mapped file when there is no pool,
and queues the slab for the fast tier in the background (after every prefetch),
so that the fast tier learns from use as an LRU cache does.

Threads:
    model thread(s)  call the store; compute hits at once, then late/missed experts
                     as they arrive, so transfers overlap the compute of hits.
    transfer thread  the one link between tiers: runs transfers one at a time
                     (demand loads, for which a model thread waits, first; then
                     prefetches; then background fills), each as file -> pool
                     and/or pool or file -> fast tier, with the simulated link's
                     delay if one is set (link.py). File reads fetch a slab's
                     three parts in parallel (slabs.py).
    prefetcher       (prefetch.py, in the model's thread or a worker of its own)
                     predicts, and calls `prefetch`, which queues transfers; a
                     prefetch for a layer that has already run is dropped unstarted.

Accounting: the budgets fix each tier's slot count (budget // slab bytes); slots
are allocated once, so the bytes held never exceed the budget. Fixed I/O buffers
(the O_DIRECT bounce buffers, CUDA's pinned staging buffer: one slab in all) are
outside the budgets. A slot is taken by evicting the least recently used slab
that nobody pins and that is not a prediction waiting for its layer; a prediction
its layer did not use goes to the front of the eviction order (cache.py).

Results do not depend on the tiers: an expert's output is computed by the same
code whether it was a hit or a miss, and the outputs are summed in the order
`kernels.moe_ffn` sums them, so on the kernel path (no fast tier) the layer's
output is bit-identical to the model without a store; so is it with a fast
tier on the CPU, which computes with the same kernels. A dense fast tier (CUDA)
is a different compute path (fp16 products); with `--on-miss wait` every expert
takes it, so its results are independent of budgets and policy too; with `cpu`
misses they mix both paths.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.experts.cache import Entry, Key
from qmoe.experts.options import OffloadOptions, format_bytes, parse_budget
from qmoe.experts.slabs import ExpertSlabs, SlabReader
from qmoe.experts.stats import StoreStats, report
from qmoe.experts.tiers import FastTier, RamPool
from qmoe.kernels.ops import BLAS_MIN_TOKENS

UNPREDICTED_KEPT = 1024  # forward passes whose late prediction may still be scored (stats only)
DEMAND, PREFETCH, FILL = 0, 1, 2  # transfer priorities: a waiting model thread, a prediction, a cache fill
Tier = RamPool | FastTier


def expert_groups(ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The routed (token, expert) pairs grouped by expert: [(expert, pair indices)], pair p = t * k + j.

    In the order kernels.moe_ffn adds the groups into its output: the experts that
    fewer than BLAS_MIN_TOKENS tokens chose (one compiled call, by ascending
    expert), then the others (by ascending expert). Float sums depend on order;
    keeping this one makes the store's output bit-identical to moe_ffn's.
    """
    pair_experts = ids.reshape(-1)
    pairs = np.argsort(pair_experts, kind="stable")
    starts = np.flatnonzero(np.diff(pair_experts[pairs], prepend=-1))
    counts = np.diff(starts, append=len(pairs))
    groups = [(int(pair_experts[pairs[s]]), pairs[s : s + c]) for s, c in zip(starts, counts)]
    return [g for g in groups if len(g[1]) < BLAS_MIN_TOKENS] + [
        g for g in groups if len(g[1]) >= BLAS_MIN_TOKENS
    ]


@dataclass(order=True)
class _Job:
    """One queued transfer: bring slab `key` into `tier`."""

    priority: int
    seq: int
    key: Key = field(compare=False)
    tier: Tier = field(compare=False)
    step: int = field(compare=False)  # a prefetch is for this step of its layer; useless after it
    pins: int = field(default=0, compare=False)  # model threads waiting for it: hold it for them on arrival
    pinned: int = field(default=0, compare=False)  # of those, pins already put on the slab
    delivered: Entry | None = field(default=None, compare=False)  # the slab, once ready and pinned
    cancelled: bool = field(default=False, compare=False)


@dataclass
class _Transfer:
    """What the transfer thread does for a job, decided under the lock, done outside it."""

    job: _Job
    target: Entry  # in job.tier
    read_into: Entry | None  # pool entry to fill from the file first
    upload_from: Entry | None  # pool entry to upload into the fast tier from (None: the mapped file)
    elapsed: float = 0.0
    slept: float = 0.0  # of which waiting for the simulated link


class ExpertStore:
    """`ExpertCompute` over budgeted tiers; see the module docstring."""

    def __init__(self, slabs: ExpertSlabs, options: OffloadOptions, device: torch.device):
        self.slabs = slabs
        self.layout = slabs.layout
        self.on_miss = options.on_miss
        self.link = options.link
        self.pool = self._make_pool(options)
        self.fast = self._make_fast(options, device)
        self.compute_tier: Tier | None = self.fast or self.pool
        self.reader = SlabReader(slabs.path, options.direct_io) if self.pool else None
        # One lock, two conditions, so that a thread is woken only for what it waits for:
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # transfer thread: a job queued, a slot released
        self.arrivals = threading.Condition(self.lock)  # model threads: a transfer done, or none left (drain)
        self.waiting_for_slot = False  # the transfer thread waits for a pin to be released
        self.queue: list[_Job] = []  # heap: demand before prefetch, then first come first served
        self.queued: dict[tuple[str, Key], _Job] = {}
        self.seq = itertools.count()
        self.steps = {layer: 0 for layer in slabs.layers}  # forward passes each layer has started
        self.predicted: dict[int, set[Key]] = {}  # layer -> slabs protected for its coming step
        self.predicting = False  # a prefetcher is attached: measure its predictions
        self.unpredicted: dict[tuple[int, int], set[int]] = {}  # (layer, step) run unpredicted -> routing
        self.busy = False
        self.closing = False
        self.error: BaseException | None = None
        self.stats = StoreStats.for_layers(slabs.layers)
        self.thread = threading.Thread(target=self._transfer_loop, name="qmoe-transfers", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------------------- construction

    def _slots(self, budget: int, slab_bytes: int, flag: str) -> int:
        if budget < slab_bytes:
            raise QmoeError(
                f"{flag} {format_bytes(budget)} is smaller than one expert slab ({format_bytes(slab_bytes)} in "
                f"that tier); give at least that"
            )
        return min(self.slabs.n_slabs, budget // slab_bytes)

    def _make_pool(self, options: OffloadOptions) -> RamPool | None:
        if options.ram_budget is None:
            return None
        total = self.slabs.total_bytes
        budget = parse_budget(options.ram_budget, total, "--ram-budget")
        if budget >= total and not options.direct_io:
            return None  # every expert fits: serve them from the mapped file, no copies
        return RamPool(self.layout, self._slots(budget, self.layout.nbytes, "--ram-budget"))

    def _make_fast(self, options: OffloadOptions, device: torch.device) -> FastTier | None:
        if options.gpu_budget is None:
            return None
        dense = device.type == "cuda" or options.cpu_fast_tier_dense
        slab_bytes = FastTier.slot_bytes(self.layout, device, dense)
        budget = parse_budget(options.gpu_budget, self.slabs.n_slabs * slab_bytes, "--gpu-budget")
        return FastTier(self.layout, self._slots(budget, slab_bytes, "--gpu-budget"), device, dense)

    def describe(self) -> dict:
        """The tiers as configured: for statistics and the CLI."""
        tiers = {}
        for tier in (self.pool, self.fast):
            if tier is not None:
                share = tier.cache.n_slots / self.slabs.n_slabs
                tiers[tier.name] = {
                    "slots": tier.cache.n_slots,
                    "bytes": tier.nbytes,
                    "share": share,
                    "description": f"{tier.describe()} of {self.slabs.n_slabs} slabs ({100 * share:.1f}%, "
                    f"{format_bytes(tier.nbytes)})",
                }
        if self.pool is None:
            tiers["file"] = {
                "description": f"every expert served from the memory-mapped {self.slabs.path.name}"
            }
        if self.reader is not None:
            tiers["ram"]["direct_io"] = self.reader.direct
        if self.link is not None:
            tiers["link"] = {
                "gbps": self.link.gbps,
                "latency_us": self.link.latency_us,
                "description": f"simulated at {self.link.gbps:g} GB/s + {self.link.latency_us:g} us "
                "per transfer",
            }
        return tiers

    def summary(self) -> dict:
        with self.lock:
            return report(self.stats, self.describe())

    # ----------------------------------------------------------------------------- model thread: compute

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum: x [T, n_embd], ids and weights [T, k] -> [T, n_embd]."""
        if self.compute_tier is None:  # every expert is in the mapped file: as the model without a store
            gate, up, down = self.slabs.tensors[layer]
            needed = {int(e) for e in np.unique(ids)}
            with self.lock:
                self.stats.layers[layer].hits += len(needed)
                self._layer_starts(layer, needed)
            return kernels.moe_ffn(gate.data, up.data, down.data, self.layout.qtypes, x, ids, weights)
        groups = expert_groups(ids)
        k = ids.shape[1]
        tokens = {e: pairs // k for e, pairs in groups}
        outputs: dict[int, np.ndarray] = {}  # expert -> its output on its tokens [n, n_embd]
        all_ready = self._compute_layer(layer, x, tokens, outputs)
        if all_ready is not None:
            return self._compute_all(all_ready, x, ids, weights)
        out = np.zeros_like(x)
        pair_weights = weights.reshape(-1)
        for e, pairs in groups:
            np.add.at(out, tokens[e], pair_weights[pairs, None] * outputs[e])
        return out

    def _compute_layer(
        self, layer: int, x: np.ndarray, tokens: dict[int, np.ndarray], outputs: dict[int, np.ndarray]
    ) -> list[tuple[int, Entry]] | None:
        """Claim every expert the layer needs and fill `outputs` with their outputs, as they come.

        When every one is ready in a tier of quantized slabs, computes nothing and returns
        them [(expert, entry pinned for us)], for one `moe_ffn` call over the tier's slots.
        """
        tier = self.compute_tier
        ready, waiting, on_cpu = [], [], []
        with self.lock:
            self._raise_if_failed()
            self._cancel_prefetches(layer, needed=set(tokens))
            s = self.stats.layers[layer]
            for e in tokens:
                state, order, handle = self._claim(tier, (layer, e))
                if state == "ready":
                    ready.append((e, handle))
                    s.hits += 1
                elif state is not None:
                    waiting.append((order, e, handle))
                    s.late += 1
                else:
                    s.misses += 1
                    if tier is self.fast and self.on_miss == "cpu":
                        on_cpu.append(e)
                        self._queue(FILL, tier, (layer, e), step=-1)  # the cache learns: next time a hit
                    else:
                        job = self._request(tier, (layer, e))
                        waiting.append((job.seq, e, job))
            predicted = self._layer_starts(layer, set(tokens))
            # The predictions that came are used (and claimed above) or wrong: evict those first.
            for key in predicted or ():
                entry = tier.cache.get(key)
                if entry is not None:
                    entry.protected = False
                    if key[1] not in tokens:
                        tier.cache.demote(entry)
        if not waiting and not on_cpu and (tier is self.pool or not tier.dense):
            return ready
        # Hits first (their compute overlaps the transfers of the rest), then the others
        # in the order the transfer thread delivers them.
        waiting.sort(key=lambda item: item[:2])
        claimed = [handle for _, handle in ready] + [handle for *_, handle in waiting]
        try:
            for e, entry in ready:
                claimed.remove(entry)
                outputs[e] = self._compute_in(tier, entry, x[tokens[e]])
            for _, e, handle in waiting:
                entry = self._wait(handle, layer)
                claimed.remove(handle)
                outputs[e] = self._compute_in(tier, entry, x[tokens[e]])
            for e in on_cpu:
                outputs[e] = self._compute_on_cpu(layer, e, x[tokens[e]])
        except BaseException:  # an error or Ctrl-C: do not leave slabs pinned for good
            with self.lock:
                for handle in claimed:
                    self._unclaim(handle)
            raise

    def _layer_starts(self, layer: int, actual: set[int]) -> set[Key] | None:
        """Under the lock: `layer` runs a forward pass that routes to `actual`. A prediction for this
        pass that comes later is too late; the one that came is scored and returned (its slabs)."""
        self.steps[layer] += 1
        predicted = self.predicted.pop(layer, None)
        if self.predicting:
            self.stats.record_routing(layer, actual)
            if predicted is not None:
                self.stats.record_prediction(layer, {e for _, e in predicted}, actual)
            else:  # the prediction may still come: its accuracy counts all the same
                self.unpredicted[layer, self.steps[layer] - 1] = actual
                if len(self.unpredicted) > UNPREDICTED_KEPT:
                    del self.unpredicted[next(iter(self.unpredicted))]  # the oldest
        return predicted

    def _compute_all(
        self, ready: list[tuple[int, Entry]], x: np.ndarray, ids: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        """The layer's output when all its experts are ready in the compute tier's quantized slots:
        one kernel call, with the experts' slots for their ids (bit-identical to moe_ffn on the file)."""
        tier = self.compute_tier
        slots = np.zeros(self.slabs.n_expert, np.int64)
        for e, entry in ready:
            slots[e] = entry.slot
        try:
            return kernels.moe_ffn(*tier.parts, self.layout.qtypes, x, ids, weights, slabs=slots)
        finally:
            with self.lock:
                for _, entry in ready:
                    entry.pins -= 1
                    tier.cache.touch(entry)
                    self._slot_released(entry)

    def _compute_on_cpu(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        """A fast-tier miss computed by the kernels from the quantized slab: pool (read if absent) or file."""
        if self.pool is None:
            return self._kernel(self.slabs.views(layer, expert), x)
        key = (layer, expert)
        with self.lock:
            state, _, handle = self._claim(self.pool, key)
            if state is None:
                handle = self._request(self.pool, key)
        try:
            entry = self._wait(handle, layer)
        except BaseException:
            with self.lock:
                self._unclaim(handle)
            raise
        return self._compute_in(self.pool, entry, x)

    def _compute_in(self, tier: Tier, entry: Entry, x: np.ndarray) -> np.ndarray:
        """Compute from an entry pinned for us, then release it."""
        try:
            if tier is self.fast:
                return self.fast.compute(entry.slot, x)
            return self._kernel(self.pool.views(entry.slot), x)
        finally:
            with self.lock:
                entry.pins -= 1
                tier.cache.touch(entry)
                self._slot_released(entry)

    def _kernel(self, raw: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
        return kernels.expert_ffn(*raw, self.layout.qtypes, x)

    # ----------------------------------------------------------------------------- model thread: claims (under the lock)
    # A claim pins a slab for the claiming thread: directly on its entry when it is
    # in the tier (ready, or loading now), or through the queued job that will
    # bring it (the job adds its pins when it delivers). A thread waits on exactly
    # what it claimed, so a slab is never used without its pin.

    def _claim(self, tier: Tier, key: Key) -> tuple[str | None, float, Entry | _Job | None]:
        """Claim `key` in `tier` if it is there or on its way: (state, delivery order, handle).

        state: "ready", "loading" (being transferred now), "queued" (a transfer is
        queued: made a demand load if it was a prefetch or fill), or None (absent,
        nothing claimed). The delivery order sorts what to wait for as the transfer
        thread will deliver it: the one loading now first, then queued demand loads
        first come first served.
        """
        entry = tier.cache.get(key)
        if entry is not None:
            entry.pins += 1
            return ("ready" if entry.ready else "loading"), -1.0, entry
        job = self.queued.get((tier.name, key))
        if job is None:
            return None, 0.0, None
        if job.priority != DEMAND:
            job.cancelled = True
            job = self._request(tier, key)
        else:
            job.pins += 1
        return "queued", float(job.seq), job

    def _unclaim(self, handle: Entry | _Job) -> None:
        if isinstance(handle, _Job):
            if handle.delivered is None:
                handle.pins -= 1  # the transfer thread reconciles if it already pinned the slab
                return
            handle = handle.delivered
        handle.pins -= 1
        self._slot_released(handle)

    def _slot_released(self, entry: Entry) -> None:
        if entry.pins == 0 and self.waiting_for_slot:
            self.work.notify()

    def _request(self, tier: Tier, key: Key) -> _Job:
        """Queue a demand load of `key` into `tier`, held for the requesting thread."""
        job = _Job(DEMAND, next(self.seq), key, tier, self.steps[key[0]], pins=1)
        heapq.heappush(self.queue, job)
        self.queued[(tier.name, key)] = job
        self.work.notify()
        return job

    def _queue(self, priority: int, tier: Tier, key: Key, step: int) -> None:
        """Queue a prefetch or a cache fill of `key` unless one is queued already."""
        if (tier.name, key) not in self.queued:
            job = _Job(priority, next(self.seq), key, tier, step)
            heapq.heappush(self.queue, job)
            self.queued[(tier.name, key)] = job
            self.work.notify()

    def _wait(self, handle: Entry | _Job, layer: int) -> Entry:
        """Block until what we claimed is ready (pinned for us); the wait is the layer's stall."""
        start = time.perf_counter()
        with self.lock:
            while True:
                self._raise_if_failed()
                entry = handle.delivered if isinstance(handle, _Job) else handle
                if entry is not None and entry.ready:
                    self.stats.layers[layer].stall_s += time.perf_counter() - start
                    return entry
                if self.closing:
                    raise QmoeError("the expert store was closed while a layer waited for an expert")
                self.arrivals.wait()

    def _cancel_prefetches(self, layer: int, needed: set[int]) -> None:
        """Drop queued prefetches for `layer` outside `needed`: it runs now, or a newer prediction replaced them."""
        for (_, (job_layer, e)), job in list(self.queued.items()):
            if job_layer == layer and job.priority == PREFETCH and e not in needed:
                job.cancelled = True
                del self.queued[(job.tier.name, job.key)]
                self.stats.prefetch_dropped += 1

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise QmoeError(f"{self.slabs.path}: loading experts failed: {self.error}") from self.error

    # ----------------------------------------------------------------------------- prefetch (any thread)

    def step(self, layer: int) -> int:
        """How many forward passes `layer` has started: a prediction made now is for the next one."""
        return self.steps[layer]

    def prefetch(self, layer: int, experts: list[int], step: int, predict_s: float = 0.0) -> None:
        """Bring `experts` of `layer` (most wanted first) into the compute tier for its step `step`.

        Resident ones are protected until the layer runs; absent ones are queued
        behind any demand load. Nothing happens if the layer has already started its step.
        A second prediction for the same step (a lookahead guess, then the layer's own)
        replaces the first: the guessed transfers it does not repeat are cancelled and the
        guessed slabs it does not name lose their protection.
        predict_s: how long the prediction took to compute (statistics).
        """
        tier = self.compute_tier
        with self.lock:
            self.stats.predictions += 1
            self.stats.predict_s += predict_s
            if step != self.steps[layer]:
                self.stats.late_predictions += 1
                actual = self.unpredicted.pop((layer, step), None)
                if actual is not None:
                    self.stats.record_prediction(layer, set(experts), actual)
                return
            guessed = self.predicted.get(layer, set())
            self.predicted[layer] = {(layer, e) for e in experts}
            if tier is None:  # every expert is served from the mapped file: only measure the prediction
                return
            if guessed:
                self._cancel_prefetches(layer, needed=set(experts))
                for key in guessed - self.predicted[layer]:
                    entry = tier.cache.get(key)
                    if entry is not None:
                        entry.protected = False
            self.stats.prefetch_requested += len(experts)
            for e in experts:
                key = (layer, e)
                entry = tier.cache.get(key)
                if entry is not None:
                    entry.protected = True
                else:
                    self._queue(PREFETCH, tier, key, step)

    # ----------------------------------------------------------------------------- transfer thread

    def _transfer_loop(self) -> None:
        while True:
            with self.lock:
                transfer = None
                while transfer is None:
                    job = self._next_job()
                    if job is None:
                        return
                    self.busy = True
                    transfer = self._plan(job)
                    if transfer is None:
                        self.busy = False
                        self.arrivals.notify_all()  # it may have delivered a slab that was already there
            try:
                self._move(transfer)
            except BaseException as exc:  # noqa: BLE001 - any failure is handed to the waiting threads
                with self.lock:
                    self._abandon(transfer, exc)
            else:
                with self.lock:
                    self._complete(transfer)
            finally:
                with self.lock:
                    self.busy = False
                    self.arrivals.notify_all()

    def _next_job(self) -> _Job | None:
        while not self.closing:
            while self.queue:
                job = heapq.heappop(self.queue)
                if not job.cancelled:
                    del self.queued[(job.tier.name, job.key)]
                    return job
            self.arrivals.notify_all()  # idle: wake drain()
            self.work.wait()
        return None

    def _reserve(self, tier: Tier, key: Key, demand: bool) -> Entry | None:
        """A slot for `key`: a demand load waits for one to be released, a prefetch gives up."""
        while True:
            entry = tier.cache.reserve(key, demand)
            if entry is not None or not demand or self.closing:
                return entry
            self.waiting_for_slot = True
            self.work.wait()
            self.waiting_for_slot = False

    def _plan(self, job: _Job) -> _Transfer | None:
        tier, key, demand = job.tier, job.key, job.priority == DEMAND
        if job.priority == PREFETCH and job.step != self.steps[key[0]]:
            self.stats.prefetch_dropped += 1
            return None
        existing = tier.cache.get(key)
        if existing is not None:  # brought in by another job meanwhile (only this thread loads: it is ready)
            existing.pins += job.pins
            job.pinned, job.delivered = job.pins, existing
            return None
        target = self._reserve(tier, key, demand)
        if target is None:
            self.stats.prefetch_dropped += job.priority == PREFETCH
            return None
        target.pins += job.pins
        job.pinned = job.pins
        target.protected = job.priority == PREFETCH and key in self.predicted.get(key[0], ())
        if tier is self.pool:
            return _Transfer(job, target, read_into=target, upload_from=None)
        if self.pool is None:
            return _Transfer(job, target, read_into=None, upload_from=None)
        # Into the fast tier through the pool. Only this thread fills the pool, so a
        # pool entry found here is ready; an absent one is read from the file first.
        source = self.pool.cache.get(key)
        read_into = None
        if source is None:
            source = read_into = self._reserve(self.pool, key, demand)
            if source is None:  # not a demand load, and every pool slot is in use
                tier.cache.discard(target)
                self.stats.prefetch_dropped += job.priority == PREFETCH
                return None
        source.pins += 1
        return _Transfer(job, target, read_into=read_into, upload_from=source)

    def _move(self, t: _Transfer) -> None:
        """The transfer itself, outside the lock: file -> pool and/or pool or file -> fast tier."""
        layer, expert = t.job.key
        start = time.perf_counter()
        link_start = start
        if t.read_into is not None:
            self.reader.read(self.slabs.ranges(layer, expert), self.pool.views(t.read_into.slot))
            link_start = time.perf_counter() if t.job.tier is self.fast else start
        if t.job.tier is self.fast:
            raw = (
                self.pool.views(t.upload_from.slot)
                if t.upload_from is not None
                else self.slabs.views(layer, expert)
            )
            self.fast.upload(t.target.slot, raw)
        slept = self.link.finish(link_start, self.layout.nbytes) if self.link is not None else 0.0
        t.elapsed, t.slept = time.perf_counter() - start, slept

    def _complete(self, t: _Transfer) -> None:
        s = self.stats
        if t.read_into is not None:
            self.pool.cache.loaded(t.read_into)
            s.bytes_into["ram"] += self.layout.nbytes
        if t.upload_from is not None:
            t.upload_from.pins -= 1
            self.pool.cache.touch(t.upload_from)
        if t.job.tier is self.fast:
            self.fast.cache.loaded(t.target)
            s.bytes_into["fast"] += self.layout.nbytes
        t.target.pins += t.job.pins - t.job.pinned  # claims withdrawn (or added) during the transfer
        t.job.delivered = t.target
        s.transfers += 1
        s.transfer_s += t.elapsed
        s.simulated_s += t.slept
        s.prefetch_loaded += t.job.priority == PREFETCH
        if t.job.step != self.steps[t.job.key[0]] or t.job.key not in self.predicted.get(t.job.key[0], ()):
            t.target.protected = False  # its layer ran while it was on its way, or a newer prediction dropped it

    def _abandon(self, t: _Transfer, exc: BaseException) -> None:
        self.error = exc
        for entry, tier in ((t.target, t.job.tier), (t.read_into, self.pool)):
            if entry is not None and not entry.ready and tier.cache.get(entry.key) is entry:
                tier.cache.discard(entry)
        if t.upload_from is not None and t.upload_from is not t.read_into:
            t.upload_from.pins -= 1

    # ----------------------------------------------------------------------------- lifetime

    def drain(self) -> None:
        """Wait until no transfer is queued or running."""
        with self.lock:
            while (self.busy or any(not j.cancelled for j in self.queue)) and self.error is None:
                self.arrivals.wait()

    def clear(self) -> None:
        """Forget every resident slab and every statistic: a cold start (between benchmark runs)."""
        self.drain()
        with self.lock:
            for tier in (self.pool, self.fast):
                if tier is not None:
                    tier.cache.clear()
            self.predicted.clear()
            self.unpredicted.clear()
            self.stats = StoreStats.for_layers(self.slabs.layers)

    def reset_stats(self) -> None:
        """Zero the statistics, keeping what the tiers hold (e.g. to measure decode apart from prefill)."""
        self.drain()
        with self.lock:
            self.stats = StoreStats.for_layers(self.slabs.layers)

    def close(self) -> None:
        """Stop the transfer thread and close the file. Idempotent."""
        with self.lock:
            self.closing = True
            self.work.notify_all()
            self.arrivals.notify_all()
        self.thread.join()
        if self.reader is not None:
            self.reader.close()
