"""Expert offloading benchmark: decode tokens/s and stall time per prefetch policy and budget.

For each model, tier setup, budget (10, 25, 50, 100% of the experts in that tier)
and policy (none, cross-layer, pre-attn, oracle), one run: load the model with
that store, prefill the prompt (cold store), then run teacher-forced decode steps
(one token each: the text's next token). Tokens/s, the stall time and the hit rate
are those of the decode steps; every run does the same work with the routing of
real text and differs only in how long it waits for experts.

Models
    tiny   models/tiny-qwen3moe, the trained quick-start model (bench/train_tiny_moe.py),
           as models/tiny-qwen3moe.gguf (converted here, q8_0, if absent), with its
           predictors (models/tiny-qwen3moe.pred.gguf) or, if absent, predictors
           trained here into ~/.cache/qmoe-bench (`qmoe calibrate` on Python
           standard-library files, the model's own training distribution, then
           `qmoe train-predictors`).
    a3b    random weights with Qwen3-30B-A3B's layer shapes: n_embd 2048, 128
           experts of which 8 are used, expert FFN 768, 32 query / 4 KV heads of
           128; q4_0 experts, q8_0 elsewhere; 4 layers and a 4096-token byte-level
           vocabulary (the real 151k-token head would dominate decode). Written from
           random quantized blocks into ~/.cache/qmoe-bench (1.4 GB) by
           bench/random_moe.py, whose scales make routing predictable from the
           pre-attention activation as in trained models. Its predictors are
           trained the same way as the tiny model's, on 20,000 tokens of its own
           activations, with the default width (1024), q8_0 like the shipped ones.

Tier setups
    ram    RAM pool of quantized slabs, read from the file with O_DIRECT (the page
           cache bypassed, so every miss is a real read from the drive); the CPU
           kernels compute from the pool. No simulated link.
    pcie   the simulated fast tier (--sim-fast-budget: quantized slabs in CPU memory,
           computed by the same kernels), link SIMULATED at 25 GB/s + 10 us per
           transfer, misses wait. With --device cuda, the GPU tier behind that link.
    flash  the same with the link SIMULATED at 2 GB/s + 100 us.
    gpu    (--device cuda, the default tiers there with flash) the fast tier in GPU memory:
           fp16 experts in GPU slots, uploaded over the machine's real link and
           dequantized on the GPU; misses wait. bench/gpu_offload.sh runs this.
    link-X (--link-sweep X ...) the same with the link SIMULATED at X GB/s + 10 us:
           how the value of prefetching depends on the ratio of transfer time to
           compute time (a second plot, offload-links.png).

Policies (POLICIES): none, cross-layer, pre-attn and oracle as `--prefetch` names them,
with the paper's schedule (lookahead 0); pre-attn+1 and oracle+1 with --lookahead 1 (each
layer predicted right after the previous layer's attention instead of at its own); oracle-token, the true
routing of every MoE layer queued right after the token's first attention: about the best
that any prediction made within a token could do on this machine.

Why the gain over on-demand loading is bounded: a prediction for layer l can only
be made from layer l's input, so its transfers overlap at most layer l's attention
(A) and the compute of the experts already there (M). Per layer, on-demand loading
takes about A + T (T: the transfers of the misses, whose wait overlaps the hits'
compute), a perfect prefetcher max(A + M, T). The ratio peaks where T = A + M, at
1 + A / (A + M): about 1.5x when attention and experts cost the same, as on the a3b
shapes; a faster link leaves little to hide, a slower one leaves T >> A to wait for
whatever the policy. A lookahead widens the window by the previous layer's experts,
but the link still carries every miss one after the other, and on a CPU-only machine
the copies into the fast tier take the cores that compute.

Cross-layer and pre-attn prefetch k' = k experts per token by default (--k-prime).
Over-provisioning (the paper's k' = 1.5 k) raises recall but, at these budgets,
every extra guess is one more transfer on a link that is already the bottleneck
and one more slab pushed out of a small cache: on the tiny model at 25% it moved
1.8x the slabs of on-demand loading for a few points of recall.

Each point is run --repeats times (policies in alternating order) and the fastest
run counts: the development machines are shared, and a slow spell should not
decide a comparison.

Output (--out, default out/offload/): offload.json (every run's numbers and store statistics) and
offload.png (tokens/s against budget, per model and tier setup).

    python bench/offload.py                  # the default run: about 13 minutes on 2 cores
    python bench/offload.py --models tiny --tiers ram --decode 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# First: importing qmoe sets how long OpenMP's idle threads spin (qmoe/__init__.py), which
# must happen before torch loads its OpenMP runtime. Threads that spin for long fight the
# prefetch worker and the transfer thread for the cores (made decode 13x slower here).
import qmoe  # noqa: E402, I001

import torch  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from bench.random_moe import MoEShape, write_random_moe  # noqa: E402
from qmoe import kernels as qmoe_kernels  # noqa: E402
from qmoe.cli import main as qmoe_main  # noqa: E402
from qmoe.errors import PredictorMismatchError  # noqa: E402
from qmoe.experts.link import SimulatedLink  # noqa: E402
from qmoe.experts.options import PREDICT_IN, OffloadOptions  # noqa: E402
from qmoe.experts.prefetch import RoutingTrace, TraceRecorder  # noqa: E402
from qmoe.predictor.sidecar import default_sidecar_path, load_sidecar, model_identity  # noqa: E402

QT = GGMLQuantizationType
MODELS_DIR = REPO_ROOT / "models"
# The 1.4 GB random a3b model is a cache, not a repository file.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qmoe-bench"
RESULTS_DIR = REPO_ROOT / "out" / "offload"
TOKEN = -1  # lookahead: every MoE layer of the token, right after the first attention
# label -> (--prefetch, --lookahead): the policies, pre-attn and the oracle also one layer ahead,
# and the oracle with the whole token ahead (nearly the best any prediction could do here).
POLICIES = {
    "none": ("none", 0),
    "cross-layer": ("cross-layer", 0),
    "pre-attn": ("pre-attn", 0),
    "oracle": ("oracle", 0),
    "pre-attn+1": ("pre-attn", 1),
    "oracle+1": ("oracle", 1),
    "oracle-token": ("oracle", TOKEN),
}
BUDGETS = (10, 25, 50, 100)
AUTO_K = "auto"  # --k-prime auto: qmoe's own default width and admission
TIERS = {
    "ram": dict(direct_io=True),
    "pcie": dict(fast_tier=True, on_miss="wait", link=SimulatedLink(25.0, 10.0)),
    "flash": dict(fast_tier=True, on_miss="wait", link=SimulatedLink(2.0, 100.0)),
    "gpu": dict(fast_tier=True, on_miss="wait"),  # with --device cuda: the real host -> GPU link
}
CPU_TIERS, CUDA_TIERS = ["ram", "pcie", "flash"], ["gpu", "flash"]
# The tiny model's matrices are too small for two kernel threads to pay off (one: 359, two: 307
# tokens/s without a store), and one leaves a core to the prefetch and transfer threads.
KERNEL_THREADS = {"tiny": 1, "a3b": 2}
A3B = MoEShape(
    n_layers=4, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128, n_expert_used=8,
    n_ff_exp=768, n_vocab=4096, expert_type=QT.Q4_0,
)


# ----------------------------------------------------------------------------- models


def stdlib_texts(n_files: int) -> list[Path]:
    """Some Python standard-library files: calibration text (the tiny model was trained on such)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 20_000)
    return files[:n_files]


