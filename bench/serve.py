"""`qmoe serve` under load: throughput and latency at 1, 4 and 16 concurrent clients.

For each model (the bundled tiny Qwen3-MoE, and the random-weight GGUF with
Qwen3-30B-A3B's layer shapes from bench/bench_model.py) and each --parallel
setting (1 and 4), starts the real `qmoe serve` in a subprocess and, from this
process, runs rounds of C concurrent streaming clients (openai's AsyncOpenAI),
each asking for a fixed number of greedy tokens after its own prompt. Per round:
  - throughput: completion tokens of all clients / the round's wall time;
  - time to first token (TTFT) and time per output token (TPOT: (last - first
    token time) / (tokens - 1)) per request: median and p90;
  - from /metrics: decode steps, routed (token, expert) pairs and distinct experts
    read, hence the weight bytes one generated token costs: every non-expert
    tensor once per decode step (one embedding row per token) plus each distinct
    expert's slab once per step, divided by the tokens those steps produced. With
    several slots a step's tokens share the dense weights and the experts they
    route to in common.
Then, with --parallel 1, the prompt cache: TTFT of a conversation's first turn
(a long prompt), of its second turn (the first turn, its reply and a new line:
the slot holds the first part), and of the same second turn sent cold (after an
unrelated prompt took the slot).

    python bench/serve.py [--json bench/results/serve/serve.json] [--png bench/results/serve/serve.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model import make_bench_gguf  # noqa: E402

CLIENTS = (1, 4, 16)
PARALLEL = (1, 4)
WORDS = "def class return import lambda yield while print self value index count result".split()


def prompts(n: int, words: int, tag: str = "") -> list[str]:
    """n different prompts of about `words` words each, starting with `tag` (a round's own, so that
    no slot holds a prompt of an earlier round: each round measures its prefills whole)."""
    return [tag + " ".join(WORDS[(i * 7 + j * (i + 3)) % len(WORDS)] for j in range(words)) for i in range(n)]


def weight_bytes(path: Path) -> tuple[int, int, int, int, int]:
    """(bytes of the non-expert tensors a decode step reads once, one embedding row, one expert's
    slab, experts used per token, MoE layers)."""
    from qmoe.gguf_file import GGUFFile

    f = GGUFFile(path)
    n_expert, k = int(f.arch_get("expert_count")), int(f.arch_get("expert_used_count"))
    dense = embed_row = slab = 0
    n_moe = 0
    for t in f.tensors.values():
        if t.name == "token_embd.weight":
            embed_row = t.nbytes // t.shape[0]
        elif "_exps." in t.name:
            slab += t.nbytes // n_expert
            n_moe += t.name.endswith("ffn_gate_exps.weight")
        else:
            dense += t.nbytes
    return dense, embed_row, slab // n_moe, k, n_moe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, parallel: int, threads: int, ctx: int):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmoe.cli", "serve", str(model), "--port", str(self.port), "--parallel",
             str(parallel), "--queue", "64", "-t", str(threads), "--ctx", str(ctx)],
            cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = model.name.removesuffix(".gguf")
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"qmoe serve exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("qmoe serve did not come up") from None
                time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics") as r:
            lines = r.read().decode().splitlines()
        return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One greedy streaming request: its TTFT, TPOT, token count and text."""
    start = time.perf_counter()
    times, pieces, usage = [], [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    n = usage.completion_tokens
    return {"ttft_s": times[0] - start, "tokens": n, "text": "".join(pieces),
            "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 and len(times) > 1 else None}


async def _gather(server: ServerProcess, texts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    import openai

    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                  timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, server.model_id, t, max_tokens) for t in texts))
        return results, time.perf_counter() - start


