"""`qmoe plan`: the forecast's arithmetic on made-up machines, and the command on a small file."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest

from qmoe.cli import main
from qmoe.experts.budget import MEASURED_OVERHEAD_BYTES, RunSizes
from qmoe.experts.plan import ModelShape, Probe, Routing, forecast, pool_misses

MiB = 2**20
# Qwen3-30B-A3B at Q8_0: 48 MoE layers of 128 experts (8 used), 3 x 768 x 2048 rows a slab.
SLAB = 3 * 768 * 2048 * 34 // 32
SHAPE = ModelShape(n_moe_layers=48, n_expert=128, n_expert_used=8, dense_bytes=1200 * MiB,
                   sizes=RunSizes(expert_bytes=48 * 128 * SLAB, slab_bytes=SLAB, slabs_per_token=8,
                                  other_weights_bytes=1500 * MiB, kv_cache_bytes=100 * MiB, activation_bytes=50 * MiB))
# A drive of 0.7 GB/s in a queue, whose bursts of 1-4 slabs pay a latency; an expert 0.5 ms a token
# (0.25 ms in a batch); 10 GB/s over the other weights.
BURSTS = (9e-3, 16e-3, 23e-3, 30e-3)
PROBE = Probe(read_bps=0.7e9, burst_s=BURSTS, expert_s=0.5e-3, expert_batched_s=0.25e-3, dense_bps=10e9,
              dense_batched_bps=100e9, seconds=4.0)


def test_a_model_served_from_the_map_reads_nothing_per_token():
    f = forecast(SHAPE, PROBE, None)
    compute = 48 * 8 * 0.5e-3 + 1200 * MiB / 10e9
    assert f.hit_rate == 1 and f.read_per_token == 0 and f.pool_bytes == 0
    assert f.decode_tok_s == pytest.approx(1 / compute) == f.decode_bound_tok_s
    assert f.compute_s == pytest.approx(compute)
    assert f.peak_rss == 1650 * MiB + MEASURED_OVERHEAD_BYTES + SHAPE.sizes.expert_bytes


def test_a_pool_misses_in_proportion_to_what_it_leaves_out():
    half = SHAPE.sizes.expert_bytes // 2
    f = forecast(SHAPE, PROBE, half)  # uniform routing
    slots = half // SLAB
    assert f.hit_rate == pytest.approx(slots / (48 * 128))
    misses = (1 - f.hit_rate) * 8  # a layer's: 4 of its 8, 0.5 GB a token
    assert f.read_per_token == pytest.approx(misses * 48 * SLAB, abs=1)
    compute, reads = 48 * 8 * 0.5e-3 + 1200 * MiB / 10e9, f.read_per_token / 0.7e9
    # --prefetch none: each layer computes its hits while its misses are read together (a burst),
    # then the last miss; averaged over the binomial spread of a layer's misses. Beyond 4 in
    # flight, the rest queue at the drive's rate.
    def burst(m):
        return 0 if m == 0 else BURSTS[m - 1] if m <= 4 else BURSTS[-1] + (m - 4) * SLAB / 0.7e9

    q = misses / 8
    layer = sum(math.comb(8, m) * q**m * (1 - q) ** (8 - m) * (max((8 - m) * 0.5e-3, burst(m)) + (m > 0) * 0.5e-3)
                for m in range(9))
    assert f.decode_tok_s == pytest.approx(1 / (1200 * MiB / 10e9 + 48 * layer))
    assert f.decode_bound_tok_s == pytest.approx(1 / max(compute, reads)) and f.compute_s == pytest.approx(compute)
    # never past the bound, nor slower than every miss read alone after the layer's compute
    assert 1 / (compute + 48 * 8 * BURSTS[0]) < f.decode_tok_s < f.decode_bound_tok_s
    assert f.peak_rss == 1650 * MiB + MEASURED_OVERHEAD_BYTES + slots * SLAB
    # Layer-major prefill: an 8-token prompt uses at most 64 of a layer's 128 experts, read once;
    # the pool holds two layers, so the reads overlap the compute.
    used = 128 * (1 - (1 - 8 / 128) ** 8)
    work = 8 * (48 * 8 * 0.25e-3 + 1200 * MiB / 100e9)
    assert f.first_token_s[8] == pytest.approx(max(48 * used * SLAB / 0.7e9, work))
    assert f.first_token_s[512] > f.first_token_s[8]


def test_concentrated_routing_misses_what_an_lru_pool_misses():
    """Che's approximation against an LRU pool simulated on tokens drawn from the same routing."""
    rng = np.random.default_rng(0)
    layers, n_expert, k, slots = 4, 32, 4, 48
    weights = rng.pareto(1.0, (layers, n_expert)) + 0.05  # a few popular experts per layer, as trained routers
    lru, misses, tokens = OrderedDict(), 0, 4000
    for t in range(tokens + 1000):  # the first 1000 fill the pool
        for layer in range(layers):
            for e in rng.choice(n_expert, k, replace=False, p=weights[layer] / weights[layer].sum()):
                key = (layer, int(e))
                if key in lru:
                    lru.move_to_end(key)
                    continue
                misses += t >= 1000
                lru[key] = None
                if len(lru) > slots:
                    lru.popitem(last=False)
    # The chance that a token's k draws without replacement include each expert.
    p = np.zeros((layers, n_expert))
    for _ in range(3000):
        for layer in range(layers):
            p[layer, rng.choice(n_expert, k, replace=False, p=weights[layer] / weights[layer].sum())] += 1 / 3000
    assert pool_misses(p, slots).sum() == pytest.approx(misses / tokens, rel=0.08)
    uniform = pool_misses(np.full((layers, n_expert), k / n_expert), slots).sum()
    assert uniform == pytest.approx(k * layers * (1 - slots / (layers * n_expert)))
    assert misses / tokens < 0.8 * uniform  # the reason to count the routing: uniform overestimates misses


