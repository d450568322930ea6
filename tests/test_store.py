"""The expert store and the prefetcher: budgets, reads, eviction, policies, and that none of it changes results."""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

import qmoe
from bench.random_moe import MoEShape, write_random_moe
from qmoe import kernels
from qmoe.cli import main
from qmoe.errors import QmoeError
from qmoe.experts.cache import SlotCache
from qmoe.experts.link import SimulatedLink
from qmoe.experts.options import OffloadOptions, parse_budget
from qmoe.experts.slabs import SlabReader, direct_residue
from qmoe.experts.stats import LAYER_PRIOR, PredictionScorer
from qmoe.experts.store import ExpertStore
from qmoe.experts.tiers import RamPool, dense_expert_ffn
from qmoe.kernels import dequantize_torch
from qmoe.models.base import MmapExperts, MoE
from qmoe.predictor.model import INPUT_PRE_ATTN, PredictorSet, build_predictor, fold_batchnorm
from qmoe.predictor.sidecar import default_sidecar_path, model_identity, write_sidecar
from tests.tiny_models import TINY_KINDS

QT = GGMLQuantizationType
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA fast tier needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def q4_path(tiny_gguf):
    """qwen3moe with q4_0 experts (2 MoE layers of 8 experts, 2 used)."""
    return tiny_gguf("qwen3moe", "q8_0", "q4_0")


def prompt(n_vocab: int, n: int = 64, seed: int = 0) -> list[int]:
    """Long enough that some expert gets >= 16 tokens: the kernels' BLAS path runs too."""
    return np.random.default_rng(seed).integers(3, n_vocab, n).tolist()


@functools.cache
def one_slab(path) -> int:
    """Bytes of one quantized expert slab of the model at `path`."""
    with qmoe.load(path, offload=OffloadOptions(ram_budget="100%", direct_io=True)) as m:
        return m.store.layout.nbytes  # every layer alike in these files: one slab = one slot


# ----------------------------------------------------------------------------- pieces


def test_budgets_parse_sizes_and_shares():
    assert parse_budget("6G", 0, "--ram-budget") == 6 * 2**30
    assert parse_budget("1.5M", 0, "--ram-budget") == 3 * 2**19
    assert parse_budget("512KiB", 0, "--ram-budget") == 512 * 1024
    assert parse_budget("1000", 0, "--ram-budget") == 1000
    assert parse_budget("40%", 1000, "--gpu-budget") == 400
    assert parse_budget(123, 0, "--gpu-budget") == 123
    for bad in ("6X", "-5", "%", "ten"):
        with pytest.raises(QmoeError, match="--ram-budget"):
            parse_budget(bad, 100, "--ram-budget")


def test_options_are_checked():
    assert OffloadOptions().ram_budget == "auto"  # the default: sized at load (budget.py)
    with pytest.raises(QmoeError, match="--gpu-budget \\(or --sim-fast-budget\\); for none at all"):
        OffloadOptions(ram_budget="off", prefetch="pre-attn")
    with pytest.raises(QmoeError, match="--prefetch"):
        OffloadOptions(ram_budget="1G", prefetch="psychic")
    with pytest.raises(QmoeError, match="--on-miss"):
        OffloadOptions(ram_budget="1G", on_miss="pray")
    with pytest.raises(QmoeError, match="--predict-in must be one of auto, model, worker"):
        OffloadOptions(ram_budget="1G", predict_in="gpu")
    with pytest.raises(QmoeError, match="--lookahead must be >= 0"):
        OffloadOptions(ram_budget="1G", prefetch="pre-attn", lookahead=-1)
    with pytest.raises(QmoeError, match="--lookahead applies to --prefetch pre-attn and oracle, not cross-layer"):
        OffloadOptions(ram_budget="1G", prefetch="cross-layer", lookahead=1)
    with pytest.raises(QmoeError, match="sim-link-gbps"):
        SimulatedLink(0.0)
    assert SimulatedLink(2.0, 100).seconds(2_000_000) == pytest.approx(1e-3 + 1e-4)


def test_slot_cache_evicts_lru_but_not_pinned_or_protected():
    cache = SlotCache(3)
    a, b, c = (cache.reserve((0, e), demand=False) for e in range(3))
    for entry in (a, b, c):
        cache.loaded(entry)
    assert sorted(e.slot for e in (a, b, c)) == [0, 1, 2]
    a.pins, b.protected = 1, True
    d = cache.reserve((0, 3), demand=False)  # a pinned, b protected: c goes
    assert d.slot == c.slot and cache.get((0, 2)) is None and cache.evicted_unused == 1
    cache.loaded(d)
    cache.touch(d)
    d.pins = 1
    assert (
        cache.reserve((0, 4), demand=False) is None
    )  # only a prediction could go, and a prefetch may not evict it
    e = cache.reserve((0, 4), demand=True)  # a demand load may
    assert e.slot == b.slot and len(cache) == 3


