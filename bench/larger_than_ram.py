"""Larger than RAM: a full-depth Qwen3-30B-A3B-shaped GGUF streamed from the drive, qmoe beside llama.cpp.

What a user with 16 GB of RAM and a 32 GB model sees (issue 14). In one run, on one file:

 1. Writes a random-weight GGUF with Qwen3-30B-A3B's shapes at full depth (48 layers,
    128 experts of which 8 are used, expert FFN 768, the real 151,936-token vocabulary),
    Q8_0: 32.6 GB, tensor by tensor (bench/random_moe.py; never more than one tensor in
    memory), into --dir (default /tmp/qmoe-ltr). It is deleted at the end unless --keep.
 2. Measures the drive: O_DIRECT reads of one slab's size at random offsets of the file
    with 1, 2, 4, 8 and 16 requests in flight (GB/s).
 3. Trains predictors for it (`qmoe calibrate` over --calib-tokens tokens, layer-major
    through the RAM pool, then `qmoe train-predictors`), timed.
 4. Runs each engine in a fresh process, the file's pages dropped from the page cache
    before each (posix_fadvise POSIX_FADV_DONTNEED):
      llama.cpp      llama-cpp-python, its defaults (mmap)
      qmoe           no offload flags: `--ram-budget auto` sizes a RAM pool (O_DIRECT) itself
      qmoe <policy>  the same with --prefetch cross-layer, pre-attn (the predictors of step 3),
                     governed (qmoe/experts/governor.py); with --always-prefetch also ungoverned
    (--ram-budget SIZE: every qmoe run with that pool instead of auto's)
    each: an 8-token prompt (time to first token), then --decode single-token steps
    (teacher-forced on text); steady decode = the median step time of the second half, and
    its throughput = the second half's steps over their time (a token whose experts are not
    resident takes 2-3 times one whose are, so the two differ).
    Then, in another fresh process per engine, the time to first token of a 512-token prompt.
    Per run: bytes read from the drive per decode token (/proc/self/io read_bytes, all
    threads), the store's prefetches that no layer used (wasted bytes), peak RSS (VmHWM).
 5. Writes JSON and a PNG to --out and prints the README table.

    python bench/larger_than_ram.py                 # about 25 minutes on 2 cores and a 0.7 GB/s drive
    python bench/larger_than_ram.py --layers 2 --keep --no-llama-cpp   # a quick look
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import user_environment  # noqa: E402
from bench.random_moe import MoEShape, expert_bytes, nbytes, tensor_plan, write_random_moe  # noqa: E402

QT = GGMLQuantizationType
A3B_FULL = MoEShape(n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128,
                    n_expert_used=8, n_ff_exp=768, n_vocab=151_936, expert_type=QT.Q8_0)
DEPTHS = (1, 2, 4, 8, 16)
PROMPT_SHORT, PROMPT_LONG = 8, 512
POLICIES = ("cross-layer", "pre-attn")


# ----------------------------------------------------------------------------- the file and the drive


def model_path(directory: Path, shape: MoEShape) -> Path:
    return directory / f"qwen3-a3b-shapes-{shape.n_layers}l-q8_0.gguf"


def write_model(path: Path, shape: MoEShape) -> None:
    total = sum(nbytes(s, q) for _, s, q, _ in tensor_plan(shape))
    free = shutil.disk_usage(path.parent).free
    if free < total * 1.05:
        raise SystemExit(f"{path.parent} has {free / 1e9:.1f} GB free; the model needs {total / 1e9:.1f} GB")
    print(f"writing {path} ({total / 1e9:.1f} GB, tensor by tensor)...", flush=True)
    start = time.perf_counter()
    write_random_moe(path, shape, "random weights with Qwen3-30B-A3B's shapes at full depth")
    print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages, so that every engine starts from the drive."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drive_bandwidth(path: Path, read_bytes: int, seconds: float = 3.0) -> dict[int, float]:
    """GB/s of O_DIRECT reads of `read_bytes` at random aligned offsets, with each depth of requests in flight."""
    read_bytes = -(-read_bytes // 4096) * 4096
    result = {}
    for depth in DEPTHS:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            stop = time.perf_counter() + seconds
            start = time.perf_counter()
            with ThreadPoolExecutor(depth) as pool:
                done = sum(pool.map(_read_until, [fd] * depth, [read_bytes] * depth, [stop] * depth, range(depth)))
            result[depth] = done / (time.perf_counter() - start) / 1e9
        finally:
            os.close(fd)
        print(f"  drive, {depth:2d} in flight: {result[depth]:.2f} GB/s", flush=True)
    return result


def _read_until(fd: int, read_bytes: int, stop: float, seed: int) -> int:
    """One reader: random aligned reads of `read_bytes` until `stop`; the bytes it read."""
    rng = np.random.default_rng(seed)
    blocks = (os.fstat(fd).st_size - read_bytes) // 4096
    buffer = mmap.mmap(-1, read_bytes)  # page-aligned, as O_DIRECT wants
    done = 0
    while time.perf_counter() < stop:
        done += os.preadv(fd, [buffer], int(rng.integers(0, blocks)) * 4096)
    buffer.close()
    return done


# ----------------------------------------------------------------------------- one engine (in a child process)


def proc_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def text_tokens(tokenize, n: int) -> list[int]:
    """n tokens of Python standard-library source: the calibration text's kind."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("a*.py"))[:8])
    ids = tokenize(text)
    assert len(ids) >= n, "the benchmark text is too short"
    return ids[:n]


