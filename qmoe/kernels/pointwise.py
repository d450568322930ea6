"""RMS norm (with the residual add before it), rotary embedding and the common router on the CPU, each
one compiled call.

A decode step of one token runs a few norms and two rotations per layer on vectors of a few
thousand floats. In torch each is 5-10 ops, and on the 2-core development machines a torch
op costs 9-14 us to launch whatever its size: 72 us an RMS norm and 110 us a rotation, about
0.5 ms a layer, 25 ms a token of a 48-layer model (the router's softmax and top-k another
75 us). Compiled, one call costs a few us. The
models use these for every CPU tensor, prefill included, so that a prompt's tokens are
normed and rotated by the same arithmetic whether they come one at a time or in a batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qmoe.errors import QmoeError


@njit(nogil=True, cache=True)
def _rms_norm(x, weight, eps, out):
    rows, n = x.shape
    for r in range(rows):
        total = 0.0  # float64: the mean of squares of thousands of float32 values
        for i in range(n):
            total += np.float64(x[r, i]) * x[r, i]
        inv = np.float32(1.0 / np.sqrt(total / n + eps))
        for i in range(n):
            out[r, i] = x[r, i] * inv * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis: x float32 [..., n], weight [n]."""
    n = weight.shape[0]
    if x.shape[-1] != n:
        raise QmoeError(f"rms_norm: activations [..., {n}] expected, got shape {list(x.shape)}")
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n)
    out = np.empty_like(rows)
    _rms_norm(rows, np.ascontiguousarray(weight, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)



@njit(nogil=True, cache=True)
def _add_rms_norm(h, delta, weight, eps, h_out, out):
    rows, n = h.shape
    for r in range(rows):
        for i in range(n):
            h_out[r, i] = h[r, i] + delta[r, i]
    _rms_norm(h_out, weight, eps, out)


def add_rms_norm(h: np.ndarray, delta: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(h + delta, rms_norm(h + delta, weight, eps)) for float32 [T, n]: a residual add and the norm
    after it in one call, where a decode step made a torch add and a norm call, each slow to
    start after a weight product."""
    if h.ndim != 2 or delta.shape != h.shape or weight.shape != (h.shape[1],):
        raise QmoeError(f"add_rms_norm: h and delta [T, n] and weight [n] expected, got {list(h.shape)}, "
                        f"{list(delta.shape)}, {list(weight.shape)}")
    h_out, out = np.empty(h.shape, np.float32), np.empty(h.shape, np.float32)
    _add_rms_norm(np.ascontiguousarray(h, dtype=np.float32), np.ascontiguousarray(delta, dtype=np.float32),
                  weight, float(eps), h_out, out)
    return h_out, out

@njit(nogil=True, cache=True)
def _rope(x, positions, cos, sin, dim, neox, out):
    tokens, heads, head_dim = x.shape
    half = dim // 2
    for t in range(tokens):
        c, s = cos[positions[t]], sin[positions[t]]
        for h in range(heads):
            for i in range(half):
                a_at, b_at = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b = x[t, h, a_at], x[t, h, b_at]
                out[t, h, a_at] = a * c[i] - b * s[i]
                out[t, h, b_at] = b * c[i] + a * s[i]
            for i in range(dim, head_dim):
                out[t, h, i] = x[t, h, i]


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, dim: int, neox: bool
         ) -> np.ndarray:
    """x float32 [T, H, head_dim] with its first `dim` features of every head rotated by the
    angles of `positions` [T]: cos/sin float32 [n_ctx, dim / 2]. neox: pairs (i, i + dim / 2),
    else adjacent pairs (2i, 2i + 1)."""
    if x.ndim != 3 or x.shape[2] < dim or cos.shape[1] * 2 != dim or len(positions) != x.shape[0]:
        raise QmoeError(f"rope: x [T, H, >= {dim}] and {x.shape[0]} positions expected, got x {list(x.shape)} "
                        f"and {len(positions)} positions")
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _rope(x, np.ascontiguousarray(positions, dtype=np.int64), cos, sin, dim, neox, out)
    return out


@njit(nogil=True, cache=True)
def _softmax_topk(logits, k, normalize, scale, ids, weights):
    tokens, n = logits.shape
    probs = np.empty(n, np.float32)
    taken = np.empty(n, np.bool_)
    for t in range(tokens):
        top = logits[t, 0]
        for e in range(n):
            top = max(top, logits[t, e])
        total = np.float32(0.0)
        for e in range(n):
            probs[e] = np.exp(logits[t, e] - top)
            total += probs[e]
        taken[:] = False
        chosen = np.float32(0.0)
        for j in range(k):  # k is small (2-8): k passes beat a sort of all n
            best = -1
            for e in range(n):
                if not taken[e] and (best < 0 or probs[e] > probs[best]):  # ties: the lower index
                    best = e
            taken[best] = True
            ids[t, j] = best
            weights[t, j] = probs[best] / total
            chosen += weights[t, j]
        for j in range(k):
            w = weights[t, j] / chosen if normalize else weights[t, j]
            weights[t, j] = w * np.float32(scale)


def softmax_topk(logits: np.ndarray, k: int, normalize: bool, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the last axis of logits float32 [T, n], the k largest, best first (ties: the
    lower index): (ids int64 [T, k], weights float32 [T, k]), the weights renormalized to sum
    to 1 when `normalize`, then times `scale`."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise QmoeError(f"softmax_topk: logits [T, n >= {k}] expected, got shape {list(logits.shape)}")
    ids = np.empty((logits.shape[0], k), np.int64)
    weights = np.empty((logits.shape[0], k), np.float32)
    _softmax_topk(logits, k, normalize, float(scale), ids, weights)
    return ids, weights


@njit(nogil=True, fastmath=True, cache=True)
def _router_logits(x, router, logits):
    for t in range(x.shape[0]):
        for e in range(router.shape[0]):
            acc = np.float32(0.0)
            for i in range(x.shape[1]):
                acc += x[t, i] * router[e, i]
            logits[t, e] = acc


@njit(nogil=True, cache=True)
def _route_softmax_topk(x, router, k, normalize, scale, logits, ids, weights):
    _router_logits(x, router, logits)
    _softmax_topk(logits, k, normalize, scale, ids, weights)


def route_softmax_topk(x: np.ndarray, router: np.ndarray, k: int, normalize: bool, scale: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The router's logits x @ router.T (x float32 [T, n], router float32 [E, n]) and their
    softmax_topk, in one compiled call: (logits [T, E], ids int64 [T, k], weights float32 [T, k]).
    For a decode step, whose router product and top-k were two torch calls and a numba one."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or router.ndim != 2 or router.shape[1] != x.shape[1] or not 1 <= k <= router.shape[0]:
        raise QmoeError(f"route_softmax_topk: x [T, n], router [E >= {k}, n] expected, got {list(x.shape)} "
                        f"and {list(router.shape)}")
    logits = np.empty((x.shape[0], router.shape[0]), np.float32)
    ids = np.empty((x.shape[0], k), np.int64)
    weights = np.empty((x.shape[0], k), np.float32)
    _route_softmax_topk(x, np.ascontiguousarray(router, dtype=np.float32), k, normalize, float(scale), logits, ids,
                        weights)
    return logits, ids, weights
