"""The expert store: which routed experts are where, within budgets, and claims on them.

Tiers, from slow to fast:

    file        the GGUF, memory-mapped (the kernels can read a slab in place)
    RAM pool    quantized slabs in preallocated slots, filled by explicit reads
                (optionally O_DIRECT); `--ram-budget`. Without one, or with one
                that covers every expert (and the page cache allowed), the
                mapped file plays this part.
    fast tier   slabs ready to multiply (tiers.py): dequantized in GPU memory
                (`--gpu-budget`, CUDA), or, to simulate one on the CPU, quantized
                slabs in CPU memory behind a simulated link (`--sim-fast-budget`).

The compute tier is the fast tier when there is one, else the RAM pool. The store
is a residency service: it keeps slabs within the budgets, hands out claims on
them (a claim pins a slab, so that it is not evicted while a thread computes
from it or waits for it), takes predictions (`prefetch`) and queues the
transfers that move slabs between tiers (transfers.py, worker threads of its own).
Computing from what it hands out is compute.py's job; scoring predictions is the
prefetcher's (stats.PredictionScorer).

Accounting: the budgets fix each tier's slot count (budget // slab bytes); slots
are allocated once, so the bytes held never exceed the budget. Fixed I/O buffers
(the readers' one-block O_DIRECT buffers and, for slabs whose offsets do not line up
with the pool's slots, a bounce buffer per reader; CUDA's pinned staging buffer) are
outside the budgets. A slot is taken by evicting the least recently used slab
that nobody pins and that is not a prediction waiting for its layer; a prediction
its layer did not use goes to the front of the eviction order (cache.py).

Threads: model threads claim and release under one lock; the transfer workers
plan and complete transfers under it and move bytes outside it; prefetch
calls come from the model's thread or a prefetch worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qmoe.errors import QmoeError
from qmoe.experts.admission import admit
from qmoe.experts.cache import Entry, Key
from qmoe.experts.options import OffloadOptions, format_bytes, parse_budget
from qmoe.experts.slabs import ExpertSlabs, SlabReader, direct_alignment, direct_residue
from qmoe.experts.stats import StoreStats
from qmoe.experts.tiers import FastTier, RamPool
from qmoe.experts.transfers import DEMAND, FILL, PREFETCH, Job, Tier, Transfers


@dataclass
class LayerClaims:
    """What a layer's forward pass got from the store for the experts it needs.

    ready:   (expert, entry) in the compute tier, pinned for the caller
    waiting: (expert, handle) on their way, in the order they were queued;
             a handle is an Entry (being loaded now) or the Job that will bring it
    on_cpu:  fast-tier misses the caller computes from the quantized slab (on_miss "cpu")
    """

    ready: list[tuple[int, Entry]] = field(default_factory=list)
    waiting: list[tuple[int, Entry | Job]] = field(default_factory=list)
    on_cpu: list[int] = field(default_factory=list)

    def handles(self) -> list[Entry | Job]:
        return [h for _, h in self.ready] + [h for _, h in self.waiting]


class ExpertStore:
    """Routed experts' slabs across budgeted tiers; see the module docstring."""

    def __init__(self, slabs: ExpertSlabs, options: OffloadOptions, device: torch.device):
        self.slabs = slabs
        self.layout = slabs.layout  # a slot's: every layer's slab fits one (slabs.py)
        self.on_miss = options.on_miss
        self.link = options.link
        self.pool = self._make_pool(options)
        self.fast = self._make_fast(options, device)
        self.compute_tier: Tier | None = self.fast or self.pool
        self.reader = SlabReader(slabs.path, options.direct_io, options.io_depth) if self.pool else None
        # One lock, two conditions, so that a thread is woken only for what it waits for:
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # transfer workers: a job queued or a worker freed
        self.arrivals = threading.Condition(self.lock)  # model threads: a transfer done, or none left (drain)
        self.slot_freed = threading.Condition(self.lock)  # transfer workers waiting for an unpinned slot
        self.waiting_for_slot = 0  # how many of them
        self.steps = {layer: 0 for layer in slabs.layers}  # forward passes each layer has started
        self.predicted: dict[int, set[Key]] = {}  # layer -> slabs protected for its coming step
        self.closing = False
        self.error: BaseException | None = None
        self.stats = StoreStats.for_layers(slabs.layers)
        # Several reads in flight when they only fill the pool; a fast tier's link (and CUDA's one
        # staging buffer) carries one transfer at a time.
        self.transfers = Transfers(self, options.io_depth if self.compute_tier is self.pool else 1)

    # ----------------------------------------------------------------------------- tiers from budgets

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
        n_slots = self._slots(budget, self.layout.nbytes, "--ram-budget")
        if not options.direct_io:
            return RamPool(self.layout, n_slots)
        align = direct_alignment(self.slabs.path)  # slots lined up with the file: O_DIRECT reads into them
        return RamPool(self.layout, n_slots, align, direct_residue(self.slabs, align))

    def _make_fast(self, options: OffloadOptions, device: torch.device) -> FastTier | None:
        spec, flag, simulated = options.fast_budget(cuda=device.type == "cuda")
        if spec is None:
            return None
        if simulated:
            device = torch.device("cpu")
        dense = device.type == "cuda" or options.cpu_fast_tier_dense
        slab_bytes = FastTier.slot_bytes(self.layout, device, dense)
        budget = parse_budget(spec, self.slabs.n_slabs * slab_bytes, flag)
        return FastTier(self.layout, self._slots(budget, slab_bytes, flag), device, dense)

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
                    "evictions": tier.cache.evictions,
                    "evicted_unused": tier.cache.evicted_unused,  # prefetched, evicted before any use
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

    # ----------------------------------------------------------------------------- a layer's claims

    def claim_layer(self, layer: int, needed: list[int]) -> LayerClaims:
        """Start `layer`'s forward pass over the experts `needed`, claiming each in the compute tier.

        A hit is claimed where it is; a slab on its way is claimed through its entry or
        job (a queued prefetch or fill becomes a demand load); a miss is requested as a
        demand load, or, for a fast tier with on_miss "cpu", left to the caller to compute
        from the quantized slab while the slab is queued for the tier in the background.
        """
        tier = self.compute_tier
        claims = LayerClaims()
        order = []  # (delivery order, expert, handle) of the waiting ones
        with self.lock:
            self.raise_if_failed()
            self.transfers.cancel_prefetches(layer, needed=set(needed))
            s = self.stats.layers[layer]
            for e in needed:
                state, rank, handle = self._claim(tier, (layer, e))
                if state == "ready":
                    claims.ready.append((e, handle))
                    s.hits += 1
                elif state is not None:
                    order.append((rank, e, handle))
                    s.late += 1
                else:
                    s.misses += 1
                    if tier is self.fast and self.on_miss == "cpu":
                        claims.on_cpu.append(e)
                        self.transfers.enqueue(FILL, tier, (layer, e), step=-1)  # the cache learns
                    else:
                        job = self.transfers.demand(tier, (layer, e))
                        order.append((job.seq, e, job))
            self._layer_starts(layer, set(needed))
        order.sort(key=lambda item: item[:2])
        claims.waiting = [(e, handle) for _, e, handle in order]
        return claims

    def count_file_layer(self, layer: int, needed: list[int]) -> None:
        """Start `layer`'s forward pass when every expert is served from the mapped file: all hits."""
        with self.lock:
            self.stats.layers[layer].hits += len(needed)
            self._layer_starts(layer, set(needed))

    def _layer_starts(self, layer: int, needed: set[int]) -> None:
        """Under the lock: `layer` runs a forward pass. A prediction for this pass that comes
        later is too late; those that came are used (claimed already) or wrong: a wrong one that
        the prediction brought in is evicted first. A wrong one that was resident already keeps
        its place: it was used before, and demoting it made pre-attn miss what none kept (on
        the 12-layer bench file, 9 % more reads than none)."""
        self.steps[layer] += 1
        tier = self.compute_tier
        for key in self.predicted.pop(layer, ()):
            entry = tier.cache.get(key) if tier is not None else None
            if entry is not None:
                entry.protected = False
                if key[1] not in needed and not entry.used:
                    tier.cache.demote(entry)

    def claim_in_pool(self, layer: int, expert: int) -> Entry | Job:
        """Claim a slab in the RAM pool (a fast-tier miss computed on the CPU), requesting it if absent."""
        key = (layer, expert)
        with self.lock:
            state, _, handle = self._claim(self.pool, key)
            if state is None:
                handle = self.transfers.demand(self.pool, key)
        return handle

    # A claim pins a slab for the claiming thread: directly on its entry when it is
    # in the tier (ready, or loading now), or through the queued job that will
    # bring it (the job adds its pins when it delivers). A thread waits on exactly
    # what it claimed, so a slab is never used without its pin.

    def _claim(self, tier: Tier, key: Key) -> tuple[str | None, float, Entry | Job | None]:
        """Under the lock: claim `key` in `tier` if it is there or on its way: (state, delivery order, handle).

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
        job = self.transfers.find(tier, key)
        if job is None:
            return None, 0.0, None
        if job.priority != DEMAND:
            job.cancelled = True
            job = self.transfers.demand(tier, key)
        else:
            job.pins += 1
        return "queued", float(job.seq), job

    def wait(self, handle: Entry | Job, layer: int) -> Entry:
        """Block until what we claimed is ready (pinned for us); the wait is the layer's stall."""
        start = time.perf_counter()
        with self.lock:
            while True:
                self.raise_if_failed()
                entry = handle.delivered if isinstance(handle, Job) else handle
                if entry is not None and entry.ready:
                    self.stats.layers[layer].stall_s += time.perf_counter() - start
                    return entry
                if self.closing:
                    raise QmoeError("the expert store was closed while a layer waited for an expert")
                self.arrivals.wait()

    def arrived(self, handle: Entry | Job) -> Entry | None:
        """What we claimed, pinned for us, if it is ready now (wait without waiting), else None."""
        with self.lock:
            self.raise_if_failed()
            entry = handle.delivered if isinstance(handle, Job) else handle
            return entry if entry is not None and entry.ready else None

    def release(self, tier: Tier, entry: Entry) -> None:
        """The caller is done computing from `entry`: unpin it, and mark it recently used."""
        with self.lock:
            entry.pins -= 1
            tier.cache.touch(entry)
            self._slot_released(entry)

    def unclaim(self, handles: list[Entry | Job]) -> None:
        """Withdraw claims that will not be used (an error or Ctrl-C mid-layer), so nothing stays pinned."""
        with self.lock:
            for handle in handles:
                if isinstance(handle, Job):
                    if handle.delivered is None:
                        handle.pins -= 1  # the transfer worker reconciles if it already pinned the slab
                        continue
                    handle = handle.delivered
                handle.pins -= 1
                self._slot_released(handle)

    def _slot_released(self, entry: Entry) -> None:
        if entry.pins == 0 and self.waiting_for_slot:
            self.slot_freed.notify_all()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise QmoeError(f"{self.slabs.path}: loading experts failed: {self.error}") from self.error

    # ----------------------------------------------------------------------------- predictions (any thread)

    def step(self, layer: int) -> int:
        """How many forward passes `layer` has started: a prediction made now is for the next one."""
        return self.steps[layer]

    def resident(self, layer: int, experts: list[int]) -> list[bool]:
        """For each of `experts` of `layer`, whether its slab is in the compute tier now."""
        tier = self.compute_tier
        if tier is None:
            return [False] * len(experts)
        with self.lock:
            return [tier.cache.get((layer, e)) is not None for e in experts]

    def is_predicted(self, key: Key) -> bool:
        """Under the lock: `key` is named by the current prediction for its layer's coming step."""
        return key in self.predicted.get(key[0], ())

    def prefetch(self, layer: int, experts: list[int], step: int,
                 precisions: Sequence[float | None] | None = None) -> None:
        """Bring `experts` of `layer` (most wanted first) into the compute tier for its step `step`.

        precisions: the prediction's measured precision by rank; given, only the experts
        worth a speculative read are queued (admission.py), else all of them.

        Resident ones are protected until the layer runs; absent ones are queued
        behind any demand load. Nothing happens if the layer has already started its step.
        A second prediction for the same step (a lookahead guess, then the layer's own)
        replaces the first: the guessed transfers it does not repeat are cancelled and the
        guessed slabs it does not name lose their protection.
        """
        tier = self.compute_tier
        with self.lock:
            if step != self.steps[layer] or tier is None:  # too late, or nothing to move
                return
            if precisions is not None:
                experts = admit(experts, lambda e: tier.cache.get((layer, e)) is not None, precisions)
            guessed = self.predicted.get(layer, set())
            self.predicted[layer] = {(layer, e) for e in experts}
            if guessed:
                self.transfers.cancel_prefetches(layer, needed=set(experts))
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
                    self.transfers.enqueue(PREFETCH, tier, key, step)

    def read_ahead(self, layer: int, n_claimed: int) -> None:
        """Layer-major prefill: while `layer` computes (`n_claimed` experts pinned), bring in every
        expert of the next MoE layer, if the compute tier holds them beside `layer`'s.

        A whole prompt routes to (nearly) every expert of a layer, so this is barely a guess;
        an expert it brought that no token chose is evicted first once that layer ran. Behind
        any demand load (a prefetch), and nothing when the tier is too small: then each
        expert is read when its layer asks for it, still once per prompt.
        """
        tier = self.compute_tier
        index = self.slabs.layers.index(layer)
        if tier is None or index + 1 == len(self.slabs.layers):
            return
        if tier.cache.n_slots < n_claimed + self.slabs.n_expert:
            return
        upcoming = self.slabs.layers[index + 1]
        self.prefetch(upcoming, list(range(self.slabs.n_expert)), self.step(upcoming))

    # ----------------------------------------------------------------------------- lifetime

    def drain(self) -> None:
        """Wait until no transfer is queued or running."""
        with self.lock:
            while self.transfers.pending() and self.error is None:
                self.arrivals.wait()

    def clear(self) -> None:
        """Forget every resident slab and every statistic: a cold start (between benchmark runs)."""
        self.drain()
        with self.lock:
            for tier in (self.pool, self.fast):
                if tier is not None:
                    tier.cache.clear()
            self.predicted.clear()
            self.stats = StoreStats.for_layers(self.slabs.layers)

    def reset_stats(self) -> None:
        """Zero the statistics, keeping what the tiers hold (e.g. to measure decode apart from prefill)."""
        self.drain()
        with self.lock:
            self.stats = StoreStats.for_layers(self.slabs.layers)
            for tier in (self.pool, self.fast):
                if tier is not None:
                    tier.cache.reset_counts()

    def close(self) -> None:
        """Stop the transfer workers, close the file and free the tiers' memory. Idempotent."""
        with self.lock:
            self.closing = True
            self.work.notify_all()
            self.slot_freed.notify_all()
            self.arrivals.notify_all()
        self.transfers.join()
        if self.reader is not None:
            self.reader.close()
        for tier in (self.pool, self.fast):
            if tier is not None:
                tier.release()