def run_engine(engine: str, path: str, threads: int, prompt_len: int, decode: int, predictors: str | None,
               ram_budget: str | None = None) -> dict:
    """One engine on a cold file: the prompt (time to first token), then `decode` steps. JSON-ready.

    engine: "llama.cpp", or "qmoe" and its --prefetch policy and flags ("qmoe pre-attn --always-prefetch");
    ram_budget: qmoe's --ram-budget SIZE, read with O_DIRECT (None: auto, the default)."""
    path = Path(path)
    start = time.perf_counter()
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=prompt_len + decode + 8, n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
        ids = text_tokens(lambda t: llm.tokenize(t.encode(), add_bos=False), prompt_len + decode)
        step = llm.eval
        budget = None
    else:
        import qmoe
        from qmoe.experts.options import OffloadOptions

        policy, *flags = engine.split()[1:] or ["none"]
        budget_flags = {} if ram_budget is None else {"ram_budget": ram_budget, "direct_io": True}
        offload = OffloadOptions(prefetch=policy, predictors=predictors if policy == "pre-attn" else None,
                                 govern="--always-prefetch" not in flags, **budget_flags)
        m = qmoe.load(path, threads=threads, n_ctx=prompt_len + decode + 8, offload=offload)
        cache = m.new_cache()
        ids = text_tokens(m.tokenize, prompt_len + decode)
        step = lambda toks: m.eval(toks, cache)  # noqa: E731
        budget = m.store.pool.nbytes if m.store is not None and m.store.pool is not None else None
    load_s = time.perf_counter() - start
    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    step(ids[:prompt_len])
    first_token_s = time.perf_counter() - t0
    prompt_read = proc_read_bytes() - read0
    times, reads, read0 = [], [], proc_read_bytes()
    for token in ids[prompt_len:]:
        t0, r0 = time.perf_counter(), proc_read_bytes()
        step([token])
        times.append(time.perf_counter() - t0)
        reads.append(proc_read_bytes() - r0)
    result = {"engine": engine, "load_s": load_s, "prompt_tokens": prompt_len, "first_token_s": first_token_s,
              "prompt_read_bytes": prompt_read, "ram_pool_bytes": budget, "step_s": times, "step_read_bytes": reads}
    if times:
        steady = times[len(times) // 2:]
        result |= {"decode_tok_s": 1 / float(np.median(steady)), "decode_throughput": len(steady) / sum(steady),
                   "read_per_token": (proc_read_bytes() - read0) / len(times)}
    if engine != "llama.cpp":
        result["store"] = store_figures(m, len(times))
        m.close()
    result["peak_rss"] = peak_rss()
    return result


def store_figures(m, n_steps: int) -> dict | None:
    """What the store says about the run (prompt and decode together): tiers, prefetches, stalls."""
    stats = m.offload_stats()
    if stats is None:
        return None
    pool = m.store.pool
    slab = m.store.slabs.layout.nbytes
    return {"tiers": {k: v.get("description") for k, v in stats["tiers"].items()},
            "hit_rate": stats["total"]["hit_rate"], "stall_s": stats["stall_s"], "transfers": stats["transfers"],
            "bytes_into_ram": stats["bytes_into"].get("ram", 0), "transfer_s": stats["transfer_s"],
            "prefetch": stats["prefetch"], "bounced_bytes": m.store.reader.bounced_bytes if m.store.reader else 0,
            "wasted_prefetch_bytes": (pool.cache.evicted_unused * slab) if pool is not None else 0,
            "decode_steps": n_steps}


def in_child(engine: str, path: Path, threads: int, prompt_len: int, decode: int, predictors: Path | None,
             ram_budget: str | None = None) -> dict:
    from qmoe.experts.budget import mem_available

    drop_page_cache(path)
    available = mem_available()
    code = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from bench.larger_than_ram import "
            "run_engine; print('RESULT ' + json.dumps(run_engine(*json.loads(sys.argv[1]))))")
    arg = json.dumps([engine, str(path), threads, prompt_len, decode, str(predictors) if predictors else None,
                      ram_budget])
    env = user_environment()
    print(f"  {engine}: {prompt_len}-token prompt" + (f", {decode} decode steps" if decode else "")
          + f" (MemAvailable {available / 2**30:.1f} GiB)", flush=True)
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"engine": engine, "prompt_tokens": prompt_len, "error": out.stderr.strip().splitlines()[-1:]}
    result = json.loads(lines[-1].removeprefix("RESULT ")) | {"mem_available_before": available}
    said = [line for line in out.stderr.splitlines() if line.startswith("qmoe: ")]
    result["said"] = said
    summary = f"    first token {result['first_token_s']:.1f} s"
    if "decode_tok_s" in result:
        summary += (f", decode {result['decode_tok_s']:.2f} tok/s (throughput {result['decode_throughput']:.2f}), "
                    f"{result['read_per_token'] / 1e9:.2f} GB read/token")
    governor = ((result.get("store") or {}).get("prefetch") or {}).get("governor")
    if governor and governor["decisions"]:
        summary += ", governor " + ", ".join(f"{'on' if d['prefetch'] else 'off'} ({1e3 * d['saved_s']:+.1f} ms saved)"
                                             for d in governor["decisions"])
    print(summary + f", peak RSS {result['peak_rss'] / 2**30:.1f} GiB", flush=True)
    return result


