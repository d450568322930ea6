"""Predictor accuracy on the trained tiny model: the baselines, and how accuracy grows.

1. Records calibration data from the model on text it was not trained on: the
   standard library files that bench/train_tiny_moe.py held out for validation.
2. A sweep: pre-attn exact match (held-out tokens, averaged over MoE layers, and the
   first MoE layer) as calibration tokens, predictor width and epochs grow.
3. The chosen configuration against every baseline (`qmoe eval-predictors`'s
   methods), as a table, JSON and a PNG plot by layer.
4. The predictor's run-time cost: the per-token forward of all layers' predictors
   as a share of the model's decode step, on this model and on the Qwen3-30B-A3B
   bench shapes.

    python -m bench.predictors [--model models/tiny-qwen3moe.gguf] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qmoe  # noqa: E402
from bench.train_tiny_moe import split_by_file, stdlib_corpus_files  # noqa: E402
from qmoe.predictor.calib_data import CalibData  # noqa: E402
from qmoe.predictor.calibrate import calibration_router_weights, record, tokenize_files  # noqa: E402
from qmoe.predictor.evaluate import evaluate, format_table, plot_exact_match, write_json  # noqa: E402
from qmoe.predictor.model import (  # noqa: E402
    INPUT_PRE_ATTN,
    INPUT_PREV_ROUTER,
    build_predictor,
    fold_batchnorm,
    predict_scores,  # noqa: E402
)
from qmoe.predictor.train import train_all  # noqa: E402


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
    """Median decode step with and without every layer's predictor forward, one thread."""
    hp = model.net.hp
    net = build_predictor(hp.n_embd, hp.n_expert, hidden).eval()
    weights = fold_batchnorm(net)
    cache = model.new_cache()
    model.eval(model.tokenize("def main("), cache)
    step, pred = [], []
    x = torch.randn(1, hp.n_embd)
    for i in range(steps):
        t0 = time.perf_counter()
        model.eval([100 + i], cache)
        step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in model.net.moe_layers:
            predict_scores(weights, x)
        pred.append(time.perf_counter() - t0)
    s, p = float(np.median(step)), float(np.median(pred))
    return {"hidden": hidden, "decode_step_ms": s * 1e3, "predictors_ms": p * 1e3, "share": p / s}


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
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.epochs = [5000], [64], [2]
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = qmoe.load(args.model)
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

    results["cost"] = {"tiny": predictor_cost(model, best["hidden"])}
    if Path(args.bench_model).exists():
        big = qmoe.load(args.bench_model, threads=1, n_ctx=256)
        results["cost"]["qwen3_shapes"] = [predictor_cost(big, h, steps=10) for h in (256, 512, 2048)]
    print(json.dumps(results["cost"], indent=2))
    (out / "predictors.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'predictors.json'}")


if __name__ == "__main__":
    main()
