"""Which slab occupies which slot of a tier: residency, LRU order, pins and protection.

Pure bookkeeping, no data: a tier owns the memory of its `n_slots` slots, and this
class decides which slab (layer, expert) sits in which, and what to evict.

An entry is LOADING from the moment a transfer reserves its slot until the
transfer completes, then READY. Eviction takes the least recently used READY
entry that is

    not pinned      pinned = a thread computes from it or is waiting for it to
                    arrive; never evicted (the budget is met by refusing a load
                    rather than by evicting what is in use)
    not protected   protected = prefetched for a layer that has not run yet; only
                    a demand load (a miss the model is waiting for) may evict it,
                    so one prediction cannot push out another before it is used

A slab a prediction brought in that its layer did not use is demoted to the front of
the LRU order (the store calls `demote`), so that a wrong guess does not push out the
working set.

Not thread-safe by itself: the store calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

Key = tuple[int, int]  # (layer, expert)


@dataclass(eq=False)  # entries are compared by identity
class Entry:
    key: Key
    slot: int
    ready: bool = False
    pins: int = 0
    protected: bool = False
    used: bool = False  # computed from at least once since it was loaded


class SlotCache:
    def __init__(self, n_slots: int):
        assert n_slots >= 1
        self.n_slots = n_slots
        self.entries: dict[Key, Entry] = {}
        self.lru: OrderedDict[Key, None] = OrderedDict()  # READY entries, least recently used first
        self.free = list(range(n_slots - 1, -1, -1))
        self.reset_counts()

    def reset_counts(self) -> None:
        self.evictions = 0
        self.evicted_unused = 0  # prefetched slabs evicted before anything used them

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def reserve(self, key: Key, demand: bool) -> Entry | None:
        """A new LOADING entry for `key` in a free slot or an evicted one; None if nothing may go."""
        assert key not in self.entries
        if self.free:
            slot = self.free.pop()
        else:
            victim = self._victim(demand)
            if victim is None:
                return None
            slot = self._evict(victim)
        entry = self.entries[key] = Entry(key, slot)
        return entry

    def _victim(self, demand: bool) -> Key | None:
        fallback = None
        for key in self.lru:
            entry = self.entries[key]
            if entry.pins:
                continue
            if not entry.protected:
                return key
            if demand and fallback is None:
                fallback = key
        return fallback

    def _evict(self, key: Key) -> int:
        entry = self.entries.pop(key)
        del self.lru[key]
        self.evictions += 1
        self.evicted_unused += not entry.used
        return entry.slot

    def loaded(self, entry: Entry) -> None:
        """The transfer into `entry`'s slot is complete."""
        entry.ready = True
        self.lru[entry.key] = None

    def touch(self, entry: Entry) -> None:
        """Mark as most recently used."""
        entry.used = True
        self.lru.move_to_end(entry.key)

    def demote(self, entry: Entry) -> None:
        """Make a ready entry the first to evict (a prediction its layer did not use)."""
        if entry.key in self.lru:
            self.lru.move_to_end(entry.key, last=False)

    def discard(self, entry: Entry) -> None:
        """Forget an entry whose transfer failed; its slot is free again."""
        del self.entries[entry.key]
        self.lru.pop(entry.key, None)
        self.free.append(entry.slot)

    def clear(self) -> None:
        assert not any(e.pins or not e.ready for e in self.entries.values()), "clear() while slabs are in use"
        self.entries.clear()
        self.lru.clear()
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.reset_counts()