# ----------------------------------------------------------------------------- predictors


def qmoe_in_child(argv: list[str]) -> None:
    """A qmoe command in a process of its own: its memory (a calibration's RAM pool) is gone after it."""
    code = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from qmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    if subprocess.run([sys.executable, "-c", code, *argv]).returncode != 0:
        raise SystemExit(f"qmoe {argv[0]} failed")


def train_predictors(path: Path, tokens: int, threads: int) -> tuple[Path, dict]:
    """`qmoe calibrate` (layer-major through the auto RAM pool) + `qmoe train-predictors`, timed."""
    from bench.offload import stdlib_texts

    sidecar = path.with_suffix(".pred.gguf")
    calib = path.parent / "calib"
    shutil.rmtree(calib, ignore_errors=True)
    drop_page_cache(path)
    texts = [str(p) for p in stdlib_texts(40)]
    t0 = time.perf_counter()
    qmoe_in_child(["calibrate", str(path), "--text", *texts, "--tokens", str(tokens), "--threads", str(threads),
                   "-o", str(calib)])
    calibrate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qmoe_in_child(["train-predictors", str(path), "--data", str(calib), "-o", str(sidecar), "--device", "cpu",
                   "--type", "q8_0"])
    train_s = time.perf_counter() - t0
    shutil.rmtree(calib, ignore_errors=True)
    return sidecar, {"calibration_tokens": tokens, "calibrate_s": calibrate_s, "train_s": train_s}