def requests(server: ServerProcess, texts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """All of `texts` at once, one client each; their results and the wall time."""
    return asyncio.run(_gather(server, texts, max_tokens))


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load_rounds(server: ServerProcess, path: Path, clients: tuple[int, ...], max_tokens: int,
                prompt_words: int) -> list[dict]:
    dense, embed_row, slab, k, n_moe = weight_bytes(path)
    requests(server, prompts(2, prompt_words, "warm-up: "), 4)  # first calls, page cache
    rows = []
    for c in clients:
        before = server.metrics()
        results, wall = requests(server, prompts(c, prompt_words, f"{c} clients: "), max_tokens)
        after = server.metrics()
        delta = {k: after[k] - before.get(k, 0.0) for k in ("qmoe_decode_steps_total", "qmoe_expert_uses_total",
                                                            "qmoe_expert_reads_total")}
        steps, uses, reads = (delta[k] for k in ("qmoe_decode_steps_total", "qmoe_expert_uses_total",
                                                 "qmoe_expert_reads_total"))
        step_tokens = uses / (k * n_moe)  # tokens that went through decode steps
        tokens = sum(r["tokens"] for r in results)
        rows.append({
            "clients": c, "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct([r["ttft_s"] for r in results], 0.5),
            "ttft_p90_ms": 1e3 * pct([r["ttft_s"] for r in results], 0.9),
            "tpot_p50_ms": 1e3 * pct([r["tpot_s"] for r in results], 0.5),
            "tpot_p90_ms": 1e3 * pct([r["tpot_s"] for r in results], 0.9),
            "tokens_per_decode_step": step_tokens / steps,
            "expert_reads_per_use": reads / uses,
            "weight_mib_per_token": (steps * dense + step_tokens * embed_row + reads * slab) / step_tokens / 2**20,
        })
        r = rows[-1]
        print(f"  {c:2d} clients: {r['tokens_per_s']:7.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:7.1f} ms "
              f"p90 {r['ttft_p90_ms']:7.1f}, TPOT p50 {r['tpot_p50_ms']:6.1f} ms, "
              f"{r['tokens_per_decode_step']:.2f} tokens/step, {r['weight_mib_per_token']:.1f} MiB/token",
              flush=True)
    return rows


def prompt_cache(server: ServerProcess, words: int, reply_tokens: int, repeats: int = 2) -> dict:
    """TTFT (median of `repeats`) of a first turn, of its second turn while the slot holds the
    first (and its reply), and of the same second turn cold (another prompt took the slot)."""
    first, second, cold = [], [], []
    for i in range(repeats):
        turn1 = f"{i} " + prompts(i + 2, words)[-1]
        (one,), _ = requests(server, [turn1], reply_tokens)
        turn2 = turn1 + one["text"] + "\n" + " ".join(WORDS[:8])
        (two,), _ = requests(server, [turn2], 1)
        requests(server, ["unrelated " * 4], 1)
        (two_cold,), _ = requests(server, [turn2], 1)
        first.append(one["ttft_s"])
        second.append(two["ttft_s"])
        cold.append(two_cold["ttft_s"])
    return {"turn1_ttft_ms": 1e3 * statistics.median(first), "turn2_cached_ttft_ms": 1e3 * statistics.median(second),
            "turn2_cold_ttft_ms": 1e3 * statistics.median(cold), "turn1_words": words, "reply_tokens": reply_tokens}


def batched_steps(path: Path, threads: int, batches: tuple[int, ...] = (1, 2, 4, 8, 16), repeats: int = 7) -> list[dict]:
    """The decode step alone, in this process: median time of Model.eval_step over B sequences
    (B different prompts prefilled first), the batch sizes interleaved so that a change in the
    machine's load falls on all of them alike; distinct experts read and weight bytes per token."""
    import numpy as np

    import qmoe
    from qmoe.serve.scheduler import RoutingCounter

    dense, embed_row, slab, _, n_moe = weight_bytes(path)
    with qmoe.load(path, n_ctx=256, threads=threads) as model:
        caches = [model.new_cache() for _ in range(max(batches))]
        tokens = [int(model.eval(model.tokenize(text), cache)[-1].argmax())
                  for text, cache in zip(prompts(len(caches), 4), caches)]
        times: dict[int, list[float]] = {b: [] for b in batches}
        routing = {b: RoutingCounter() for b in batches}
        for _ in range(repeats):
            for b in batches:
                start = time.perf_counter()
                logits = model.eval_step(tokens[:b], caches[:b], routing[b])
                times[b].append(time.perf_counter() - start)
                tokens[:b] = logits.argmax(-1).tolist()
    rows = []
    for b in batches:
        step = float(np.median(times[b]))
        reads_per_step = routing[b].reads / repeats
        rows.append({"batch": b, "step_ms": 1e3 * step, "ms_per_token": 1e3 * step / b, "tokens_per_s": b / step,
                     "experts_read_per_layer": reads_per_step / n_moe,
                     "expert_reads_per_use": routing[b].reads / routing[b].uses,
                     "weight_mib_per_token": (dense + b * embed_row + reads_per_step * slab) / b / 2**20})
        r = rows[-1]
        print(f"  step of {b:2d}: {r['step_ms']:8.1f} ms, {r['ms_per_token']:7.1f} ms/token, "
              f"{r['expert_reads_per_use']:.2f} expert reads per routed pair, {r['weight_mib_per_token']:.1f} MiB/token",
              flush=True)
    return rows


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for col, (name, runs) in enumerate(results.items()):
        for parallel, rows in runs["load"].items():
            c = [r["clients"] for r in rows]
            axes[0][col].plot(c, [r["tokens_per_s"] for r in rows], "o-", label=f"--parallel {parallel}")
            axes[1][col].plot(c, [r["tpot_p50_ms"] for r in rows], "o-", label=f"--parallel {parallel}")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("tokens/s, all clients")
        axes[1][col].set_ylabel("time per output token, median (ms)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
            ax.set_xlabel("concurrent streaming clients")
            ax.legend()
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-model", default="/tmp/qwen3-30b-a3b-shapes-8L.gguf",
                        help="the A3B-shaped GGUF (written there by bench/bench_model.py when missing)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench/results/serve/serve.json"))
    parser.add_argument("--png", default=str(ROOT / "bench/results/serve/serve.png"))
    args = parser.parse_args()

    bench = Path(args.bench_model)
    if not bench.exists():
        make_bench_gguf(bench, args.layers)
    models = {  # name -> (path, tokens per request, prompt words, turn-1 words for the prompt cache)
        "tiny-qwen3moe": (ROOT / "models/tiny-qwen3moe.gguf", 32, 12, 300),
        f"A3B shapes, {args.layers} layers": (bench, 8, 12, 100),
    }
    results = {}
    load_before = os.getloadavg()[0]
    for name, (path, max_tokens, words, cache_words) in models.items():
        runs = {"load": {}, "path": str(path), "max_tokens": max_tokens}
        print(f"{name}: batched decode steps", flush=True)
        runs["steps"] = batched_steps(path, args.threads)
        for parallel in PARALLEL:
            print(f"{name}, --parallel {parallel}", flush=True)
            server = ServerProcess(path, parallel, args.threads, ctx=1024)
            try:
                runs["load"][parallel] = load_rounds(server, path, CLIENTS, max_tokens, words)
                if parallel == 1:
                    runs["prompt_cache"] = prompt_cache(server, cache_words, 16)
                    print(f"  prompt cache: {runs['prompt_cache']}", flush=True)
            finally:
                server.close()
        results[name] = runs
    import platform

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "isa": "AVX2, no AVX-512", "threads": args.threads,
                       "load_average_1min": [load_before, os.getloadavg()[0]]}, "models": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    plot(results, Path(args.png))
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
