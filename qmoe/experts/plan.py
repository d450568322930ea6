"""`qmoe plan model.gguf --ram 8G 16G`: what fits, and how fast it will run, before running it.

The forecast is arithmetic over the model's shapes (read from the GGUF header, nothing
loaded), the routing's concentration where calibration recorded it, and a probe of this
machine of at most about 14 seconds (`probe`):

    read_bps        O_DIRECT slab reads as the store makes them (OffloadOptions.io_depth
                    in flight, straight into pool slots), at random places in this very file,
                    one after another: a prefill's queue
    burst_s         the time to read m = 1..io_depth slabs issued together and waited for: a
                    decode layer's misses. A few reads in flight do not reach read_bps (each
                    pays the drive's latency), and decode is made of such bursts: at the
                    queue's rate the 48-layer bench file's decode was forecast 29 % fast
    expert_s        one expert on one token, from one call over a token's k experts in RAM
                    (a decode step's), and per token in a prefill batch: the kernels' speed
                    on this model's types
    dense_bps       the kernels on a non-expert weight of the file (attention), per byte
                    for one token and per token-byte in a batch

The routing (`Routing`): p[l, e], the chance that a token's router in MoE layer l chooses
expert e (each layer's sum is k). Calibration counts it (the predictor sidecar's route
counts); without them it is taken as uniform, k / E, which overestimates what a pool
misses: routing concentrates on some experts (the 12-layer bench file's LRU pool of 71 %
of the experts read 86 MB a token, where uniform routing misses 140).

For a RAM budget B (`forecast`), the pool holds S = B / slab of the model's slabs, one LRU
order over all layers. Che's approximation gives its hits: a slab stays resident for the
pool's characteristic time tc (in tokens) since its last use, where tc solves
sum over slabs of (1 - exp(-p tc)) = S; a slab hits with probability 1 - exp(-p tc), so a
layer misses m_l = sum over e of p[l, e] exp(-p[l, e] tc) slabs a token (uniform routing:
(1 - S / all slabs) k, the pool's share). Then

    compute per token   k * MoE layers * expert_s + non-expert weights / dense_bps
    decode, none        non-expert weights / dense_bps + per MoE layer, averaged over its
                        misses M (binomial, k draws of mean m_l), the longer of its hits'
                        compute and the burst read of M slabs, plus one expert's compute when
                        M > 0: a layer computes its hits while its misses are read, then each
                        miss as it arrives (compute.py); attention cannot overlap them, as
                        nothing is read before the router has chosen
    decode, bound       max(compute, misses * slab / read_bps) (what a perfect prefetch reaches)
    first token (T)     layer-major prefill: each expert a prompt uses read once, at the queue's
                        rate: sum over e of 1 - (1 - p[l, e])^T per layer, beside T tokens'
                        batched compute (overlapped when the pool holds two layers: the next
                        layer is read ahead, else one after the other)
    peak RSS            the pool + the rest of the run (budget.py) with the overhead
                        tests/test_memory.py measured; a model served from the map adds
                        every expert it touched (all of them, over a run)

Without a budget (or one that holds every expert) the experts come from the mapped file:
no reads once warm, and the first token reads what the prompt uses once (cold cache).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.experts.budget import MEASURED_OVERHEAD_BYTES, RunSizes, run_sizes
from qmoe.experts.options import OffloadOptions, format_bytes
from qmoe.experts.slabs import ExpertSlabs, SlabReader, direct_alignment, direct_residue
from qmoe.experts.tiers import RamPool
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import HParams
from qmoe.predictor.sidecar import load_sidecar, model_identity, predictor_source

# At most this long reading slabs in a queue, and at most PROBE_READS of them; then as long
# for each burst size. A virtual drive's rate wanders by +-40 % from one second to the next:
# 96 slabs (0.8 s of the 48-layer bench file) forecast its decode 19 % low in one run and 51 %
# low in another; seconds average more of it.
PROBE_READS_S = 4.0
PROBE_BURSTS_S = 1.5
PROBE_READS = 2048
PROBE_KERNEL_S = 0.5  # each kernel timed for about this long
UNCACHED_MIN_BYTES = 256 * 2**20  # the kernels' working set where the cache's size is unknown
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
    burst_s: tuple[float, ...]  # [m - 1]: seconds to read m slabs issued together, m = 1..io_depth
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
    compute_s: float  # a decode token's compute, all weights in RAM: the bound's other side
    first_token_s: dict[int, float]  # prompt tokens -> seconds
    peak_rss: int


def moe_layers(file: GGUFFile) -> list[int]:
    """The blocks with routed experts, in file order."""
    n_layer = HParams.from_gguf(file).n_layer
    return [i for i in range(n_layer) if file.has(f"blk.{i}.ffn_gate_exps.weight")]


def model_shape(file: GGUFFile, n_ctx: int, n_batch: int) -> ModelShape:
    """The shapes `forecast` needs, from the GGUF's header (nothing is read from its data)."""
    hp = HParams.from_gguf(file)
    slabs = _expert_slabs(file, moe_layers(file))
    sizes = run_sizes(hp, file, slabs, n_ctx, n_batch)
    embedding = file.tensor("token_embd.weight").nbytes
    return ModelShape(len(slabs.layouts), slabs.n_expert, hp.n_expert_used,
                      max(sizes.other_weights_bytes - embedding, 0), sizes)