def test_expert_groups_follow_the_kernels_order():
    ids = np.array([[3, 1]] * 20 + [[1, 0]], dtype=np.int32)  # expert 3 and 1 have >= 16 tokens, 0 has one
    groups = kernels.ExpertGroups(ids)
    assert groups.experts.tolist() == [0, 1, 3]
    assert groups.group_pairs(0).tolist() == [41]


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0, QT.F16, QT.BF16, QT.F32])
def test_dequantize_torch_matches_the_kernels(qtype):
    values = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    raw = quantize(values, qtype) if qtype != QT.F32 else values
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(6, -1)
    got = dequantize_torch(torch.from_numpy(raw), qtype, 64).numpy()
    assert np.array_equal(got, kernels.dequantize(raw, qtype))


@pytest.fixture(scope="module")
def wide_experts_path(tmp_path_factory):
    """Experts of several pages per part (Q8_0 [512, 256]: 34 pages), as in real models."""
    shape = MoEShape(n_layers=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=2,
                     n_ff_exp=512, n_vocab=300, expert_type=QT.Q8_0)
    return write_random_moe(tmp_path_factory.mktemp("wide") / "wide.gguf", shape, "wide experts")


@pytest.mark.parametrize("direct,into_pool,align,fan_out", [
    (False, False, None, False), (True, False, None, False), (True, True, None, False), (True, True, 4096, False),
    (True, True, None, True)])
