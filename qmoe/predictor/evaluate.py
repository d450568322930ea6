"""Measuring the predictors against the baselines on held-out calibration tokens.

Methods, named exactly so in the results (paper.md, "Baselines"):
    pre-attn             ours: layer l's trained predictor on layer l's attn_norm output
    cross-layer-gate     layer l's router applied to the previous MoE layer's router input
                         (FATE-style, training-free; absent for the first MoE layer)
    same-layer-gate      layer l's router applied to layer l's attn_norm output (training-free)
    cross-layer-trained  the same predictor trained on the previous MoE layer's router input
                         (absent for the first MoE layer, and when not given)
    frequency            the experts layer l used most on the training split, for every token

Every method is scored on the same tokens: the held-out part of `split_tokens`
with the fraction the predictors were trained with, so no token that trained a
predictor or chose its stopping epoch is evaluated. The gate baselines rank
experts by router logit, which is the router's own order for softmax routing.

As a check on the recording itself, each layer's router is also applied to its
own recorded input (x_router): that must reproduce the recorded top-k almost
always ("router_check"); a low value means the recording is wrong, not the predictor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from qmoe.errors import PredictorMismatchError, QmoeError
from qmoe.predictor.calib_data import CalibData, split_tokens
from qmoe.predictor.metrics import METRICS, all_metrics, exact_match
from qmoe.predictor.model import INPUT_PRE_ATTN, INPUT_PREV_ROUTER, PredictorSet

METHODS = ("pre-attn", "cross-layer-gate", "same-layer-gate", "cross-layer-trained", "frequency")
CHUNK = 8192  # tokens per step, so memory stays bounded on millions of held-out tokens


def _scores_in_chunks(
    x: np.ndarray, rows: np.ndarray, score: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """score(x[rows]) [len(rows), E] computed CHUNK rows at a time from a memmap."""
    return np.concatenate(
        [score(np.asarray(x[rows[i : i + CHUNK]], dtype=np.float32)) for i in range(0, len(rows), CHUNK)]
    )


def _gate(router: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x @ router.T  # [T, D] @ [D, E] -> router logits [T, E]


def _predictor(predictors: PredictorSet, layer: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: predictors.predict(layer, torch.from_numpy(x)).cpu().numpy()


def _check_predictors(calib: CalibData, predictors: PredictorSet, expected_input: str, role: str) -> None:
    if predictors.model_identity != calib.meta.model_identity:
        raise PredictorMismatchError(
            f"{role} predictors were trained for model {predictors.model_identity[:16]}..., but the calibration "
            f"data in {calib.root} comes from model {calib.meta.model_identity[:16]}..."
        )
    if predictors.input != expected_input:
        raise QmoeError(f"{role} predictors read {predictors.input!r}, expected {expected_input!r}")


def evaluate(
    calib: CalibData,
    predictors: PredictorSet,
    router_weights: Mapping[int, np.ndarray],
    cross_layer_predictors: PredictorSet | None = None,
    k_prime: int | None = None,
) -> dict:
    """Metrics per layer and method on held-out tokens; see the module docstring for the methods.

    router_weights: MoE layer -> its router matrix (ffn_gate_inp) [E, n_embd], float32.
    k_prime: over-provisioning for `overprovisioned_exact_match` (default: the predictors' k').
    Returns a JSON-ready dict: "layers" (per layer, per method, every metric),
    "first_layer" (the first MoE layer on its own), "average" (mean over the layers
    where cross-layer-gate exists, i.e. all but the first), "average_all_layers"
    (mean over every layer, for the methods that exist in every layer), and
    "router_check" (see the module docstring).
    """
    meta = calib.meta
    _check_predictors(calib, predictors, INPUT_PRE_ATTN, "pre-attn")
    if cross_layer_predictors is not None:
        _check_predictors(calib, cross_layer_predictors, INPUT_PREV_ROUTER, "cross-layer-trained")
        if cross_layer_predictors.heldout_fraction != predictors.heldout_fraction:
            raise QmoeError(
                f"the pre-attn predictors held out {predictors.heldout_fraction} of the tokens, the cross-layer "
                f"ones {cross_layer_predictors.heldout_fraction}: train both with the same split"
            )
    k_prime = k_prime or predictors.k_prime
    train_rows, heldout_rows = split_tokens(calib.n_tokens, predictors.heldout_fraction)
    if len(heldout_rows) == 0:
        raise QmoeError(f"{calib.root}: {calib.n_tokens} tokens leave no held-out tokens to evaluate on")

    per_layer: dict[str, dict[str, dict[str, float]]] = {}
    router_check: dict[str, float] = {}
    for layer in meta.moe_layers:
        if layer not in router_weights:
            raise QmoeError(f"no router weights given for MoE layer {layer}")
        router = np.asarray(router_weights[layer], dtype=np.float32)
        if router.shape != (meta.n_expert, meta.n_embd):
            raise QmoeError(
                f"router of layer {layer} has shape {list(router.shape)}, "
                f"expected [{meta.n_expert}, {meta.n_embd}]"
            )
        if layer not in predictors.layers:
            raise QmoeError(f"the pre-attn predictors have no predictor for MoE layer {layer}")
        true_topk = np.asarray(calib.topk(layer)[heldout_rows])  # [H, k]
        previous = calib.previous_moe_layer(layer)

        scores = {
            "pre-attn": _scores_in_chunks(calib.x_pre(layer), heldout_rows, _predictor(predictors, layer))
        }
        if previous is not None:
            scores["cross-layer-gate"] = _scores_in_chunks(
                calib.x_router(previous), heldout_rows, _gate(router)
            )
        scores["same-layer-gate"] = _scores_in_chunks(calib.x_pre(layer), heldout_rows, _gate(router))
        if cross_layer_predictors is not None and layer in cross_layer_predictors.layers:
            scores["cross-layer-trained"] = _scores_in_chunks(
                calib.x_router(previous), heldout_rows, _predictor(cross_layer_predictors, layer)
            )
        usage = np.bincount(np.asarray(calib.topk(layer)[train_rows]).ravel(), minlength=meta.n_expert)  # [E]
        scores["frequency"] = np.broadcast_to(usage.astype(np.float32), (len(heldout_rows), meta.n_expert))

        per_layer[str(layer)] = {name: all_metrics(s, true_topk, k_prime) for name, s in scores.items()}
        own_input = _scores_in_chunks(calib.x_router(layer), heldout_rows, _gate(router))
        router_check[str(layer)] = exact_match(own_input, true_topk)

    first = str(meta.moe_layers[0])
    return {
        "model_identity": meta.model_identity,
        "k": meta.k,
        "k_prime": k_prime,
        "n_expert": meta.n_expert,
        "n_train_tokens": len(train_rows),
        "n_heldout_tokens": len(heldout_rows),
        "methods": [m for m in METHODS if any(m in methods for methods in per_layer.values())],
        "layers": per_layer,
        "first_layer": {"layer": int(first), "methods": per_layer[first]},
        "average": _average([per_layer[str(layer)] for layer in meta.moe_layers[1:]]),
        "average_all_layers": _average(list(per_layer.values())),
        "router_check": router_check,
    }


def _average(layers: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every metric over `layers`, for the methods present in all of them."""
    if not layers:
        return {}
    common = [m for m in METHODS if all(m in methods for methods in layers)]
    return {
        m: {metric: float(np.mean([methods[m][metric] for methods in layers])) for metric in METRICS}
        for m in common
    }


