"""`qmoe plan model.gguf --ram 8G 16G`: what fits, and how fast it will run, before running it.

The forecast is arithmetic over the model's shapes (read from the GGUF header, nothing
loaded) and a probe of this machine of at most about 12 seconds (`probe`):

    read_bps        O_DIRECT slab reads as the store makes them (OffloadOptions.io_depth
                    in flight, straight into pool slots), at random places in this very file
    expert_s        one expert on one token, from one call over a token's k experts in RAM
                    (a decode step's), and per token in a prefill batch: the kernels' speed
                    on this model's types
    dense_bps       the kernels on a non-expert weight of the file (attention), per byte
                    for one token and per token-byte in a batch

For a RAM budget B (`forecast`), the pool holds h = B / slab of the model's slabs; routing
spread over the experts (what the random-routing bench and, roughly, trained models do)
makes a hit about as likely as h / all slabs, so each token misses
(1 - h/all) * k * MoE layers slabs. Then

    compute per token   k * MoE layers * expert_s + non-expert weights / dense_bps
    decode, none        non-expert weights / dense_bps + per MoE layer the longer of its hits'
                        compute and its misses' reads, plus one expert's compute: a layer
                        computes its hits while its misses are read, then each miss as it
                        arrives (compute.py); attention cannot overlap them, as nothing
                        is read before the router has chosen
    decode, bound       max(compute, misses * slab / read_bps) (what a perfect prefetch reaches)
    first token (T)     layer-major prefill: each expert a prompt uses read once,
                        E * (1 - (1 - k/E)^T) per layer, beside T tokens' batched compute
                        (overlapped when the pool holds two layers: the next layer is read
                        ahead, else one after the other)
    peak RSS            the pool + the rest of the run (budget.py) with the overhead
                        tests/test_memory.py measured; a model served from the map adds
                        every expert it touched (all of them, over a run)

Without a budget (or one that holds every expert) the experts come from the mapped file:
no reads once warm, and the first token reads what the prompt uses once (cold cache).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.experts.budget import MEASURED_OVERHEAD_BYTES, RunSizes, run_sizes
from qmoe.experts.options import OffloadOptions, format_bytes
from qmoe.experts.slabs import ExpertSlabs, SlabReader, direct_alignment, direct_residue
from qmoe.experts.tiers import RamPool
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import HParams

# At most this long reading slabs, and at most PROBE_READS of them. A virtual drive's rate
# wanders by +-40 % from one second to the next: 96 slabs (0.8 s of the 48-layer bench file)
# forecast its decode 19 % low in one run and 51 % low in another; 8 s averages more of it.
PROBE_READS_S = 8.0
PROBE_READS = 2048
PROBE_KERNEL_S = 0.5  # each kernel timed for about this long
PREFILL_BATCH = 64  # tokens of the batched measurements
PROMPTS = (8, 512)  # time-to-first-token forecasts


@dataclass(frozen=True)
class ModelShape:
    """What the forecast needs from a model: its sizes and routing width."""

    n_moe_layers: int
    n_expert: int
    n_expert_used: int
    dense_bytes: int  # non-expert weights a token multiplies (all but the token embedding)
    sizes: RunSizes

    @property
    def n_slabs(self) -> int:
        return self.n_moe_layers * self.n_expert


@dataclass(frozen=True)
class Probe:
    """This machine on this model (module docstring)."""

    read_bps: float
    expert_s: float
    expert_batched_s: float  # per token, in a batch of PREFILL_BATCH
    dense_bps: float
    dense_batched_bps: float  # token-bytes per second, in a batch
    seconds: float  # the probe's own time


@dataclass(frozen=True)
class Forecast:
    budget: int | None  # None: the mapped file
    pool_bytes: int
    hit_rate: float
    read_per_token: int  # bytes
    decode_tok_s: float  # --prefetch none
    decode_bound_tok_s: float  # max(compute, reads): what the best prefetch can reach
    first_token_s: dict[int, float]  # prompt tokens -> seconds
    peak_rss: int


def model_shape(file: GGUFFile, n_ctx: int, n_batch: int) -> ModelShape:
    """The shapes `forecast` needs, from the GGUF's header (nothing is read from its data)."""
    hp = HParams.from_gguf(file)
    names = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    tensors = {i: tuple(file.tensor(f"blk.{i}.{n}.weight") for n in names)
               for i in range(hp.n_layer) if file.has(f"blk.{i}.ffn_gate_exps.weight")}
    slabs = ExpertSlabs(file.path, tensors)
    sizes = run_sizes(hp, file, slabs, n_ctx, n_batch)
    embedding = file.tensor("token_embd.weight").nbytes
    return ModelShape(len(tensors), slabs.n_expert, hp.n_expert_used,
                      max(sizes.other_weights_bytes - embedding, 0), sizes)