@pytest.mark.parametrize("model", ["q4_path", "wide_experts_path"])
def test_reader_reads_every_slab_as_the_file_has_it(model, direct, into_pool, align, fan_out, request):
    """Plain buffers go through the bounce buffer; slots of a pool lined up with the file take the
    whole blocks straight from the drive (at the drive's alignment, or 4096), from 4 threads at once
    (and with fan_out, each slab's parts at once, as for slabs of real models' size)."""
    path = request.getfixturevalue(model)
    with qmoe.load(path, offload=OffloadOptions(ram_budget="100%", direct_io=True)) as m:
        slabs = m.store.slabs
        reader = SlabReader(slabs.path, direct, depth=4)
        if align is not None:
            reader.align = align
        if fan_out:
            reader.FAN_OUT_MIN_BYTES = 0
        pool = RamPool(slabs.layout, 4, reader.align, direct_residue(slabs, reader.align))
        keys = [(layer, e) for layer in slabs.layers for e in range(slabs.n_expert)]

        lined_up = []  # bytes of the parts whose slot lines up with the file and that span a whole block

        def read_all(slot: int) -> None:
            for layer, e in keys[slot::4]:
                for (offset, nbytes), view in zip(slabs.ranges(layer, e), pool.views(slot, slabs.layouts[layer])):
                    if (view.ctypes.data - offset) % reader.align == 0 and (
                        -(-offset // reader.align) < (offset + nbytes) // reader.align
                    ):
                        lined_up.append(nbytes)
                outs = (pool.views(slot, slabs.layouts[layer]) if into_pool else
                        tuple(np.empty(shape, np.uint8) for shape in slabs.layouts[layer].raw_shapes))
                reader.read(slabs.ranges(layer, e), outs)
                for out, view in zip(outs, slabs.views(layer, e)):
                    assert np.array_equal(out, view), (layer, e)

        try:
            with ThreadPoolExecutor(4) as workers:
                for done in [workers.submit(read_all, slot) for slot in range(4)]:
                    done.result()
            total = sum(layout.nbytes for layout in slabs.layouts.values()) * slabs.n_expert
            if direct and reader.direct and into_pool:
                assert reader.bounced_bytes == total - sum(lined_up)
                if model == "wide_experts_path":  # parts of whole pages: at 512 all lie at one residue
                    assert sum(lined_up) == total if reader.align <= 512 else sum(lined_up) > 0
            elif direct and reader.direct:
                assert reader.bounced_bytes > 0
        finally:
            reader.close()


def test_reader_falls_back_where_o_direct_is_refused(q4_path, tmp_path_factory):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm to refuse O_DIRECT")
    copy = Path(shutil.copy(q4_path, shm / f"qmoe-test-{Path(q4_path).name}"))
    try:
        with (
            pytest.warns(RuntimeWarning, match="O_DIRECT")
            if _refuses_o_direct(copy)
            else warnings.catch_warnings()
        ):
            with qmoe.load(copy, offload=OffloadOptions(ram_budget="25%", direct_io=True)) as m:
                ids = prompt(m.n_vocab, 20)
                got = m.logits(ids)
        with qmoe.load(copy) as plain:
            assert np.array_equal(got, plain.logits(ids))
    finally:
        copy.unlink()


def _refuses_o_direct(path: Path) -> bool:
    import os

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return False
    except OSError:
        return True


# ----------------------------------------------------------------------------- results do not depend on the store


KERNEL_PATH_CONFIGS = [
    dict(ram_budget=1),  # one slot: every expert is read, evicting the last (budget rounded up below)
    dict(ram_budget="25%", prefetch="cross-layer"),
    dict(ram_budget="50%", prefetch="oracle", direct_io=True),
    dict(ram_budget="100%"),  # everything fits: served from the mapped file
    # without CUDA the fast tier holds quantized slabs for the same kernels
    dict(sim_fast_budget="20%", on_miss="wait"),
    dict(sim_fast_budget="25%", on_miss="wait", prefetch="oracle", lookahead=2),  # guesses from dense blocks too
    dict(sim_fast_budget="30%", ram_budget="25%", on_miss="cpu", prefetch="cross-layer"),
]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_kernel_path_logits_and_tokens_equal_the_plain_runtime(kind, tiny_gguf):
    path = tiny_gguf(kind, "q8_0", "q4_0")
    with qmoe.load(path) as plain:
        ids = prompt(plain.n_vocab)
        ref_logits = plain.logits(ids)
        ref_tokens = list(plain.stream(ids[:8], 6))
    slab = one_slab(path)
    for config in KERNEL_PATH_CONFIGS:
        config = dict(config)
        if config.get("ram_budget") == 1:
            config["ram_budget"] = slab
        with qmoe.load(path, offload=OffloadOptions(**config)) as m:
            if config.get("prefetch") == "oracle":
                m.replay_routing(m.record_routing(ids[:8], 6))
            assert list(m.stream(ids[:8], 6)) == ref_tokens, config
            assert np.array_equal(m.logits(ids), ref_logits), config


class DenseExperts:
    """The fast tier's compute path with every expert dequantized up front: its reference."""

    def __init__(self, mmap_experts: MmapExperts):
        self.dense = {}
        for layer, tensors in mmap_experts.tensors.items():
            self.dense[layer] = [torch.from_numpy(kernels.dequantize(t.data, t.qtype)) for t in tensors]

    def __call__(self, layer, x, ids, weights):
        gate, up, down = self.dense[layer]
        out = np.zeros_like(x)
        k = ids.shape[1]
        groups = kernels.ExpertGroups(ids)
        for g, e in enumerate(groups.experts):
            pairs = groups.group_pairs(g)
            y = dense_expert_ffn(gate[e], up[e], down[e], torch.from_numpy(x[pairs // k])).numpy()
            np.add.at(out, pairs // k, weights.reshape(-1)[pairs, None] * y)
        return out


def dense_reference(path, ids):
    """(logits with every expert dense, logits by the kernels), all products float32: the dense
    tier has float activations, so the kernels it is compared with run exact products."""
    with qmoe.load(path, exact_products=True) as m:
        kernel_logits = m.logits(ids)
        moe = [b.ffn for b in m.net.blocks if isinstance(b.ffn, MoE)]
        dense = DenseExperts(moe[0].experts)
        for ffn in moe:
            ffn.experts = dense
        return m.logits(ids), kernel_logits


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_fast_tier_equals_its_reference_and_is_close_to_the_kernels(kind, tiny_gguf):
    path = tiny_gguf(kind, "q8_0", "q4_0")
    with qmoe.load(path) as plain:
        ids = prompt(plain.n_vocab)
    dense_logits, kernel_logits = dense_reference(path, ids)
    scale = np.abs(kernel_logits).max()
    assert np.abs(dense_logits - kernel_logits).max() <= 1e-4 * scale
    for config in (
        dict(sim_fast_budget="20%", on_miss="wait"),
    dict(sim_fast_budget="25%", on_miss="wait", prefetch="oracle", lookahead=2),  # guesses from dense blocks too
        dict(sim_fast_budget="50%", ram_budget="25%", on_miss="wait", prefetch="cross-layer"),
    ):
        with qmoe.load(path, offload=OffloadOptions(**config, cpu_fast_tier_dense=True), exact_products=True) as m:
            assert m.store.fast.dense and m.store.fast.dtype == torch.float32
            assert np.array_equal(m.logits(ids), dense_logits), config
    with qmoe.load(
        path,
        offload=OffloadOptions(sim_fast_budget="30%", on_miss="cpu", prefetch="cross-layer", cpu_fast_tier_dense=True),
        exact_products=True,
    ) as m:
        mixed = m.logits(ids)  # hits dense, misses by the kernels
        assert np.abs(mixed - kernel_logits).max() <= 1e-4 * scale


# ----------------------------------------------------------------------------- prefetch policies and statistics


def random_predictors(path, moe_layers, n_embd, n_expert, k) -> PredictorSet:
    torch.manual_seed(0)
    layers = {layer: fold_batchnorm(build_predictor(n_embd, n_expert, 32, arch=2)) for layer in moe_layers}
    return PredictorSet(model_identity(path), n_embd, n_expert, k, k + 1, 2, INPUT_PRE_ATTN, 0.1, layers)


def test_every_policy_keeps_results_and_measures_itself(q4_path, tmp_path):
    sidecar = tmp_path / "preds.pred.gguf"
    with qmoe.load(q4_path) as plain:
        hp, moe_layers = plain.net.hp, plain.net.moe_layers
        ids = prompt(plain.n_vocab, 12)
        ref_tokens = list(plain.stream(ids, 8))
        write_sidecar(
            sidecar,
            random_predictors(q4_path, plain.net.moe_layers, hp.n_embd, hp.n_expert, hp.n_expert_used),
            weight_type="f16",
        )
    summaries = {}
    runs = [("none", 0), ("cross-layer", 0), ("pre-attn", 0), ("oracle", 0), ("pre-attn", 1), ("oracle", 1)]
    for policy, lookahead, predict_in in [(p, n, "auto") for p, n in runs] + [("pre-attn", 1, "worker")]:
        options = OffloadOptions(
            ram_budget="50%", prefetch=policy, predictors=str(sidecar), lookahead=lookahead, predict_in=predict_in
        )
        with qmoe.load(q4_path, offload=options) as m:
            if policy == "oracle":
                m.replay_routing(m.record_routing(ids, 8))
            assert list(m.stream(ids, 8)) == ref_tokens, (policy, lookahead, predict_in)
            summaries[policy, lookahead, predict_in] = m.offload_stats()
    summaries.update({key[:2]: value for key, value in summaries.items() if key[2] == "auto"})
    first, second = (str(layer) for layer in moe_layers)
    none, cross, pre, oracle = (summaries[p, 0] for p in ("none", "cross-layer", "pre-attn", "oracle"))
    assert none["total"]["predicted"] == 0 and none["prefetch"]["requested"] == 0
    assert (
        cross["layers"][first]["predicted"] == 0 and cross["layers"][first]["recall"] == 0
    )  # nothing to reuse
    assert cross["layers"][second]["predicted"] > 0
    assert pre["layers"][first]["predicted"] > 0  # pre-attn predicts the first MoE layer too
    assert oracle["total"]["precision"] == 1.0 and oracle["total"]["recall"] == 1.0  # the replay is the truth
    # Lookahead 1: the second MoE layer is predicted after the first one's attention instead of at
    # its own; every policy predicts each layer once a pass, only earlier.
    assert summaries["pre-attn", 1]["prefetch"]["predictions"] == pre["prefetch"]["predictions"]
    assert summaries["pre-attn", 1]["total"]["actual"] == pre["total"]["actual"]
    worker = summaries["pre-attn", 1, "worker"]  # the same predictions, made in a thread beside the model
    assert worker["prefetch"]["predictions"] == summaries["pre-attn", 1]["prefetch"]["predictions"]
    assert summaries["oracle", 1]["prefetch"]["predictions"] == oracle["prefetch"]["predictions"]
    assert summaries["oracle", 1]["total"]["precision"] == summaries["oracle", 1]["total"]["recall"] == 1.0
    for s in summaries.values():
        t = s["total"]
        assert t["hits"] + t["late"] + t["misses"] == none["total"]["hits"] + none["total"]["misses"]
        assert s["bytes_into"]["ram"] == s["transfers"] * one_slab(q4_path)


def test_predictions_are_scored_when_every_expert_is_served_from_the_file(q4_path):
    """A budget that holds every expert needs no transfers, but the statistics still judge the predictions."""
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="100%", prefetch="cross-layer")) as m:
        assert m.store.compute_tier is None
        list(m.stream(prompt(m.n_vocab, 6), 4))
        s = m.offload_stats()
    assert s["total"]["predicted"] > 0 and s["total"]["recall"] is not None and s["transfers"] == 0


def test_pre_attn_needs_matching_predictors(q4_path, tmp_path):
    with pytest.raises(QmoeError, match="needs predictors"):
        qmoe.load(
            q4_path,
            offload=OffloadOptions(
                ram_budget="50%", prefetch="pre-attn", predictors=str(tmp_path / "none.pred.gguf")
            ),
        )
    with pytest.raises(QmoeError, match="exceeds the model's 8 experts"):
        qmoe.load(q4_path, offload=OffloadOptions(ram_budget="50%", prefetch="cross-layer", k_prime=9))
    with pytest.raises(QmoeError, match="smaller than one expert slab"):
        qmoe.load(q4_path, offload=OffloadOptions(ram_budget="1K"))


def test_predictions_are_protected_until_their_layer_runs(q4_path):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget=3 * one_slab(q4_path))) as m:
        store, cache = m.store, m.store.pool.cache
        layer, other = m.net.moe_layers
        x = np.random.default_rng(0).normal(size=(1, m.net.hp.n_embd)).astype(np.float32)
        one = np.ones((1, 1), np.float32)
        store.prefetch(layer, [0, 1], store.step(layer))
        store.drain()
        for e in (2, 3, 4):  # demand loads of another layer cycle through the one unprotected slot
            m.offload.experts(other, x, np.array([[e]], np.int32), one)
        assert cache.get((other, 4)) is not None and cache.get((other, 2)) is None
        assert all(cache.get((layer, e)).protected for e in (0, 1))
        m.offload.experts(layer, x, np.array([[0]], np.int32), one)  # the layer runs: used or not, no longer protected
        assert not any(cache.get((layer, e)).protected for e in (0, 1))
        assert next(iter(cache.lru)) == (layer, 1)  # the wrong guess goes first
        assert m.offload.stats()["layers"][str(layer)]["hits"] == 1
        # A wrong guess of a slab that was resident and used already keeps its place in the LRU order.
        m.offload.experts(other, x, np.array([[4]], np.int32), one)  # (layer, 0) is now least recent
        store.prefetch(layer, [0], store.step(layer))
        m.offload.experts(layer, x, np.array([[1]], np.int32), one)  # the layer runs without 0
        assert list(cache.lru) == [(layer, 0), (other, 4), (layer, 1)]  # 0 first as before, not demoted
        store.prefetch(layer, [1], store.step(layer))
        m.offload.experts(layer, x, np.array([[0]], np.int32), one)
        assert list(cache.lru)[-1] == (layer, 0) and list(cache.lru)[0] != (layer, 1)  # used 1 keeps its place


def test_a_newer_prediction_replaces_the_guess_for_the_same_step(q4_path):
    """A lookahead guess, then the layer's own prediction: the guessed transfers it does not
    repeat are cancelled, and a guessed slab it does not name is no longer protected."""
    link = SimulatedLink(0.0001, 0)  # 100 kB/s: a ~28 KB slab takes ~0.3 s, so the rest stay queued
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="50%", link=link)) as m:
        store, cache = m.store, m.store.pool.cache
        layer = m.net.moe_layers[0]
        step = store.step(layer)
        store.prefetch(layer, [0, 1, 2, 3], step)  # the guess: 0 goes onto the link, 1-3 wait
        store.prefetch(layer, [3], step)  # the layer's own prediction
        store.drain()
        assert cache.get((layer, 1)) is None and cache.get((layer, 2)) is None  # cancelled unstarted
        assert cache.get((layer, 3)).protected
        assert cache.get((layer, 0)) is None or not cache.get((layer, 0)).protected  # moved, but not wanted
        assert m.offload.stats()["prefetch"]["dropped"] >= 2


