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
