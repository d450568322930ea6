"""The transfer queue (qmoe/experts/transfers.py): demand loads before speculative reads, stale
prefetches cancelled unread (issue 14, items 4 and 8).

The transfer thread is held inside its first transfer (an Event), so that what queues behind it
is decided while it waits; the order is then read from the transfers it actually ran. No time
is measured or asserted.
"""

from __future__ import annotations

import threading
import time

import pytest

import qmoe
from qmoe.experts.options import OffloadOptions
from qmoe.experts.transfers import DEMAND, PREFETCH


@pytest.fixture(scope="module")
def q4_path(tiny_gguf):
    return tiny_gguf("qwen3moe", "q8_0", "q4_0")


class HeldTransfers:
    """Wraps the store's transfer step: records each transfer it runs and holds the first until released."""

    def __init__(self, store):
        self.moved: list[tuple[tuple[int, int], int]] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self._move = store.transfers._move
        store.transfers._move = self

    def __call__(self, transfer) -> None:
        self.moved.append((transfer.job.key, transfer.job.priority))
        self.started.set()
        assert self.go.wait(30), "the test never released the transfer thread"
        self._move(transfer)


def claim_and_release(store, layer: int, experts: list[int]) -> None:
    """A layer's forward pass as the store sees it: claim, wait for what is on its way, release."""
    claims = store.claim_layer(layer, experts)
    for _, entry in claims.ready:
        store.release(store.compute_tier, entry)
    for _, handle in claims.waiting:
        store.release(store.compute_tier, store.wait(handle, layer))


def test_a_demand_load_goes_before_queued_prefetches(q4_path):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", direct_io=True, io_depth=1)) as m:
        store = m.store
        layer, other = m.net.moe_layers
        held = HeldTransfers(store)
        store.prefetch(layer, [0, 1, 2], store.step(layer))
        assert held.started.wait(30)  # prefetch 0 is being read; 1 and 2 wait in the queue
        demand = threading.Thread(target=claim_and_release, args=(store, other, [5]))
        demand.start()
        while store.transfers.find(store.pool, (other, 5)) is None:  # the demand is queued
            demand.join(0.01)
        held.go.set()
        demand.join(30)
        store.drain()
        assert held.moved == [((layer, 0), PREFETCH), ((other, 5), DEMAND), ((layer, 1), PREFETCH),
                              ((layer, 2), PREFETCH)]


def test_a_demand_load_never_waits_behind_a_full_set_of_prefetches(q4_path):
    """With 3 reads in flight, prefetches take at most 2 workers: a demand load starts at once."""
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", direct_io=True, io_depth=3)) as m:
        store = m.store
        layer, other = m.net.moe_layers
        held = HeldTransfers(store)
        store.prefetch(layer, [0, 1, 2, 3], store.step(layer))
        while len(held.moved) < 2:
            time.sleep(0.01)
        with store.lock:
            assert store.transfers.speculating == 2 and len(store.transfers.queued) == 2  # 2 and 3 wait
        demand = threading.Thread(target=claim_and_release, args=(store, other, [5]))
        demand.start()
        while len(held.moved) < 3:  # the demand's read starts while both prefetches are held
            time.sleep(0.01)
        assert held.moved[2] == ((other, 5), DEMAND)
        held.go.set()
        demand.join(30)
        store.drain()
        assert sorted(held.moved) == sorted([((layer, e), PREFETCH) for e in range(4)] + [((other, 5), DEMAND)])


def test_prefetches_the_layer_did_not_need_are_cancelled_unread(q4_path):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", direct_io=True, io_depth=1)) as m:
        store = m.store
        layer = m.net.moe_layers[0]
        held = HeldTransfers(store)
        store.prefetch(layer, [0, 1, 2, 3], store.step(layer))
        assert held.started.wait(30)
        # The layer runs and needs 1 only: 2 and 3 are stale, and 1 becomes a demand load.
        runner = threading.Thread(target=claim_and_release, args=(store, layer, [1]))
        runner.start()
        while store.transfers.find(store.pool, (layer, 1)).priority != DEMAND:
            runner.join(0.01)
        held.go.set()
        runner.join(30)
        store.drain()
        assert held.moved == [((layer, 0), PREFETCH), ((layer, 1), DEMAND)]
        assert store.pool.cache.get((layer, 2)) is None and store.pool.cache.get((layer, 3)) is None
        assert m.offload_stats()["prefetch"]["dropped"] >= 2


def test_a_prefetch_for_a_step_already_run_is_dropped_unread(q4_path):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", direct_io=True, io_depth=1)) as m:
        store = m.store
        layer, other = m.net.moe_layers
        held = HeldTransfers(store)
        store.prefetch(other, [7], store.step(other))  # holds the thread
        assert held.started.wait(30)
        step = store.step(layer)
        store.prefetch(layer, [4], step)
        with store.lock:
            store.steps[layer] += 1  # the layer started that step meanwhile (without needing expert 4)
        held.go.set()
        store.drain()
        assert held.moved == [((other, 7), PREFETCH)]
        assert store.pool.cache.get((layer, 4)) is None


# ----------------------------------------------------------------------------- admission


def test_speculative_reads_go_only_to_ranks_right_more_often_than_wrong():
    from qmoe.experts.admission import admit

    ranked = [5, 1, 7, 2, 0, 4]
    resident = {7, 4}.__contains__
    precisions = [0.9, 0.6, 0.55, 0.2, 0.7, 0.5]  # by rank
    # Ranks right more often than wrong, resident or read; resident 4's rank is not: unprotected.
    assert admit(ranked, resident, precisions) == [5, 1, 7, 0]
    assert admit(ranked, resident, [None] * 6) == [7, 4]  # unscored: no read, the residents kept


def test_the_store_reads_only_what_admission_keeps(q4_path):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", direct_io=True, io_depth=1)) as m:
        store = m.store
        layer = m.net.moe_layers[0]
        store.prefetch(layer, [0, 1], store.step(layer))  # without scores (prefill's read-ahead): all
        store.drain()
        assert store.pool.cache.get((layer, 1)) is not None
        claim_and_release(store, layer, [0])
        store.prefetch(layer, [2, 3, 0], store.step(layer), precisions=[0.9, None, None])
        store.drain()
        assert store.pool.cache.get((layer, 2)) is not None  # rank 0, right 90 % of the time
        assert store.pool.cache.get((layer, 3)) is None  # rank 1: unscored, not read
        assert store.pool.cache.get((layer, 0)).protected  # resident: kept, protected