def test_each_layer_is_predicted_once_a_pass_as_far_ahead_as_the_lookahead_reaches():
    from qmoe.experts.prefetch import Prefetcher

    assert OffloadOptions(ram_budget="1G", prefetch="pre-attn").lookahead == 2  # the default
    assert OffloadOptions(ram_budget="1G", prefetch="oracle", lookahead=0).lookahead == 0
    assert OffloadOptions(ram_budget="1G", prefetch="cross-layer").lookahead == 0
    norms = [lambda x: x] * 5

    def schedule(moe_layers, lookahead):
        p = Prefetcher(None, None, moe_layers, norms, lookahead, worker=False)
        return dict(p.guesses), p.guessed

    # Every block MoE: the first predicts itself; the first attention guesses the next two (1 and
    # 2 layers ahead), each later one the layer two ahead.
    assert schedule([0, 1, 2, 3, 4], 2) == ({0: [(1, 1), (2, 2)], 1: [(3, 2)], 2: [(4, 2)]}, {1, 2, 3, 4})
    # A dense first block (DeepSeek-V2): its attention already guesses the first MoE layers.
    assert schedule([1, 2, 3, 4], 2) == ({0: [(1, 1), (2, 2)], 1: [(3, 2)], 2: [(4, 2)]}, {1, 2, 3, 4})
    assert schedule([0, 1, 2, 3, 4], 0) == ({}, set())  # the paper's schedule: each at its own pre-attention


