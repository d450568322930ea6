"""One new token's attention over a KV cache, compiled: the decode step's attention on the CPU.

torch runs a decode step's attention as a handful of tiny ops (two batched products, a
softmax, reshapes), each of which costs more to launch than to compute while the caches are
cold from streaming the weights: on Qwen3-30B-A3B's shapes (32 query / 4 KV heads of 128),
right after a weight product, they took 160-180 us at 20 cached tokens on the 2-core
development machine, this kernel 44-54 us. In a loop that keeps torch warm the two are even
at 32 tokens, and beyond a few hundred torch's products (BLAS) win: 0.25 / 0.67 / 1.6 ms at
512 / 1,500 / 4,096 tokens against this kernel's 0.63 / 4.2 / 12.3 (one thread). So the model
uses it up to ONE_QUERY_MAX_KEYS cached tokens, and torch beyond.

The keys and values are the caches themselves, head-major [H_kv, n_ctx, d], of which the
first n_keys positions are attended: a contiguous buffer that the kernel reads in place. The
query heads that share a KV head (grouped-query attention: head h reads KV head
h // (H / H_kv)) are computed together, so each key and value row is read once for all of
them; the KV heads run in parallel.

decode_qkv is the rest of a decode step's attention before that: the q/k norms, the rotation
and the cache write of models.base.Attention, in one compiled call where they were four
numba calls and two torch ones.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qmoe.errors import QmoeError
from qmoe.kernels.pointwise import _rms_norm, _rope

NORM_NONE, NORM_HEAD, NORM_FULL = 0, 1, 2  # decode_qkv's q/k norms: none, per head, over all heads
# Cached tokens up to which one query's attention is worth the compiled kernel: beyond it torch's
# two grouped products (BLAS) win even against their ops' launch costs (module docstring).
ONE_QUERY_MAX_KEYS = 256


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _one_query_attention(q, k, v, n_keys, scale, out):
    n_head, d = q.shape
    n_head_kv, _, d_v = v.shape
    group = n_head // n_head_kv
    for g in prange(n_head_kv):
        p = np.empty((group, n_keys), np.float32)  # the scores, then their softmax
        for s in range(n_keys):
            for j in range(group):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += q[g * group + j, i] * k[g, s, i]
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
                    acc[j, i] += p[j, s] * v[g, s, i]
        out[g * group:(g + 1) * group] = acc


def one_query_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_keys: int, scale: float) -> np.ndarray:
    """softmax(q . k * scale) . v for one token's query heads q float32 [H, d] over the first
    n_keys positions of keys [H_kv, >= n_keys, d] and values [H_kv, >= n_keys, d_v] (H a
    multiple of H_kv) -> [H, d_v]."""
    if q.ndim != 2 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or k.shape[2] != q.shape[1] \
            or not 1 <= n_keys <= k.shape[1] or q.shape[0] % k.shape[0]:
        raise QmoeError(f"one_query_attention: q [H, d], k [H_kv, S, d], v [H_kv, S, d_v] with H a multiple "
                        f"of H_kv and 1 <= n_keys <= S expected, got {list(q.shape)}, {list(k.shape)}, "
                        f"{list(v.shape)}, n_keys {n_keys}")
    out = np.empty((q.shape[0], v.shape[2]), np.float32)
    _one_query_attention(*(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v)), n_keys,
                         np.float32(scale), out)
    return out


@njit(nogil=True, cache=True)
def _decode_qkv(q, k, v, q_norm, k_norm, norm, eps, clamp, cos, sin, position, rope_dim, neox, k_cache, v_cache,
                q_out):
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
    _rope(qn.reshape(1, q.shape[0], q.shape[1]), positions, cos, sin, rope_dim, neox,
          q_out.reshape(1, q.shape[0], q.shape[1]))
    kr = np.empty((1, k.shape[0], k.shape[1]), np.float32)
    _rope(kn.reshape(1, k.shape[0], k.shape[1]), positions, cos, sin, rope_dim, neox, kr)
    k_cache[:, position] = kr[0]
    v_cache[:, position] = v


@njit(nogil=True, cache=True)  # the attention it calls runs its own parallel loop
def _decode_attention(q, k, v, q_norm, k_norm, norm, eps, clamp, cos, sin, position, rope_dim, neox, k_cache,
                      v_cache, scale, out):
    q_out = np.empty_like(q)
    _decode_qkv(q, k, v, q_norm, k_norm, norm, eps, clamp, cos, sin, position, rope_dim, neox, k_cache, v_cache,
                q_out)
    _one_query_attention(q_out, k_cache, v_cache, position + 1, scale, out)


def decode_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_norm: np.ndarray, k_norm: np.ndarray, norm: int,
               eps: float, clamp: float, cos: np.ndarray, sin: np.ndarray, position: int, rope_dim: int, neox: bool,
               k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
    """One new token's query, key and value from its projections, in one compiled call: what
    models.base.Attention does to them before attending, in the same operations and order.

    q [H, d], k [H_kv, d], v [H_kv, d_v] float32 (clamped in place to +-clamp when clamp > 0);
    norm NORM_HEAD: RMS norms q_norm / k_norm [d] of each head, NORM_FULL: over all heads
    ([H * d], [H_kv * d]), NORM_NONE: none (the norms empty); rope over the first rope_dim
    features of every head at `position` (tables cos, sin [n_ctx, rope_dim / 2], neox pairs or
    adjacent). The rotated key and the value go into position `position` of the caches
    [H_kv, n_ctx, d] and [H_kv, n_ctx, d_v]; returns the rotated query [H, d].
    """
    _check_decode(q, k, v, k_cache, v_cache, position, "decode_qkv")
    q_out = np.empty_like(q)
    _decode_qkv(q, k, v, q_norm, k_norm, norm, float(eps), np.float32(clamp), cos, sin, position, rope_dim, neox,
                k_cache, v_cache, q_out)
    return q_out


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_norm: np.ndarray, k_norm: np.ndarray,
                     norm: int, eps: float, clamp: float, cos: np.ndarray, sin: np.ndarray, position: int,
                     rope_dim: int, neox: bool, k_cache: np.ndarray, v_cache: np.ndarray, scale: float) -> np.ndarray:
    """decode_qkv, then the query's attention over cache positions 0..position (one_query_attention),
    in the same compiled call -> [H, d_v]: a short context's whole attention after the projections."""
    _check_decode(q, k, v, k_cache, v_cache, position, "decode_attention")
    if q.shape[0] % k.shape[0]:
        raise QmoeError(f"decode_attention: {q.shape[0]} query heads do not share {k.shape[0]} KV heads evenly")
    out = np.empty((q.shape[0], v.shape[1]), np.float32)
    _decode_attention(q, k, v, q_norm, k_norm, norm, float(eps), np.float32(clamp), cos, sin, position, rope_dim,
                      neox, k_cache, v_cache, np.float32(scale), out)
    return out


def _check_decode(q, k, v, k_cache, v_cache, position: int, what: str) -> None:
    n_ctx = k_cache.shape[1]
    if not (q.ndim == k.ndim == v.ndim == 2 and k_cache.shape[::2] == k.shape and v_cache.shape[::2] == v.shape
            and v_cache.shape[1] == n_ctx and 0 <= position < n_ctx and q.shape[1] == k.shape[1]
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise QmoeError(f"{what}: q [H, d], k [H_kv, d], v [H_kv, d_v] and C-contiguous caches "
                        f"[H_kv, n_ctx, d], [H_kv, n_ctx, d_v] with position < n_ctx expected, got q {list(q.shape)}, "
                        f"k {list(k.shape)}, v {list(v.shape)}, caches {list(k_cache.shape)}, {list(v_cache.shape)}, "
                        f"position {position}")
