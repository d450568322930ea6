"""Layer-major prefill and `--ram-budget auto` (issue 14, items 2, 3 and 8).

Layer-major prefill (Transformer.forward_layer_major) runs every batch of a prompt through
one block before the next, so that an expert store reads each expert once per prompt. Its
logits must be those of batch-by-batch prefill bit for bit, although each expert now sees
the tokens of every batch in one claim: the kernels take a different path for an expert
with many tokens (BLAS from BLAS_MIN_TOKENS = 32), so the test's prompt gives experts more
than that across batches and fewer within one.

`auto` is checked with a faked MemAvailable: the sizing is a pure function (budget.py),
and attach() takes MemAvailable from `qmoe.experts.attach.mem_available`.
"""

from __future__ import annotations

import numpy as np
import pytest

import qmoe
from qmoe.cli import main
from qmoe.errors import QmoeError
from qmoe.experts import attach as attach_module
from qmoe.experts.budget import (
    MARGIN_SHARE,
    MIN_MARGIN_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    RunSizes,
    choose_ram_budget,
    run_sizes,
)
from qmoe.experts.options import OffloadOptions, format_bytes
from qmoe.experts.slabs import ExpertSlabs
from qmoe.predictor.calib_data import CalibData
from qmoe.predictor.calibrate import record

N_BATCH = 48  # a 160-token prompt is four batches; 2 of 8 experts per token: ~12 tokens an expert a batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt(n_vocab: int, n: int = 160, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, n_vocab, n).tolist()


def slab_bytes(path) -> int:
    with qmoe.load(path, offload=OffloadOptions(ram_budget="100%", direct_io=True)) as m:
        return m.store.layout.nbytes


# ----------------------------------------------------------------------------- layer-major prefill


@pytest.mark.parametrize("kind", ["qwen3moe", "deepseek2-lite"])  # deepseek2: a dense first block, shared experts
def test_layer_major_prefill_equals_batched_prefill(kind, tiny_gguf):
    path = tiny_gguf(kind, "q8_0", "q4_0")
    with qmoe.load(path, n_batch=N_BATCH, offload=None) as plain:
        ids = prompt(plain.n_vocab)
        batched = plain.logits(ids)
        assert not plain.layer_major
    n_slab = slab_bytes(path)
    for budget in (n_slab * 8, "100%"):  # one layer's experts (no read-ahead), or all (read-ahead)
        with qmoe.load(path, n_batch=N_BATCH, offload=OffloadOptions(ram_budget=budget, direct_io=True)) as m:
            assert m.layer_major
            assert np.array_equal(m.logits(ids), batched)
            # Greedy tokens after a layer-major prefill: the decode steps see the same cache.
            with qmoe.load(path, n_batch=N_BATCH, offload=None) as again:
                assert list(m.stream(ids, 6)) == list(again.stream(ids, 6))


def test_layer_major_prefill_reads_each_expert_once_per_prompt(tiny_gguf):
    """A pool of one layer's experts: batch by batch, the two layers would evict each other every
    batch; layer by layer, each expert is read once for the whole prompt."""
    path = tiny_gguf("qwen3moe", "q8_0", "q4_0")
    n_slab = slab_bytes(path)
    with qmoe.load(path, n_batch=N_BATCH, offload=OffloadOptions(ram_budget=n_slab * 8, direct_io=True)) as m:
        m.logits(prompt(m.n_vocab))
        stats = m.offload_stats()
        assert stats["bytes_into"]["ram"] <= m.store.slabs.n_slabs * n_slab
        assert stats["transfers"] <= m.store.slabs.n_slabs
        # The same prompt batch by batch, forced, for contrast: the measurement can see re-reads.
        m.reset_offload()
        cache = m.new_cache()
        ids = prompt(m.n_vocab)
        for s in range(0, len(ids), N_BATCH):
            m.net.forward(np.asarray(ids[s:s + N_BATCH]), cache)
        assert m.offload_stats()["transfers"] > m.store.slabs.n_slabs


def test_calibration_through_layer_major_records_what_batched_calibration_does(tiny_gguf, tmp_path):
    path = tiny_gguf("qwen3moe", "q8_0", "q4_0")
    docs = [prompt(256, 100, seed=1), prompt(256, 70, seed=2), prompt(256, 90, seed=3)]
    with qmoe.load(path, offload=None) as plain:
        record(plain, docs, tmp_path / "plain", 240, window=40, progress=False)
    with qmoe.load(path, offload=OffloadOptions(ram_budget="60%", direct_io=True)) as m:
        assert m.layer_major
        record(m, docs, tmp_path / "store", 240, window=40, progress=False, group_tokens=100)
        assert m.offload_stats()["transfers"] <= 3 * m.store.slabs.n_slabs  # three groups of windows
    a, b = CalibData(tmp_path / "plain"), CalibData(tmp_path / "store")
    assert a.n_tokens == b.n_tokens == 240
    for layer in a.moe_layers:
        for name in ("x_pre", "x_router", "scores", "topk"):
            assert np.array_equal(getattr(a, name)(layer), getattr(b, name)(layer)), (layer, name)


# ----------------------------------------------------------------------------- --ram-budget auto


GiB = 2**30


def sizes(expert_bytes: int, rest: int = GiB) -> RunSizes:
    return RunSizes(expert_bytes=expert_bytes, slab_bytes=3 * 2**20, slabs_per_token=8,
                    other_weights_bytes=rest, kv_cache_bytes=0, activation_bytes=0)