def test_lookahead_guesses_are_scored_apart_from_the_layers_own_predictions():
    """A guess a layer ahead must not borrow the own prediction's precision for its reads."""
    scorer = PredictionScorer([3])
    for step in range(4):
        scorer.predicted(3, step, [5, 6], 0.0, distance=1)  # the guess: rank 0 wrong, rank 1 right
        scorer.predicted(3, step, [6, 5], 0.0)  # the layer's own: rank 0 right, rank 1 wrong
        scorer.routed(3, step, {6, 7})
    assert scorer.rank_precisions(3, [False, False]) == [1.0, 0.0]
    assert scorer.rank_precisions(3, [False] * 3, distance=1) == [0.0, 1.0, None]  # no third rank named
    assert scorer.rank_precisions(3, [False], distance=2) == [None]  # never guessed that far ahead
    layer = scorer.stats.layers[3]  # precision and recall count the nearest prediction only
    assert (layer.predicted, layer.correct, layer.actual) == (8, 4, 8)
    assert scorer.stats.predictions == 8


def test_absent_candidates_are_scored_apart_from_resident_ones():
    """The reads are admitted by how often an absent candidate of that rank was right, not a resident one."""
    scorer = PredictionScorer([3])
    for step in range(4):
        # rank 0 resident and right half the time; rank 1 absent on even steps (wrong), resident on odd (right)
        scorer.predicted(3, step, [5, 6], 0.0, resident=[True, step % 2 == 1])
        scorer.routed(3, step, [{5}, {5, 6}, {7}, {6}][step])
    assert scorer.rank_precisions(3, [True, True]) == [0.5, 1.0]
    assert scorer.rank_precisions(3, [False, False]) == [None, 0.0]


