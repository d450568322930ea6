"""One new token's attention over a KV cache, compiled: the decode step's attention on the CPU.

torch runs a decode step's attention as a handful of tiny ops (two batched products, a
softmax, reshapes), each of which costs more to launch than to compute while the caches
are cold from streaming the weights: on Qwen3-30B-A3B's shapes (32 query / 4 KV heads of
128) after a weight product it took 160-180 us at 20 cached tokens, 1.1-1.4 ms at 1,000
and 3.7-4.1 ms at 3,000 on the 2-core development machine; this kernel took 44-54 us,
0.7-1.0 ms and 1.8-2.2 ms (one and two threads).

The keys and values are token-major, [S, H_kv, d], the layout of the model's caches: a
cache's first S tokens are then one contiguous block that the kernel reads in place. The
query heads that share a KV head (grouped-query attention: head h reads KV head
h // (H / H_kv)) are computed together, so each key and value row is read once for all of
them; the KV heads run in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qmoe.errors import QmoeError
from qmoe.kernels.pointwise import _rms_norm, _rope

NORM_NONE, NORM_HEAD, NORM_FULL = 0, 1, 2  # decode_attention's q/k norms: none, per head, over all heads


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _one_query_attention(q, k, v, scale, out):
    n_head, d = q.shape
    n_keys, n_head_kv, d_v = v.shape
    group = n_head // n_head_kv
    for g in prange(n_head_kv):
        p = np.empty((group, n_keys), np.float32)  # the scores, then their softmax
        for s in range(n_keys):
            for j in range(group):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += q[g * group + j, i] * k[s, g, i]
                p[j, s] = acc * scale
        for j in range(group):
            top = p[j].max()
            total = np.float32(0.0)
            for s in range(n_keys):
                p[j, s] = np.exp(p[j, s] - top)
                total += p[j, s]
            p[j] *= np.float32(1.0) / total
        acc = np.zeros((group, d_v), np.float32)
        for s in range(n_keys):
            for j in range(group):
                for i in range(d_v):
                    acc[j, i] += p[j, s] * v[s, g, i]
        out[g * group:(g + 1) * group] = acc


def one_query_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q . k * scale) . v for one token's query heads q float32 [H, d] over keys
    [S, H_kv, d] and values [S, H_kv, d_v] (token-major, H a multiple of H_kv) -> [H, d_v]."""
    if q.ndim != 2 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or k.shape[2] != q.shape[1] \
            or k.shape[0] == 0 or q.shape[0] % k.shape[1]:
        raise QmoeError(f"one_query_attention: q [H, d], k [S, H_kv, d], v [S, H_kv, d_v] with H a multiple "
                        f"of H_kv expected, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    out = np.empty((q.shape[0], v.shape[2]), np.float32)
    _one_query_attention(*(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v)), np.float32(scale), out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def _decode_attention(q, k, v, q_norm, k_norm, norm, eps, clamp, cos, sin, position, rope_dim, neox,
                      k_cache, v_cache, scale, out):
    if clamp > 0:
        for a in (q, k, v):
            for i in range(a.shape[0]):
                for j in range(a.shape[1]):
                    a[i, j] = min(max(a[i, j], -clamp), clamp)
    qn, kn = q.copy(), k.copy()
    if norm == NORM_HEAD:
        _rms_norm(q, q_norm, eps, qn)
        _rms_norm(k, k_norm, eps, kn)
    elif norm == NORM_FULL:
        _rms_norm(q.reshape(1, q.size), q_norm, eps, qn.reshape(1, q.size))
        _rms_norm(k.reshape(1, k.size), k_norm, eps, kn.reshape(1, k.size))
    positions = np.full(1, position, np.int64)
    qr = np.empty((1, q.shape[0], q.shape[1]), np.float32)
    _rope(qn.reshape(1, q.shape[0], q.shape[1]), positions, cos, sin, rope_dim, neox, qr)
    _rope(kn.reshape(1, k.shape[0], k.shape[1]), positions, cos, sin, rope_dim, neox, k_cache[position:position + 1])
    v_cache[position] = v
    _one_query_attention(qr[0], k_cache[:position + 1], v_cache[:position + 1], scale, out)


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_norm: np.ndarray, k_norm: np.ndarray,
                     norm: int, eps: float, clamp: float, cos: np.ndarray, sin: np.ndarray, position: int,
                     rope_dim: int, neox: bool, k_cache: np.ndarray, v_cache: np.ndarray, scale: float) -> np.ndarray:
    """One new token's attention from its projections, in one compiled call: the decode step of
    models.base.Attention on the CPU, as its torch ops do it, in their order.

    q [H, d], k [H_kv, d], v [H_kv, d_v] float32 (clamped in place to +-clamp when clamp > 0);
    norm NORM_HEAD: RMS norms q_norm / k_norm [d] of each head, NORM_FULL: over all heads
    ([H * d], [H_kv * d]), NORM_NONE: none (the norms empty); rope over the first rope_dim
    features of every head at `position` (tables cos, sin [n_ctx, rope_dim / 2], neox pairs or
    adjacent); the rotated key and the value go into row `position` of the token-major caches
    [n_ctx, H_kv, d] and [n_ctx, H_kv, d_v], over whose rows 0..position the query attends.
    Returns [H, d_v].
    """
    n_ctx = k_cache.shape[0]
    if not (q.ndim == k.ndim == v.ndim == 2 and k_cache.shape[1:] == k.shape and v_cache.shape[1:] == v.shape
            and v_cache.shape[0] == n_ctx and 0 <= position < n_ctx and q.shape[1] == k.shape[1]
            and q.shape[0] % k.shape[0] == 0 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise QmoeError(f"decode_attention: q [H, d], k [H_kv, d], v [H_kv, d_v] and C-contiguous caches "
                        f"[n_ctx, H_kv, d], [n_ctx, H_kv, d_v] with position < n_ctx expected, got q {list(q.shape)}, "
                        f"k {list(k.shape)}, v {list(v.shape)}, caches {list(k_cache.shape)}, {list(v_cache.shape)}, "
                        f"position {position}")
    out = np.empty((q.shape[0], v.shape[1]), np.float32)
    _decode_attention(q, k, v, q_norm, k_norm, norm, float(eps), np.float32(clamp), cos, sin, position,
                      rope_dim, neox, k_cache, v_cache, np.float32(scale), out)
    return out