def forecast(shape: ModelShape, probe: Probe, budget: int | None) -> Forecast:
    """The run with a RAM pool of `budget` bytes (None: the mapped file); see the module docstring."""
    s, k, layers = shape.sizes, shape.n_expert_used, shape.n_moe_layers
    slots = shape.n_slabs if budget is None else min(shape.n_slabs, budget // s.slab_bytes)
    if slots < 1:
        raise QmoeError(f"a RAM budget of {format_bytes(budget)} holds no expert slab ({format_bytes(s.slab_bytes)})")
    hit = slots / shape.n_slabs
    misses = (1 - hit) * k  # a layer's, on average
    read_per_token = round(misses * layers) * s.slab_bytes
    dense_s = shape.dense_bytes / probe.dense_bps
    compute = k * layers * probe.expert_s + dense_s
    read_s = read_per_token / probe.read_bps
    layer_s = max((k - misses) * probe.expert_s, misses * s.slab_bytes / probe.read_bps) + min(misses, 1) * probe.expert_s
    none_s = dense_s + layers * layer_s
    first = {}
    for n in PROMPTS:
        used = shape.n_expert * (1 - (1 - k / shape.n_expert) ** n)
        reads = layers * used * s.slab_bytes / probe.read_bps
        work = n * (k * layers * probe.expert_batched_s + shape.dense_bytes / probe.dense_batched_bps)
        overlapped = slots >= 2 * shape.n_expert
        first[n] = max(reads, work) if overlapped else reads + work
    mapped = budget is None or slots == shape.n_slabs
    pool = 0 if mapped else slots * s.slab_bytes
    rss = s.other_weights_bytes + s.kv_cache_bytes + s.activation_bytes + MEASURED_OVERHEAD_BYTES
    rss += s.expert_bytes if mapped else pool  # the map's pages count in RSS as they are touched
    return Forecast(None if mapped else budget, pool, hit, read_per_token, 1 / none_s,
                    1 / max(compute, read_s), first, rss)


def probe(file: GGUFFile, shape: ModelShape, seed: int = 0) -> Probe:
    """Measure this machine on `file`: drive bandwidth at the store's queue depth, kernel speeds."""
    start = time.perf_counter()
    names = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    layers = [i for i in range(10**6) if file.has(f"blk.{i}.ffn_gate_exps.weight")][: shape.n_moe_layers]
    slabs = ExpertSlabs(file.path, {i: tuple(file.tensor(f"blk.{i}.{n}.weight") for n in names) for i in layers})
    k, depth = shape.n_expert_used, OffloadOptions.io_depth
    align = direct_alignment(file.path)
    pool = RamPool(slabs.layout, max(k, depth), align, direct_residue(slabs, align))  # a decode step's k experts
    reader = SlabReader(file.path, direct=True, depth=depth)
    stop = time.perf_counter() + PROBE_READS_S

    def read_slabs(worker: int) -> int:
        """One transfer worker's reads into its own slot: the bytes it read."""
        rng, done = np.random.default_rng(seed + worker), 0
        for n in range(PROBE_READS // depth):
            if n >= 2 and time.perf_counter() > stop:
                break
            layer = layers[rng.integers(len(layers))]
            reader.read(slabs.ranges(layer, int(rng.integers(slabs.n_expert))),
                        pool.views(worker, slabs.layouts[layer]))
            done += slabs.layouts[layer].nbytes
        return done

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(depth) as workers:
            bytes_read = sum(workers.map(read_slabs, range(depth)))
        read_bps = bytes_read / (time.perf_counter() - t0)
    finally:
        reader.close()
    rng = np.random.default_rng(seed)
    n_embd = slabs.layout.n_embd
    x1 = rng.standard_normal((1, n_embd)).astype(np.float32)
    xb = rng.standard_normal((PREFILL_BATCH, n_embd)).astype(np.float32)
    qtypes = slabs.layout.qtypes
    slots = np.arange(k, dtype=np.int64)  # the layer's call over k resident slots (compute.py's all-ready path)
    one = (slots[None].astype(np.int32), np.full((1, k), 1 / k, np.float32))
    batch = (np.stack([rng.permutation(k) for _ in range(PREFILL_BATCH)]).astype(np.int32),
             np.full((PREFILL_BATCH, k), 1 / k, np.float32))
    expert_s = _timed(lambda: kernels.moe_ffn(*pool.parts, qtypes, x1, *one, slabs=slots)) / k
    expert_batched_s = _timed(lambda: kernels.moe_ffn(*pool.parts, qtypes, xb, *batch, slabs=slots)) / (
        k * PREFILL_BATCH)
    dense = file.tensor(f"blk.{layers[0]}.attn_q.weight") if file.has(f"blk.{layers[0]}.attn_q.weight") else None
    if dense is None:  # MLA attention names its projections otherwise: any 2-D weight of the block
        dense = next(t for t in _block_weights(file, layers[0]) if t.data.ndim == 2)
    w = np.ascontiguousarray(dense.data)  # in RAM, as a warm run has it
    dense_s = _timed(lambda: kernels.matmul(w, dense.qtype, x1))
    dense_batched_s = _timed(lambda: kernels.matmul(w, dense.qtype, xb))
    return Probe(read_bps, expert_s, expert_batched_s, dense.nbytes / dense_s,
                 PREFILL_BATCH * dense.nbytes / dense_batched_s, time.perf_counter() - start)


def _block_weights(file: GGUFFile, layer: int):
    for name in file.tensors:
        if name.startswith(f"blk.{layer}.attn") and name.endswith(".weight"):
            yield file.tensor(name)


def _timed(fn) -> float:
    """Median seconds of `fn` over about PROBE_KERNEL_S (after one call that compiles and warms)."""
    fn()
    times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < PROBE_KERNEL_S or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def report(shape: ModelShape, probe_result: Probe, forecasts: list[Forecast]) -> dict:
    """JSON-ready: the shapes, the probe and each budget's forecast."""
    return {"model": asdict(shape) | {"n_slabs": shape.n_slabs}, "probe": asdict(probe_result),
            "forecasts": [asdict(f) for f in forecasts]}


def format_table(shape: ModelShape, probe_result: Probe, forecasts: list[Forecast]) -> str:
    s = shape.sizes
    lines = [
        f"experts {format_bytes(s.expert_bytes)} ({shape.n_slabs} slabs of {format_bytes(s.slab_bytes)}), "
        f"the rest of the run {format_bytes(s.rest_of_run)}",
        f"probe ({probe_result.seconds:.1f} s): drive {probe_result.read_bps / 1e9:.2f} GB/s (O_DIRECT, "
        f"{OffloadOptions.io_depth} slabs in flight), one expert {probe_result.expert_s * 1e3:.2f} ms a token, non-expert weights "
        f"{probe_result.dense_bps / 1e9:.1f} GB/s",
        "",
        "| RAM budget | pool | hit rate | read/token | decode tok/s (none) | best prefetch | "
        + " | ".join(f"first token, {n}-token prompt" for n in PROMPTS) + " | peak RSS |",
        "|---" * (7 + len(PROMPTS)) + "|",
    ]
    for f in forecasts:
        where = "mapped file" if f.budget is None else format_bytes(f.budget)
        firsts = " | ".join(f"{f.first_token_s[n]:.2f} s" for n in PROMPTS)
        lines.append(f"| {where} | {format_bytes(f.pool_bytes)} | {100 * f.hit_rate:.0f}% | "
                     f"{format_bytes(f.read_per_token)} | {f.decode_tok_s:.2f} | {f.decode_bound_tok_s:.2f} | "
                     f"{firsts} | {format_bytes(f.peak_rss)} |")
    return "\n".join(lines)