def test_each_layer_is_admitted_by_its_own_precision_once_it_has_some():
    """A rank right in one layer and wrong in another: each layer's count moves it off the pooled 1/2."""
    scorer = PredictionScorer([1, 2])
    for step in range(LAYER_PRIOR):
        for layer in (1, 2):
            scorer.predicted(layer, step, [5], 0.0)
            scorer.routed(layer, step, {5} if layer == 1 else {6})
    # n = LAYER_PRIOR scored: (n right + LAYER_PRIOR pseudo-counts at the pooled 1/2) / 2n, and (0 + n/2) / 2n
    assert scorer.rank_precisions(1, [False]) == [0.75]
    assert scorer.rank_precisions(2, [False]) == [0.25]


def test_simulated_link_slows_transfers_beside_compute(q4_path):
    link = SimulatedLink(0.05, 200)  # 50 MB/s: a slab of ~28 KB takes ~0.8 ms
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="25%", prefetch="cross-layer", link=link)) as m:
        list(m.stream(prompt(m.n_vocab, 6), 4))
        s = m.offload_stats()
    # the sleeps are summed over the transfer workers, transfer_s is wall time with any running
    assert s["simulated_link_s"] > 0 and s["transfer_s"] * OffloadOptions.io_depth >= s["simulated_link_s"]
    assert s["tiers"]["link"]["gbps"] == 0.05


def test_gpu_budget_without_cuda_is_the_deprecated_simulated_tier(q4_path):
    with pytest.warns(DeprecationWarning, match="use --sim-fast-budget"):
        m = qmoe.load(q4_path, offload=OffloadOptions(gpu_budget="25%"))
    with m:
        assert m.store.fast is not None and not m.store.fast.dense
        assert "simulated fast tier" in m.store.describe()["fast"]["description"]
    with pytest.raises(QmoeError, match="not both"):
        OffloadOptions(gpu_budget="25%", sim_fast_budget="25%")


def test_without_store_options_the_runtime_is_unchanged(q4_path):
    with qmoe.load(q4_path) as m:
        assert m.store is None and m.prefetcher is None and m.offload_stats() is None
        assert all(isinstance(b.ffn.experts, MmapExperts) for b in m.net.blocks if isinstance(b.ffn, MoE))


# ----------------------------------------------------------------------------- budgets under stress


def check_budgets(store: ExpertStore, budgets: dict[str, int]) -> None:
    """Under the store's lock: no tier holds more slabs than its slots, nor more bytes than its budget."""
    with store.lock:
        for tier in (store.pool, store.fast):
            if tier is None:
                continue
            cache = tier.cache
            slots = [e.slot for e in cache.entries.values()]
            assert len(slots) == len(set(slots)) <= cache.n_slots
            assert sorted(slots + cache.free) == list(range(cache.n_slots))
            assert tier.nbytes <= budgets[tier.name]
            assert len(cache.entries) * tier.slab_bytes <= budgets[tier.name]
            assert all(e.pins >= 0 for e in cache.entries.values())


