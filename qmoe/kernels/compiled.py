"""Everything numba compiles: per-format row loops in LLVM vector IR, and the parallel kernels.

Why hand-written vector IR for the innermost loop: left to itself, LLVM (through
numba) fully unrolls the 32-element loop inside a block and then vectorizes across
*blocks*, gathering every 34th or 18th byte; a Q8_0 matrix-vector product written
as plain numba loops reached 2-4 GB/s on one core. Written as explicit vectors -- one
block becomes two 16-lane float32 vectors, multiplied by the activation and added
into a 16-lane accumulator that is reduced once per row -- the same product runs at
22-26 GB/s (Q8_0) and 10 GB/s (Q4_0) per core on weights in cache, and at 11-16 and
8-9 GB/s on weights streamed from memory (one core reads about 15-17 GB/s). The IR
is generic LLVM vectors (no x86 intrinsics); LLVM lowers it to AVX-512, AVX2 or NEON
for the machine numba compiles on.

The activations stay float32 (no int8 quantization of x), so every format's product
is as exact as a float32 BLAS product of the dequantized weights.

Numba caches compiled code per source file and does not track what a cached
function calls in other files, so the IR builders and the kernels that use them live
here together: editing either invalidates the cache of both.

Row loops generated per weight format, each over the raw bytes of one row:
    dot_row(qtype, w, w_off, x, x_off, n) -> float32     sum_i w_row[i] * x.flat[x_off + i]
    dot_row_tile(qtype, w, w_off, x, x_offs, n) -> tuple  the same for TOKEN_TILE offsets,
                                                          decoding each block once
    decode_row(qtype, w, w_off, out, out_off, n)         out.flat[out_off + i] = w_row[i]
w is the weight as flat uint8, w_off the byte offset of the row; n is the row length.
The kernels at the bottom (matmul_rows, dequantize_rows, moe_rows) run them in
parallel over output rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

QT = GGMLQuantizationType
F32, F16, BF16, Q8_0, Q4_0 = int(QT.F32), int(QT.F16), int(QT.BF16), int(QT.Q8_0), int(QT.Q4_0)

# ----------------------------------------------------------------------------- LLVM IR helpers

_f32 = ir.FloatType()
_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_LANES = 16  # one accumulator vector; a step of 32 elements is two of these
_STEP = 2 * _LANES
_vf32 = ir.VectorType(_f32, _LANES)
# reassociation lets the 16 lanes sum in any order (and a*b+c fuse); no nnan/ninf assumptions
_FLAGS = ("reassoc", "contract", "nsz")


def _const(n: int) -> ir.Constant:
    return ir.Constant(_i64, n)


def _load(builder, ptr, ty, offset_bytes: int = 0):
    """Unaligned load of an `ty` at byte pointer `ptr` + offset_bytes."""
    p = builder.gep(ptr, [_const(offset_bytes)]) if offset_bytes else ptr
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=1)


def _half_to_f32(builder, ptr):
    return builder.fpext(builder.bitcast(_load(builder, ptr, _i16), ir.HalfType()), _f32)


def _bf16_to_f32(builder, bits):  # bits: i16 or <N x i16>; bf16 is the top half of a float32
    wide = _i32 if isinstance(bits.type, ir.IntType) else ir.VectorType(_i32, bits.type.count)
    shifted = builder.shl(builder.zext(bits, wide), ir.Constant(wide, 16))
    return builder.bitcast(shifted, _f32 if wide is _i32 else ir.VectorType(_f32, bits.type.count))


def _splat(builder, value):
    vec = builder.insert_element(ir.Constant(_vf32, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, _LANES), [0] * _LANES))


def _sum_lanes(builder, vec):
    fnty = ir.FunctionType(_f32, [_f32, _vf32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.fadd.v{_LANES}f32")
    return builder.call(fn, [ir.Constant(_f32, -0.0), vec], fastmath=_FLAGS)


# ----------------------------------------------------------------------------- formats in IR
# A step decodes 32 consecutive elements of a row into (scale or None, lo[16], hi[16]);
# the weights are scale * lo, scale * hi. Float formats also decode one element at a time
# for a row tail shorter than a step (block formats have no tails: rows are whole blocks).


def _q8_0_step(builder, p):
    d = _half_to_f32(builder, p)
    q = ir.VectorType(_i8, _LANES)
    lo = builder.sitofp(_load(builder, p, q, 2), _vf32)
    hi = builder.sitofp(_load(builder, p, q, 2 + _LANES), _vf32)
    return d, lo, hi


def _q4_0_step(builder, p):
    d = _half_to_f32(builder, p)
    vq = ir.VectorType(_i8, _LANES)
    q = _load(builder, p, vq, 2)  # byte i: element i in the low nibble, element i + 16 in the high
    eight = ir.Constant(vq, [8] * _LANES)
    lo = builder.sub(builder.and_(q, ir.Constant(vq, [15] * _LANES)), eight)
    hi = builder.sub(builder.lshr(q, ir.Constant(vq, [4] * _LANES)), eight)
    return d, builder.sitofp(lo, _vf32), builder.sitofp(hi, _vf32)


def _f32_step(builder, p):
    return None, _load(builder, p, _vf32), _load(builder, p, _vf32, 4 * _LANES)


def _f16_step(builder, p):
    vh = ir.VectorType(ir.HalfType(), _LANES)
    return (
        None,
        builder.fpext(_load(builder, p, vh), _vf32),
        builder.fpext(_load(builder, p, vh, 2 * _LANES), _vf32),
    )


def _bf16_step(builder, p):
    vi = ir.VectorType(_i16, _LANES)
    return (
        None,
        _bf16_to_f32(builder, _load(builder, p, vi)),
        _bf16_to_f32(builder, _load(builder, p, vi, 2 * _LANES)),
    )


@dataclass(frozen=True)
class _IRFormat:
    step_bytes: int  # bytes of 32 elements
    step: Callable  # (builder, byte ptr) -> (scale | None, lo, hi)
    elem_bytes: int = 0  # float formats: bytes of one element, for the row tail
    one: Callable | None = None  # float formats: (builder, byte ptr) -> float


IR_FORMATS = {
    Q8_0: _IRFormat(34, _q8_0_step),
    Q4_0: _IRFormat(18, _q4_0_step),
    F32: _IRFormat(128, _f32_step, 4, lambda b, p: _load(b, p, _f32)),
    F16: _IRFormat(64, _f16_step, 2, _half_to_f32),
    BF16: _IRFormat(64, _bf16_step, 2, lambda b, p: _bf16_to_f32(b, _load(b, p, _i16))),
}


# Bytes ahead of the block being decoded that each step asks the cache to fetch. Rows are
# read once, front to back, so the hardware prefetcher alone leaves the core waiting on
# memory; asking ~4 KB ahead (two rows of 2048 Q8_0 weights) raised cold Q4_0/Q8_0
# products from 6.2/9.2 to 8.7/12.9 GB/s on one core. A prefetch never faults, so
# running past the end of the weights is harmless.
_PREFETCH_BYTES = 4096


def _prefetch(builder, ptr):
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _i32, _i32, _i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(
        fn, [ptr, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)]
    )  # read, keep, data


@contextmanager
def _decoded_steps(builder, fmt: _IRFormat, wp, n_steps):
    """Loop over the whole 32-element steps of a row; yields (step index, scale | None, lo, hi)."""
    with cgutils.for_range(builder, n_steps) as loop:
        bp = builder.gep(wp, [builder.mul(loop.index, _const(fmt.step_bytes))])
        _prefetch(builder, builder.gep(bp, [_const(_PREFETCH_BYTES)]))
        yield (loop.index, *fmt.step(builder, bp))


def _is_c_array(ty, dtype) -> bool:
    """The row loops index raw pointers, so they take only C-contiguous arrays of the right dtype."""
    return isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype == dtype


def _pointers(context, builder, sig, args):
    """(weight row byte pointer, float32 pointer at the x/out offset, n) from intrinsic args."""
    w, w_off, f, f_off, n = args
    wp = builder.gep(context.make_array(sig.args[0])(context, builder, w).data, [w_off])
    fp = builder.gep(context.make_array(sig.args[2])(context, builder, f).data, [f_off])
    return wp, fp, n


def _make_row_dot(fmt: _IRFormat, n_tokens: int):
    """row_dot(w, w_off, x, x_offs, n): the row's dot product with n_tokens activation rows.

    n_tokens = 1: x_offs is one offset, the result a float32. n_tokens = TOKEN_TILE: x_offs
    is a tuple of offsets and the result a tuple of float32; every block is decoded once
    for all of them, which is what makes a few tokens cheaper than a few products.
    """

    @intrinsic
    def row_dot(typingctx, w, w_off, x, x_offs, n):
        if not (_is_c_array(w, types.uint8) and _is_c_array(x, types.float32)):
            return None
        if n_tokens == 1:
            offs_type, result_type = types.intp, types.float32
        else:
            offs_type, result_type = (
                types.UniTuple(types.intp, n_tokens),
                types.UniTuple(types.float32, n_tokens),
            )
        sig = result_type(w, types.intp, x, offs_type, types.intp)

        def codegen(context, builder, sig, args):
            w, w_off, x, x_offs, n = args
            wp = builder.gep(context.make_array(sig.args[0])(context, builder, w).data, [w_off])
            x0 = context.make_array(sig.args[2])(context, builder, x).data
            offs = [x_offs] if n_tokens == 1 else [builder.extract_value(x_offs, j) for j in range(n_tokens)]
            xps = [builder.gep(x0, [off]) for off in offs]
            n_steps = builder.sdiv(n, _const(_STEP))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf32, [0.0] * _LANES)) for _ in xps]
            with _decoded_steps(builder, fmt, wp, n_steps) as (i, scale, lo, hi):
                for xp, acc in zip(xps, accs):
                    xs = builder.gep(xp, [builder.mul(i, _const(_STEP))])
                    x_lo = builder.load(builder.bitcast(xs, _vf32.as_pointer()), align=4)
                    x_hi = builder.load(
                        builder.bitcast(builder.gep(xs, [_const(_LANES)]), _vf32.as_pointer()), align=4
                    )
                    s = builder.fadd(
                        builder.fmul(lo, x_lo, flags=_FLAGS),
                        builder.fmul(hi, x_hi, flags=_FLAGS),
                        flags=_FLAGS,
                    )
                    if scale is not None:
                        s = builder.fmul(_splat(builder, scale), s, flags=_FLAGS)
                    builder.store(builder.fadd(builder.load(acc), s, flags=_FLAGS), acc)
            totals = [
                cgutils.alloca_once_value(builder, _sum_lanes(builder, builder.load(acc))) for acc in accs
            ]
            if fmt.one is not None:
                with cgutils.for_range(builder, n, start=builder.mul(n_steps, _const(_STEP))) as loop:
                    wi = fmt.one(builder, builder.gep(wp, [builder.mul(loop.index, _const(fmt.elem_bytes))]))
                    for xp, total in zip(xps, totals):
                        xi = builder.load(builder.gep(xp, [loop.index]))
                        builder.store(builder.fadd(builder.load(total), builder.fmul(wi, xi)), total)
            results = [builder.load(total) for total in totals]
            return results[0] if n_tokens == 1 else context.make_tuple(builder, sig.return_type, results)

        return sig, codegen

    return row_dot


def _make_row_decode(fmt: _IRFormat):
    @intrinsic
    def row_decode(typingctx, w, w_off, out, out_off, n):
        if not (_is_c_array(w, types.uint8) and _is_c_array(out, types.float32)):
            return None
        sig = types.void(w, types.intp, out, types.intp, types.intp)

        def codegen(context, builder, sig, args):
            wp, op, n = _pointers(context, builder, sig, args)
            n_steps = builder.sdiv(n, _const(_STEP))
            with _decoded_steps(builder, fmt, wp, n_steps) as (i, scale, lo, hi):
                if scale is not None:
                    lo = builder.fmul(_splat(builder, scale), lo)
                    hi = builder.fmul(_splat(builder, scale), hi)
                os = builder.gep(op, [builder.mul(i, _const(_STEP))])
                builder.store(lo, builder.bitcast(os, _vf32.as_pointer()), align=4)
                builder.store(
                    hi, builder.bitcast(builder.gep(os, [_const(_LANES)]), _vf32.as_pointer()), align=4
                )
            if fmt.one is not None:
                with cgutils.for_range(builder, n, start=builder.mul(n_steps, _const(_STEP))) as loop:
                    wi = fmt.one(builder, builder.gep(wp, [builder.mul(loop.index, _const(fmt.elem_bytes))]))
                    builder.store(wi, builder.gep(op, [loop.index]))
            return context.get_dummy_value()

        return sig, codegen

    return row_decode


TOKEN_TILE = 4  # activation rows that share one decode of a weight row (tile_offsets lists 4)
OUT_BLOCK = 16  # moe_rows: output rows that share the hidden rows read for them

_q8_0_dot, _q8_0_dot_tile = _make_row_dot(IR_FORMATS[Q8_0], 1), _make_row_dot(IR_FORMATS[Q8_0], TOKEN_TILE)
_q4_0_dot, _q4_0_dot_tile = _make_row_dot(IR_FORMATS[Q4_0], 1), _make_row_dot(IR_FORMATS[Q4_0], TOKEN_TILE)
_f32_dot, _f32_dot_tile = _make_row_dot(IR_FORMATS[F32], 1), _make_row_dot(IR_FORMATS[F32], TOKEN_TILE)
_f16_dot, _f16_dot_tile = _make_row_dot(IR_FORMATS[F16], 1), _make_row_dot(IR_FORMATS[F16], TOKEN_TILE)
_bf16_dot, _bf16_dot_tile = _make_row_dot(IR_FORMATS[BF16], 1), _make_row_dot(IR_FORMATS[BF16], TOKEN_TILE)
_q8_0_decode, _q4_0_decode = _make_row_decode(IR_FORMATS[Q8_0]), _make_row_decode(IR_FORMATS[Q4_0])
_f32_decode, _f16_decode = _make_row_decode(IR_FORMATS[F32]), _make_row_decode(IR_FORMATS[F16])
_bf16_decode = _make_row_decode(IR_FORMATS[BF16])


# ----------------------------------------------------------------------------- dispatch on qtype
# qtype is checked against FORMATS before any kernel runs, so the last branch is BF16.


@njit(nogil=True)
def dot_row(qtype, w, w_off, x, x_off, n):
    if qtype == Q4_0:
        return _q4_0_dot(w, w_off, x, x_off, n)
    elif qtype == Q8_0:
        return _q8_0_dot(w, w_off, x, x_off, n)
    elif qtype == F32:
        return _f32_dot(w, w_off, x, x_off, n)
    elif qtype == F16:
        return _f16_dot(w, w_off, x, x_off, n)
    else:
        return _bf16_dot(w, w_off, x, x_off, n)


@njit(nogil=True)
def dot_row_tile(qtype, w, w_off, x, x_offs, n):
    """dot_row for TOKEN_TILE activation rows at once; x_offs: tuple of their offsets."""
    if qtype == Q4_0:
        return _q4_0_dot_tile(w, w_off, x, x_offs, n)
    elif qtype == Q8_0:
        return _q8_0_dot_tile(w, w_off, x, x_offs, n)
    elif qtype == F32:
        return _f32_dot_tile(w, w_off, x, x_offs, n)
    elif qtype == F16:
        return _f16_dot_tile(w, w_off, x, x_offs, n)
    else:
        return _bf16_dot_tile(w, w_off, x, x_offs, n)


@njit(nogil=True)
def decode_row(qtype, w, w_off, out, out_off, n):
    if qtype == Q4_0:
        _q4_0_decode(w, w_off, out, out_off, n)
    elif qtype == Q8_0:
        _q8_0_decode(w, w_off, out, out_off, n)
    elif qtype == F32:
        _f32_decode(w, w_off, out, out_off, n)
    elif qtype == F16:
        _f16_decode(w, w_off, out, out_off, n)
    else:
        _bf16_decode(w, w_off, out, out_off, n)


@njit(nogil=True)
def tile_offsets(rows, start, count, divisor, row_len):
    """Offsets (rows[start + j] // divisor) * row_len of a tile's activation rows, j < count <= TOKEN_TILE.

    A tile shorter than TOKEN_TILE repeats its last row (computed again, not stored).
    """
    last = start + count - 1
    return (
        (rows[start] // divisor) * row_len,
        (rows[min(start + 1, last)] // divisor) * row_len,
        (rows[min(start + 2, last)] // divisor) * row_len,
        (rows[min(start + 3, last)] // divisor) * row_len,
    )


@njit(nogil=True)
def silu(a):
    return a / (np.float32(1.0) + np.exp(-a))


# ----------------------------------------------------------------------------- kernels


@njit(parallel=True, nogil=True, cache=True)
def matmul_rows(qtype, w, row_bytes, x, out):
    """out[t, r] = w[r] . x[t] for all rows r, in parallel over rows.

    w: flat weight bytes [rows * row_bytes]; x: float32 [T, n]; out: float32 [T, rows].
    Each row is read from memory once and decoded once per TOKEN_TILE tokens, so this
    is the kernel for few tokens (decode); many tokens go to BLAS.
    """
    n_tokens, n = x.shape
    rows = out.shape[1]
    tokens = np.arange(n_tokens)
    for r in prange(rows):
        for t in range(0, n_tokens, TOKEN_TILE):
            m = min(TOKEN_TILE, n_tokens - t)
            if m == 1:
                out[t, r] = dot_row(qtype, w, r * row_bytes, x, t * n, n)
            else:
                y = dot_row_tile(qtype, w, r * row_bytes, x, tile_offsets(tokens, t, m, 1, n), n)
                for j in range(m):
                    out[t + j, r] = y[j]


@njit(parallel=True, nogil=True, cache=True)
def dequantize_rows(qtype, w, row_bytes, first_row, out):
    """out[i] = w[first_row + i] as float32, in parallel over rows.  out: float32 [R, n]."""
    n_rows, n = out.shape
    for i in prange(n_rows):
        decode_row(qtype, w, (first_row + i) * row_bytes, out, i * n, n)


@njit(parallel=True, nogil=True, cache=True)
def moe_rows(
    gate, up, down, qtypes, row_bytes, x, k, pairs, group_starts, group_experts, pair_weights, n_ff, out
):
    """out[t] += sum over pairs p = t * k + j of weight[p] * down_e (silu(gate_e x[t]) * up_e x[t]).

    gate, up: flat bytes of [E, n_ff, n_embd] weights; down: of [E, n_embd, n_ff];
    qtypes, row_bytes: (gate, up, down); x: float32 [T, n_embd]; out: float32 [T, n_embd].
    The (token, expert) pairs to compute come grouped by expert: group g is expert
    group_experts[g] for pairs[group_starts[g]:group_starts[g + 1]], pair p being token
    p // k. Each weight row is read from memory once per group and decoded once per
    TOKEN_TILE of its pairs. Two parallel passes: the hidden rows of every pair, then
    every output row summed over the pairs of its token.
    """
    n_tokens, n_embd = x.shape
    n_groups = group_experts.shape[0]
    hidden = np.empty((n_tokens * k, n_ff), np.float32)  # [pair, n_ff]
    for i in prange(n_groups * n_ff):
        g = i // n_ff
        r = i - g * n_ff
        e = group_experts[g]
        off_gate, off_up = (e * n_ff + r) * row_bytes[0], (e * n_ff + r) * row_bytes[1]
        for q in range(group_starts[g], group_starts[g + 1], TOKEN_TILE):
            m = min(TOKEN_TILE, group_starts[g + 1] - q)
            if m == 1:
                t_off = pairs[q] // k * n_embd
                a = dot_row(qtypes[0], gate, off_gate, x, t_off, n_embd)
                b = dot_row(qtypes[1], up, off_up, x, t_off, n_embd)
                hidden[pairs[q], r] = silu(a) * b
            else:
                t_offs = tile_offsets(pairs, q, m, k, n_embd)
                a4 = dot_row_tile(qtypes[0], gate, off_gate, x, t_offs, n_embd)
                b4 = dot_row_tile(qtypes[1], up, off_up, x, t_offs, n_embd)
                for j in range(m):
                    hidden[pairs[q + j], r] = silu(a4[j]) * b4[j]
    # Output rows in blocks of OUT_BLOCK, so that a tile of hidden rows is read from L1 for a
    # whole block of down rows instead of from L2 or memory for every one of them.
    for cb in prange((n_embd + OUT_BLOCK - 1) // OUT_BLOCK):
        c_end = min(n_embd, (cb + 1) * OUT_BLOCK)
        for g in range(n_groups):
            for q in range(group_starts[g], group_starts[g + 1], TOKEN_TILE):
                m = min(TOKEN_TILE, group_starts[g + 1] - q)
                for c in range(cb * OUT_BLOCK, c_end):
                    off_down = (group_experts[g] * n_embd + c) * row_bytes[2]
                    if m == 1:
                        p = pairs[q]
                        y = dot_row(qtypes[2], down, off_down, hidden, p * n_ff, n_ff)
                        out[p // k, c] += pair_weights[p] * y
                    else:
                        y4 = dot_row_tile(
                            qtypes[2], down, off_down, hidden, tile_offsets(pairs, q, m, 1, n_ff), n_ff
                        )
                        for j in range(m):
                            p = pairs[q + j]
                            out[p // k, c] += pair_weights[p] * y4[j]


@njit(nogil=True)
def _activate(a, gelu):
    """Exact (erf) GELU when `gelu`, else SiLU."""
    if gelu:
        return np.float32(0.5) * a * (np.float32(1.0) + np.float32(math.erf(a * np.float32(0.7071067811865476))))
    return silu(a)


@njit(nogil=True, cache=True)
def mlp_top(q1, w1, rb1, b1, q2, w2, rb2, b2, gelu, x, count, out):
    """out[t] = the `count` largest of fc2(act(fc1 x[t] + b1)) + b2, best first (ties: lower index).

    w1, w2: flat weight bytes of [H, n] and [E, H]; x: float32 [T, n]; out: int64 [T, count].
    Serial on purpose: the caller runs it on a core of its own, beside the model.
    """
    n_tokens, n = x.shape
    hidden_size, n_out = b1.shape[0], b2.shape[0]
    hidden = np.empty(hidden_size, np.float32)
    scores = np.empty(n_out, np.float32)
    for t in range(n_tokens):
        for r in range(hidden_size):
            hidden[r] = _activate(dot_row(q1, w1, r * rb1, x, t * n, n) + b1[r], gelu)
        for e in range(n_out):
            scores[e] = dot_row(q2, w2, e * rb2, hidden, 0, hidden_size) + b2[e]
        order = np.argsort(-scores, kind="mergesort")
        out[t] = order[:count]

