"""Predictor accuracy on the trained tiny model: the baselines, and how accuracy grows.

1. Records calibration data from the model on text it was not trained on: the
   standard library files that bench/train_tiny_moe.py held out for validation.
2. A sweep: pre-attn exact match (held-out tokens, averaged over MoE layers, and the
   first MoE layer) as calibration tokens, predictor width and epochs grow.
3. The chosen configuration against every baseline (`qmoe eval-predictors`'s
   methods), as a table, JSON and a PNG plot by layer.
4. The predictor's run-time cost: the per-token forward of all layers' predictors
   as the runtime runs them on the CPU, as a share of the model's decode step (one
   thread for both), on this model and on the Qwen3-30B-A3B bench shapes.

5. The ceiling of the first MoE layer: its input is a function of the token alone,
   so no predictor can beat the best fixed k'-set per token (`first_layer_ceiling`).

    python -m bench.predictors [--model models/tiny-qwen3moe.gguf] [--quick] [--cost-only]
    python -m bench.predictors --ceiling-only --data CALIB_DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qmoe  # noqa: E402
from bench.train_tiny_moe import split_by_file, stdlib_corpus_files  # noqa: E402
from qmoe import kernels  # noqa: E402
from qmoe.predictor.calib_data import CalibData  # noqa: E402
from qmoe.predictor.calibrate import calibration_router_weights, record, tokenize_files  # noqa: E402
from qmoe.predictor.evaluate import evaluate, format_table, plot_exact_match, write_json  # noqa: E402
from qmoe.predictor.metrics import default_k_prime  # noqa: E402
from qmoe.predictor.model import INPUT_PRE_ATTN, INPUT_PREV_ROUTER, build_predictor, fold_batchnorm  # noqa: E402
from qmoe.predictor.train import train_all  # noqa: E402

Q8_0 = GGMLQuantizationType.Q8_0


def calibrate(model, out: Path, tokens: int) -> CalibData:
    if out.exists():
        shutil.rmtree(out)
    _, files = stdlib_corpus_files()
    _, validation = split_by_file(files)
    record(model, tokenize_files(model, validation), out, tokens)
    return CalibData(out)


def score(calib: CalibData, routers, **options) -> dict:
    predictors, _ = train_all(calib, input=INPUT_PRE_ATTN, progress=False, **options)
    result = evaluate(calib, predictors, routers)
    first = result["first_layer"]["methods"]["pre-attn"]
    mean = result["average_all_layers"]["pre-attn"]
    return {"exact_all_layers": mean["exact_match"], "exact_first_layer": first["exact_match"],
            "overprov_first_layer": first["overprovisioned_exact_match"]}


def predictor_cost(model, hidden: int, steps: int = 30) -> dict:
    """Median decode step, and median time of every MoE layer's predictor forward for one token as
    the runtime runs it on the CPU (`kernels.MLPTopK` on q8_0 weights, one thread, top-k')."""
    hp = model.net.hp
    weights = fold_batchnorm(build_predictor(hp.n_embd, hp.n_expert, hidden).eval())
    fc1, fc2 = (np.ascontiguousarray(quantize(w.numpy(), Q8_0)) for w in (weights.fc1_weight, weights.fc2_weight))
    b1, b2 = weights.fc1_bias.numpy(), weights.fc2_bias.numpy()
    k_prime = default_k_prime(hp.n_expert_used)
    cache = model.new_cache()
    model.eval(model.tokenize("def main("), cache)
    step, pred = [], []
    x = np.random.default_rng(0).normal(size=(1, hp.n_embd)).astype(np.float32)
    predictor = kernels.MLPTopK(fc1, Q8_0, b1, fc2, Q8_0, b2, weights.activation)
    for i in range(steps):
        t0 = time.perf_counter()
        model.eval([100 + i], cache)
        step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in model.net.moe_layers:
            predictor(x, k_prime)
        pred.append(time.perf_counter() - t0)
    s, p = float(np.median(step)), float(np.median(pred))
    return {"hidden": hidden, "decode_step_ms": s * 1e3, "predictors_ms": p * 1e3, "share": p / s}


def first_layer_ceiling(calib: CalibData, k_prime: int) -> dict:
    """The best over-provisioned exact match ANY predictor of block 0 can reach on `calib`.

    Block 0's pre-attention activation is attn_norm(embedding of the current token): a
    function of the token alone, so a predictor of block 0 can at best name, for each
    token, one set of k' experts. The best set per token is found exactly (every k'-subset
    of the E experts scored against the token's recorded top-k sets), and the share of
    all recorded tokens it covers is a ceiling that no width, data or training can pass
    (measured in-sample, so if anything optimistic). Exact search: small E only.
    """
    meta = calib.meta
    if calib.moe_layers[0] != 0 or meta.n_expert > 20:
        raise SystemExit("the ceiling needs block 0 to be an MoE layer and at most 20 experts")
    x, topk = calib.x_pre(0), np.asarray(calib.topk(0), np.int64)
    n = len(topk)
    # tokens: identical activations (the first 8 values' bytes tell them apart)
    _, token = np.unique(np.ascontiguousarray(x[:, :8]).view(np.uint8).reshape(n, -1), axis=0, return_inverse=True)
    token = token.ravel()
    masks = (1 << topk).sum(axis=1)  # each token's top-k as an expert bitmask
    subsets = list(itertools.combinations(range(meta.n_expert), k_prime))
    inside = np.array([[sum(1 << e for e in s) for s in itertools.combinations(c, meta.k)] for c in subsets])
    order = np.argsort(token, kind="stable")
    starts = np.flatnonzero(np.diff(token[order], prepend=-1))
    covered = 0
    for start, stop in zip(starts, np.append(starts[1:], n)):
        seen, counts = np.unique(masks[order[start:stop]], return_counts=True)
        count_of = np.zeros(1 << meta.n_expert, np.int64)
        count_of[seen] = counts
        covered += count_of[inside].sum(axis=1).max()  # the best k'-set for this token
    return {"k_prime": k_prime, "tokens": n, "distinct_tokens": len(starts), "ceiling": covered / n}


def cost_table(model, bench_model: str) -> dict:
    """The predictors' cost at several widths on this model and, if present, the bench shapes."""
    cost = {"tiny": [predictor_cost(model, h) for h in (64, 256, 1024)]}
    if Path(bench_model).exists():
        big = qmoe.load(bench_model, n_ctx=256)
        cost["qwen3_shapes"] = [predictor_cost(big, h, steps=10) for h in (256, 512, 1024, 2048)]
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-qwen3moe.gguf")
    parser.add_argument("--out", default="bench/results/predictors")
    parser.add_argument("--tokens", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--bench-model", default="/tmp/qmoe-bench/qwen3-30b-a3b-shapes-8L.gguf",
                        help="GGUF with Qwen3-30B-A3B shapes for the cost measurement (bench/bench_model.py)")
    parser.add_argument("--quick", action="store_true", help="small sweep, for a smoke run")
    parser.add_argument("--cost-only", action="store_true", help="only the run-time cost (cost.json)")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the first-layer ceiling of the recording --data (ceiling.json)")
    parser.add_argument("--data", default=None, metavar="CALIB_DIR", help="recording for --ceiling-only")
    args = parser.parse_args()
    if args.ceiling_only:
        calib = CalibData(args.data)
        ceiling = first_layer_ceiling(calib, default_k_prime(calib.meta.k))
        print(json.dumps(ceiling, indent=2))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ceiling.json").write_text(json.dumps(ceiling, indent=2) + "\n")
        return
    if args.quick:
        args.tokens, args.hidden, args.epochs = [5000], [64], [2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The cost is measured with one thread for everything: the share a predictor takes of a core.
    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    model = qmoe.load(args.model)
    if args.cost_only:
        cost = cost_table(model, args.bench_model)
        print(json.dumps(cost, indent=2))
        (out / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
        return
    torch.set_num_threads(2)
    routers = calibration_router_weights(model)
    results: dict = {"model": args.model, "sweep": []}

    calibs = {n: calibrate(model, out / f"calib-{n}", n) for n in args.tokens}
    # One axis at a time around a base: the most tokens, the middle width and epoch count.
    base_tokens, base_hidden, base_epochs = max(args.tokens), args.hidden[len(args.hidden) // 2], \
        args.epochs[len(args.epochs) // 2]
    configs = ([(n, base_hidden, base_epochs) for n in args.tokens]
               + [(base_tokens, h, base_epochs) for h in args.hidden if h != base_hidden]
               + [(base_tokens, base_hidden, e) for e in args.epochs if e != base_epochs])
    for tokens, hidden, epochs in configs:
        t0 = time.perf_counter()
        row = {"tokens": tokens, "hidden": hidden, "epochs": epochs,
               **score(calibs[tokens], routers, hidden=hidden, epochs=epochs, patience=epochs)}
        row["train_s"] = time.perf_counter() - t0
        results["sweep"].append(row)
        print(json.dumps(row), flush=True)

    best = max(results["sweep"], key=lambda r: r["exact_all_layers"])
    results["chosen"] = {k: best[k] for k in ("tokens", "hidden", "epochs")}
    calib = calibs[best["tokens"]]
    options = dict(hidden=best["hidden"], epochs=best["epochs"], patience=3, progress=False)
    predictors, _ = train_all(calib, input=INPUT_PRE_ATTN, **options)
    cross, _ = train_all(calib, input=INPUT_PREV_ROUTER, **options)
    full = evaluate(calib, predictors, routers, cross_layer_predictors=cross)
    results["evaluation"] = full
    print(format_table(full))
    write_json(full, out / "eval.json")
    plot_exact_match(full, out / "exact_match_by_layer.png")

    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    results["cost"] = cost_table(model, args.bench_model)
    results["first_layer_ceiling"] = first_layer_ceiling(calib, default_k_prime(calib.meta.k))
    print(json.dumps(results["cost"], indent=2))
    (out / "predictors.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'predictors.json'}")


if __name__ == "__main__":
    main()