def _expert_slabs(file: GGUFFile, layers: list[int]) -> ExpertSlabs:
    names = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    return ExpertSlabs(file.path, {i: tuple(file.tensor(f"blk.{i}.{n}.weight") for n in names) for i in layers})


@dataclass(frozen=True)
class Routing:
    """p[l, e]: the chance that a token's router in the l-th MoE layer chooses expert e (rows sum to k)."""

    p: np.ndarray
    source: str  # where it came from, for the report

    @classmethod
    def uniform(cls, shape: ModelShape, why: str) -> Routing:
        k, n = shape.n_expert_used, shape.n_expert
        return cls(np.full((shape.n_moe_layers, n), k / n), f"uniform ({why})")


def routing(file: GGUFFile, shape: ModelShape, explicit: str | os.PathLike | None = None) -> Routing:
    """The routing calibration counted (the predictors' route counts: `explicit`, else embedded in
    the model, else the sidecar beside it); uniform where there are none."""
    try:
        path = predictor_source(file, explicit)
    except QmoeError:
        if explicit is not None:
            raise
        return Routing.uniform(shape, "no predictors to take the calibration's route counts from")
    try:
        predictors = load_sidecar(file if path == file.path else GGUFFile(path), model_identity(file))
    except QmoeError as e:  # another model's, or not a readable sidecar: say so, forecast all the same
        if explicit is not None:
            raise
        return Routing.uniform(shape, str(e))
    layers = moe_layers(file)
    counts = [predictors.route_counts.get(layer) for layer in layers]
    if any(c is None for c in counts):
        return Routing.uniform(shape, f"{path.name} has no route counts; train-predictors records them")
    c = np.stack(counts).astype(np.float64)
    # Add-one smoothing: an expert that calibration never saw chosen is rare, not impossible.
    p = shape.n_expert_used * (c + 1) / (c.sum(axis=1, keepdims=True) + shape.n_expert)
    return Routing(p, f"route counts of {predictors.routed_tokens} calibration tokens ({path.name})")


def pool_misses(p: np.ndarray, slots: int) -> np.ndarray:
    """Each MoE layer's slabs an LRU pool of `slots` slabs misses a token, by Che's approximation
    (module docstring): p [layers, E] the routing's probabilities."""
    if slots >= p.size:
        return np.zeros(len(p))
    flat = p.reshape(-1)

    def resident(tc: float) -> float:
        return float(np.sum(-np.expm1(-flat * tc)))

    lo, hi = 0.0, 1.0
    while resident(hi) < slots:
        lo, hi = hi, 2 * hi
    for _ in range(60):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if resident(mid) < slots else (lo, mid)
    return (p * np.exp(-p * hi)).sum(axis=1)


def burst_read_s(probe_result: Probe, m: int, slab_bytes: int) -> float:
    """Seconds to read m slabs issued together: measured up to io_depth, then queued at the queue's rate."""
    if m == 0:
        return 0.0
    measured = probe_result.burst_s
    if m <= len(measured):
        return measured[m - 1]
    return measured[-1] + (m - len(measured)) * slab_bytes / probe_result.read_bps


def _decode_layer_s(misses: float, k: int, probe_result: Probe, slab_bytes: int) -> float:
    """A decode layer under --prefetch none, over the binomial spread of its misses around `misses`."""
    q = min(misses / k, 1.0)
    total = 0.0
    for m in range(k + 1):
        chance = math.comb(k, m) * q**m * (1 - q) ** (k - m)
        hits_s = (k - m) * probe_result.expert_s
        total += chance * (max(hits_s, burst_read_s(probe_result, m, slab_bytes)) + min(m, 1) * probe_result.expert_s)
    return total


