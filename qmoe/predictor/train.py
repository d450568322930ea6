"""Training expert predictors on a calibration recording (paper.md, "Training").

Target: multi-label, 1 for the experts the router chose. Loss, per token:

    weighted BCE over all E experts, weight by the expert's router rank:
        3.0 for ranks 1..top, 1.5 for ranks top+1..mid, 0.5 for the rest
  + 0.3 x mean over pairs (i above j) inside ranks 1..top of relu(0.1 - (p_i - p_j))

on raw predictor scores p. Router rank: the chosen experts first, then the others,
each group by descending router logit (the chosen set is the label, so it must lead
the ranking even for routers whose choice is not the plain top-k of the logits).

Rank tiers. The paper uses top=10, mid=30 for E=64 (k=6) and E=128 (k=8). We keep
those for E >= 64 and scale them with E below that, never letting the top tier be
narrower than 1.25 k (it must cover the chosen experts and the near-misses that
over-provisioning picks up):

    top = min(E, max(ceil(1.25 k), round(10 * min(E, 64) / 64)))
    mid = min(E, 3 * top)

e.g. E=128,k=8 -> (10, 30); E=64,k=6 -> (10, 30); E=16,k=2 -> (3, 9); E=8,k=2 -> (3, 8).

Splits. `split_tokens` holds out a fraction of the recording for evaluation
(evaluate.py uses the same call); the rest is split again, the same way, into the
tokens the optimizer sees and a validation set for early stopping, so the
reported numbers come from tokens that influenced neither weights nor stopping.

The cross-layer-trained baseline is the same net and loss fed, for layer l, the
router input (ffn_norm output) of the previous MoE layer: the tensor the
cross-layer gate baseline also uses, so the two cross-layer baselines differ only
by training, and pre-attn vs cross-layer-trained differ only by the input. The
first MoE layer has no such input and gets no cross-layer predictor.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from qmoe.errors import QmoeError
from qmoe.predictor.calib_data import DEFAULT_HELDOUT_FRACTION, CalibData, split_tokens
from qmoe.predictor.metrics import default_k_prime, exact_match
from qmoe.predictor.model import (
    INPUT_PRE_ATTN,
    INPUTS,
    PredictorSet,
    build_predictor,
    default_hidden,
    fold_batchnorm,
)

TIER_WEIGHTS = (3.0, 1.5, 0.5)  # top tier, middle tier, rest
HINGE_WEIGHT = 0.3
HINGE_MARGIN = 0.1
EVAL_CHUNK = 8192  # tokens per forward when scoring the validation set


def rank_tiers(n_expert: int, k: int) -> tuple[int, int]:
    """(top, mid): router ranks 1..top get the top weight, top+1..mid the middle one (module docstring)."""
    top = min(n_expert, max(math.ceil(1.25 * k), round(10 * min(n_expert, 64) / 64)))
    return top, min(n_expert, 3 * top)


def router_order(scores: torch.Tensor, topk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts by router rank [B, E] (chosen first, each group by logit) and the label mask [B, E]."""
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, topk, True)  # [B, E]
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)  # [B, E]
    chosen_first = torch.argsort((~chosen.gather(1, by_score)).to(torch.uint8), dim=1, stable=True)
    return by_score.gather(1, chosen_first), chosen


