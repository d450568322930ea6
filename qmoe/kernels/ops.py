"""The kernels' public operations: checks at the boundary, then the right compiled path.

Few tokens per weight matrix (decode) run the row kernels of `compiled`, which read
every weight once from memory. Many tokens (prefill) dequantize tiles of rows to
float32 and multiply them with BLAS, which does far more arithmetic per byte than a
row loop can. `BLAS_MIN_TOKENS` is about where the second starts to win
(bench/kernels_bench.py, "tokens" section, on the 2-core development machines).

The BLAS products go through torch, not numpy: OpenBLAS's threads spin after each
call and numba's OpenMP threads spin after each parallel loop, and alternating the two
on a 2-core machine made a 256-token prefill of the tiny model take 3 s instead of
0.08 s. torch's threads follow torch.set_num_threads (the CLI's -t) and, like numba's,
wait passively under OMP_WAIT_POLICY=PASSIVE, which qmoe sets unless the user has.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType

from qmoe.errors import QmoeError
from qmoe.kernels import compiled
from qmoe.kernels.formats import QT, check_qtype, row_bytes, weight_bytes

BLAS_MIN_TOKENS = 32
TILE_FLOATS = 1 << 20  # rows dequantized per BLAS call: about 4 MB of float32, at home in L2/L3
PARALLEL_MIN_BYTES = 1 << 20  # kernels reading less weight than this run on one thread (_run)


def set_num_threads(n: int) -> None:
    """Threads for the kernels (numba's setting, which is per calling thread)."""
    n_max = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= n_max:
        raise QmoeError(f"threads must be between 1 and {n_max} (numba's NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(int(n))


def _run(kernel, weight_bytes: int, *args) -> None:
    """Call a parallel kernel; one that reads little weight runs on the calling thread alone.

    Waking and joining the other threads of a parallel loop costs tens of microseconds, more
    than a small product takes: on the tiny model (6 layers of 256-wide matrices) two threads
    made a decode step 13.5 ms instead of 5.3. Every output is summed by one thread in a
    fixed order either way, so the results do not change.
    """
    threads = numba.get_num_threads()
    if weight_bytes >= PARALLEL_MIN_BYTES or threads == 1:
        kernel(*args)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _activations(x: np.ndarray, n: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != n:
        raise QmoeError(f"{what}: activations must be [tokens, {n}], got shape {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _output(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise QmoeError(
            f"matmul: out must be a writable C-contiguous float32 array of shape {list(shape)}, "
            f"got {out.dtype} {list(out.shape)}"
        )
    return out


def matmul(
    w: np.ndarray, qtype: GGMLQuantizationType | int, x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """x @ W.T for a raw weight W [rows, n] of type qtype: x float32 [T, n] -> float32 [T, rows]."""
    qtype = check_qtype(qtype)
    if w.ndim != 2:
        raise QmoeError(f"matmul: weight must be [rows, row], got shape {list(w.shape)}")
    wb, n = weight_bytes(w, qtype, "matmul weight")
    rows = w.shape[0]
    x = _activations(x, n, "matmul")
    out = _output(out, (x.shape[0], rows))
    if x.shape[0] == 0 or rows == 0:
        return out
    if x.shape[0] < BLAS_MIN_TOKENS:
        _run(compiled.matmul_rows, wb.nbytes, int(qtype), wb, row_bytes(qtype, n), x, out)
    elif qtype == QT.F32:
        with warnings.catch_warnings():  # torch warns on read-only (memory-mapped) arrays; we only read them
            warnings.simplefilter("ignore", UserWarning)
            w_t = torch.from_numpy(wb.view(np.float32).reshape(rows, n))
        torch.matmul(torch.from_numpy(x), w_t.T, out=torch.from_numpy(out))
    else:
        _matmul_blas_tiles(wb, qtype, rows, n, x, out)
    return out


def _matmul_blas_tiles(
    wb: np.ndarray, qtype: GGMLQuantizationType, rows: int, n: int, x: np.ndarray, out: np.ndarray
) -> None:
    tile_rows = max(1, min(rows, TILE_FLOATS // max(n, 1)))
    tile = np.empty((tile_rows, n), np.float32)
    x_t, out_t, tile_t = torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(tile)
    for r0 in range(0, rows, tile_rows):
        r1 = min(rows, r0 + tile_rows)
        compiled.dequantize_rows(int(qtype), wb, row_bytes(qtype, n), r0, tile[: r1 - r0])
        out_t[:, r0:r1] = x_t @ tile_t[: r1 - r0].T  # [T, n] @ [n, r1 - r0]


ACTIVATIONS = ("gelu", "silu")


class MLPTopK:
    """The top outputs of a small two-layer network, fc2 @ act(fc1 @ x + b1) + b2, per token.

    fc1: raw [H, n]; fc2: raw [E, H]; biases float32 [H] and [E]; activation "gelu" | "silu".
    Made for the expert predictors: checked once here, then each call is one serial compiled
    call that releases the GIL and uses no threads, meant to run on a core of its own beside
    the model, where separate products, activations and a sort would each cost a Python round
    trip and a turn at the GIL.
    """

    def __init__(
        self,
        fc1: np.ndarray,
        fc1_type: GGMLQuantizationType | int,
        fc1_bias: np.ndarray,
        fc2: np.ndarray,
        fc2_type: GGMLQuantizationType | int,
        fc2_bias: np.ndarray,
        activation: str,
    ):
        if activation not in ACTIVATIONS:
            raise QmoeError(f"MLPTopK: activation must be one of {ACTIVATIONS}, got {activation!r}")
        fc1_type, fc2_type = check_qtype(fc1_type), check_qtype(fc2_type)
        self.w1, self.n = weight_bytes(fc1, fc1_type, "MLPTopK fc1")
        self.w2, hidden = weight_bytes(fc2, fc2_type, "MLPTopK fc2")
        self.n_out = fc2.shape[0]
        if fc1.shape[0] != hidden or np.shape(fc1_bias) != (hidden,) or np.shape(fc2_bias) != (self.n_out,):
            raise QmoeError(
                f"MLPTopK: shapes do not fit: fc1 [{fc1.shape[0]}, {self.n}], fc2 [{self.n_out}, {hidden}], "
                f"biases {list(np.shape(fc1_bias))} and {list(np.shape(fc2_bias))}"
            )
        self.layer1 = (int(fc1_type), self.w1, row_bytes(fc1_type, self.n), np.asarray(fc1_bias, np.float32))
        self.layer2 = (int(fc2_type), self.w2, row_bytes(fc2_type, hidden), np.asarray(fc2_bias, np.float32))
        self.gelu = activation == "gelu"

    def __call__(self, x: np.ndarray, count: int) -> np.ndarray:
        """x float32 [T, n] -> the `count` largest outputs' indices, best first: int64 [T, count].
        Equal outputs rank the lower index first."""
        if not 1 <= count <= self.n_out:
            raise QmoeError(f"MLPTopK: count must be between 1 and {self.n_out}, got {count}")
        x = _activations(x, self.n, "MLPTopK")
        out = np.empty((x.shape[0], count), np.int64)
        compiled.mlp_top(*self.layer1, *self.layer2, self.gelu, x, count, out)
        return out


def dequantize(w: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """A raw weight [..., row] of type qtype as float32 [..., n]."""
    qtype = check_qtype(qtype)
    wb, n = weight_bytes(w, qtype, "dequantize")
    lead = w.shape[:-1]
    out = np.empty((int(np.prod(lead)), n), np.float32)
    if out.size:
        compiled.dequantize_rows(int(qtype), wb, row_bytes(qtype, n), 0, out)
    return out.reshape(*lead, n)


def _experts(gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple, what: str):
    """Checked flat bytes of stacked expert weights [E, rows, row], and their sizes."""
    if len(qtypes) != 3:
        raise QmoeError(f"{what}: qtypes must be (gate, up, down), got {qtypes!r}")
    qtypes = tuple(check_qtype(q) for q in qtypes)
    flat, sizes = [], []
    for name, w, qtype in zip(("gate", "up", "down"), (gate, up, down), qtypes):
        if w.ndim != 3:
            raise QmoeError(f"{what}: {name} must be [experts, rows, row], got shape {list(w.shape)}")
        wb, n = weight_bytes(w, qtype, f"{what} {name}")
        flat.append(wb)
        sizes.append((w.shape[0], w.shape[1], n))  # (experts, rows, n)
    (e_g, n_ff, n_embd), (e_u, *up_rows_n), (e_d, *down_rows_n) = sizes
    if up_rows_n != [n_ff, n_embd] or down_rows_n != [n_embd, n_ff] or not e_g == e_u == e_d:
        raise QmoeError(
            f"{what}: expert shapes do not fit together: gate {sizes[0]}, up {sizes[1]}, down {sizes[2]} "
            "(experts, rows, row length); expected gate = up = [E, n_ff, n_embd], down = [E, n_embd, n_ff]"
        )
    row_nbytes = tuple(row_bytes(q, n) for q, (_, _, n) in zip(qtypes, sizes))
    return flat, tuple(int(q) for q in qtypes), row_nbytes, e_g, n_embd, n_ff


def moe_ffn(
    gate_exps: np.ndarray,
    up_exps: np.ndarray,
    down_exps: np.ndarray,
    qtypes: tuple,
    x: np.ndarray,
    expert_ids: np.ndarray,
    expert_weights: np.ndarray,
    slabs: np.ndarray | None = None,
) -> np.ndarray:
    """The routed experts' weighted sum for T tokens.

    gate_exps, up_exps: raw [E, n_ff, n_embd]; down_exps: raw [E, n_embd, n_ff];
    qtypes: their types (gate, up, down); x: float32 [T, n_embd];
    expert_ids: int [T, k]; expert_weights: float32 [T, k].
    out[t] = sum_j weights[t, j] * (silu(x[t] @ G_e.T) * (x[t] @ U_e.T)) @ D_e.T,  e = ids[t, j]
    -> float32 [T, n_embd]. The (token, expert) pairs are grouped by expert; experts chosen
    by at least BLAS_MIN_TOKENS tokens run through BLAS, all others in one compiled call
    that reads each of their weight rows once.
    slabs: int [n_ids], expert id -> its index in the stacked arrays, when these are not
    the model's tensors but slots of a cache (the expert store's tiers); the sums run in
    the order of the expert ids all the same, so the result is bit-identical.
    """
    flat, qt, rb, n_expert, n_embd, n_ff = _experts(gate_exps, up_exps, down_exps, qtypes, "moe_ffn")
    n_ids = n_expert
    if slabs is not None:
        slabs = np.asarray(slabs, dtype=np.int64)
        n_ids = len(slabs)
    x = _activations(x, n_embd, "moe_ffn")
    ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
    weights = np.ascontiguousarray(expert_weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise QmoeError(
            f"moe_ffn: expert_ids {list(ids.shape)} and expert_weights {list(weights.shape)} must both be "
            f"[tokens = {x.shape[0]}, k]"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= n_ids):
        raise QmoeError(f"moe_ffn: expert ids must be in 0..{n_ids - 1}, got {ids.min()}..{ids.max()}")
    if slabs is not None and ids.size and (slabs[ids].min() < 0 or slabs[ids].max() >= n_expert):
        raise QmoeError(f"moe_ffn: the slabs of the chosen experts must be in 0..{n_expert - 1}")
    out = np.zeros((x.shape[0], n_embd), np.float32)
    if ids.size == 0:
        return out
    k = ids.shape[1]
    pair_experts = ids.reshape(-1)  # pair p = t * k + j
    pairs = np.argsort(pair_experts, kind="stable")  # grouped by expert
    starts = np.flatnonzero(np.diff(pair_experts[pairs], prepend=-1))
    counts = np.diff(starts, append=len(pairs))
    experts = pair_experts[pairs[starts]]
    if slabs is not None:
        experts = slabs[experts]  # where each expert's weights are; the groups keep the ids' order
    by_blas = counts >= BLAS_MIN_TOKENS
    small = ~by_blas
    if small.any():
        small_starts = np.concatenate(([0], np.cumsum(counts[small])))
        slab_bytes = (rb[0] + rb[1]) * n_ff + rb[2] * n_embd
        _run(
            compiled.moe_rows, int(small.sum()) * slab_bytes,
            *flat, qt, rb, x, k, pairs[np.repeat(small, counts)], small_starts, experts[small],
            weights.reshape(-1), n_ff, out,
        )  # fmt: skip
    for start, count, e in zip(starts[by_blas], counts[by_blas], experts[by_blas]):
        group = pairs[start : start + count]
        y = expert_ffn(gate_exps[e], up_exps[e], down_exps[e], qtypes, x[group // k])
        np.add.at(out, group // k, weights.reshape(-1)[group, None] * y)
    return out


def expert_ffn(
    gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple, x: np.ndarray
) -> np.ndarray:
    """One expert's SwiGLU for T token rows, from its slabs (stacked[e] views).

    gate, up: raw [n_ff, n_embd]; down: raw [n_embd, n_ff]; x: float32 [T, n_embd]
    -> silu(x @ G.T) * (x @ U.T) @ D.T, float32 [T, n_embd]. Fewer than BLAS_MIN_TOKENS
    tokens run moe_ffn's compiled code (one expert, weight 1); more run three BLAS products.
    """
    flat, qt, rb, _, n_embd, n_ff = _experts(gate[None], up[None], down[None], qtypes, "expert_ffn")
    x = _activations(x, n_embd, "expert_ffn")
    n_tokens = x.shape[0]
    if n_tokens < BLAS_MIN_TOKENS:
        out = np.zeros((n_tokens, n_embd), np.float32)
        if n_tokens:
            pairs = np.arange(n_tokens, dtype=np.int64)  # k = 1: pair p is token p, all of expert 0
            _run(
                compiled.moe_rows, sum(f.nbytes for f in flat),
                *flat, qt, rb, x, 1, pairs, np.array([0, n_tokens], np.int64), np.zeros(1, np.int64),
                np.ones(n_tokens, np.float32), n_ff, out,
            )  # fmt: skip
        return out
    g = matmul(gate, qt[0], x)
    u = matmul(up, qt[1], x)
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
        hidden = g / (1.0 + np.exp(-g)) * u  # silu(g) * u, [T, n_ff]
    return matmul(down, qt[2], hidden)