def forecast(shape: ModelShape, probe_result: Probe, budget: int | None, route: Routing | None = None) -> Forecast:
    """The run with a RAM pool of `budget` bytes (None: the mapped file); see the module docstring.
    route: the routing's concentration (None: uniform)."""
    s, k, layers = shape.sizes, shape.n_expert_used, shape.n_moe_layers
    p = (route or Routing.uniform(shape, "no route counts given")).p
    slots = shape.n_slabs if budget is None else min(shape.n_slabs, budget // s.slab_bytes)
    if slots < 1:
        raise QmoeError(f"a RAM budget of {format_bytes(budget)} holds no expert slab ({format_bytes(s.slab_bytes)})")
    misses = pool_misses(p, slots)  # each layer's, a token
    read_per_token = round(float(misses.sum()) * s.slab_bytes)
    dense_s = shape.dense_bytes / probe_result.dense_bps
    compute = k * layers * probe_result.expert_s + dense_s
    read_s = read_per_token / probe_result.read_bps
    none_s = dense_s + sum(_decode_layer_s(float(m), k, probe_result, s.slab_bytes) for m in misses)
    first = {}
    for n in PROMPTS:
        used = float(np.sum(1 - (1 - p) ** n))  # experts the prompt uses, all layers
        reads = used * s.slab_bytes / probe_result.read_bps
        work = n * (k * layers * probe_result.expert_batched_s + shape.dense_bytes / probe_result.dense_batched_bps)
        overlapped = slots >= 2 * shape.n_expert
        first[n] = max(reads, work) if overlapped else reads + work
    mapped = budget is None or slots == shape.n_slabs
    pool = 0 if mapped else slots * s.slab_bytes
    rss = s.other_weights_bytes + s.kv_cache_bytes + s.activation_bytes + MEASURED_OVERHEAD_BYTES
    rss += s.expert_bytes if mapped else pool  # the map's pages count in RSS as they are touched
    hit = 1 - float(misses.sum()) / (k * layers)
    return Forecast(None if mapped else budget, pool, hit, read_per_token, 1 / none_s,
                    1 / max(compute, read_s), compute, first, rss)


def probe(file: GGUFFile, shape: ModelShape, seed: int = 0) -> Probe:
    """Measure this machine on `file`: drive bandwidth at the store's queue depth, kernel speeds."""
    start = time.perf_counter()
    layers = moe_layers(file)
    slabs = _expert_slabs(file, layers)
    k, depth = shape.n_expert_used, OffloadOptions.io_depth
    n_slots = max(k, depth, min(_uncached_bytes(), shape.sizes.expert_bytes) // shape.sizes.slab_bytes)
    align = direct_alignment(file.path)
    pool = RamPool(slabs.layout, n_slots, align, direct_residue(slabs, align))
    reader = SlabReader(file.path, direct=True, depth=depth)
    rng = np.random.default_rng(seed)

    def read_slab(slot: int) -> int:
        """A random slab of the file into pool slot `slot`: its bytes."""
        layer = layers[int(rng.integers(len(layers)))]
        reader.read(slabs.ranges(layer, int(rng.integers(slabs.n_expert))), pool.views(slot, slabs.layouts[layer]))
        return slabs.layouts[layer].nbytes

    def queue(worker: int) -> int:
        """One transfer worker's reads, one after another until the stop, into its share of the
        slots in turn (so the pool holds data to compute on afterwards): the bytes it read."""
        done = 0
        for n in range(PROBE_READS // depth):
            if n >= 2 and time.perf_counter() > stop:
                break
            done += read_slab((worker + n * depth) % n_slots)
        return done

    try:
        with ThreadPoolExecutor(depth) as workers:
            t0 = time.perf_counter()
            stop = t0 + PROBE_READS_S
            bytes_read = sum(workers.map(queue, range(depth)))
            read_bps = bytes_read / (time.perf_counter() - t0)
            burst_s = []
            for m in range(1, depth + 1):  # m slabs issued together, then waited for (a decode layer's misses)
                times = []
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < PROBE_BURSTS_S or len(times) < 3:
                    t = time.perf_counter()
                    list(workers.map(read_slab, range(m)))
                    times.append(time.perf_counter() - t)
                burst_s.append(float(np.mean(times)))  # the mean: decode waits for the slow ones too
    finally:
        reader.close()
    n_embd = slabs.layout.n_embd
    x1 = rng.standard_normal((1, n_embd)).astype(np.float32)
    xb = rng.standard_normal((PREFILL_BATCH, n_embd)).astype(np.float32)
    qtypes = slabs.layout.qtypes
    # Each call takes the next k slots: a decode step never finds a slab in the cache, as 48 layers
    # of 8 experts (hundreds of MB) pass between two uses of one; with one fixed set of slots the
    # A3B experts timed 0.13 ms a token instead of 0.23.
    turn = iter(range(10**9))

    def next_slots() -> np.ndarray:
        first = next(turn) * k % (n_slots - k + 1)
        return np.arange(first, first + k, dtype=np.int64)

    one = (np.arange(k, dtype=np.int32)[None], np.full((1, k), 1 / k, np.float32))
    batch = (np.stack([rng.permutation(k) for _ in range(PREFILL_BATCH)]).astype(np.int32),
             np.full((PREFILL_BATCH, k), 1 / k, np.float32))
    expert_s = _timed(lambda: kernels.moe_ffn(*pool.parts, qtypes, x1, *one, slabs=next_slots())) / k
    expert_batched_s = _timed(lambda: kernels.moe_ffn(*pool.parts, qtypes, xb, *batch, slabs=next_slots())) / (
        k * PREFILL_BATCH)
    pool.release()
    dense = file.tensor(f"blk.{layers[0]}.attn_q.weight") if file.has(f"blk.{layers[0]}.attn_q.weight") else None
    if dense is None:  # MLA attention names its projections otherwise: any 2-D weight of the block
        dense = next(t for t in _block_weights(file, layers[0]) if t.data.ndim == 2)
    # In RAM, as a warm run has it, in copies that together outgrow the cache, taken in turn.
    copies = np.tile(np.ascontiguousarray(dense.data), (max(1, _uncached_bytes() // dense.nbytes), 1, 1))
    dense_s = _timed(lambda: kernels.matmul(copies[next(turn) % len(copies)], dense.qtype, x1))
    dense_batched_s = _timed(lambda: kernels.matmul(copies[next(turn) % len(copies)], dense.qtype, xb))
    return Probe(read_bps, tuple(burst_s), expert_s, expert_batched_s, dense.nbytes / dense_s,
                 PREFILL_BATCH * dense.nbytes / dense_batched_s, time.perf_counter() - start)


def _uncached_bytes() -> int:
    """Memory to cycle the kernels' timing through so that it comes from RAM, not the cache:
    twice the largest cache sysfs reports (a VM may report its host's: 480 MiB here), at least
    UNCACHED_MIN_BYTES."""
    llc = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):  # Linux; e.g. "480M"
        try:
            text = size.read_text().strip()
            llc = max(llc, int(text.rstrip("KMG")) * 1024 ** (" KMG".index(text[-1]) if text[-1] in "KMG" else 0))
        except (OSError, ValueError):
            continue
    return max(2 * llc, UNCACHED_MIN_BYTES)


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


def report(shape: ModelShape, probe_result: Probe, route: Routing, forecasts: list[Forecast]) -> dict:
    """JSON-ready: the shapes, the probe, the routing's source and each budget's forecast."""
    return {"model": asdict(shape) | {"n_slabs": shape.n_slabs}, "probe": asdict(probe_result),
            "routing": route.source, "forecasts": [asdict(f) for f in forecasts]}


def format_table(shape: ModelShape, probe_result: Probe, route: Routing, forecasts: list[Forecast]) -> str:
    s = shape.sizes
    bursts = ", ".join(f"{m + 1} in {t * 1e3:.1f} ms" for m, t in enumerate(probe_result.burst_s))
    lines = [
        f"experts {format_bytes(s.expert_bytes)} ({shape.n_slabs} slabs of {format_bytes(s.slab_bytes)}), "
        f"the rest of the run {format_bytes(s.rest_of_run)}",
        f"probe ({probe_result.seconds:.1f} s): drive {probe_result.read_bps / 1e9:.2f} GB/s (O_DIRECT, "
        f"{OffloadOptions.io_depth} slabs in flight; slabs issued together: {bursts}), one expert "
        f"{probe_result.expert_s * 1e3:.2f} ms a token, non-expert weights {probe_result.dense_bps / 1e9:.1f} GB/s",
        f"routing: {route.source}",
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