def predictor_loss(
    pred: torch.Tensor, scores: torch.Tensor, topk: torch.Tensor, tiers: tuple[int, int]
) -> torch.Tensor:
    """Weighted BCE + HINGE_WEIGHT x pairwise ranking hinge; pred, scores [B, E], topk [B, k]."""
    top, mid = tiers
    order, chosen = router_order(scores, topk)  # [B, E], [B, E]
    n_expert = scores.shape[1]
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n_expert, device=order.device).expand_as(order)
    )
    weight = torch.full_like(pred, TIER_WEIGHTS[2])
    weight[rank < mid] = TIER_WEIGHTS[1]
    weight[rank < top] = TIER_WEIGHTS[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, chosen.float(), weight=weight)

    p_top = pred.gather(1, order[:, :top])  # [B, top], in router order
    above = torch.triu(torch.ones(top, top, dtype=torch.bool, device=pred.device), diagonal=1)  # pairs i < j
    gaps = (p_top[:, :, None] - p_top[:, None, :])[:, above]  # [B, pairs]: p_i - p_j, i ranked above j
    hinge = torch.relu(HINGE_MARGIN - gaps).mean() if gaps.numel() else pred.new_zeros(())
    return bce + HINGE_WEIGHT * hinge


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def _score(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted scores [N, E] in eval mode, in chunks so the hidden activations stay small."""
    net.eval()
    return torch.cat([net(x[i : i + EVAL_CHUNK].float()) for i in range(0, x.shape[0], EVAL_CHUNK)])


def train_layer(
    x: np.ndarray,
    topk: np.ndarray,
    scores: np.ndarray,
    n_expert: int,
    k: int,
    *,
    hidden: int | None = None,
    arch: int = 1,
    epochs: int = 30,
    lr: float = 1e-3,
    batch: int = 512,
    device: str | None = None,
    val_fraction: float = 0.1,
    patience: int = 3,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[torch.nn.Sequential, list[dict]]:
    """Train one layer's predictor; returns (net with the best weights, in eval mode, on CPU; history).

    x [N, n_embd] (any float dtype; kept as float16 on the device), topk [N, k],
    scores [N, E]. A `val_fraction` of the tokens (split_tokens) is held back for
    early stopping: training stops after `patience` epochs without a better
    validation exact match (ties broken by validation loss), and the best epoch's
    weights are returned. AdamW with a cosine learning-rate decay over `epochs`.
    `on_epoch` receives each history entry as it is made (progress display).
    """
    n_tokens, n_embd = x.shape
    if topk.shape != (n_tokens, k) or scores.shape != (n_tokens, n_expert):
        raise QmoeError(
            f"training data disagree: x {list(x.shape)}, topk {list(topk.shape)} (expected [{n_tokens}, {k}]), "
            f"scores {list(scores.shape)} (expected [{n_tokens}, {n_expert}])"
        )
    train_idx, val_idx = split_tokens(n_tokens, val_fraction)
    if len(val_idx) == 0 or len(train_idx) < 2:
        raise QmoeError(f"{n_tokens} tokens are too few to train a predictor with a validation split")
    device = device or default_device()
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)

    x_all = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16)).to(device)  # [N, D]
    scores_all = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).to(device)  # [N, E]
    topk_all = torch.from_numpy(np.ascontiguousarray(topk, dtype=np.int64)).to(device)  # [N, k]
    train_t = torch.from_numpy(train_idx).to(device)
    val_t = torch.from_numpy(val_idx).to(device)
    x_val, scores_val, topk_val = x_all[val_t], scores_all[val_t], topk_all[val_t]

    hidden = hidden or default_hidden(n_embd)
    net = build_predictor(n_embd, n_expert, hidden, arch).to(device)
    tiers = rank_tiers(n_expert, k)
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    history: list[dict] = []
    best: tuple[float, float] | None = None  # (val exact match, -val loss) of the kept weights
    best_state = copy.deepcopy(net.state_dict())
    stale = 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        net.train()
        permutation = train_t[torch.randperm(len(train_t), generator=shuffle).to(device)]
        total, seen = 0.0, 0
        for start in range(0, len(permutation), batch):
            rows = permutation[start : start + batch]
            if len(rows) < 2:  # BatchNorm cannot normalise a batch of one
                continue
            loss = predictor_loss(net(x_all[rows].float()), scores_all[rows], topk_all[rows], tiers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            seen += len(rows)

        val_pred = _score(net, x_val)  # [V, E]
        val_loss = float(predictor_loss(val_pred, scores_val, topk_val, tiers))
        val_exact = exact_match(val_pred.cpu().numpy(), topk_val.cpu().numpy())
        entry = {
            "epoch": epoch,
            "train_loss": total / max(seen, 1),
            "val_loss": val_loss,
            "val_exact_match": val_exact,
            "seconds": time.perf_counter() - started,
        }
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)

        if best is None or (val_exact, -val_loss) > best:
            best, stale = (val_exact, -val_loss), 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break

    net.load_state_dict(best_state)
    return net.cpu().eval(), history


def train_all(
    calib: CalibData,
    *,
    input: str = INPUT_PRE_ATTN,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    hidden: int | None = None,
    arch: int = 1,
    k_prime: int | None = None,
    progress: bool = True,
    **options,
) -> tuple[PredictorSet, dict[int, list[dict]]]:
    """Train one predictor per MoE layer on the training part of `calib`.

    input: INPUT_PRE_ATTN (ours: layer l's attn_norm output) or INPUT_PREV_ROUTER
    (the cross-layer-trained baseline; the first MoE layer is skipped).
    options: keyword arguments of `train_layer` (epochs, lr, batch, device, ...).
    Returns the exported predictors (BatchNorm folded, float32, CPU) and the
    training history of each layer. Each layer's arrays are loaded into memory
    (or device memory) while that layer trains, one layer at a time.
    """
    if input not in INPUTS:
        raise QmoeError(f"predictor input must be one of {INPUTS}, got {input!r}")
    meta = calib.meta
    hidden = hidden or default_hidden(meta.n_embd)
    train_idx, _ = split_tokens(calib.n_tokens, heldout_fraction)
    predictors = PredictorSet(
        model_identity=meta.model_identity,
        n_embd=meta.n_embd,
        n_expert=meta.n_expert,
        k=meta.k,
        k_prime=k_prime or default_k_prime(meta.k),
        arch=arch,
        input=input,
        heldout_fraction=heldout_fraction,
        # every calibrated token, held-out ones included: this describes the routing, not a fit
        route_counts={layer: np.bincount(np.asarray(calib.topk(layer)).reshape(-1), minlength=meta.n_expert)
                      for layer in calib.moe_layers},
        routed_tokens=calib.n_tokens,
    )
    histories: dict[int, list[dict]] = {}
    layers = [
        layer
        for layer in calib.moe_layers
        if input == INPUT_PRE_ATTN or calib.previous_moe_layer(layer) is not None
    ]
    bar = tqdm(layers, desc=f"train predictors ({input})", unit="layer", disable=not progress)
    for layer in bar:
        source = (
            calib.x_pre(layer) if input == INPUT_PRE_ATTN else calib.x_router(calib.previous_moe_layer(layer))
        )

        def show(entry: dict, layer: int = layer) -> None:
            bar.set_postfix(layer=layer, epoch=entry["epoch"], val_exact=f"{entry['val_exact_match']:.3f}")

        net, histories[layer] = train_layer(
            source[train_idx],
            calib.topk(layer)[train_idx],
            calib.scores(layer)[train_idx],
            meta.n_expert,
            meta.k,
            hidden=hidden,
            arch=arch,
            on_epoch=show,
            **options,
        )
        predictors.layers[layer] = fold_batchnorm(net)
    return predictors, histories
