"""Decode speed: qmoe beside llama.cpp on the same GGUF, at 1 and 2 threads.

Builds (once) a random-weight GGUF with Qwen3-30B-A3B's layer shapes
(bench/bench_model.py, 8 blocks by default; --mix q4_0: Q4_0 experts and Q8_0
elsewhere, q4_k_m / iq4_xs: typed tensor by tensor as llama.cpp's quantizer types
that file type), then
for each thread count measures, in this one run:
  - qmoe: the median time of one decode step (one token after a short prompt);
  - llama.cpp (llama-cpp-python; installed by this script when absent, built
    without AMX, see .ci/run): the same, through `Llama.eval`;
  - effective weight bandwidth = weight bytes one decode step reads / step time
    (every non-expert tensor, one embedding row, and k expert slabs per layer);
  - the machine's read bandwidth (numpy sum over 1 GiB, 1 thread: an upper bound
    for one core's streaming reads).
Prints a table and writes JSON. The engines take turns, --rounds times each (a fresh
process per round), so that a slow spell of a shared machine falls on both: the figure
per engine is the median of all its steps, and the ratio is the median of the rounds'
ratios (each qmoe round against the llama.cpp round after it).

--isa avx2 measures an AVX2-only CPU (the laptop class) on any x86 machine: qmoe's
numba code is compiled for Haswell (NUMBA_CPU_NAME=haswell and Haswell's NUMBA_CPU_FEATURES), and llama.cpp must be a
build without AVX-512 (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF); the script
refuses a llama.cpp that reports AVX-512. On a machine without AVX-512, native is avx2.

    python bench/decode.py [--layers 8] [--steps 32] [--rounds 3] [--mix q4_k_m] [--isa avx2] [--json out/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import user_environment  # noqa: E402
from bench.bench_model import MIXES, make_bench_gguf  # noqa: E402

# What the qmoe child is given. The CPU name alone would keep the host's features (AVX-512 on a
# machine that has it), so the features are Haswell's, listed.
HASWELL_FEATURES = ("+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,"
                    "+movbe,+cx16,+xsave,-avx512f")
ISA_ENV = {"native": {}, "avx2": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL_FEATURES}}

PROMPT = "def main(args):\n    return"


def weight_bytes_per_token(path: Path) -> int:
    from qmoe.gguf_file import GGUFFile

    f = GGUFFile(path)
    n_expert = int(f.arch_get("expert_count"))
    k = int(f.arch_get("expert_used_count"))
    total = 0
    for t in f.tensors.values():
        if t.name == "token_embd.weight":
            total += t.nbytes // t.shape[0]
        elif "_exps." in t.name:
            total += t.nbytes // n_expert * k
        else:
            total += t.nbytes
    return total


def read_bandwidth_gbs() -> float:
    a = np.ones(2**28, dtype=np.float32)  # 1 GiB
    a.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.nbytes / float(np.median(times)) / 1e9


def step_times_qmoe(path: Path, threads: int, steps: int) -> list[float]:
    import qmoe

    m = qmoe.load(path, threads=threads, n_ctx=512)
    cache = m.new_cache()
    m.eval(m.tokenize(PROMPT), cache)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        m.eval([300 + i], cache)
        times.append(time.perf_counter() - t0)
    return times[3:]  # the first steps warm caches and numba's dispatch


def step_times_llama_cpp(path: Path, threads: int, steps: int) -> list[float]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        llm.eval([300 + i])
        times.append(time.perf_counter() - t0)
    return times[3:]


def ensure_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        print("llama-cpp-python is absent: building it (about 10 minutes)...", file=sys.stderr)
        env = dict(os.environ, MAKEFLAGS="-j2", CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                   "-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"], env=env)
        return done.returncode == 0


def llama_cpp_has_avx512() -> bool:
    import llama_cpp

    return "AVX512 = 1" in llama_cpp.llama_print_system_info().decode()


def run_in_child(engine: str, path: Path, threads: int, steps: int, isa: str = "native") -> list[float]:
    """Each measurement in a fresh process: thread pools and page cache state don't leak between engines."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r});"
            f"from bench.decode import step_times_{engine} as f;"
            f"print(json.dumps(f(__import__('pathlib').Path({str(path)!r}), {threads}, {steps})))")
    env = user_environment(**(ISA_ENV[isa] if engine == "qmoe" else {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} at {threads} threads failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="qmoe vs llama.cpp decode speed on Qwen3-30B-A3B shapes.")
    parser.add_argument("--layers", type=int, default=8, help="blocks in the bench model (48 = the real depth)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured per round")
    parser.add_argument("--rounds", type=int, default=3, help="turns each engine takes, alternating")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model-dir", default="/tmp/qmoe-bench", help="where the bench GGUF is kept")
    parser.add_argument("--json", default="bench/results/decode.json")
    parser.add_argument("--no-llama-cpp", action="store_true", help="measure qmoe only")
    parser.add_argument("--mix", choices=list(MIXES), default="q4_0", help="tensor types (default q4_0)")
    parser.add_argument("--isa", choices=list(ISA_ENV), default="native",
                        help="native, or avx2: code for an AVX2-only CPU (see the module docstring)")
    args = parser.parse_args()

    suffix = "" if args.mix == "q4_0" else f"-{args.mix}"  # q4_0 keeps the name earlier runs built
    path = Path(args.model_dir) / f"qwen3-30b-a3b-shapes-{args.layers}L{suffix}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    have_llama = not args.no_llama_cpp and ensure_llama_cpp()
    if have_llama and args.isa == "avx2" and llama_cpp_has_avx512():
        sys.exit("--isa avx2: this llama.cpp build uses AVX-512; rebuild it with "
                 "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF' or pass --no-llama-cpp")
    if not path.exists():
        make_bench_gguf(path, args.layers, mix=args.mix)
    nbytes = weight_bytes_per_token(path)
    result = {"model": path.name, "layers": args.layers, "mix": args.mix, "isa": args.isa,
              "weight_bytes_per_token": nbytes, "read_bandwidth_gbs_1thread": read_bandwidth_gbs(), "runs": []}
    for threads in args.threads:
        row = {"threads": threads}
        engines = ["qmoe"] + (["llama_cpp"] if have_llama else [])
        rounds = {engine: [] for engine in engines}  # step times of each round
        for _ in range(args.rounds):
            for engine in engines:
                rounds[engine].append(run_in_child(engine, path, threads, args.steps, args.isa))
        for engine in engines:
            median = float(np.median(np.concatenate(rounds[engine])))
            row[engine] = {"median_step_ms": median * 1e3, "tokens_per_s": 1 / median,
                           "weight_gbs": nbytes / median / 1e9,
                           "round_median_ms": [float(np.median(r)) * 1e3 for r in rounds[engine]]}
        if have_llama:
            ratios = [np.median(b) / np.median(a) for a, b in zip(rounds["qmoe"], rounds["llama_cpp"])]
            row["round_ratios"] = [float(r) for r in ratios]
            row["ratio_qmoe_over_llama_cpp"] = float(np.median(ratios))
        result["runs"].append(row)

    print(f"model {path.name} (mix {args.mix}, isa {args.isa}): {nbytes / 1e6:.1f} MB of weights per token; "
          f"read bandwidth (1 thread) {result['read_bandwidth_gbs_1thread']:.1f} GB/s")
    print(f"{'threads':>7} {'engine':>10} {'tok/s':>8} {'ms/tok':>8} {'GB/s':>6}")
    for row in result["runs"]:
        for engine in ("qmoe", "llama_cpp"):
            if engine in row:
                r = row[engine]
                print(f"{row['threads']:>7} {engine:>10} {r['tokens_per_s']:8.2f} {r['median_step_ms']:8.1f} "
                      f"{r['weight_gbs']:6.2f}")
        if "ratio_qmoe_over_llama_cpp" in row:
            rounds = " ".join(f"{r:.2f}" for r in row["round_ratios"])
            print(f"{row['threads']:>7} {'qmoe/llama.cpp':>10} {row['ratio_qmoe_over_llama_cpp']:.2f}x (rounds: {rounds})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