def train_predictors(model: Path, sidecar: Path, tokens: int, hidden: int | None, epochs: int) -> Path:
    """`qmoe calibrate` + `qmoe train-predictors` for `model`, written to `sidecar`."""
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib"
        texts = [str(p) for p in stdlib_texts(12)]
        args = ["calibrate", str(model), "--text", *texts, "--tokens", str(tokens), "-o", str(calib)]
        if qmoe_main(args) != 0:
            raise SystemExit(f"calibration of {model} failed")
        args = [
            "train-predictors",
            str(model),
            "--data",
            str(calib),
            "-o",
            str(sidecar),
            "--epochs",
            str(epochs),
            "--device",
            "cpu",
            "--type",
            "q8_0",
        ] + (["--hidden", str(hidden)] if hidden else [])
        if qmoe_main(args) != 0:
            raise SystemExit(f"training predictors for {model} failed")
    return sidecar


def predictors_for(model: Path, sidecars: list[Path], tokens: int, hidden: int | None, epochs: int) -> Path:
    """The first of `sidecars` that holds predictors for `model`; else trains them into the last."""
    identity = model_identity(model)
    for sidecar in sidecars:
        if sidecar.exists():
            try:
                load_sidecar(sidecar, identity)
                return sidecar
            except PredictorMismatchError:
                continue
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return train_predictors(model, sidecars[-1], tokens, hidden, epochs)