def plan_forecast(path: Path, budget: int | None, threads: int, predictors: Path | None) -> dict:
    """What `qmoe plan` forecasts for the budget qmoe chose itself (its probe included, and the route
    counts of `predictors`, uniform routing without), to set beside the measurements."""
    from qmoe import kernels
    from qmoe.experts.plan import forecast, model_shape, probe, routing
    from qmoe.gguf_file import GGUFFile

    kernels.set_num_threads(threads)
    file = GGUFFile(path)
    shape = model_shape(file, PROMPT_LONG + 64, 512)
    route = routing(file, shape, predictors)
    drop_page_cache(path)
    measured = probe(file, shape)
    f = forecast(shape, measured, budget, route)
    return {"budget": budget, "probe_s": measured.seconds, "read_bps": measured.read_bps,
            "burst_s": measured.burst_s, "routing": route.source,
            "decode_tok_s": f.decode_tok_s, "decode_bound_tok_s": f.decode_bound_tok_s, "compute_s": f.compute_s,
            "first_token_s": {str(n): t for n, t in f.first_token_s.items()}, "peak_rss": f.peak_rss,
            "read_per_token": f.read_per_token}


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    rows = ["| engine | load | decode tok/s | vs llama.cpp | read per token | first token, 8 tokens | "
            "first token, 512 tokens | wasted prefetch | peak RSS |", "|---" * 9 + "|"]
    runs = {r["engine"]: r for r in results["decode_runs"]}
    longs = {r["engine"]: r for r in results["long_prompt_runs"]}
    base = runs.get("llama.cpp", {}).get("decode_tok_s")
    for engine, r in runs.items():
        if "error" in r:
            rows.append(f"| {engine} | failed: {r['error']} |" + " |" * 7)
            continue
        long = longs.get(engine, {})
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
        wasted = r.get("store") or {}
        wasted = f"{wasted['wasted_prefetch_bytes'] / 1e9:.2f} GB" if wasted else "-"
        first_long = f"{long['first_token_s']:.1f} s" if "first_token_s" in long else "-"
        rows.append(f"| {engine} | {r['load_s']:.1f} s | {r['decode_tok_s']:.2f} | {ratio} | {r['read_per_token'] / 1e9:.2f} GB | "
                    f"{r['first_token_s']:.1f} s | {first_long} | {wasted} | {r['peak_rss'] / 2**30:.1f} GiB |")
    qmoe, plan = runs.get("qmoe"), results.get("plan")
    if qmoe and plan and "decode_tok_s" in qmoe:
        rows.append("")
        rows.append(f"qmoe plan forecast for its budget: decode {plan['decode_tok_s']:.2f} tok/s (measured "
                    f"{qmoe['decode_tok_s']:.2f}), first token of 8 tokens {plan['first_token_s']['8']:.1f} s "
                    f"(measured {qmoe['first_token_s']:.1f}), peak RSS {plan['peak_rss'] / 2**30:.1f} GiB "
                    f"(measured {qmoe['peak_rss'] / 2**30:.1f})")
        long = longs.get("qmoe", {})
        if "first_token_s" in long:
            rows[-1] += f", 512 tokens {plan['first_token_s']['512']:.1f} s (measured {long['first_token_s']:.1f})"
        depth = str(4 if "4" in results["drive_gbs"] else max(results["drive_gbs"], key=int))
        half = len(qmoe["step_s"]) // 2  # the steady half, bytes over time (older results: the median's rate)
        reached = (sum(qmoe["step_read_bytes"][half:]) / sum(qmoe["step_s"][half:]) if "step_read_bytes" in qmoe
                   else qmoe["read_per_token"] * qmoe["decode_tok_s"]) / 1e9
        rows.append(f"qmoe's decode read {reached:.2f} GB/s from the drive, which serves "
                    f"{results['drive_gbs'][depth]:.2f} GB/s at {depth} reads in flight")
        rows += bound_lines(results, runs, depth)
    return "\n".join(rows)


