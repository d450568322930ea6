"""The store's transfer workers: the links between tiers, and the queue of work for them.

A transfer brings one slab into one tier: file -> RAM pool, and/or pool (or the
mapped file, when there is no pool) -> fast tier, with the simulated link's delay
if one is set (link.py). `depth` worker threads run transfers, in priority order:

    DEMAND    a model thread waits for it (a miss, or a late prefetch it claimed)
    PREFETCH  a prediction, for one step of its layer: dropped unstarted once the
              layer has started that step, or when a newer prediction leaves it out
    FILL      a slab a fast-tier miss was computed without, so that the tier learns
              from use as an LRU cache does

then first come first served. Each job is planned under the store's lock (which
slot, evicting what), moved outside it (the reads and copies), and completed under
it again (the slot is ready, the pins of the threads waiting for it are added).
Slab reads are `SlabReader.read` (slabs.py); they release the GIL, so `depth`
workers keep that many reads in flight, which a drive serves in little more than
the time of one. Speculative jobs (prefetches, fills) take at most depth - 1
workers, so that a demand miss never queues behind a full set of guesses. Only
reads into the RAM pool run several at a time; a fast tier's link carries one
transfer after the other (depth 1).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmoe.experts.cache import Entry, Key
from qmoe.experts.tiers import FastTier, RamPool

if TYPE_CHECKING:  # the store owns the transfers; they read its tiers under its lock
    from qmoe.experts.store import ExpertStore

DEMAND, PREFETCH, FILL = 0, 1, 2
Tier = RamPool | FastTier


@dataclass(order=True)
class Job:
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
    """What a transfer worker does for a job, decided under the lock, done outside it."""

    job: Job
    target: Entry  # in job.tier
    read_into: Entry | None  # pool entry to fill from the file first
    upload_from: Entry | None  # pool entry to upload into the fast tier from (None: the mapped file)
    slept: float = 0.0  # waiting for the simulated link


class Transfers:
    """The queue of jobs and the `depth` threads that run them, for one store.

    The queueing methods are called under the store's lock; the threads take it themselves.
    """

    def __init__(self, store: ExpertStore, depth: int = 1):
        self.store = store
        self.depth = depth
        self.queue: list[Job] = []  # heap: demand before prefetch before fill, then first come first served
        self.queued: dict[tuple[str, Key], Job] = {}
        self.seq = itertools.count()
        self.running = 0  # jobs being planned, moved or completed
        self.busy_since = 0.0  # when `running` last rose from 0
        self.slot_waiters: list[int] = []  # seqs of demand jobs waiting for a slot, oldest first
        self.reserving: dict[tuple[str, Key], Job] = {}  # those jobs by tier and key
        self.speculating = 0  # of which prefetches and fills
        self.threads = [
            threading.Thread(target=self._loop, name=f"qmoe-transfers-{i}", daemon=True) for i in range(depth)
        ]
        for thread in self.threads:
            thread.start()

    # ----------------------------------------------------------------------------- queueing (under the lock)

    def find(self, tier: Tier, key: Key) -> Job | None:
        """The job queued for `key` in `tier`, or the demand load waiting for a slot for it."""
        return self.reserving.get((tier.name, key)) or self.queued.get((tier.name, key))

    def demand(self, tier: Tier, key: Key) -> Job:
        """Queue a demand load of `key` into `tier`, held for the requesting thread."""
        job = Job(DEMAND, next(self.seq), key, tier, self.store.steps[key[0]], pins=1)
        self._push(job)
        return job

    def enqueue(self, priority: int, tier: Tier, key: Key, step: int) -> None:
        """Queue a prefetch or a cache fill of `key` unless a job for it is queued already, or a
        demand load for it waits for a slot."""
        if (tier.name, key) not in self.queued and (tier.name, key) not in self.reserving:
            self._push(Job(priority, next(self.seq), key, tier, step))

    def _push(self, job: Job) -> None:
        heapq.heappush(self.queue, job)
        self.queued[(job.tier.name, job.key)] = job
        self.store.work.notify()

    def cancel_prefetches(self, layer: int, needed: set[int]) -> None:
        """Drop queued prefetches for `layer` outside `needed`: it runs now, or a newer prediction replaced them."""
        for (_, (job_layer, e)), job in list(self.queued.items()):
            if job_layer == layer and job.priority == PREFETCH and e not in needed:
                job.cancelled = True
                del self.queued[(job.tier.name, job.key)]
                self.store.stats.prefetch_dropped += 1

    def pending(self) -> bool:
        """A transfer is running or queued."""
        return self.running > 0 or any(not job.cancelled for job in self.queue)

    # ----------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        store = self.store
        while True:
            with store.lock:
                transfer = None
                while transfer is None:
                    job = self._next_job()
                    if job is None:
                        return
                    self._start(job)
                    transfer = self._plan(job)
                    if transfer is None:
                        self._finish(job)
                        store.arrivals.notify_all()  # it may have delivered a slab that was already there
            try:
                self._move(transfer)
            except BaseException as exc:  # noqa: BLE001 - any failure is handed to the waiting threads
                with store.lock:
                    self._abandon(transfer, exc)
            else:
                with store.lock:
                    self._complete(transfer)
            finally:
                with store.lock:
                    self._finish(transfer.job)
                    store.arrivals.notify_all()

    def _start(self, job: Job) -> None:
        if self.running == 0:
            self.busy_since = time.perf_counter()
        self.running += 1
        self.speculating += job.priority != DEMAND

    def _finish(self, job: Job) -> None:
        self.running -= 1
        self.speculating -= job.priority != DEMAND
        if self.running == 0:  # busy time is wall time with any transfer running, however many
            self.store.stats.transfer_s += time.perf_counter() - self.busy_since
        self.store.work.notify()  # a worker may be waiting for a speculative turn
        if self.store.waiting_for_slot:  # what it brought may be evictable for a demand load now
            self.store.slot_freed.notify_all()

    def _next_job(self) -> Job | None:
        """Under the lock: the most urgent job this worker may take, waiting for one if need be."""
        store = self.store
        while not store.closing:
            while self.queue and self.queue[0].cancelled:
                heapq.heappop(self.queue)
            if self.queue and (self.queue[0].priority == DEMAND or self.depth == 1
                               or self.speculating < self.depth - 1):
                job = heapq.heappop(self.queue)
                del self.queued[(job.tier.name, job.key)]
                return job
            if not self.queue:
                store.arrivals.notify_all()  # idle: wake drain()
            store.work.wait()
        return None

    def _reserve(self, tier: Tier, key: Key, job: Job) -> Entry | None:
        """A slot for `key`: a demand load waits for one to be released, a prefetch gives up.

        Waiting demand loads take freed slots in the order they were queued, which is the
        order the model thread waits for them in: were a later one served first, it could
        hold the last slot (pinned for the model) while the model waits for an earlier one.
        Nothing speculative takes a slot while a demand load waits for one.
        """
        store = self.store
        if job.priority != DEMAND:
            return None if self.slot_waiters else tier.cache.reserve(key, demand=False)
        bisect.insort(self.slot_waiters, job.seq)
        joinable = tier is job.tier  # not the pool slot a fast-tier job reads through
        if joinable:
            self.reserving[(tier.name, key)] = job  # claims on the key meanwhile join this job (find)
        try:
            while True:
                entry = tier.cache.reserve(key, demand=True) if self.slot_waiters[0] == job.seq else None
                if entry is not None or store.closing:
                    return entry
                store.waiting_for_slot += 1
                store.slot_freed.wait()
                store.waiting_for_slot -= 1
        finally:
            self.slot_waiters.remove(job.seq)
            if joinable:
                del self.reserving[(tier.name, key)]
            if self.slot_waiters:
                store.slot_freed.notify_all()  # the next in line may find a slot free already

    def _plan(self, job: Job) -> _Transfer | None:
        store = self.store
        tier, key = job.tier, job.key
        if job.priority == PREFETCH and job.step != store.steps[key[0]]:
            store.stats.prefetch_dropped += 1
            return None
        existing = tier.cache.get(key)
        if existing is not None:  # brought in (or being brought in) by another job meanwhile: wait on that
            existing.pins += job.pins
            job.pinned, job.delivered = job.pins, existing
            return None
        target = self._reserve(tier, key, job)
        if target is None:
            store.stats.prefetch_dropped += job.priority == PREFETCH
            return None
        target.pins += job.pins
        job.pinned = job.pins
        target.protected = job.priority == PREFETCH and store.is_predicted(key)
        if tier is store.pool:
            return _Transfer(job, target, read_into=target, upload_from=None)
        if store.pool is None:
            return _Transfer(job, target, read_into=None, upload_from=None)
        # Into the fast tier through the pool (one worker: depth 1, so a pool entry found
        # here is ready); an absent one is read from the file first.
        source = store.pool.cache.get(key)
        read_into = None
        if source is None:
            source = read_into = self._reserve(store.pool, key, job)
            if source is None:  # not a demand load, and every pool slot is in use
                tier.cache.discard(target)
                store.stats.prefetch_dropped += job.priority == PREFETCH
                return None
        source.pins += 1
        return _Transfer(job, target, read_into=read_into, upload_from=source)

    def _move(self, t: _Transfer) -> None:
        """The transfer itself, outside the lock: file -> pool and/or pool or file -> fast tier."""
        store = self.store
        layer, expert = t.job.key
        layout = store.slabs.layouts[layer]
        start = time.perf_counter()
        link_start = start
        if t.read_into is not None:
            store.reader.read(store.slabs.ranges(layer, expert), store.pool.views(t.read_into.slot, layout))
            link_start = time.perf_counter() if t.job.tier is store.fast else start
        if t.job.tier is store.fast:
            raw = (
                store.pool.views(t.upload_from.slot, layout)
                if t.upload_from is not None
                else store.slabs.views(layer, expert)
            )
            store.fast.upload(t.target.slot, raw, layout)
        t.slept = store.link.finish(link_start, layout.nbytes) if store.link is not None else 0.0

    def _complete(self, t: _Transfer) -> None:
        store, s = self.store, self.store.stats
        nbytes = store.slabs.layouts[t.job.key[0]].nbytes
        if t.read_into is not None:
            store.pool.cache.loaded(t.read_into)
            s.bytes_into["ram"] += nbytes
        if t.upload_from is not None:
            t.upload_from.pins -= 1
            store.pool.cache.touch(t.upload_from)
        if t.job.tier is store.fast:
            store.fast.cache.loaded(t.target)
            s.bytes_into["fast"] += nbytes
        t.target.pins += t.job.pins - t.job.pinned  # claims withdrawn (or added) during the transfer
        t.job.delivered = t.target
        s.transfers += 1
        s.simulated_s += t.slept
        s.prefetch_loaded += t.job.priority == PREFETCH
        if t.job.step != store.steps[t.job.key[0]] or not store.is_predicted(t.job.key):
            t.target.protected = False  # its layer ran while it was on its way, or a newer prediction dropped it

    def _abandon(self, t: _Transfer, exc: BaseException) -> None:
        store = self.store
        store.error = exc
        for entry, tier in ((t.target, t.job.tier), (t.read_into, store.pool)):
            if entry is not None and not entry.ready and tier.cache.get(entry.key) is entry:
                tier.cache.discard(entry)
        if t.upload_from is not None and t.upload_from is not t.read_into:
            t.upload_from.pins -= 1

    def join(self) -> None:
        """Wait for the threads to end (after the store set `closing` and woke them)."""
        for thread in self.threads:
            thread.join()