def tiny_model() -> tuple[Path, Path] | None:
    """models/tiny-qwen3moe as GGUF, and its predictors; None when the checkpoint is not there.

    The model's own sidecar (models/tiny-qwen3moe.pred.gguf) is used when it exists;
    otherwise the bench trains predictors into its cache, leaving models/ alone.
    """
    hf = MODELS_DIR / "tiny-qwen3moe"
    gguf_path = MODELS_DIR / "tiny-qwen3moe.gguf"
    if not gguf_path.exists():
        if not (hf / "config.json").exists():
            print(f"skipping the tiny model: {hf} does not exist (train it with bench/train_tiny_moe.py)")
            return None
        from convert.to_gguf import convert

        convert(hf, gguf_path, outtype="q8_0", progress=False)
    sidecars = [default_sidecar_path(gguf_path), CACHE_DIR / "tiny-qwen3moe.pred.gguf"]
    return gguf_path, predictors_for(gguf_path, sidecars, tokens=20_000, hidden=None, epochs=10)


def a3b_model() -> Path:
    """The random-weight GGUF with Qwen3-30B-A3B's layer shapes (written once, then reused)."""
    path = CACHE_DIR / f"qwen3-a3b-shapes-random-{A3B.n_layers}l.gguf"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        write_random_moe(path, A3B, "random weights with Qwen3-30B-A3B layer shapes")
    return path


def a3b_with_predictors() -> tuple[Path, Path]:
    path = a3b_model()
    return path, predictors_for(path, [default_sidecar_path(path)], tokens=20_000, hidden=None, epochs=10)


# ----------------------------------------------------------------------------- runs


def text_ids(model: qmoe.Model, n: int) -> list[int]:
    """The first `n` tokens of a standard-library file: text like the calibration text."""
    text = stdlib_texts(40)[-1].read_text(encoding="utf-8", errors="replace")
    ids = model.tokenize(text)[:n]
    assert len(ids) == n, "the benchmark text is too short"
    return ids


def decode(model: qmoe.Model, prompt: list[int], continuation: list[int], observer=None) -> float:
    """Prefill `prompt`, then feed `continuation` one token per step; returns the decode seconds.

    The decode steps are teacher-forced (each feeds the text's next token instead of
    the model's choice): every run then does identical work with the routing of real
    text, even on a random model whose greedy output repeats one token forever. A step
    costs what a generated token costs. The store's statistics are reset after the
    prefill, so they cover the decode steps only.
    """
    cache = model.new_cache()
    model.eval(prompt, cache, observer)
    if model.store is not None:
        model.offload.reset_stats()  # once the prefill's prefetches have settled
    start = time.perf_counter()
    for token in continuation:
        model.eval([token], cache, observer)
    return time.perf_counter() - start


SWEEP_LATENCY_US = 10.0


def link_tier(gbps: float) -> str:
    return f"link-{gbps:g}"


def tier_config(tier: str) -> dict:
    """The store options of a tier setup: one of TIERS, or link-X (--link-sweep)."""
    if tier.startswith("link-"):
        return dict(fast_tier=True, on_miss="wait", link=SimulatedLink(float(tier[5:]), SWEEP_LATENCY_US))
    return dict(TIERS[tier])


def options(
    tier: str, budget: int, label: str, k_prime: int | str | None, predictors: Path, n_layer: int, predict_in: str = "auto",
    device: str = "cpu",
) -> OffloadOptions:
    """The store options of one run: `label` is one of POLICIES. A fast tier is in GPU memory
    with --device cuda, else the simulated one in CPU memory."""
    policy, lookahead = POLICIES[label]
    config = tier_config(tier)
    share = f"{budget}%"
    if config.pop("fast_tier", False):
        config["gpu_budget" if device == "cuda" else "sim_fast_budget"] = share
    else:
        config["ram_budget"] = share
    k_prime = k_prime if policy in ("cross-layer", "pre-attn") and k_prime != AUTO_K else None
    lookahead = n_layer if lookahead == TOKEN else lookahead
    return OffloadOptions(
        prefetch=policy,
        k_prime=k_prime,
        lookahead=lookahead,
        predict_in=predict_in,
        predictors=str(predictors),
        **config,
    )


def measure(
    path: Path,
    opts: OffloadOptions,
    prompt: list[int],
    continuation: list[int],
    trace: RoutingTrace,
    device: str = "cpu",
) -> dict:
    """One run with a fresh store. The oracle replays `trace`; the first run of a tier setup records it."""
    with qmoe.load(path, device=device, offload=opts) as m:
        recorder = None
        if opts.prefetch == "oracle":
            m.replay_routing(trace)
        elif not trace.calls:
            recorder = TraceRecorder(trace)
        seconds = decode(m, prompt, continuation, recorder)
        stats = m.offload_stats()
    t = stats["total"]
    return dict(
        tokens_per_s=len(continuation) / seconds,
        stall_s=stats["stall_s"],
        hit_rate=t["hit_rate"],
        precision=t["precision"],
        recall=t["recall"],
        predict_share=stats["prefetch"]["predict_s"] / seconds,  # the predictor's time / decode time
        stats=stats,
    )