def bound_lines(results: dict, runs: dict, depth: str) -> list[str]:
    """Each qmoe run's steady time per token against the bound of issue 14: max(compute per token
    (the plan's probe), the run's own steady read bytes per token / the drive at the store's
    queue depth (this bench's measurement)), and against none."""
    compute = results["plan"].get("compute_s")
    none = runs.get("qmoe")
    if compute is None or none is None or "step_read_bytes" not in none:
        return []
    drive = results["drive_gbs"][depth] * 1e9
    lines = [f"bound per token = max(compute {compute * 1e3:.0f} ms, steady reads / {drive / 1e9:.2f} GB/s):"]
    for engine, r in runs.items():
        if not engine.startswith("qmoe") or "step_read_bytes" not in r:
            continue
        half = len(r["step_s"]) // 2
        read = float(np.mean(r["step_read_bytes"][half:]))
        bound = max(compute, read / drive)
        step = 1 / r["decode_tok_s"]
        lines.append(f"  {engine}: {step * 1e3:.0f} ms a token = {step / bound:.2f}x its bound "
                     f"({bound * 1e3:.0f} ms: {read / 1e6:.0f} MB read), {r['decode_tok_s'] / none['decode_tok_s']:.2f}x none"
                     + (f" (by throughput {r['decode_throughput'] / none['decode_throughput']:.2f}x)"
                        if "decode_throughput" in r and "decode_throughput" in none else ""))
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["decode_runs"] if "decode_tok_s" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["engine"] for r in runs]
    axes[0].bar(names, [r["decode_tok_s"] for r in runs], color="tab:blue")
    axes[0].set_title("steady decode (tok/s)")
    axes[1].bar(names, [r["read_per_token"] / 1e9 for r in runs], color="tab:orange")
    axes[1].set_title("read from the drive per token (GB)")
    depths = sorted(results["drive_gbs"], key=int)
    axes[2].plot([int(d) for d in depths], [results["drive_gbs"][d] for d in depths], marker="o")
    axes[2].set_xscale("log", base=2)
    axes[2].set_title("drive, O_DIRECT (GB/s by requests in flight)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{results['model']} ({results['model_bytes'] / 1e9:.1f} GB), {results['threads']} threads, "
                 f"{results['mem_total'] / 2**30:.0f} GiB RAM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qmoe-ltr"), help="where the model file goes")
    parser.add_argument("--layers", type=int, default=A3B_FULL.n_layers, help="blocks (48: the real depth)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=96,
                        help="decode steps per run (>= 32 for the README; at 32 the 48-layer file's pool is "
                             "still filling in the second half, at 96 it is past that)")
    parser.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for the predictors")
    parser.add_argument("--predictors", type=Path, default=None,
                        help="predictors trained for this file by an earlier run (--keep keeps them): skip training")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--always-prefetch", action="store_true",
                        help="also run each policy with --always-prefetch (prefetching in every pass, ungoverned)")
    parser.add_argument("--ram-budget", default=None, metavar="SIZE",
                        help="qmoe's RAM pool for every run (read with O_DIRECT; default: auto, as a user gets)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-long-prompt", action="store_true", help="skip the 512-token prompt runs")
    parser.add_argument("--keep", action="store_true", help="keep the model file (and predictors) afterwards")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "larger-than-ram")
    args = parser.parse_args(argv)

    shape = MoEShape(**{**A3B_FULL.__dict__, "n_layers": args.layers})
    args.dir.mkdir(parents=True, exist_ok=True)
    path = model_path(args.dir, shape)
    from qmoe.experts.budget import mem_available

    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        if not path.exists():
            write_model(path, shape)
        size = path.stat().st_size
        print(f"{path.name}: {size / 1e9:.1f} GB; RAM {mem_total / 2**30:.1f} GiB, available "
              f"{mem_available() / 2**30:.1f} GiB" + ("" if size > mem_total else " (the file FITS in RAM)"),
              flush=True)
        slab = expert_bytes(shape) // (shape.n_layers * shape.n_expert)
        print("measuring the drive...", flush=True)
        drive = drive_bandwidth(path, slab)
        predictors, training = None, None
        if args.predictors is not None:
            predictors, training = args.predictors, {"reused": str(args.predictors)}
        elif "pre-attn" in args.policies:
            print(f"training predictors on {args.calib_tokens} tokens...", flush=True)
            predictors, training = train_predictors(path, args.calib_tokens, args.threads)
            print(f"  calibration {training['calibrate_s']:.0f} s, training {training['train_s']:.0f} s", flush=True)
        policies = [f"qmoe {p}" for p in args.policies]
        policies += [f"{p} --always-prefetch" for p in policies] if args.always_prefetch else []
        engines = ([] if args.no_llama_cpp else ["llama.cpp"]) + ["qmoe"] + policies
        print("decode runs:", flush=True)
        decode_runs = [in_child(e, path, args.threads, PROMPT_SHORT, args.decode, predictors, args.ram_budget)
                       for e in engines]
        long_runs = []
        if not args.no_long_prompt:
            print("512-token prompts:", flush=True)
            long_runs = [in_child(e, path, args.threads, PROMPT_LONG, 0, None, args.ram_budget) for e in engines[:2]]
        chosen = next((r.get("ram_pool_bytes") for r in decode_runs if r["engine"] == "qmoe"), None)
        print("qmoe plan's forecast for that budget...", flush=True)
        planned = plan_forecast(path, chosen, args.threads, predictors)
        results = {"model": path.name, "model_bytes": size, "layers": shape.n_layers, "threads": args.threads,
                   "ram_budget": args.ram_budget or "auto",
                   "mem_total": mem_total, "machine": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "drive_gbs": {str(k): v for k, v in drive.items()},
                   "slab_bytes": slab, "predictors": training, "decode_runs": decode_runs,
                   "long_prompt_runs": long_runs, "plan": planned}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "larger_than_ram.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "larger_than_ram.png")
        print(table(results))
        print(f"wrote {args.out / 'larger_than_ram.json'} and larger_than_ram.png")
    finally:
        if not args.keep:
            for p in (path, path.with_suffix(".pred.gguf"), path.with_name(path.name + ".tmp")):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