def format_table(result: dict) -> str:
    """Terminal report: exact match by layer for every method, then the first layer and the average in full."""
    methods = result["methods"]
    width = max(len(m) for m in methods) + 2
    lines = [
        f"held-out tokens: {result['n_heldout_tokens']}, k={result['k']}, k'={result['k_prime']}",
        "",
        "exact match (%) by layer",
        "layer " + "".join(f"{m:>{width}}" for m in methods),
    ]
    for layer, by_method in result["layers"].items():
        cells = [f"{100 * by_method[m]['exact_match']:.1f}" if m in by_method else "-" for m in methods]
        lines.append(f"{layer:>5} " + "".join(f"{c:>{width}}" for c in cells))
    headers = ("exact", f"over-prov (k'={result['k_prime']})", "top-1", "recall@k")
    for title, by_method in (
        (f"first MoE layer ({result['first_layer']['layer']})", result["first_layer"]["methods"]),
        ("average over layers with a previous MoE layer", result["average"]),
    ):
        if not by_method:
            continue
        lines += ["", title, f"{'method':<{width}}" + "".join(f"{h:>20}" for h in headers)]
        for m in methods:
            if m in by_method:
                lines.append(
                    f"{m:<{width}}" + "".join(f"{100 * by_method[m][metric]:>20.2f}" for metric in METRICS)
                )
    worst = min(result["router_check"].items(), key=lambda item: item[1])
    lines += [
        "",
        f"router reproduces its recorded top-k from x_router: lowest {100 * worst[1]:.2f}% (layer {worst[0]})",
    ]
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot_exact_match(result: dict, path: str | os.PathLike) -> None:
    """PNG: exact match by layer, one line per method."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise QmoeError("plotting needs matplotlib: pip install 'qmoe[bench]'") from e
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for method in result["methods"]:
        layers = [int(layer) for layer, by_method in result["layers"].items() if method in by_method]
        values = [100 * result["layers"][str(layer)][method]["exact_match"] for layer in layers]
        ax.plot(layers, values, marker="o", markersize=3, label=method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"top-{result['k']} of {result['n_expert']} experts, {result['n_heldout_tokens']} held-out tokens"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