def run_model(
    name: str,
    path: Path,
    predictors: Path,
    tiers: list[str],
    budgets: list[int],
    n_prompt: int,
    n_decode: int,
    repeats: int,
    k_prime: int | str | None,
    device: str = "cpu",
    predict_in: str = "auto",
) -> list[dict]:
    """Every tier setup, budget and policy; each run `repeats` times (policies in alternating
    order, so that a slow spell of a shared machine does not hit one policy only), keeping the fastest."""
    results = []
    with qmoe.load(path, device=device) as plain:
        ids = text_ids(plain, n_prompt + n_decode)
        prompt, continuation = ids[:n_prompt], ids[n_prompt:]
        if k_prime != AUTO_K:
            k_prime = k_prime or plain.net.hp.n_expert_used
        n_layer = plain.net.hp.n_layer
        decode(plain, prompt, continuation[:2])  # compile and warm up
        seconds = min(decode(plain, prompt, continuation) for _ in range(repeats))
        results.append(
            dict(
                model=name,
                tier="file",
                budget=100,
                policy="no store",
                tokens_per_s=n_decode / seconds,
                stall_s=0.0,
                hit_rate=None,
            )
        )
        print(f"{name}: no store: {n_decode / seconds:.2f} tokens/s", flush=True)
    for tier in tiers:
        trace = RoutingTrace()  # recorded by the first run of this tier setup, replayed by the oracle
        for budget in budgets:
            best: dict[str, dict] = {}
            for repeat in range(repeats):
                for policy in POLICIES if repeat % 2 == 0 else reversed(POLICIES):
                    opts = options(tier, budget, policy, k_prime, predictors, n_layer, predict_in, device)
                    row = measure(path, opts, prompt, continuation, trace, device)
                    if policy not in best or row["tokens_per_s"] > best[policy]["tokens_per_s"]:
                        best[policy] = row
            for policy in POLICIES:
                row = dict(model=name, tier=tier, budget=budget, policy=policy, prefetch=POLICIES[policy][0],
                           lookahead=POLICIES[policy][1]) | best[policy]
                results.append(row)
                print(
                    f"{name} {tier:5} {budget:3}% {policy:12}: {row['tokens_per_s']:7.2f} tokens/s, "
                    f"stall {1e3 * row['stall_s']:8.1f} ms, hit {100 * (row['hit_rate'] or 0):5.1f}%"
                    + (f", recall {100 * row['recall']:5.1f}%" if row["recall"] is not None else ""),
                    flush=True,
                )
    return results