class Progress:
    """Counts completed calls, so that a watchdog can tell a hang from a slow machine."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0

    def tick(self) -> None:
        with self.lock:
            self.count += 1


def run_threads(target, n: int, progress: Progress, stall_s: float = 120.0) -> None:
    """Run target(i) in n threads; fail on any exception, and on a hang (a deadlock): `stall_s`
    seconds in which no thread completed a call (`progress.tick()`). No limit on the total time,
    which depends on the machine: a slow one makes progress all the same."""
    errors = []

    def wrapped(i):
        torch.set_num_threads(1)  # each thread's own OpenMP setting: two threads each on a 2-core machine thrash
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    last, since = progress.count, time.monotonic()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
        if progress.count != last:
            last, since = progress.count, time.monotonic()
        assert time.monotonic() - since < stall_s, f"no call completed in {stall_s:.0f} s: the store deadlocked"
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    "config",
    [
        dict(ram_budget=2, prefetch="cross-layer", predict_in="worker"),
        dict(ram_budget=2, prefetch="cross-layer"),  # predictions in the generating threads themselves
        dict(ram_budget=1, sim_fast_budget=2, on_miss="cpu", prefetch="cross-layer"),
        dict(ram_budget=2, sim_fast_budget=1, on_miss="wait", prefetch="cross-layer"),
        dict(ram_budget=2, sim_fast_budget=1, on_miss="wait", prefetch="cross-layer", cpu_fast_tier_dense=True),
    ],
)
def test_budgets_hold_under_many_prompts_tiny_budgets_and_threads(q4_path, config):
    """3 threads generate from 6 prompts while 2 more call the store directly and prefetch at random;
    a watcher checks the budgets all along. Budgets are in slabs here: 1 or 2 per tier."""
    slab = one_slab(q4_path)
    with qmoe.load(q4_path) as plain:
        hp, layers = plain.net.hp, plain.net.moe_layers
        prompts = [prompt(plain.n_vocab, n, seed) for seed, n in enumerate((3, 9, 17, 5, 12, 7))]
        ref = [list(plain.stream(p, 5)) for p in prompts]
        mapped = next(b.ffn.experts for b in plain.net.blocks if isinstance(b.ffn, MoE))
    budgets = {
        "ram": config["ram_budget"] * slab,
        "fast": config.get("sim_fast_budget", 0)
        * (3 * hp.n_ff_exp * hp.n_embd * 4 if config.get("cpu_fast_tier_dense") else slab),
    }
    options = OffloadOptions(
        **(
            config
            | {"ram_budget": budgets["ram"], "direct_io": True}
            | ({"sim_fast_budget": budgets["fast"]} if "sim_fast_budget" in config else {})
        )
    )
    exact = not config.get("cpu_fast_tier_dense")  # the kernel path; the dense fast tier is only close
    # (to the kernels' exact products: the dense tier's activations are float32)
    with qmoe.load(q4_path, offload=options, exact_products=not exact) as m:
        store = m.store
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                check_budgets(store, budgets)

        results = {}

        progress = Progress()

        def generate(i):
            for j in range(i, len(prompts), 3):
                results[j] = []
                for token in m.stream(prompts[j], 5):
                    results[j].append(token)
                    progress.tick()

        def call_store(i):
            rng = np.random.default_rng(i)
            for _ in range(20):
                layer = int(rng.choice(layers))
                x = rng.normal(size=(int(rng.integers(1, 20)), hp.n_embd)).astype(np.float32)
                ids = np.stack([rng.choice(hp.n_expert, 2, replace=False) for _ in x]).astype(np.int32)
                w = rng.random(ids.shape).astype(np.float32)
                other = int(rng.choice(layers))
                store.prefetch(other, rng.choice(hp.n_expert, 3, replace=False).tolist(), store.step(other))
                got, want = m.offload.experts(layer, x, ids, w), mapped(layer, x, ids, w)
                assert np.array_equal(got, want) if exact else np.allclose(got, want, atol=1e-4, rtol=1e-3)
                progress.tick()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            run_threads(lambda i: generate(i) if i < 3 else call_store(i), 5, progress)
        finally:
            stop.set()
            watcher.join()
        check_budgets(store, budgets)
        m.offload_stats()  # drains: every transfer done, so every pin released
        assert all(
            e.pins == 0 for tier in (store.pool, store.fast) if tier for e in tier.cache.entries.values()
        )
    if exact:
        assert [results[j] for j in range(len(prompts))] == ref


# ----------------------------------------------------------------------------- failures in the store's threads


def _within(seconds: float, call):
    """call() in a thread; its result or exception, or a failure if it hangs (a deadlock).

    `seconds` is far beyond what the call takes on any machine (it fails fast): only a hang reaches it."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call hung: a failed worker thread left the model waiting"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_failed_read_in_the_transfer_thread_surfaces_in_the_caller(q4_path, monkeypatch):
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="30%", direct_io=True)) as m:
        ids = prompt(m.n_vocab, 8)

        def broken_read(ranges, views):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(m.store.reader, "read", broken_read)
        with pytest.raises(QmoeError, match="loading experts failed: .*Input/output error") as caught:
            _within(600, lambda: m.logits(ids))
        assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize("predict_in", ["model", "worker"])