def test_auto_budget_keeps_a_model_that_fits_in_the_map():
    choice = choose_ram_budget(sizes(4 * GiB), mem_available=16 * GiB)
    assert choice.budget is None and "served from the mapped file" in choice.message
    assert choose_ram_budget(sizes(400 * GiB), mem_available=None).budget is None  # not Linux: as before


@pytest.mark.parametrize("mem_gib", [2, 3, 8, 15.5, 16, 23, 34])
def test_auto_budget_never_takes_more_than_is_left(mem_gib):
    mem = int(mem_gib * GiB)
    s = sizes(32 * GiB)
    choice = choose_ram_budget(s, mem)
    assert choice.budget is not None and choice.budget % s.slab_bytes == 0
    assert choice.budget >= s.slab_bytes * s.slabs_per_token
    margin = max(MIN_MARGIN_BYTES, mem // MARGIN_SHARE)
    assert choice.budget + s.rest_of_run + margin <= mem
    assert choice.budget + s.rest_of_run + margin + s.slab_bytes > mem  # and uses what is there
    assert f"{format_bytes(choice.budget)} RAM pool" in choice.message and "O_DIRECT" in choice.message


def test_auto_budget_refuses_a_machine_that_cannot_run_the_model():
    with pytest.raises(QmoeError, match="not enough memory for this model"):
        choose_ram_budget(sizes(32 * GiB), mem_available=GiB + RUNTIME_OVERHEAD_BYTES)


def test_auto_is_the_default_and_sizes_a_pool_when_the_experts_do_not_fit(tiny_gguf, monkeypatch, capsys):
    path = tiny_gguf("qwen3moe", "q8_0", "q4_0")
    with qmoe.load(path) as m:  # plenty of memory here: the plain runtime, silently
        assert m.store is None
        ids = prompt(m.n_vocab, 24)
        plain = m.logits(ids)
        slabs = ExpertSlabs(m.file.path, m.net.blocks[m.net.moe_layers[0]].ffn.experts.tensors)
        run = run_sizes(m.net.hp, m.file, slabs, m.n_ctx, m.n_batch)
    assert "--ram-budget auto" not in capsys.readouterr().err
    # MemAvailable that leaves room for half the experts (a margin of 256 MiB: below 2 GiB in all).
    fake = run.rest_of_run + MIN_MARGIN_BYTES + run.expert_bytes // 2
    assert fake // MARGIN_SHARE <= MIN_MARGIN_BYTES
    monkeypatch.setattr(attach_module, "mem_available", lambda: fake)
    with qmoe.load(path) as m:
        assert m.store is not None and m.store.reader is not None
        assert run.expert_bytes // 2 - run.slab_bytes < m.store.pool.nbytes <= run.expert_bytes // 2
        assert np.array_equal(m.logits(ids), plain)
    err = capsys.readouterr().err
    assert err.count("--ram-budget auto:") == 1 and "RAM pool read with O_DIRECT" in err
    with qmoe.load(path, offload=OffloadOptions(ram_budget="off", sim_fast_budget="50%")) as m:
        assert m.store.pool is None  # off: no pool, whatever MemAvailable says
    assert main(["run", str(path), "-p", "x", "-n", "2"]) == 0
    assert "--ram-budget auto:" in (err := capsys.readouterr().err) and "RAM pool" in err
    assert main(["run", str(path), "-p", "x", "-n", "2", "--ram-budget", "off"]) == 0
    assert "RAM pool" not in capsys.readouterr().err
    monkeypatch.setattr(attach_module, "mem_available", lambda: RUNTIME_OVERHEAD_BYTES)
    assert main(["run", str(path), "-p", "x", "-n", "2"]) == 1
    assert "not enough memory for this model" in capsys.readouterr().err
    assert main(["run", str(path), "-p", "x", "-n", "2", "--ram-budget", "30%"]) == 0  # a size overrides


def test_the_larger_than_ram_bench_file_decodes_as_from_ram(tmp_path, monkeypatch):
    """bench/larger_than_ram.py's model at 2 layers (and a small vocabulary): under `auto` with a
    MemAvailable that leaves room for a third of its experts, the O_DIRECT pool with several reads
    in flight and prefetching give the tokens and logits of a run with everything in RAM."""
    from bench.larger_than_ram import A3B_FULL, model_path
    from bench.random_moe import MoEShape, write_random_moe

    shape = MoEShape(**{**A3B_FULL.__dict__, "n_layers": 2, "n_vocab": 2048})
    path = write_random_moe(model_path(tmp_path, shape), shape, "larger than RAM, 2 layers")
    with qmoe.load(path, offload=None) as m:
        ids = m.tokenize("def main(args):\n    return")[:8]
        want_tokens, want_logits = list(m.stream(ids, 12)), m.logits(ids)
        slabs = ExpertSlabs(m.file.path, m.net.blocks[m.net.moe_layers[0]].ffn.experts.tensors)
        run = run_sizes(m.net.hp, m.file, slabs, m.n_ctx, m.n_batch)
    monkeypatch.setattr(attach_module, "mem_available",
                        lambda: run.rest_of_run + MIN_MARGIN_BYTES + run.expert_bytes // 3)
    for prefetch in ("none", "cross-layer"):
        with qmoe.load(path, offload=OffloadOptions(prefetch=prefetch)) as m:
            assert m.store.pool is not None and m.store.pool.nbytes <= run.expert_bytes // 3
            assert m.store.transfers.depth == OffloadOptions.io_depth
            assert list(m.stream(ids, 12)) == want_tokens, prefetch
            assert np.array_equal(m.logits(ids), want_logits), prefetch
            assert m.offload_stats()["bytes_into"]["ram"] > 0
