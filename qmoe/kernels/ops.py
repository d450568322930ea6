"""The products and dequantization: checks at the boundary, then the right compiled path.

Few tokens per weight matrix (decode) run the row kernels of `compiled`, which read
every weight once from memory. Many tokens (prefill) dequantize tiles of rows to
float32 and multiply them with BLAS, which does far more arithmetic per byte than a
row loop can (Q8_0 on a CPU with VNNI excepted: compiled.matmul_tiles, integer products
in tiles of tokens, outruns both). `BLAS_MIN_TOKENS` is about where the second starts to win on the 2-core
AVX2 development machine, one A3B expert's gate (768 x 2048) at two threads, integer row
products against dequantized tiles and BLAS: Q8_0 30-38 against 24 GMAC/s at 32 tokens and
even at 64; Q4_K 18 against 14 at 32, 19 against 28 at 64. Routed experts in Q8_0 on a
CPU with VNNI never go to BLAS: moe.py's tiles (set_tile_lanes) are faster at any count.

The row kernels multiply either float32 activations by the decoded weights (exact) or,
for block formats, integers: x quantized to 8 bits per block of the weight's format, as
llama.cpp does, times the weights' integer values (compiled.py's integer products). The
second is the default (set_exact_products, or `exact=` per call): it reads weights 1.5-2x
faster on an AVX2 core, and decode is as close to llama.cpp's logits as llama.cpp's own
float run is (tests/test_llama_cpp_quants.py). BLAS products then multiply the same
quantized activation in float32 (quantized_activation), so that batch size does not change
what a prompt computes.

The BLAS products go through torch, not numpy: OpenBLAS's threads spin after each
call and numba's OpenMP threads spin after each parallel loop, and alternating the two
on a 2-core machine made a 256-token prefill of the tiny model take 3 s instead of
0.08 s. torch's threads follow torch.set_num_threads (the CLI's -t) and, like numba's,
spin only briefly before they sleep (qmoe/__init__.py sets how long, unless the user has).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType

from qmoe.errors import QmoeError
from qmoe.kernels import compiled
from qmoe.kernels.formats import FORMATS, QT, check_qtype, row_bytes, weight_bytes

BLAS_MIN_TOKENS = 48
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


_exact_products = False  # set_exact_products


def set_exact_products(exact: bool) -> None:
    """The products' default: float32 activations (True), or integer products on activations
    quantized to 8 bits (False, the initial setting). Like set_num_threads, for the process."""
    global _exact_products
    _exact_products = bool(exact)


def exact_products() -> bool:
    return _exact_products


_tile_lanes = compiled.TILE_LANES  # set_tile_lanes


def set_tile_lanes(lanes: int) -> None:
    """Lanes of the Q8_0 experts' tiles (compiled.moe_rows): 16 or 8, or 0 for the row loops
    alone. The initial setting is this machine's (compiled.TILE_LANES: 16 with AVX-512 VNNI, 8
    with AVX-VNNI, else 0); the tests set it to run the tiles' generic code on any CPU."""
    global _tile_lanes
    if lanes not in (0, 8, 16):
        raise QmoeError(f"set_tile_lanes: lanes must be 0, 8 or 16, got {lanes!r}")
    _tile_lanes = lanes


def tile_lanes() -> int:
    return _tile_lanes


def q8_products(qtype: GGMLQuantizationType, exact: bool | None) -> bool:
    """Whether a few-token product of a `qtype` weight runs on integers (see the module docstring)."""
    exact = _exact_products if exact is None else exact
    return not exact and int(qtype) in compiled.Q8_FORMATS


def q8_block(qtype: GGMLQuantizationType) -> int:
    """Elements per scale of the activation quantized for a `qtype` weight: its block."""
    return FORMATS[qtype].block


@dataclass(frozen=True)
class Matrix:
    """A raw weight [rows, row] of type qtype, checked once for the products.

    matmul checks its weight and works out its row sizes on every call; a caller that
    multiplies by the same weight every step (a model's Linear) makes this once and calls
    matmul_matrix, or passes it to matmul_many. In a decode step each Python call after a
    weight product runs slowly (see moe.StackedExperts), so the checks are worth skipping there.
    """

    qtype: GGMLQuantizationType
    flat: np.ndarray  # the bytes as weight_bytes gives them (flat, read-only)
    rows: int
    n: int  # row length, in elements
    row_bytes: int

    @classmethod
    def of(cls, w: np.ndarray, qtype: GGMLQuantizationType | int, what: str = "matmul weight") -> Matrix:
        qtype = check_qtype(qtype)
        if w.ndim != 2:
            raise QmoeError(f"{what}: must be [rows, row], got shape {list(w.shape)}")
        wb, n = weight_bytes(w, qtype, what)
        return cls(qtype, wb, w.shape[0], n, row_bytes(qtype, n))


