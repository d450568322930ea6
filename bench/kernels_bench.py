"""Speed of qmoe's numba kernels against the machine's memory bandwidth.

    python -m bench.kernels_bench [--threads 1 2] [--repeats 30] [--output-rows] [--exact-products] [--json out.json]

Reports, per thread count, the median time and effective weight bandwidth (weight
bytes read / time) of:
  - matmul with one token (decode's matrix-vector product) for F32, F16, Q8_0 and
    Q4_0 weights at Qwen3-30B-A3B's shapes (2048x2048, 768x2048, 2048x768,
    4096x2048; --output-rows adds the 151936x2048 output matrix);
  - moe_ffn for one token, 8 of 128 experts, n_embd 2048, expert ff 768 (Q4_0 and Q8_0);
  - matmul with T tokens, row kernel vs dequantize + BLAS (where BLAS_MIN_TOKENS comes from);
and the bandwidth of a numpy sum (one thread) and of a numba parallel sum.

Every timed call reads weights that are not in cache: each case cycles through
copies of its weight totalling at least --working-set MB, as decode reads every
weight once per token. Results go to stdout as JSON (and to --json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType

from bench.bench_model import random_blocks
from qmoe import kernels
from qmoe.kernels import ops

QT = GGMLQuantizationType
MATVEC_SHAPES = [(2048, 2048), (768, 2048), (2048, 768), (4096, 2048)]
OUTPUT_SHAPE = (151936, 2048)
N_EXPERT, N_USED, N_EMBD, N_FF = 128, 8, 2048, 768


def random_raw(qtype: QT, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random weights in qtype's raw layout, made directly (quantizing 300M floats would take minutes)."""
    *lead, n = shape
    if qtype == QT.F32:
        return rng.standard_normal(shape, dtype=np.float32)
    if qtype in (QT.F16, QT.BF16):
        w = rng.standard_normal(shape, dtype=np.float32)
        return w.astype(np.float16) if qtype == QT.F16 else (w.view(np.uint32) >> 16).astype(np.uint16)
    return random_blocks(rng, shape, qtype, weight_size=0.03)