def test_counted_routing_forecasts_fewer_reads_than_uniform():
    p = np.tile(np.r_[np.full(16, 0.3), np.full(112, (8 - 16 * 0.3) / 112)], (48, 1))  # 16 popular experts a layer
    route = Routing(p, "made up")
    half = SHAPE.sizes.expert_bytes // 2
    counted, uniform = forecast(SHAPE, PROBE, half, route), forecast(SHAPE, PROBE, half)
    assert counted.read_per_token < uniform.read_per_token and counted.decode_tok_s > uniform.decode_tok_s
    assert counted.hit_rate > uniform.hit_rate
    assert counted.first_token_s[8] < uniform.first_token_s[8]  # a prompt uses fewer distinct experts


def test_smaller_pools_forecast_slower_runs():
    budgets = [2**30 * g for g in (4, 8, 16, 24)]
    rates = [forecast(SHAPE, PROBE, b).decode_tok_s for b in budgets]
    assert rates == sorted(rates) and rates[0] < rates[-1] < forecast(SHAPE, PROBE, None).decode_tok_s


def test_plan_answers_for_a_small_file(tiny_gguf, tmp_path, capsys):
    path = tiny_gguf("qwen3moe", "q8_0", "q4_0")
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--ram", "30%", "off", "--json", str(out), "-t", "1"]) == 0
    table = capsys.readouterr().out
    assert "| mapped file |" in table and "probe (" in table
    plan = json.loads(out.read_text())
    assert [f["budget"] for f in plan["forecasts"]][1] is None
    assert plan["probe"]["read_bps"] > 0 and plan["model"]["n_slabs"] == 16
    assert main(["plan", str(path), "--ram", "lots"]) == 1
    assert "is not a size" in capsys.readouterr().err


def test_the_bench_sets_each_run_beside_its_bound():
    """bench/larger_than_ram.py: a run's time per token over max(compute, its steady reads / the drive)."""
    from bench.larger_than_ram import bound_lines

    def run(tok_s, read):  # 4 steps: the steady half reads `read` bytes a token
        return {"decode_tok_s": tok_s, "step_s": [1.0] * 4, "step_read_bytes": [9e9, 9e9, read, read]}

    runs = {"llama.cpp": {"decode_tok_s": 0.5}, "qmoe": run(4.0, 300e6), "qmoe pre-attn": run(5.0, 100e6)}
    results = {"plan": {"compute_s": 0.15}, "drive_gbs": {"4": 1.5}}
    lines = bound_lines(results, runs, "4")
    assert "compute 150 ms" in lines[0] and len(lines) == 3
    assert "250 ms a token = 1.25x its bound (200 ms: 300 MB read), 1.00x none" in lines[1]  # read-bound
    assert "200 ms a token = 1.33x its bound (150 ms: 100 MB read), 1.25x none" in lines[2]  # compute-bound
    assert bound_lines({"plan": {}, "drive_gbs": {"4": 1.5}}, runs, "4") == []  # an older plan: no compute