def matmul(
    w: np.ndarray,
    qtype: GGMLQuantizationType | int,
    x: np.ndarray,
    out: np.ndarray | None = None,
    exact: bool | None = None,
) -> np.ndarray:
    """x @ W.T for a raw weight W [rows, n] of type qtype: x float32 [T, n] -> float32 [T, rows].

    exact: float32 activations for every product (True), or integer products on x quantized
    to 8 bits for few tokens of a block format (False); None: set_exact_products' setting."""
    return matmul_matrix(Matrix.of(w, qtype), x, out, exact)


def matmul_matrix(m: Matrix, x: np.ndarray, out: np.ndarray | None = None, exact: bool | None = None
                  ) -> np.ndarray:
    """matmul on a weight checked once (Matrix)."""
    x = _activations(x, m.n, "matmul")
    out = _output(out, (x.shape[0], m.rows))
    if x.shape[0] == 0 or m.rows == 0:
        return out
    q8 = q8_products(m.qtype, exact)
    if x.shape[0] < BLAS_MIN_TOKENS:
        _matmul_rows([m], x, q8, q8_block(m.qtype), [out])
    elif q8 and m.qtype == QT.Q8_0 and _tile_lanes:
        _run(compiled.matmul_tiles, m.flat.nbytes, m.flat, m.row_bytes, x, _tile_lanes, out)
    elif m.qtype == QT.F32:
        with warnings.catch_warnings():  # torch warns on read-only (memory-mapped) arrays; we only read them
            warnings.simplefilter("ignore", UserWarning)
            w_t = torch.from_numpy(m.flat.view(np.float32).reshape(m.rows, m.n))
        torch.matmul(torch.from_numpy(x), w_t.T, out=torch.from_numpy(out))
    else:
        _matmul_blas_tiles(m.flat, m.qtype, m.rows, m.n, quantized_activation(x, m.qtype) if q8 else x, out)
    return out


def matmul_many(weights: list[tuple[np.ndarray, GGMLQuantizationType | int] | Matrix], x: np.ndarray,
                exact: bool | None = None) -> list[np.ndarray]:
    """[matmul(w, qtype, x) for each (w, qtype)] (or Matrix), each product as matmul computes it.

    For few tokens, weights whose products take the same form (integer products on the same
    activation blocks, or float32) run together, up to MATMUL_WEIGHTS in one compiled call:
    a layer's q, k and v projections quantize x once and wake the threads once, and the
    small k and v, each below PARALLEL_MIN_BYTES alone, are shared out with q's rows."""
    matrices = [w if isinstance(w, Matrix) else Matrix.of(*w) for w in weights]
    x = np.asarray(x)
    if len(matrices) < 2 or x.ndim != 2 or x.shape[0] >= BLAS_MIN_TOKENS:
        return [matmul_matrix(m, x, exact=exact) for m in matrices]
    outs: list[np.ndarray | None] = [None] * len(matrices)
    together: dict[tuple, list[int]] = {}  # (q8, block, row length) -> positions
    for i, m in enumerate(matrices):
        q8 = q8_products(m.qtype, exact)
        together.setdefault((q8, q8_block(m.qtype) if q8 else 1, m.n), []).append(i)  # 1: no blocks
    for (q8, block, n), positions in together.items():
        xs = _activations(x, n, "matmul")
        for first in range(0, len(positions), compiled.MATMUL_WEIGHTS):
            chunk = positions[first:first + compiled.MATMUL_WEIGHTS]
            for i in chunk:
                outs[i] = np.empty((x.shape[0], matrices[i].rows), np.float32)
            if x.shape[0]:
                _matmul_rows([matrices[i] for i in chunk], xs, q8, block, [outs[i] for i in chunk])
    return outs


def _matmul_rows(parts: list[Matrix], x: np.ndarray, q8: bool, block: int, outs: list[np.ndarray]) -> None:
    """compiled.matmul_rows over up to MATMUL_WEIGHTS weights, the rest of its weights empty: one
    compiled specialization serves every count."""
    pad = compiled.MATMUL_WEIGHTS - len(parts)
    first = parts[0]
    unused = first.flat[:0]  # empty, of the others' array type (weight_bytes' read-only views)
    qtypes = tuple([int(p.qtype) for p in parts] + [int(first.qtype)] * pad)
    ws = tuple([p.flat for p in parts] + [unused] * pad)
    rbs = tuple([p.row_bytes for p in parts] + [0] * pad)
    outs_all = tuple(outs + [np.empty((x.shape[0], 0), np.float32)] * pad)
    _run(compiled.matmul_rows, sum([p.flat.nbytes for p in parts]), qtypes, ws, rbs, x, q8, block, outs_all)