def copies_for(nbytes: int, working_set_mb: int) -> int:
    return max(1, -(-working_set_mb * 2**20 // nbytes))


def timings(call, n_items: int, repeats: int) -> tuple[float, float]:
    """(median, best) seconds over `repeats` calls, cycling through the items so none is in cache.

    The median is the figure to quote; the best shows what the kernel does when no other
    process takes the cores (the development machines are shared).
    """
    call(0)  # compile or load from cache
    times = []
    for rep in range(repeats):
        i = rep % n_items
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def bandwidth_probe(repeats: int) -> dict:
    a = np.ones(256 * 2**20 // 4, np.float32)

    # fastmath lets the sum vectorize, as a read probe must
    @numba.njit(parallel=True, nogil=True, fastmath=True)
    def parallel_sum(v):
        s = 0.0
        for i in numba.prange(v.size):
            s += v[i]
        return s

    parallel_sum(a)
    t_numpy, _ = timings(lambda i: a.sum(), 1, repeats)
    t_numba, _ = timings(lambda i: parallel_sum(a), 1, repeats)
    return {"numpy_sum_GBps": a.nbytes / t_numpy / 1e9, "numba_parallel_sum_GBps": a.nbytes / t_numba / 1e9}


def bench_matvec(qtype: QT, rows: int, n: int, args, rng) -> dict:
    one = random_raw(qtype, (rows, n), rng)
    ws = [one] + [
        random_raw(qtype, (rows, n), rng) for _ in range(copies_for(one.nbytes, args.working_set) - 1)
    ]
    x = rng.standard_normal((1, n), dtype=np.float32)
    out = np.empty((1, rows), np.float32)
    t, best = timings(lambda i: kernels.matmul(ws[i], qtype, x, out=out), len(ws), args.repeats)
    return {
        "type": qtype.name,
        "shape": [rows, n],
        "ms": t * 1e3,
        "GBps": one.nbytes / t / 1e9,
        "GBps_best": one.nbytes / best / 1e9,
    }


def bench_moe(qtype: QT, args, rng) -> dict:
    gate, up = (random_raw(qtype, (N_EXPERT, N_FF, N_EMBD), rng) for _ in range(2))
    down = random_raw(qtype, (N_EXPERT, N_EMBD, N_FF), rng)
    x = rng.standard_normal((1, N_EMBD), dtype=np.float32)
    routes = [rng.choice(N_EXPERT, N_USED, replace=False)[None] for _ in range(64)]
    weights = np.full((1, N_USED), 1.0 / N_USED, np.float32)
    t, best = timings(
        lambda i: kernels.moe_ffn(gate, up, down, (qtype,) * 3, x, routes[i], weights),
        len(routes),
        args.repeats,
    )
    nbytes = N_USED * (gate[0].nbytes + up[0].nbytes + down[0].nbytes)
    return {
        "type": qtype.name,
        "tokens": 1,
        "experts": N_EXPERT,
        "used": N_USED,
        "ms": t * 1e3,
        "GBps": nbytes / t / 1e9,
        "GBps_best": nbytes / best / 1e9,
    }


def bench_tokens(qtype: QT, args, rng) -> list[dict]:
    """matmul of 2048x2048 with T tokens by both paths, to place BLAS_MIN_TOKENS."""
    w = random_raw(qtype, (2048, 2048), rng)
    matrix = ops.Matrix.of(w, qtype, "bench")
    wb, n = matrix.flat, matrix.n
    results = []
    for n_tokens in (1, 2, 4, 8, 16, 64):
        x = rng.standard_normal((n_tokens, n), dtype=np.float32)
        out = np.empty((n_tokens, 2048), np.float32)

        def rows_kernel(i, x=x, out=out):
            ops._matmul_rows([matrix], x, ops.q8_products(qtype, None), ops.q8_block(qtype), [out])

        def blas_tiles(i, x=x, out=out):
            ops._matmul_blas_tiles(wb, qtype, 2048, n, x, out)

        t_rows, _ = timings(rows_kernel, 1, args.repeats)
        t_blas, _ = timings(blas_tiles, 1, args.repeats)
        results.append(
            {
                "type": qtype.name,
                "tokens": n_tokens,
                "row_kernel_ms": t_rows * 1e3,
                "blas_tiles_ms": t_blas * 1e3,
            }
        )
    return results


def print_summary(report: dict) -> None:
    """A short table on stderr for people; the JSON on stdout is the record."""
    for run in report["runs"]:
        bw = run["bandwidth"]
        print(
            f"threads {run['threads']}: numpy sum {bw['numpy_sum_GBps']:.1f} GB/s, "
            f"numba parallel sum {bw['numba_parallel_sum_GBps']:.1f} GB/s",
            file=sys.stderr,
        )
        for r in run["matvec"]:
            print(
                f"  matvec {r['type']:5s} {r['shape'][0]:6d}x{r['shape'][1]:<5d} {r['ms']:8.3f} ms "
                f"{r['GBps']:6.1f} GB/s (best {r['GBps_best']:5.1f})",
                file=sys.stderr,
            )
        for r in run["moe_ffn"]:
            print(
                f"  moe_ffn {r['type']:5s} T=1 k={r['used']} {r['ms']:8.3f} ms "
                f"{r['GBps']:6.1f} GB/s (best {r['GBps_best']:5.1f})",
                file=sys.stderr,
            )
        for r in run["tokens"]:
            print(
                f"  T={r['tokens']:3d} {r['type']} 2048x2048: row kernel {r['row_kernel_ms']:7.2f} ms, "
                f"BLAS tiles {r['blas_tiles_ms']:7.2f} ms",
                file=sys.stderr,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--working-set", type=int, default=256, help="MB of weight copies cycled per case")
    ap.add_argument("--output-rows", action="store_true", help="also the 151936x2048 output matrix")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--types", default="Q4_0,Q8_0,F16,F32", help="matvec types, comma-separated (any of qmoe's)")
    ap.add_argument("--exact-products", action="store_true", help="float32 activations (default: integer products)")
    args = ap.parse_args()
    kernels.set_exact_products(args.exact_products)

    rng = np.random.default_rng(0)
    shapes = MATVEC_SHAPES + ([OUTPUT_SHAPE] if args.output_rows else [])
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "numba": numba.__version__,
            "threading_layer": None,
            "cores": numba.config.NUMBA_NUM_THREADS,
            "exact_products": args.exact_products,
        },
        "runs": [],
    }
    for threads in args.threads:
        kernels.set_num_threads(threads)
        run = {"threads": threads, "bandwidth": bandwidth_probe(args.repeats), "matvec": [], "moe_ffn": []}
        for qtype in (QT[name] for name in args.types.split(",")):
            for rows, n in shapes:
                run["matvec"].append(bench_matvec(qtype, rows, n, args, rng))
        for qtype in (QT.Q4_0, QT.Q8_0):
            run["moe_ffn"].append(bench_moe(qtype, args, rng))
        run["tokens"] = bench_tokens(QT.Q4_0, args, rng)
        run["bandwidth_after"] = bandwidth_probe(args.repeats)
        report["runs"].append(run)
    report["machine"]["threading_layer"] = numba.threading_layer()
    text = json.dumps(report, indent=1)
    print(text)
    print_summary(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