# ----------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    """Markdown: tokens/s (stall ms) per model/tier/budget and policy, plus the 25% target ratios
    (pre-attn at lookahead 0 and 1, each against none and against the oracle on the same schedule)."""
    lines = [
        "| model | tier | budget | " + " | ".join(POLICIES) + " | pre-attn / none | pre-attn / oracle "
        "| pre-attn+1 / none | pre-attn+1 / oracle+1 |",
        "|---|---|---|" + "---|" * (len(POLICIES) + 4),
    ]
    rows: dict[tuple, dict] = {}
    for r in results:
        if r["policy"] in POLICIES:
            rows.setdefault((r["model"], r["tier"], r["budget"]), {})[r["policy"]] = r
    for (model, tier, budget), by_policy in rows.items():
        cells = [
            f"{by_policy[p]['tokens_per_s']:.1f} ({1e3 * by_policy[p]['stall_s']:.0f})"
            if p in by_policy
            else "-"
            for p in POLICIES
        ]
        speed = {p: by_policy.get(p, {}).get("tokens_per_s") for p in POLICIES}
        ratios = [
            f"{speed[a] / speed[b]:.2f}x" if speed[a] and speed[b] else "-"
            for a, b in (("pre-attn", "none"), ("pre-attn", "oracle"), ("pre-attn+1", "none"),
                         ("pre-attn+1", "oracle+1"))
        ]
        lines.append(f"| {model} | {tier} | {budget}% | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Decode tokens/s against budget: one panel per model (rows) and tier setup (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    tiers = [t for t in TIERS if any(r["tier"] == t for r in results)]
    if not tiers:
        return
    fig, axes = plt.subplots(
        len(models), len(tiers), figsize=(4.2 * len(tiers), 3.4 * len(models)), squeeze=False
    )
    for row, model in enumerate(models):
        plain = [r["tokens_per_s"] for r in results if r["model"] == model and r["policy"] == "no store"]
        for ax, tier in zip(axes[row], tiers):
            for policy in POLICIES:
                points = sorted(
                    (r["budget"], r["tokens_per_s"])
                    for r in results
                    if (r["model"], r["tier"], r["policy"]) == (model, tier, policy)
                )
                if points:
                    ax.plot(*zip(*points), marker="o", label=policy)
            if plain and tier == "ram":
                ax.axhline(plain[0], color="gray", linestyle=":", label="no store")
            ax.set_title(f"{model}, {tier}")
            ax.set_xlabel("budget (% of experts)")
            ax.set_ylabel("decode tokens/s")
            ax.set_xticks(BUDGETS)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_links(results: list[dict], path: Path) -> None:
    """Speed-up over on-demand loading against the simulated link's speed: one panel per model and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["budget"]) for r in results if r["tier"].startswith("link-")})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (model, budget) in zip(axes[0], panels):
        rows = [r for r in results if r["tier"].startswith("link-") and (r["model"], r["budget"]) == (model, budget)]
        speed = {(r["tier"], r["policy"]): r["tokens_per_s"] for r in rows}
        links = sorted({r["tier"] for r in rows}, key=lambda t: float(t[5:]))
        for policy in POLICIES:
            if policy == "none":
                continue
            points = [(float(t[5:]), speed[t, policy] / speed[t, "none"]) for t in links if (t, policy) in speed]
            ax.plot(*zip(*points), marker="o", label=f"{policy} / none")
        ax.axhline(1.5, color="gray", linestyle=":", label="1.5x")
        ax.set_xscale("log")
        ax.set_title(f"{model}, fast tier {budget}% of experts")
        ax.set_xlabel(f"simulated link GB/s (+{SWEEP_LATENCY_US:g} us per transfer)")
        ax.set_ylabel("decode tokens/s relative to none")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "a3b"), default=["tiny", "a3b"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="qmoe.load's device (default cpu)")
    parser.add_argument(
        "--tiers",
        nargs="*",
        choices=tuple(TIERS),
        default=None,
        help=f"tier setups (default: {' '.join(CPU_TIERS)}; with --device cuda {' '.join(CUDA_TIERS)})",
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--decode", type=int, default=None, help="decode tokens (default: tiny 64, a3b 32)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="kernel threads (default: tiny 1, a3b 2; see KERNEL_THREADS)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per point; the fastest counts (default 3)"
    )
    parser.add_argument(
        "--k-prime",
        type=lambda v: v if v == AUTO_K else int(v),
        default=None,
        help="experts prefetched per token by cross-layer and pre-attn (default k); auto: qmoe's "
        "default, the ranks right more often than wrong (experts/admission.py)",
    )
    parser.add_argument(
        "--predict-in",
        choices=PREDICT_IN,
        default="auto",
        help="where predictions run (qmoe run --predict-in; default auto: the model's thread on the CPU)",
    )
    parser.add_argument(
        "--link-sweep",
        nargs="*",
        type=float,
        default=[],
        metavar="GB_S",
        help=f"also run the fast tier behind a simulated link of each speed (+{SWEEP_LATENCY_US:g} us)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.tiers is None:
        args.tiers = list(CUDA_TIERS if args.device == "cuda" else CPU_TIERS)
    args.tiers += [link_tier(g) for g in args.link_sweep]

    # numba's kernels take the cores; torch gets one thread: its work here is small (one token's
    # attention, norms, the predictors) and the prefetch worker's share should not spread over
    # the cores the kernels use.
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for name in args.models:
        model = tiny_model() if name == "tiny" else a3b_with_predictors()
        if model is None:
            continue
        qmoe_kernels.set_num_threads(args.threads or KERNEL_THREADS[name])
        n_decode = args.decode or (64 if name == "tiny" else 32)
        results += run_model(
            name,
            *model,
            args.tiers,
            args.budgets,
            args.prompt,
            n_decode,
            args.repeats,
            args.k_prime,
            args.device,
            args.predict_in,
        )
    summary = dict(
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            threads=args.threads or KERNEL_THREADS,
            python=platform.python_version(),
            torch=torch.__version__,
            device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            predict_in=args.predict_in,
        ),
        seconds=time.perf_counter() - started,
        results=results,
    )
    (args.out / "offload.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot([r for r in results if not r["tier"].startswith("link-")], args.out / "offload.png")
    plot_links(results, args.out / "offload-links.png")
    print(table(results))
    print(f"wrote {args.out} in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