class AttentionProducts:
    """A layer's q, k, v and output weights, for one token's whole attention in one compiled call.

    compiled.attention_one runs the q, k and v products (as matmul_many would: one quantization
    of x, one parallel loop), attention.decode_attention and the output product together: in a
    decode step each of those was a call of its own, with Python between them, and every call
    after a weight product starts slowly (moe.StackedExperts). It needs q, k and v to take the
    same form of product (`fits`: integer products on the same activation blocks, or float32),
    which every llama.cpp mix gives them; otherwise the model calls the parts in turn.
    """

    def __init__(self, wq: Matrix, wk: Matrix, wv: Matrix, wo: Matrix):
        self.qkv, self.wo = (wq, wk, wv), wo
        self.weight_bytes = sum(m.flat.nbytes for m in (wq, wk, wv, wo))
        self._forms: dict[bool, tuple | None] = {}  # exact -> the kernel's product arguments, or None

    def _form(self, exact: bool | None) -> tuple | None:
        key = _exact_products if exact is None else exact
        if key not in self._forms:
            q8s = [q8_products(m.qtype, key) for m in self.qkv]
            blocks = {q8_block(m.qtype) if q8 else 1 for m, q8 in zip(self.qkv, q8s)}
            o_q8 = q8_products(self.wo.qtype, key)
            self._forms[key] = None if len(set(q8s)) > 1 or len(blocks) > 1 else (
                tuple(int(m.qtype) for m in self.qkv), tuple(m.flat for m in self.qkv),
                tuple(m.row_bytes for m in self.qkv), q8s[0], blocks.pop(),
                int(self.wo.qtype), self.wo.flat, self.wo.row_bytes, o_q8, q8_block(self.wo.qtype) if o_q8 else 1)
        return self._forms[key]

    def fits(self, exact: bool | None = None) -> bool:
        return self._form(exact) is not None

    def __call__(self, x: np.ndarray, n_head: int, q_norm: np.ndarray, k_norm: np.ndarray, norm: int, eps: float,
                 clamp: float, cos: np.ndarray, sin: np.ndarray, position: int, rope_dim: int, neox: bool,
                 k_cache: np.ndarray, v_cache: np.ndarray, scale: float, exact: bool | None = None) -> np.ndarray:
        """One token's attention output [1, n_embd] from its normed x [1, n_embd]: the products
        around attention.decode_attention(q, k, v, q_norm, ..., scale), whose arguments these are,
        the key and value written into the caches at `position`. Only when `fits`."""
        form = self._form(exact)
        if form is None or x.shape != (1, self.qkv[0].n):
            raise QmoeError(f"AttentionProducts: x [1, {self.qkv[0].n}] and q, k, v of one product form expected")
        out = np.empty((1, self.wo.rows), np.float32)
        _run(compiled.attention_one, self.weight_bytes, *form[:3], x, *form[3:], n_head, q_norm, k_norm, norm,
             float(eps), np.float32(clamp), cos, sin, position, rope_dim, neox, k_cache, v_cache, np.float32(scale), out)
        return out

def quantized_activation(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """x as the integer products see it for a `qtype` weight (xq * d per block), float32:
    BLAS products of many tokens multiply this, so that a prompt gives the same result to
    float rounding whether it is computed in one batch or in chunks of few tokens."""
    out = np.empty(x.shape, np.float32)
    compiled.quantized_rows(x, q8_block(qtype), out)
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
    Made for the expert predictors: checked once here, then each call is one compiled call
    that releases the GIL, where separate products, activations and a sort would each cost a
    Python round trip and a turn at the GIL. fc1's rows go over the kernel threads of the
    calling thread (set_num_threads): all of them in the model's thread, one in a prefetch
    worker, which then leaves the other cores to the model; one alone for a network of
    less than PARALLEL_MIN_BYTES, like any small product (_run).
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
        _run(compiled.mlp_top, self.w1.nbytes + self.w2.nbytes, *self.layer1, *self.layer2, self.gelu, x, count, out)
        return out


def dequantize(w: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """A raw weight [..., row] of type qtype as float32 [..., n]."""
    qtype = check_qtype(qtype)
    wb, n = weight_bytes(w, qtype, "dequantize")
    lead = w.shape[:-1]
    out = np.empty((int(np.prod(lead)), n), np.float32)
    if out.size:
        _run(compiled.dequantize_rows, wb.nbytes, int(qtype), wb, row_bytes(qtype, n), 0, out)
    return out.reshape(*lead, n)
