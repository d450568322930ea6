"""How well predicted expert scores match the router's choice (paper.md, "Metrics").

All functions take predicted scores [N, E] (higher = more likely) and the router's
true top-k [N, k] (distinct expert ids per row), and return a fraction in [0, 1]
averaged over the N tokens. Ties between predicted scores are broken arbitrarily.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("exact_match", "overprovisioned_exact_match", "top1", "recall_at_k")


def default_k_prime(k: int) -> int:
    """Over-provisioning used when none is given: ceil(1.5 k) (paper: 12 of 8, 3 of 2; 9 of 6 where it used 10)."""
    return math.ceil(1.5 * k)


def predicted_topk(pred_scores: np.ndarray, count: int) -> np.ndarray:
    """Indices [N, count] of the `count` highest scores per row (in no particular order)."""
    return np.argpartition(-pred_scores, count - 1, axis=1)[:, :count]


def _true_mask(pred_scores: np.ndarray, true_topk: np.ndarray) -> np.ndarray:
    """bool [N, E]: expert e is in token n's true top-k."""
    if pred_scores.ndim != 2 or true_topk.ndim != 2 or pred_scores.shape[0] != true_topk.shape[0]:
        raise ValueError(
            f"expected scores [N, E] and true top-k [N, k], got {pred_scores.shape} and {true_topk.shape}"
        )
    mask = np.zeros(pred_scores.shape, dtype=bool)
    np.put_along_axis(mask, true_topk.astype(np.int64), True, axis=1)
    return mask


def _hits(pred_scores: np.ndarray, true_mask: np.ndarray, count: int) -> np.ndarray:
    """int [N]: how many of the `count` best predicted experts are true top-k experts."""
    chosen = predicted_topk(pred_scores, count)
    return np.take_along_axis(true_mask, chosen, axis=1).sum(axis=1)


def exact_match(pred_scores: np.ndarray, true_topk: np.ndarray) -> float:
    """Fraction of tokens whose predicted top-k set equals the router's top-k set."""
    k = true_topk.shape[1]
    return float(np.mean(_hits(pred_scores, _true_mask(pred_scores, true_topk), k) == k))


def overprovisioned_exact_match(
    pred_scores: np.ndarray, true_topk: np.ndarray, k_prime: int | None = None
) -> float:
    """Fraction of tokens whose true top-k lies inside the predicted top-k' (default ceil(1.5 k))."""
    k = true_topk.shape[1]
    k_prime = min(k_prime or default_k_prime(k), pred_scores.shape[1])
    return float(np.mean(_hits(pred_scores, _true_mask(pred_scores, true_topk), k_prime) == k))


def top1_accuracy(pred_scores: np.ndarray, true_topk: np.ndarray) -> float:
    """Fraction of tokens whose single best predicted expert is among the router's top-k."""
    best = np.argmax(pred_scores, axis=1)[:, None]  # [N, 1]
    return float(np.mean(np.take_along_axis(_true_mask(pred_scores, true_topk), best, axis=1)))


def recall_at_k(pred_scores: np.ndarray, true_topk: np.ndarray) -> float:
    """Mean over tokens of |predicted top-k ∩ true top-k| / k."""
    k = true_topk.shape[1]
    return float(np.mean(_hits(pred_scores, _true_mask(pred_scores, true_topk), k)) / k)


def all_metrics(
    pred_scores: np.ndarray, true_topk: np.ndarray, k_prime: int | None = None
) -> dict[str, float]:
    """Every metric of METRICS, by name."""
    return {
        "exact_match": exact_match(pred_scores, true_topk),
        "overprovisioned_exact_match": overprovisioned_exact_match(pred_scores, true_topk, k_prime),
        "top1": top1_accuracy(pred_scores, true_topk),
        "recall_at_k": recall_at_k(pred_scores, true_topk),
    }