def test_a_failed_prediction_surfaces_in_the_caller(q4_path, monkeypatch, predict_in):
    options = OffloadOptions(ram_budget="50%", prefetch="cross-layer", predict_in=predict_in)
    with qmoe.load(q4_path, offload=options) as m:
        assert (m.prefetcher.thread is not None) == (predict_in == "worker")
        ids = prompt(m.n_vocab, 8)

        def broken_predict(layer, x):
            raise ValueError("predictor exploded")

        monkeypatch.setattr(m.prefetcher.policy, "predict", broken_predict)
        with pytest.raises(QmoeError, match="expert prediction failed: predictor exploded") as caught:
            _within(600, lambda: list(m.stream(ids, 6)))  # reported at the next layer that asks
        assert isinstance(caught.value.__cause__, ValueError)


# ----------------------------------------------------------------------------- CLI


def test_cli_runs_with_a_store_and_writes_statistics(q4_path, tmp_path, capsys):
    out = tmp_path / "stats.json"
    code = main(
        [
            "run",
            str(q4_path),
            "-p",
            "def main(",
            "-n",
            "6",
            "--ram-budget",
            "40%",
            "--prefetch",
            "cross-layer",
            "--no-page-cache",
            "--sim-link-gbps",
            "1",
            "--sim-link-latency-us",
            "50",
            "--stats",
            "--stats-json",
            str(out),
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "hit%" in err and "overlapped with compute" in err
    summary = json.loads(out.read_text())
    assert set(summary["layers"]) == {"0", "1"}
    assert (
        summary["tiers"]["ram"]["direct_io"] in (True, False) and summary["tiers"]["link"]["latency_us"] == 50
    )


def test_cli_oracle_and_flag_errors(q4_path, capsys):
    assert (
        main(
            [
                "run",
                str(q4_path),
                "-p",
                "x",
                "-n",
                "4",
                "--ram-budget",
                "30%",
                "--prefetch",
                "oracle",
                "--stats",
            ]
        )
        == 0
    )
    assert "recording the routing" in capsys.readouterr().err
    assert main(["run", str(q4_path), "-p", "x", "--prefetch", "cross-layer"]) == 1
    assert "--prefetch only apply with an expert store" in capsys.readouterr().err
    assert main(["run", str(q4_path), "-p", "x", "--lookahead", "1"]) == 1
    assert "--lookahead only apply with an expert store" in capsys.readouterr().err
    assert main(["run", str(q4_path), "-p", "x", "--ram-budget", "lots"]) == 1
    assert "is not a size" in capsys.readouterr().err
    assert main(["run", str(q4_path), "--chat", "--ram-budget", "30%", "--prefetch", "oracle"]) == 1
    assert "chat" in capsys.readouterr().err


def test_default_sidecar_is_found(q4_path, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(q4_path, model)
    with qmoe.load(model) as plain:
        hp = plain.net.hp
        write_sidecar(
            default_sidecar_path(model),
            random_predictors(model, plain.net.moe_layers, hp.n_embd, hp.n_expert, hp.n_expert_used),
            weight_type="f16",
        )
    with qmoe.load(model, offload=OffloadOptions(ram_budget="50%", prefetch="pre-attn")) as m:
        # the sidecar's k' (k + 1), doubled: the candidates the store's admission picks from
        assert m.prefetcher.policy.k_prime == min(hp.n_expert, 2 * (hp.n_expert_used + 1))


# ----------------------------------------------------------------------------- CUDA


@CUDA
def test_cuda_fast_tier_is_deterministic_and_close_to_the_kernels(q4_path):
    with qmoe.load(q4_path) as plain:
        ids = prompt(plain.n_vocab)
        kernel_logits = plain.logits(ids)
    results = []
    for config in (
        dict(gpu_budget="20%", on_miss="wait"),
    dict(gpu_budget="25%", on_miss="wait", prefetch="oracle", lookahead=2),  # guesses from dense blocks too
        dict(gpu_budget="60%", on_miss="wait", prefetch="cross-layer"),
        dict(gpu_budget="100%", ram_budget="25%", on_miss="wait", direct_io=True),
    ):
        with qmoe.load(q4_path, device="cuda", offload=OffloadOptions(**config)) as m:
            assert m.store.fast.parts[0].is_cuda and m.store.fast.dtype == torch.float16
            results.append(m.logits(ids))
    assert all(np.array_equal(r, results[0]) for r in results)
    cos = (
        (results[0] * kernel_logits).sum(-1)
        / np.linalg.norm(results[0], axis=-1)
        / np.linalg.norm(kernel_logits, axis=-1)
    )
    assert cos.min() > 0.999


@CUDA
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0, QT.F16])
def test_cuda_dequantize_matches_the_cpu(qtype):
    values = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    raw = np.ascontiguousarray(quantize(values, qtype)).view(np.uint8).reshape(4, -1)
    got = dequantize_torch(torch.from_numpy(raw).cuda(), qtype, 64).cpu().numpy()
    assert np.array_equal(got, kernels.dequantize(raw, qtype))
