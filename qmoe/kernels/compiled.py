"""Everything numba compiles: per-format row loops in LLVM vector IR, and the parallel kernels.

Why hand-written vector IR for the innermost loop: left to itself, LLVM (through
numba) fully unrolls the 32-element loop inside a block and then vectorizes across
*blocks*, gathering every 34th or 18th byte; a Q8_0 matrix-vector product written
as plain numba loops reached 2-4 GB/s on one core. Written as explicit vectors -- one
block becomes two 16-lane float32 vectors, multiplied by the activation and added
into a 16-lane accumulator that is reduced once per row -- the same product runs at
22-26 GB/s (Q8_0) and 10 GB/s (Q4_0) per core on weights in cache, and at 11-16 and
8-9 GB/s on weights streamed from memory (one core reads about 15-17 GB/s). The IR
is generic LLVM vectors, lowered to AVX-512, AVX2 or NEON for the machine numba compiles
on, except for two AVX2 instructions of the integer products that LLVM would not select
from generic code (`vpmaddubsw`, `vpsignb`) and IQ4's lookup, a byte shuffle where the
target has one (`pshufb`, NEON `tbl`).

Two kinds of product: dot_row keeps the activation float32, so every format's product
is as exact as a float32 BLAS product of the dequantized weights; dot_row_q8 (block
formats) takes the activation quantized to 8 bits per block, as llama.cpp does, and sums
integers, which is less work per weight byte ("integer products" below). On the 2-core
AVX2 (no AVX-512) development machine it raised one core's cold matrix-vector products
from 4.7 / 11.7 / 3.9 / 5.3 / 3.7 GB/s (Q4_0 / Q8_0 / Q4_K / Q6_K / IQ4_XS) to
7.3 / 17.2 / 7.6 / 8.6 / 5.8 GB/s; multiplying bytes as llama.cpp does (vpmaddubsw) instead
of 16-bit values (vpmaddwd alone) then made them 1.05 / 1.09 / 1.42 / 1.48 / 1.23x faster
(on weights in cache, the two versions interleaved in one process). With the bytes' products
down to about 12 vector instructions per 64 weights, a Q4_K super-block's other ~100 were
scalar work on its sub-scales and mins, decoded and multiplied group by group; decoding them
four at a time in 32-bit words, summing the mins' products in one vector multiply per block
(block_imin) and shuffling the sub-scales out of one vector (iscale_lanes) made Q4_K products
1.28-1.39x faster again (Q6_K 1.02-1.05x), same measurement. The 32-block formats' loops then
spent half their instructions converting each block's fp16 scale; converting it with one
vcvtph2ps (_half_to_f32_f16c) and giving Q4_0 and Q5_0 the signed bytes' form made Q4_0's
cold products 1.27-1.40x faster and Q8_0's 1.08-1.10x. Adding Q6_K's offset to the integer
sums' lanes instead of reducing it to a number first (_q6_k_block_ioffset) made its cold
products 1.14x (one core) and 1.16x (two) faster; Q4_K's and Q5_K's mins the same way
(_k4_block_imin), 1.05-1.08x; IQ4_XS's 8 scales decoded as one vector per block instead of
group by group (_iq4_xs_scales), 1.08-1.09x.

Numba caches compiled code per source file and does not track what a cached
function calls in other files, so the IR builders and the kernels that use them live
here together: editing either invalidates the cache of both. The field offsets come
from qmoe/formats.py; ggml fixes them, but whoever edits one there must touch this
file too, or the cache keeps the old code. The same holds for the two functions of other files
that the decode step's fused calls (route_moe_one, attention_one) compile into themselves:
pointwise._route_softmax_topk and attention._decode_attention.

Row loops, one compiled function for every type (a switch on qtype inside), each over
the raw bytes of one row:
    dot_row(qtype, w, w_off, x, x_off, n) -> float32     sum_i w_row[i] * x.flat[x_off + i]
    dot_row_q8(qtype, w, w_off, xq, xd, xs, xb, x_off, n) the same on quantize_q8's activation
    dot_row_tile(qtype, w, w_off, x, x_offs, n) -> tuple  the same for TOKEN_TILE offsets,
                                                          decoding each block once
    decode_row(qtype, w, w_off, out, out_off, n)         out.flat[out_off + i] = w_row[i]
w is the weight as flat uint8, w_off the byte offset of the row; n is the row length.
The kernels at the bottom (matmul_rows, dequantize_rows, moe_rows) run them in
parallel over output rows. For a prompt's Q8_0 experts on a CPU with VNNI, moe_rows
multiplies tiles instead (tile_dot_q8_0_16 / _8): TILE_ROWS weight rows times 15 (or 7)
tokens held in the vector lanes, which is what a matrix product of many tokens wants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qmoe.formats import FORMATS, KERNEL_TYPES, KVALUES
from qmoe.kernels.attention import _decode_attention
from qmoe.kernels.pointwise import _route_softmax_topk

binding.initialize_native_asmparser()  # for _half_to_f32_f16c's inline assembly; numba leaves it out

QT = GGMLQuantizationType
F32, F16, BF16, Q8_0, Q4_0 = int(QT.F32), int(QT.F16), int(QT.BF16), int(QT.Q8_0), int(QT.Q4_0)
Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS = int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1), int(QT.IQ4_NL), int(QT.IQ4_XS)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(QT.Q2_K), int(QT.Q3_K), int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)

# ----------------------------------------------------------------------------- LLVM IR helpers

_f32 = ir.FloatType()
_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_LANES = 16  # one accumulator vector; a group of 32 elements is two of these
_GROUP = 2 * _LANES
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
    """The fp16 at ptr as float32."""
    return builder.fpext(builder.bitcast(_load(builder, ptr, _i16), ir.HalfType()), _f32)


def _half_to_f32_int(builder, ptr):
    """_half_to_f32 in integer operations and one multiply by 2^112 (the fp16 bits moved into
    float32's places are the value times 2^-112), exact for subnormals, inf and NaN too.
    For the scale of a 32-block, converted once per block in the loop: x86 lowers fpext of
    a scalar half to a vpinsrw into whatever vector register is free, often the accumulator,
    which chained each block's scale to the previous block's sum (Q4_0 and Q8_0 products ran
    at half their speed). Where a scale is converted once per 256 elements, fpext is faster."""
    h = builder.zext(_load(builder, ptr, _i16), _i32)

    def c(v):
        return ir.Constant(_i32, v)

    mag = builder.shl(builder.and_(h, c(0x7FFF)), c(13))
    bits = builder.or_(mag, builder.shl(builder.and_(h, c(0x8000)), c(16)))
    value = builder.fmul(builder.bitcast(bits, _f32), ir.Constant(_f32, 2.0**112))
    inf_nan = builder.icmp_unsigned("==", builder.and_(h, c(0x7C00)), c(0x7C00))
    return builder.select(inf_nan, builder.bitcast(builder.or_(bits, c(0x7F800000)), _f32), value)


def _bf16_to_f32(builder, bits):  # bits: i16 or <N x i16>; bf16 is the top half of a float32
    wide = _i32 if isinstance(bits.type, ir.IntType) else ir.VectorType(_i32, bits.type.count)
    shifted = builder.shl(builder.zext(bits, wide), ir.Constant(wide, 16))
    return builder.bitcast(shifted, _f32 if wide is _i32 else ir.VectorType(_f32, bits.type.count))


def _splat(builder, value, lanes: int = _LANES):
    vty = ir.VectorType(value.type, lanes)
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes))


def _sum_lanes(builder, vec):
    lanes = vec.type.count
    fnty = ir.FunctionType(_f32, [_f32, vec.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.fadd.v{lanes}f32")
    return builder.call(fn, [ir.Constant(_f32, -0.0), vec], fastmath=_FLAGS)


# ----------------------------------------------------------------------------- formats in IR
# A row is decoded in groups of 32 consecutive elements: group s of a block (s < block / 32)
# becomes two halves of 16, each integer values q with a scale and an offset,
# weight = q * scale + offset (float32 scalars or None), scale = d * iscale: the block's
# fp16 d times the half's integer sub-scale (K-quants, IQ4_XS; None elsewhere). A 32-block
# is one group; a 256-element super-block is 8. Field offsets come from qmoe/formats.py.
# Decoding computes every scale and weight with the float32 operations, in the order,
# of gguf-py's dequantize, without fast-math flags, so it is bit-exact; only the products'
# sums reassociate. Float formats also decode one element at a time for a row tail
# shorter than a group (block formats have none: rows are whole blocks).

_vi8 = ir.VectorType(_i8, _LANES)
_vi32 = ir.VectorType(_i32, _LANES)
_vi32_group = ir.VectorType(_i32, _GROUP)


@dataclass(frozen=True)
class _Half:
    q: ir.Value  # <16 x i8> signed integer values (block formats) or <16 x float> (float formats)
    d: ir.Value | None = None  # float32
    offset: ir.Value | None = None  # float32
    iscale: ir.Value | None = None  # i32
    imin: ir.Value | None = None  # i32, K-quants: offset = -(dmin * imin), dmin the block's
    ushift: int | None = None  # q + ushift is in 0..127 (None: q is signed): the integer products' bytes
    # <16 x i16>, where a format has its sub-scales in a vector: the group's iscale lane by lane
    # (8 lanes of the low half's, 8 of the high half's), what the integer products multiply by
    iscale_lanes: ir.Value | None = None

    def values(self, builder):
        """q as <16 x float>."""
        return builder.sitofp(self.q, _vf32) if isinstance(self.q.type.element, ir.IntType) else self.q

    def scale(self, builder):
        """d * iscale as float32 (d alone without a sub-scale; None for float formats)."""
        return self.d if self.iscale is None else builder.fmul(self.d, _i32_to_f32(builder, self.iscale))

    def same_scale(self, other: _Half) -> bool:
        return self.d is other.d and self.iscale is other.iscale


def _c8(value: int) -> ir.Constant:
    return ir.Constant(_vi8, [value] * _LANES)


def _bytes16(builder, p, offset: int):
    return _load(builder, p, _vi8, offset)


def _bits(builder, v, shift: int, mask: int):
    """(v >> shift) & mask, lane by lane, for <16 x i8> v."""
    return builder.and_(builder.lshr(v, _c8(shift)) if shift else v, _c8(mask))


def _byte(builder, p, offset: int):
    """The unsigned byte at p + offset as i32."""
    return builder.zext(_load(builder, p, _i8, offset), _i32)


def _i32_to_f32(builder, v):
    return builder.sitofp(v, _f32)


def _kvalues(builder, nibbles):
    """IQ4's table lookup KVALUES[nibble] on <16 x i8>: one byte shuffle where the target has
    one (x86's pshufb, every x86-64 CPU with SSSE3, so every AVX2 one; ARM's tbl), else a tree
    of 15 vector selects (LLVM's generic vectors have no shuffle by a variable index)."""
    table = ir.Constant(_vi8, list(KVALUES))
    shuffle = {"x86_64": "llvm.x86.ssse3.pshuf.b.128", "aarch64": "llvm.aarch64.neon.tbl1.v16i8"}
    name = shuffle.get(builder.module.triple.split("-")[0])
    if name is not None:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vi8, [_vi8, _vi8]), name)
        return builder.call(fn, [table, nibbles])
    vals = [_c8(k) for k in KVALUES]
    for bit in range(4):
        test = builder.icmp_unsigned("!=", builder.and_(nibbles, _c8(1 << bit)), _c8(0))
        vals = [builder.select(test, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
    return vals[0]


def _qh_bits(builder, p, offset: int):
    """Q5_0/Q5_1: the u32 at p + offset -> (bit i for i < 16, bit i for 16 <= i < 32), <16 x i8> of 0/1."""
    qh = _load(builder, p, _i32, offset)
    vec = builder.insert_element(ir.Constant(_vi32, ir.Undefined), qh, ir.Constant(_i32, 0))
    vec = builder.shuffle_vector(vec, vec, ir.Constant(_vi32, [0] * _LANES))
    halves = []
    for first in (0, _LANES):
        shifted = builder.lshr(vec, ir.Constant(_vi32, list(range(first, first + _LANES))))
        halves.append(builder.trunc(builder.and_(shifted, ir.Constant(_vi32, [1] * _LANES)), _vi8))
    return halves


def _same(q_lo, q_hi, d, offset=None, iscale=None, imin=None, ushift=None, iscale_lanes=None):
    return (_Half(q_lo, d, offset, iscale, imin, ushift, iscale_lanes),
            _Half(q_hi, d, offset, iscale, imin, ushift, iscale_lanes))


def _lanes_of(builder, vec, lo: int, hi: int):
    """<16 x i16> of 8 lanes vec[lo], 8 lanes vec[hi] (vec: i16 lanes, lo and hi among the same
    8): a group's sub-scales for the integer products, from a vector loaded once per block.

    The 8 lanes that hold both are first put in both 128-bit halves (once per block: every group
    asks for the same), so that each group's pick stays within the halves: for Q6_K's 16 scales
    LLVM made one byte shuffle of it instead of a cross-half one and a spill, 118 -> 104
    instructions a block."""
    base = _I_LANES * (lo // _I_LANES)
    assert hi // _I_LANES == lo // _I_LANES, "a group's two sub-scales come from one half of the vector"
    half = builder.shuffle_vector(vec, vec, ir.Constant(_vi32, list(range(base, base + _I_LANES)) * 2))
    return builder.shuffle_vector(half, half, ir.Constant(_vi32, [lo - base] * _I_LANES
                                                          + [_I_LANES + hi - base] * _I_LANES))


def _format(qtype):
    return FORMATS[QT(qtype)]


def _q8_0_group(builder, p, s):
    fmt = _format(Q8_0)
    d, qs = _half_to_f32_int(builder, p), fmt.offset("qs")
    return _same(_bytes16(builder, p, qs), _bytes16(builder, p, qs + 16), d)


def _nibbles(builder, p, offset: int):
    """16 bytes at p + offset -> (low nibbles, high nibbles): elements i and i + 16 of a 32-block."""
    q = _bytes16(builder, p, offset)
    return _bits(builder, q, 0, 15), _bits(builder, q, 4, 15)


def _q4_0_group(builder, p, s):
    lo, hi = _nibbles(builder, p, _format(Q4_0).offset("qs"))
    return _same(builder.sub(lo, _c8(8)), builder.sub(hi, _c8(8)), _half_to_f32_int(builder, p), ushift=8)


def _q4_1_group(builder, p, s):
    fmt = _format(Q4_1)
    lo, hi = _nibbles(builder, p, fmt.offset("qs"))
    m = _half_to_f32_int(builder, builder.gep(p, [_const(fmt.offset("m"))]))
    return _same(lo, hi, _half_to_f32_int(builder, p), m, ushift=0)


def _q5_values(builder, p, fmt):
    """Q5_0/Q5_1's 5-bit values (0..31) of the block at p, as two <16 x i8>."""
    lo, hi = _nibbles(builder, p, fmt.offset("qs"))
    h_lo, h_hi = _qh_bits(builder, p, fmt.offset("qh"))
    return builder.or_(lo, builder.shl(h_lo, _c8(4))), builder.or_(hi, builder.shl(h_hi, _c8(4)))


def _q5_0_group(builder, p, s):
    lo, hi = _q5_values(builder, p, _format(Q5_0))
    return _same(builder.sub(lo, _c8(16)), builder.sub(hi, _c8(16)), _half_to_f32_int(builder, p), ushift=16)


def _q5_1_group(builder, p, s):
    fmt = _format(Q5_1)
    lo, hi = _q5_values(builder, p, fmt)
    m = _half_to_f32_int(builder, builder.gep(p, [_const(fmt.offset("m"))]))
    return _same(lo, hi, _half_to_f32_int(builder, p), m, ushift=0)


def _iq4_nl_group(builder, p, s):
    lo, hi = _nibbles(builder, p, _format(IQ4_NL).offset("qs"))
    return _same(_kvalues(builder, lo), _kvalues(builder, hi), _half_to_f32_int(builder, p))


def _field_half(builder, p, fmt, field: str):
    return _half_to_f32(builder, builder.gep(p, [_const(fmt.offset(field))]))


def _q2_k_group(builder, p, s):
    """Group s: bits 2 * (s % 4) of qs[32 * (s // 4) + i]; 16-groups 2s and 2s + 1 with
    scale d * (sc & 15) and offset -(dmin * (sc >> 4)), sc = scales[group]."""
    fmt = _format(Q2_K)
    d, dmin = _field_half(builder, p, fmt, "d"), _field_half(builder, p, fmt, "dmin")
    qs = fmt.offset("qs") + 32 * (s // 4)
    halves = []
    for h in range(2):
        q = _bits(builder, _bytes16(builder, p, qs + 16 * h), 2 * (s % 4), 3)
        sc = _byte(builder, p, fmt.offset("scales") + 2 * s + h)
        m = builder.lshr(sc, ir.Constant(_i32, 4))
        ml = builder.fmul(dmin, _i32_to_f32(builder, m))
        halves.append(_Half(q, d, builder.fneg(ml), builder.and_(sc, ir.Constant(_i32, 15)), m, ushift=0))
    return tuple(halves)


def _q3_k_scale(builder, p, offset: int, j: int):
    """Q3_K's 6-bit scale j (of 16), minus 32, as i32: low 4 bits from byte j % 8 (its high
    nibble for j >= 8), high 2 bits from byte 8 + j % 4 at bit 2 * (j // 4)."""
    low = _byte(builder, p, offset + j % 8)
    low = builder.lshr(low, ir.Constant(_i32, 4)) if j >= 8 else builder.and_(low, ir.Constant(_i32, 15))
    high = builder.and_(
        builder.lshr(_byte(builder, p, offset + 8 + j % 4), ir.Constant(_i32, 2 * (j // 4))),
        ir.Constant(_i32, 3),
    )
    return builder.sub(builder.or_(low, builder.shl(high, ir.Constant(_i32, 4))), ir.Constant(_i32, 32))


def _q3_k_group(builder, p, s):
    """Group s: 2 bits as Q2_K's, minus 4 where bit s of hmask[i] is clear."""
    fmt = _format(Q3_K)
    d = _field_half(builder, p, fmt, "d")
    qs = fmt.offset("qs") + 32 * (s // 4)
    halves = []
    for h in range(2):
        q = _bits(builder, _bytes16(builder, p, qs + 16 * h), 2 * (s % 4), 3)
        hbit = _bits(builder, _bytes16(builder, p, fmt.offset("hmask") + 16 * h), s, 1)
        q = builder.sub(q, builder.shl(builder.xor(hbit, _c8(1)), _c8(2)))
        halves.append(_Half(q, d, iscale=_q3_k_scale(builder, p, fmt.offset("scales"), 2 * s + h), ushift=4))
    return tuple(halves)


def _k4_words(builder, p, offset: int):
    """Q4_K/Q5_K's 12 packed bytes of 6-bit scales and mins -> (scales 0-3, scales 4-7, mins 0-3,
    mins 4-7), each an i32 of four bytes (byte i of a word is bits 8i: little-endian, as GGUF).
    Groups j < 4 keep their scale and min in the low 6 bits of bytes j and j + 4; groups j >= 4
    the low 4 bits in byte j + 4 (scale) or its high nibble (min), the top 2 in bits 6-7 of
    bytes j - 4 and j. Word operations decode four groups at once, and every group of a
    super-block asks for the same words, which LLVM computes once per block."""
    w0, w1, w2 = (_load(builder, p, _i32, offset + 4 * i) for i in range(3))

    def c(v):
        return ir.Constant(_i32, v)

    def top2(w):  # bits 6-7 of each byte, moved to bits 4-5
        return builder.shl(builder.and_(builder.lshr(w, c(6)), c(0x03030303)), c(4))

    low6 = c(0x3F3F3F3F)
    scales_hi = builder.or_(builder.and_(w2, c(0x0F0F0F0F)), top2(w0))
    mins_hi = builder.or_(builder.and_(builder.lshr(w2, c(4)), c(0x0F0F0F0F)), top2(w1))
    return builder.and_(w0, low6), scales_hi, builder.and_(w1, low6), mins_hi


def _k4_scale_min(builder, p, offset: int, j: int):
    """Q4_K/Q5_K's 6-bit scale and min of group j (of 8), as i32 (_k4_words)."""
    words = _k4_words(builder, p, offset)

    def byte(w):
        return builder.and_(builder.lshr(w, ir.Constant(_i32, 8 * (j % 4))), ir.Constant(_i32, 255))

    return byte(words[j // 4]), byte(words[2 + j // 4])


def _word_bytes(builder, first, second):
    """Two i32 words of four bytes (_k4_words) as one <8 x i8>: the first word's bytes, then the second's."""
    pair = ir.VectorType(_i32, 2)
    words = builder.insert_element(ir.Constant(pair, ir.Undefined), first, ir.Constant(_i32, 0))
    return builder.bitcast(builder.insert_element(words, second, ir.Constant(_i32, 1)), ir.VectorType(_i8, 8))


def _k4_block_imin(builder, p, fmt, xbp):
    """A Q4_K/Q5_K super-block's min_j * (xb[2j] + xb[2j + 1]) for its groups j, as <8 x i32>
    lanes that the row loop scales and adds to its float sums' lanes: per-group scalar sums cost
    as much as the group's byte products, and a reduction to one number a dozen instructions.
    Each min goes to two 16-bit lanes, so that one pairwise multiply-add of the 16 int16 sums
    (vpmaddwd) gives the eight products."""
    words = _k4_words(builder, p, fmt.offset("scales"))
    mins = builder.zext(_word_bytes(builder, words[2], words[3]), ir.VectorType(_i16, _I_LANES))
    pairs = builder.shuffle_vector(mins, mins, ir.Constant(_vi32, [j // 2 for j in range(_LANES)]))
    return _pair_dot(builder, pairs, _xb_lanes(builder, xbp))


def _xb_lanes(builder, xbp):
    """A super-block's 16 sums of 16 xq (quantize_q8's xb, int16) as one <16 x i16>."""
    return builder.load(builder.bitcast(xbp, _vi16.as_pointer()), align=2)


def _q6_k_block_ioffset(builder, p, fmt, xbp):
    """A Q6_K super-block's -32 * scales[h] * xb[h] over its 16-groups h (the unsigned bytes'
    offset, _group_isum_bytes) as <8 x i32> lanes to add to the block's integer sums, which are
    summed over lanes in the end anyway: reduced to one number and put into a lane it took a
    dozen more instructions a block. The int8 scales times the int16 sums in pairs are one
    vpmaddwd on AVX2 (two widenings and two 32-bit multiplies with int32 sums)."""
    scales = builder.sext(_bytes16(builder, p, fmt.offset("scales")), _vi16)
    return builder.mul(_pair_dot(builder, scales, _xb_lanes(builder, xbp)), ir.Constant(_vi32_i, [-32] * _I_LANES))


def _k4_scales(builder, p, fmt, s):
    """(d, -(dmin * m), sc, m) of group s of a Q4_K/Q5_K super-block: _same's d, offset, iscale, imin."""
    sc, m = _k4_scale_min(builder, p, fmt.offset("scales"), s)
    d, dmin = _field_half(builder, p, fmt, "d"), _field_half(builder, p, fmt, "dmin")
    return d, builder.fneg(builder.fmul(dmin, _i32_to_f32(builder, m))), sc, m


def _k4_nibbles(builder, p, fmt, s):
    """Group s's 4-bit values: nibble s % 2 of qs[32 * (s // 2) + i]."""
    qs = fmt.offset("qs") + 32 * (s // 2)
    return [_bits(builder, _bytes16(builder, p, qs + 16 * h), 4 * (s % 2), 15) for h in range(2)]


def _k4_scale_lanes(builder, p, fmt, s):
    """Group s's scale in the 16 lanes of _Half.iscale_lanes, from the block's 8 scales as a vector."""
    words = _k4_words(builder, p, fmt.offset("scales"))
    return _lanes_of(builder, builder.zext(_word_bytes(builder, words[0], words[1]), ir.VectorType(_i16, 8)), s, s)


def _q4_k_group(builder, p, s):
    fmt = _format(Q4_K)
    lo, hi = _k4_nibbles(builder, p, fmt, s)
    return _same(lo, hi, *_k4_scales(builder, p, fmt, s), ushift=0, iscale_lanes=_k4_scale_lanes(builder, p, fmt, s))


def _q5_k_group(builder, p, s):
    """Q4_K's nibbles with a fifth bit: bit s of qh[i]."""
    fmt = _format(Q5_K)
    qs = []
    for h, q in enumerate(_k4_nibbles(builder, p, fmt, s)):
        hbit = _bits(builder, _bytes16(builder, p, fmt.offset("qh") + 16 * h), s, 1)
        qs.append(builder.or_(q, builder.shl(hbit, _c8(4))))
    return _same(*qs, *_k4_scales(builder, p, fmt, s), ushift=0, iscale_lanes=_k4_scale_lanes(builder, p, fmt, s))


def _q6_k_group(builder, p, s):
    """Group s (a = s // 4, r = s % 4): nibble r // 2 of ql[64a + 32 (r % 2) + i], bits 2r of
    qh[32a + i] on top, minus 32; 16-groups 2s, 2s + 1 scaled by d * scales[group] (int8)."""
    fmt = _format(Q6_K)
    a, r = s // 4, s % 4
    d = _field_half(builder, p, fmt, "d")
    lanes = _lanes_of(builder, builder.sext(_bytes16(builder, p, fmt.offset("scales")), _vi16), 2 * s, 2 * s + 1)
    halves = []
    for h in range(2):
        ql = _bits(
            builder, _bytes16(builder, p, fmt.offset("ql") + 64 * a + 32 * (r % 2) + 16 * h), 4 * (r // 2), 15
        )
        qh = _bits(builder, _bytes16(builder, p, fmt.offset("qh") + 32 * a + 16 * h), 2 * r, 3)
        q = builder.sub(builder.or_(ql, builder.shl(qh, _c8(4))), _c8(32))
        sc = builder.sext(_load(builder, p, _i8, fmt.offset("scales") + 2 * s + h), _i32)
        halves.append(_Half(q, d, iscale=sc, ushift=32, iscale_lanes=lanes))
    return tuple(halves)


def _iq4_xs_group(builder, p, s):
    """Group s: IQ4_NL's nibbles of qs[16s + i]; scale d * (6 bits - 32), the low 4 from
    nibble s % 2 of scales_l[s // 2], the high 2 from bits 2s of the u16 scales_h."""
    fmt = _format(IQ4_XS)
    low = _byte(builder, p, fmt.offset("scales_l") + s // 2)
    low = builder.and_(builder.lshr(low, ir.Constant(_i32, 4 * (s % 2))), ir.Constant(_i32, 15))
    high = builder.zext(_load(builder, p, _i16, fmt.offset("scales_h")), _i32)
    high = builder.and_(builder.lshr(high, ir.Constant(_i32, 2 * s)), ir.Constant(_i32, 3))
    scale = builder.sub(builder.or_(low, builder.shl(high, ir.Constant(_i32, 4))), ir.Constant(_i32, 32))
    lo, hi = _nibbles(builder, p, fmt.offset("qs") + 16 * s)
    return _same(_kvalues(builder, lo), _kvalues(builder, hi), _half_to_f32(builder, p), iscale=scale,
                 iscale_lanes=_lanes_of(builder, _iq4_xs_scales(builder, p, fmt), s, s))


def _iq4_xs_scales(builder, p, fmt):
    """An IQ4_XS super-block's 8 scales (6 bits - 32) as <8 x i16>, in vector operations: nibble j
    of the scales_l word is bits 4j, the high 2 bits of scale j bits 2j of scales_h. Decoded one
    group at a time they were ~9 scalar instructions a group, as many as its byte products; every
    group asks for the same vector, which LLVM computes once per block."""
    lanes = ir.VectorType(_i32, _I_LANES)

    def shifted(word, step, mask):
        v = _splat(builder, word, _I_LANES)
        return builder.and_(builder.lshr(v, ir.Constant(lanes, [step * j for j in range(_I_LANES)])),
                            ir.Constant(lanes, [mask] * _I_LANES))

    low = shifted(_load(builder, p, _i32, fmt.offset("scales_l")), 4, 15)
    high = shifted(builder.zext(_load(builder, p, _i16, fmt.offset("scales_h")), _i32), 2, 3)
    scales = builder.or_(low, builder.shl(high, ir.Constant(lanes, [4] * _I_LANES)))
    return builder.trunc(builder.sub(scales, ir.Constant(lanes, [32] * _I_LANES)), ir.VectorType(_i16, _I_LANES))


def _f32_group(builder, p, s):
    return _same(_load(builder, p, _vf32), _load(builder, p, _vf32, 4 * _LANES), None)


def _f16_group(builder, p, s):
    vh = ir.VectorType(ir.HalfType(), _LANES)
    return _same(
        builder.fpext(_load(builder, p, vh), _vf32),
        builder.fpext(_load(builder, p, vh, 2 * _LANES), _vf32),
        None,
    )


def _bf16_group(builder, p, s):
    vi = ir.VectorType(_i16, _LANES)
    return _same(
        _bf16_to_f32(builder, _load(builder, p, vi)),
        _bf16_to_f32(builder, _load(builder, p, vi, 2 * _LANES)),
        None,
    )


@dataclass(frozen=True)
class _IRFormat:
    block: int  # elements a loop iteration decodes: the format's block, or one 32-group of floats
    block_bytes: int
    group: Callable  # (builder, block ptr, s) -> (lo, hi) _Half of group s
    elem_bytes: int = 0  # float formats: bytes of one element, for the row tail
    one: Callable | None = None  # float formats: (builder, byte ptr) -> float
    d_offset: int = 0  # block formats: byte offset of the fp16 d, the halves' common d
    dmin_offset: int = 0  # K-quants with mins: byte offset of the fp16 dmin
    # Integer products, where a format has them: the whole block's imin * xb, or its unsigned
    # bytes' offset, in one go, (builder, block ptr, xb ptr of the block) -> <8 x i32> lanes
    # that the loop adds lane by lane (the mins scaled by -dmin * dx, the offset into the
    # integer sums), instead of group by group.
    block_imin: Callable | None = None
    block_ioffset: Callable | None = None


def _block_format(qtype, group: Callable, block_imin: Callable | None = None,
                  block_ioffset: Callable | None = None) -> _IRFormat:
    fmt = _format(qtype)
    dmin = fmt.offset("dmin") if "dmin" in dict(fmt.fields) else 0

    def bound(hook):
        return None if hook is None else (lambda builder, bp, xbp: hook(builder, bp, fmt, xbp))

    return _IRFormat(fmt.block, fmt.block_bytes, group, d_offset=fmt.offset("d"), dmin_offset=dmin,
                     block_imin=bound(block_imin), block_ioffset=bound(block_ioffset))


def _float_format(qtype, group: Callable, one: Callable) -> _IRFormat:
    size = _format(qtype).block_bytes
    return _IRFormat(_GROUP, _GROUP * size, group, size, one)


IR_FORMATS = {
    Q8_0: _block_format(Q8_0, _q8_0_group),
    Q4_0: _block_format(Q4_0, _q4_0_group),
    Q4_1: _block_format(Q4_1, _q4_1_group),
    Q5_0: _block_format(Q5_0, _q5_0_group),
    Q5_1: _block_format(Q5_1, _q5_1_group),
    IQ4_NL: _block_format(IQ4_NL, _iq4_nl_group),
    Q2_K: _block_format(Q2_K, _q2_k_group),
    Q3_K: _block_format(Q3_K, _q3_k_group),
    Q4_K: _block_format(Q4_K, _q4_k_group, block_imin=_k4_block_imin),
    Q5_K: _block_format(Q5_K, _q5_k_group, block_imin=_k4_block_imin),
    Q6_K: _block_format(Q6_K, _q6_k_group, block_ioffset=_q6_k_block_ioffset),
    IQ4_XS: _block_format(IQ4_XS, _iq4_xs_group),
    F32: _float_format(F32, _f32_group, lambda b, p: _load(b, p, _f32)),
    F16: _float_format(F16, _f16_group, _half_to_f32),
    BF16: _float_format(BF16, _bf16_group, lambda b, p: _bf16_to_f32(b, _load(b, p, _i16))),
}
assert set(IR_FORMATS) == {int(t) for t in KERNEL_TYPES}, (
    "every kernel type of qmoe/formats.py needs a decoder"
)


# Bytes ahead of the block being decoded that each block asks the cache to fetch. Rows are
# read once, front to back, so the hardware prefetcher alone leaves the core waiting on
# memory; asking ~4 KB ahead (two rows of 2048 Q8_0 weights) raised cold Q4_0/Q8_0
# products from 6.2/9.2 to 8.7/12.9 GB/s on one core. A prefetch never faults, so
# running past the end of the weights is harmless. One per 64-byte line of a block.
_PREFETCH_BYTES = 4096
_LINE = 64


def _prefetch(builder, ptr):
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _i32, _i32, _i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(
        fn, [ptr, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)]
    )  # read, keep, data


def _for_each_block(builder, fmt: _IRFormat, wp, n, body) -> None:
    """Call body(block pointer, first element index) for every whole block of the row."""
    n_blocks = builder.sdiv(n, _const(fmt.block))
    with cgutils.for_range(builder, n_blocks) as loop:
        bp = builder.gep(wp, [builder.mul(loop.index, _const(fmt.block_bytes))])
        for line in range(0, max(fmt.block_bytes - _LINE // 2, 1), _LINE):
            _prefetch(builder, builder.gep(bp, [_const(_PREFETCH_BYTES + line)]))
        body(bp, builder.mul(loop.index, _const(fmt.block)))


def _for_each_group(builder, fmt: _IRFormat, wp, n, body) -> None:
    """Call body(first element index, lo, hi) for every 32-group of the row's whole blocks."""

    def block(bp, first):
        for s in range(fmt.block // _GROUP):
            lo, hi = fmt.group(builder, bp, s)
            body(builder.add(first, _const(_GROUP * s)) if s else first, lo, hi)

    _for_each_block(builder, fmt, wp, n, block)


def _weights(builder, half: _Half):
    """A half's weights, q * scale + offset, with the plain (exact) float32 operations."""
    q = half.values(builder)
    scale = half.scale(builder)
    w = q if scale is None else builder.fmul(q, _splat(builder, scale))
    return w if half.offset is None else builder.fadd(w, _splat(builder, half.offset))


def _half_dot(builder, half: _Half, x):
    """sum-ready <16 x float> of the half's weights times x, scale and offset applied once."""
    s = builder.fmul(half.values(builder), x, flags=_FLAGS)
    scale = half.scale(builder)
    if scale is not None:
        s = builder.fmul(_splat(builder, scale), s, flags=_FLAGS)
    if half.offset is not None:
        s = builder.fadd(s, builder.fmul(_splat(builder, half.offset), x, flags=_FLAGS), flags=_FLAGS)
    return s


def _group_dot(builder, lo: _Half, hi: _Half, x_lo, x_hi):
    if lo.same_scale(hi) and lo.offset is hi.offset:  # one scale and offset: apply each once
        s = builder.fadd(
            builder.fmul(lo.values(builder), x_lo, flags=_FLAGS),
            builder.fmul(hi.values(builder), x_hi, flags=_FLAGS),
            flags=_FLAGS,
        )
        scale = lo.scale(builder)
        if scale is not None:
            s = builder.fmul(_splat(builder, scale), s, flags=_FLAGS)
        if lo.offset is not None:
            x_sum = builder.fadd(x_lo, x_hi, flags=_FLAGS)
            s = builder.fadd(s, builder.fmul(_splat(builder, lo.offset), x_sum, flags=_FLAGS), flags=_FLAGS)
        return s
    return builder.fadd(_half_dot(builder, lo, x_lo), _half_dot(builder, hi, x_hi), flags=_FLAGS)


def _is_c_array(ty, dtype) -> bool:
    """The row loops index raw pointers, so they take only C-contiguous arrays of the right dtype."""
    return isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype == dtype


def _switch_on_qtype(context, builder, qtype, qtype_type, emit, formats=None) -> None:
    """emit(fmt) in the branch of the row's format: one compiled function serves every type
    of `formats` (default IR_FORMATS). Callers check qtype first, so no other value arrives."""
    value = context.cast(builder, qtype, qtype_type, types.int64)
    done = builder.append_basic_block("qtype.done")
    unknown = builder.append_basic_block("qtype.unknown")
    switch = builder.switch(value, unknown)
    for code, fmt in (IR_FORMATS if formats is None else formats).items():
        case = builder.append_basic_block(f"qtype.{code}")
        switch.add_case(ir.Constant(_i64, code), case)
        builder.position_at_end(case)
        emit(fmt)
        builder.branch(done)
    builder.position_at_end(unknown)
    builder.unreachable()
    builder.position_at_end(done)


def _tile_types(n_tokens: int):
    """Numba types of a row loop's token offsets and result: one token's, or a tile's tuples."""
    if n_tokens == 1:
        return types.intp, types.float32
    return types.UniTuple(types.intp, n_tokens), types.UniTuple(types.float32, n_tokens)


def _make_row_dot(n_tokens: int):
    """row_dot(qtype, w, w_off, x, x_offs, n): the row's dot product with n_tokens activation rows.

    n_tokens = 1: x_offs is one offset, the result a float32. n_tokens = TOKEN_TILE: x_offs
    is a tuple of offsets and the result a tuple of float32; every block is decoded once
    for all of them, which is what makes a few tokens cheaper than a few products.
    """

    @intrinsic
    def row_dot(typingctx, qtype, w, w_off, x, x_offs, n):
        if not (
            isinstance(qtype, types.Integer) and _is_c_array(w, types.uint8) and _is_c_array(x, types.float32)
        ):
            return None
        offs_type, result_type = _tile_types(n_tokens)
        sig = result_type(qtype, w, types.intp, x, offs_type, types.intp)

        def codegen(context, builder, sig, args):
            qtype, w, w_off, x, x_offs, n = args
            wp = builder.gep(context.make_array(sig.args[1])(context, builder, w).data, [w_off])
            x0 = context.make_array(sig.args[3])(context, builder, x).data
            offs = [x_offs] if n_tokens == 1 else [builder.extract_value(x_offs, j) for j in range(n_tokens)]
            xps = [builder.gep(x0, [off]) for off in offs]
            totals = [cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0)) for _ in xps]

            def emit(fmt: _IRFormat):
                accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf32, [0.0] * _LANES)) for _ in xps]

                def body(first, lo, hi):
                    for xp, acc in zip(xps, accs):
                        xs = builder.gep(xp, [first])
                        x_lo = builder.load(builder.bitcast(xs, _vf32.as_pointer()), align=4)
                        x_hi = builder.load(
                            builder.bitcast(builder.gep(xs, [_const(_LANES)]), _vf32.as_pointer()), align=4
                        )
                        s = _group_dot(builder, lo, hi, x_lo, x_hi)
                        builder.store(builder.fadd(builder.load(acc), s, flags=_FLAGS), acc)

                _for_each_group(builder, fmt, wp, n, body)
                for acc, total in zip(accs, totals):
                    builder.store(_sum_lanes(builder, builder.load(acc)), total)
                if fmt.one is not None:
                    tail = builder.mul(builder.sdiv(n, _const(_GROUP)), _const(_GROUP))
                    with cgutils.for_range(builder, n, start=tail) as loop:
                        wi = fmt.one(
                            builder, builder.gep(wp, [builder.mul(loop.index, _const(fmt.elem_bytes))])
                        )
                        for xp, total in zip(xps, totals):
                            xi = builder.load(builder.gep(xp, [loop.index]))
                            builder.store(builder.fadd(builder.load(total), builder.fmul(wi, xi)), total)

            _switch_on_qtype(context, builder, qtype, sig.args[0], emit)
            results = [builder.load(total) for total in totals]
            return results[0] if n_tokens == 1 else context.make_tuple(builder, sig.return_type, results)

        return sig, codegen

    return row_dot


# ----------------------------------------------------------------------------- integer products
# The q8 row loops multiply a block format's integer values by an activation quantized the way
# llama.cpp quantizes it for its integer dot products (quantize_q8 below): x[i] ~ dx * xq[i],
# xq integers in -127..127 with one dx per block of the weight's format (32 elements as Q8_0,
# 256 as Q8_K for the K-quants and IQ4_XS), xq int8. Formats whose values are q = u - ushift
# with u in 0..127 (all but Q8_0 and the IQ4s) multiply the bytes u by xq as llama.cpp does on
# AVX2: adjacent products summed in pairs into 16 int16 lanes (vpmaddubsw: one instruction for
# a 32-group; the pair sums stay below 2 * 127 * 127, so its saturation never acts), then those
# times the halves' sub-scales summed in pairs into 8 int32 lanes (vpmaddwd); the offset
# -ushift * iscale * (sum of the half's xq) comes from xb as an integer. Signed formats
# sign-extend q and xq and sum their products in pairs (vpmaddwd), times the sub-scale. ARM
# lowers both to widening multiplies (smull/umull) and adds. The block's integer sum becomes
# float once, times d * dx. The K-quants' mins (Q2_K, Q4_K, Q5_K) multiply the integer sums of
# their halves' xq (xb, int16: a 16-sum is at most 16 * 127), summed as integers (Q4_K/Q5_K:
# one pairwise multiply-add per block whose lanes are scaled and added to the float sums'
# lanes, _IRFormat.block_imin; Q6_K's unsigned-byte offset likewise, into the integer sums'
# lanes, block_ioffset) and scaled by
# -dmin * dx; Q4_1's and Q5_1's float offsets multiply their group's xs, as llama.cpp's Q8_1
# does. The int32 sums cannot overflow: |u * iscale| <= 63 * 128 for every format, so a
# 256-block sums to at most 256 * 8064 * 127 < 2^31. Float formats have no integer values and are not here.

_I_LANES = _LANES // 2
_vf32_i = ir.VectorType(_f32, _I_LANES)
_vi32_i = ir.VectorType(_i32, _I_LANES)
_vi16 = ir.VectorType(_i16, _LANES)
_vi8_group = ir.VectorType(_i8, _GROUP)
Q8_FORMATS = {code: fmt for code, fmt in IR_FORMATS.items() if fmt.one is None}


def _pair_dot(builder, q, xq):
    """<16 x i8 or i16> q . <16 x i8 or i16> xq -> <8 x i32>: lane j = q[2j] xq[2j] + q[2j+1] xq[2j+1]."""
    p = builder.mul(builder.sext(q, _vi32), builder.sext(xq, _vi32))
    even = builder.shuffle_vector(p, p, ir.Constant(_vi32_i, list(range(0, _LANES, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(_vi32_i, list(range(1, _LANES, 2))))
    return builder.add(even, odd)


def _cpu_features() -> list[str]:
    """numba's target features ("+avx2", ...): the host's, unless NUMBA_CPU_FEATURES names others
    (the bench's --isa avx2 does)."""
    return (numba.config.CPU_FEATURES or numba.core.codegen.get_host_cpu_features()).split(",")


def _x86_has(builder, feature: str) -> bool:
    """Whether this code is compiled for an x86 CPU with `feature` ("avx2", "f16c")."""
    return builder.module.triple.startswith("x86_64") and f"+{feature}" in _cpu_features()


def _half_to_f32_f16c(builder, ptr):
    """_half_to_f32 as vmovd + vcvtph2ps, in inline assembly, for a block's scales in the
    integer products' loop. vmovd from a general register writes the whole vector register,
    so nothing chains the conversion to an earlier value (the trouble with fpext, see
    _half_to_f32_int), and it is 3 instructions where _half_to_f32_int takes about 12 and a
    branch: Q8_0's products 1.28-1.39x faster, Q4_1's 1.25x, IQ4_NL's 1.18x (one core, in L2;
    with the signed form of _group_isum_bytes, cold Q4_0 1.27-1.40x; the K-quants' and
    IQ4_XS's 1.00-1.04x, where fpext chained d to the accumulator's register). LLVM cannot see into the assembly, which
    is the point. NaN payloads may differ from gguf-py's (vcvtph2ps quiets a signaling NaN),
    so decoding keeps the exact conversions."""
    h = builder.zext(_load(builder, ptr, _i16), _i32)
    vec = builder.asm(ir.FunctionType(ir.VectorType(_f32, 4), [_i32]), "vmovd $1, $0\n\tvcvtph2ps $0, $0",
                      "=x,r", [h], side_effect=False)
    return builder.extract_element(vec, ir.Constant(_i32, 0))


def _ubyte_pairs(builder, u, xq, avx2: bool):
    """<32 x i8> u (unsigned, 0..128) . <32 x i8> xq -> <16 x i16>: lane j = u[2j] xq[2j] + u[2j+1] xq[2j+1].

    On AVX2 that is one vpmaddubsw, called by name: written as generic vectors, LLVM proves
    from the masks that made u that no sum needs the instruction's saturation and rewrites the
    products into 16-bit multiplies and shuffles, three times the work. Elsewhere (ARM: widening
    multiplies and pairwise adds) the generic form; the sums never exceed 2 * 128 * 127."""
    if avx2:
        return _x86_call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vi16, u, xq)

    def part(v, first):
        return builder.shuffle_vector(v, v, ir.Constant(_vi32, list(range(first, _GROUP, 2))))

    return builder.trunc(builder.add(
        builder.mul(builder.zext(part(u, 0), _vi32), builder.sext(part(xq, 0), _vi32)),
        builder.mul(builder.zext(part(u, 1), _vi32), builder.sext(part(xq, 1), _vi32)),
    ), _vi16)


def _x86_call(builder, name: str, ret, *args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))


def _group_isum_bytes(builder, lo: _Half, hi: _Half, xq_group, xb_lo, xb_hi, avx2: bool, vnni: bool, isum):
    """(<8 x i32>, i32 or None): isum plus one 32-group's q * iscale * xq in lanes through
    _ubyte_pairs, and the offset -ushift * (iscale_lo * xb_lo + iscale_hi * xb_hi) (None when
    ushift is 0).

    Bytes u = q + ushift for the unsigned formats; signed ones (Q8_0, the IQ4s) only on AVX2,
    as llama.cpp does: u = |q| and xq with q's sign (vpabsb, vpsignb), the same products.
    On AVX2 the formats with one scale per 32-block (Q4_0, Q5_0) take the signed form too:
    two vector instructions instead of the offset's scalar sum moved into a vector lane (Q4_0's
    products 1.23x faster on one core, weights in L2)."""
    whole = ir.Constant(_vi32_group, list(range(_GROUP)))
    signed = lo.ushift is None or (avx2 and lo.iscale is None and lo.ushift)
    if signed:
        q = builder.shuffle_vector(lo.q, hi.q, whole)
        abs_fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_vi8_group, [_vi8_group, ir.IntType(1)]), "llvm.abs.v32i8")
        u = builder.call(abs_fn, [q, ir.Constant(ir.IntType(1), 0)])
        xq_group = _x86_call(builder, "llvm.x86.avx2.psign.b", _vi8_group, xq_group, q)
    else:
        shift = _c8(lo.ushift)
        u = builder.shuffle_vector(builder.add(lo.q, shift), builder.add(hi.q, shift), whole)
    if vnni and lo.iscale_lanes is None and lo.iscale is None and (signed or not lo.ushift):
        # VNNI (AVX-512 VNNI with VL, or AVX-VNNI): vpdpbusd adds each 4 bytes' u * xq into a
        # lane, the same lanes as vpmaddubsw, vpmaddwd by ones and the add, in one instruction
        # (the pairs' sums never saturate, so the integers are equal).
        as_i32 = ir.VectorType(_i32, _I_LANES)
        return _x86_call(builder, "llvm.x86.avx512.vpdpbusd.256", as_i32, isum, builder.bitcast(u, as_i32),
                         builder.bitcast(xq_group, as_i32)), None
    pairs = _ubyte_pairs(builder, u, xq_group, avx2)  # lanes 0-7: the low half's, 8-15: the high half's
    if lo.iscale_lanes is not None:
        scales = lo.iscale_lanes
    elif lo.iscale is None:
        scales = ir.Constant(_vi16, [1] * _LANES)
    else:
        scales = _splat(builder, builder.trunc(lo.iscale, _i16), _LANES)
        if not lo.same_scale(hi):
            high = _splat(builder, builder.trunc(hi.iscale, _i16), _LANES)
            scales = builder.shuffle_vector(scales, high, ir.Constant(
                _vi32, list(range(_I_LANES)) + list(range(_LANES + _I_LANES, 2 * _LANES))))
    isum = builder.add(isum, _pair_dot(builder, pairs, scales))
    if signed or not lo.ushift:
        return isum, None
    if lo.iscale is None or lo.same_scale(hi):
        xsum = builder.add(xb_lo, xb_hi)
        offset = xsum if lo.iscale is None else builder.mul(lo.iscale, xsum)
    else:
        offset = builder.add(builder.mul(lo.iscale, xb_lo), builder.mul(hi.iscale, xb_hi))
    return isum, builder.mul(offset, ir.Constant(_i32, -lo.ushift))


def _group_isum(builder, lo: _Half, hi: _Half, xq_lo, xq_hi):
    """<8 x i32> sum of one 32-group's q * iscale * xq (signed q)."""
    p_lo, p_hi = _pair_dot(builder, lo.q, xq_lo), _pair_dot(builder, hi.q, xq_hi)
    if lo.same_scale(hi):
        p = builder.add(p_lo, p_hi)
        return p if lo.iscale is None else builder.mul(p, _splat(builder, lo.iscale, _I_LANES))
    return builder.add(
        builder.mul(p_lo, _splat(builder, lo.iscale, _I_LANES)), builder.mul(p_hi, _splat(builder, hi.iscale, _I_LANES))
    )


def _group_imin(builder, lo: _Half, hi: _Half, xb_lo, xb_hi):
    """K-quants: the group's integer mins times the integer sums of its xq halves (i32)."""
    if lo.imin is hi.imin:
        return builder.mul(lo.imin, builder.add(xb_lo, xb_hi))
    return builder.add(builder.mul(lo.imin, xb_lo), builder.mul(hi.imin, xb_hi))


def _group_offset(builder, lo: _Half, hi: _Half, xsp, s: int):
    """The group's float offset (Q4_1, Q5_1: one per 32-block) times its x sum xs[s], or None."""
    if lo.offset is None:
        return None
    assert lo.offset is hi.offset, "float offsets are per 32-group; the K-quants' mins are integers (imin)"
    return builder.fmul(lo.offset, builder.load(builder.gep(xsp, [_const(s)])), flags=_FLAGS)


def _make_row_dot_q8(n_tokens: int):
    """row_dot_q8(qtype, w, w_off, xq, xd, xs, xb, x_offs, n): _make_row_dot's product for a
    block format, on quantize_q8's activation (xq int8, xd and xs float32, xb int16, C arrays
    indexed flat: element e of x is about xq[e] * xd[e // block]; xs[e // 32] and xb[e // 16]
    are the offset sum of its 32-group and the sum of its 16 xq)."""

    @intrinsic
    def row_dot_q8(typingctx, qtype, w, w_off, xq, xd, xs, xb, x_offs, n):
        arrays = ((w, types.uint8), (xq, types.int8), (xd, types.float32), (xs, types.float32), (xb, types.int16))
        if not (isinstance(qtype, types.Integer) and all(_is_c_array(a, dt) for a, dt in arrays)):
            return None
        offs_type, result_type = _tile_types(n_tokens)
        sig = result_type(qtype, w, types.intp, xq, xd, xs, xb, offs_type, types.intp)

        def codegen(context, builder, sig, args):
            qtype, w, w_off, xq, xd, xs, xb, x_offs, n = args

            def data(i, value):
                return context.make_array(sig.args[i])(context, builder, value).data

            wp = builder.gep(data(1, w), [w_off])
            xq0, xd0, xs0, xb0 = data(3, xq), data(4, xd), data(5, xs), data(6, xb)
            offs = [x_offs] if n_tokens == 1 else [builder.extract_value(x_offs, j) for j in range(n_tokens)]
            totals = [cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0)) for _ in offs]

            imins_zero = ir.Constant(_i32, 0)
            avx2 = _x86_has(builder, "avx2")
            vnni = avx2 and (_x86_has(builder, "avxvnni") or (
                _x86_has(builder, "avx512vnni") and _x86_has(builder, "avx512vl")))
            f16c = _x86_has(builder, "f16c")

            def emit(fmt: _IRFormat):
                accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf32_i, [0.0] * _I_LANES)) for _ in offs]
                offset_sums = [cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0)) for _ in offs]

                def block(bp, first):
                    es = [builder.add(off, first) for off in offs]
                    xqps = [builder.bitcast(builder.gep(xq0, [e]), _vi8.as_pointer()) for e in es]
                    xsps = [builder.gep(xs0, [builder.ashr(e, _const(5))]) for e in es]
                    xbps = [builder.gep(xb0, [builder.ashr(e, _const(4))]) for e in es]
                    isums, offsets = [ir.Constant(_vi32_i, [0] * _I_LANES)] * len(es), [None] * len(es)
                    imins, ioffsets = [imins_zero] * len(es), [imins_zero] * len(es)
                    for s in range(fmt.block // _GROUP):
                        lo, hi = fmt.group(builder, bp, s)
                        for j, (xqp, xsp, xbp) in enumerate(zip(xqps, xsps, xbps)):
                            xb_lo, xb_hi = (builder.sext(builder.load(builder.gep(xbp, [_const(2 * s + h)])), _i32)
                                            for h in range(2))
                            if lo.ushift is not None or avx2:
                                group = builder.bitcast(builder.gep(xqp, [_const(2 * s)]), _vi8_group.as_pointer())
                                isums[j], ioffset = _group_isum_bytes(
                                    builder, lo, hi, builder.load(group, align=1), xb_lo, xb_hi, avx2, vnni, isums[j])
                                if ioffset is not None and fmt.block_ioffset is None:
                                    ioffsets[j] = builder.add(ioffsets[j], ioffset)
                            else:
                                xq_lo = builder.load(builder.gep(xqp, [_const(2 * s)]), align=1)
                                xq_hi = builder.load(builder.gep(xqp, [_const(2 * s + 1)]), align=1)
                                isums[j] = builder.add(isums[j], _group_isum(builder, lo, hi, xq_lo, xq_hi))
                            if lo.imin is not None:
                                if fmt.block_imin is None:
                                    imins[j] = builder.add(imins[j], _group_imin(builder, lo, hi, xb_lo, xb_hi))
                                continue
                            o = _group_offset(builder, lo, hi, xsp, s)
                            if o is not None:
                                offsets[j] = o if offsets[j] is None else builder.fadd(offsets[j], o, flags=_FLAGS)
                    if fmt.block_imin is not None:
                        imins = [fmt.block_imin(builder, bp, xbp) for xbp in xbps]
                    if fmt.block_ioffset is not None:  # a format with unsigned bytes: always their path
                        ioffsets = [fmt.block_ioffset(builder, bp, xbp) for xbp in xbps]
                    if f16c:
                        half = _half_to_f32_f16c
                    else:
                        half = _half_to_f32_int if fmt.block == _GROUP else _half_to_f32
                    d = half(builder, builder.gep(bp, [_const(fmt.d_offset)]))
                    for j, (e, isum, acc, offset_sum) in enumerate(zip(es, isums, accs, offset_sums)):
                        if isinstance(ioffsets[j].type, ir.VectorType):  # block_ioffset's lanes
                            isum = builder.add(isum, ioffsets[j])
                        elif ioffsets[j] is not imins_zero:  # the unsigned bytes' offsets, into lane 0
                            first = builder.add(builder.extract_element(isum, ir.Constant(_i32, 0)), ioffsets[j])
                            isum = builder.insert_element(isum, first, ir.Constant(_i32, 0))
                        dx = builder.load(builder.gep(xd0, [builder.udiv(e, _const(fmt.block))]))
                        scale = _splat(builder, builder.fmul(d, dx, flags=_FLAGS), _I_LANES)
                        v = builder.fmul(builder.sitofp(isum, _vf32_i), scale, flags=_FLAGS)
                        o = offsets[j]
                        if isinstance(imins[j].type, ir.VectorType):  # block_imin's lanes, times -(dmin * dx)
                            dmin = half(builder, builder.gep(bp, [_const(fmt.dmin_offset)]))
                            mscale = _splat(builder, builder.fneg(builder.fmul(dmin, dx, flags=_FLAGS)), _I_LANES)
                            v = builder.fadd(v, builder.fmul(builder.sitofp(imins[j], _vf32_i), mscale, flags=_FLAGS),
                                             flags=_FLAGS)
                        elif imins[j] is not imins_zero:  # -(dmin * dx) * sum of imin * xb
                            dmin = half(builder, builder.gep(bp, [_const(fmt.dmin_offset)]))
                            o = builder.fmul(builder.fneg(builder.fmul(dmin, dx, flags=_FLAGS)),
                                             builder.sitofp(imins[j], _f32), flags=_FLAGS)
                        builder.store(builder.fadd(builder.load(acc), v, flags=_FLAGS), acc)
                        if o is not None:
                            builder.store(builder.fadd(builder.load(offset_sum), o, flags=_FLAGS), offset_sum)

                _for_each_block(builder, fmt, wp, n, block)
                for acc, offset_sum, total in zip(accs, offset_sums, totals):
                    s = _sum_lanes(builder, builder.load(acc))
                    builder.store(builder.fadd(s, builder.load(offset_sum), flags=_FLAGS), total)

            _switch_on_qtype(context, builder, qtype, sig.args[0], emit, Q8_FORMATS)
            results = [builder.load(total) for total in totals]
            return results[0] if n_tokens == 1 else context.make_tuple(builder, sig.return_type, results)

        return sig, codegen

    return row_dot_q8


# ----------------------------------------------------------------------------- Q8_0 tiles (VNNI)
# A prompt's experts see tens of tokens each, and there the row loops above are bound by
# their vector instructions: per token and 32-block a sign fix, a multiply-add, a conversion,
# a scale and an accumulate for 32 products (A3B Q8_0 experts, 32 tokens each: 61 GMAC/s on
# two AVX-512 cores, BLAS float32 reaches 186). A tile turns that around, as VNNI GEMMs do:
# the vector lanes are tokens. Each 4 weights of a row are broadcast to every lane and
# vpdpbusd adds their products with 4 bytes of each lane's token, so a 32-block is 8
# instructions for `lanes` tokens' 32 products, and the block's scale is applied once per
# lane vector. vpdpbusd multiplies unsigned by signed bytes: the tile holds each token's
# xq + 128 (tile_activations), and its last lane is a token of 128s, whose sum is 128 times
# the weights' sum -- exactly what the other lanes must take off. So a tile computes
# `lanes - 1` tokens, and every lane does the same operations in the same order: a token's
# result does not depend on the tile it is in, or on its neighbours. One core, weights and
# tile in cache: 190-205 G lane-products/s (the row loops: about 30 G products/s).

TILE_ROWS = 4  # weight rows per tile call: each chunk of the tile's activation serves them all
_TILE_CHUNK = 4  # bytes of one token that one vpdpbusd lane multiplies


def _tile_lanes_here() -> int:
    """Lanes of the tiles this machine runs natively: 16 with AVX-512 VNNI, 8 with AVX-VNNI
    (or VNNI on 256-bit vectors), 0 without VNNI (x86 before it, ARM): there the row loops
    stay faster than the tiles' generic lowering."""
    if not binding.get_process_triple().startswith("x86_64"):
        return 0
    features = _cpu_features()
    if "+avx512vnni" in features:
        return 16
    return 8 if "+avxvnni" in features or ("+avx512vnni" in features and "+avx512vl" in features) else 0


TILE_LANES = _tile_lanes_here()


def _tile_vnni(builder, lanes: int) -> bool:
    """Whether the target has vpdpbusd on vectors of `lanes` i32."""
    if lanes == 16:
        return _x86_has(builder, "avx512vnni")
    return _x86_has(builder, "avxvnni") or (_x86_has(builder, "avx512vnni") and _x86_has(builder, "avx512vl"))


def _dot_bytes(builder, acc, u, s, lanes: int, vnni: bool):
    """acc + for each i32 lane the sum of its 4 (unsigned u byte) * (signed s byte) products:
    vpdpbusd (vnni), else the same integers in generic vector code."""
    vi32 = ir.VectorType(_i32, lanes)
    if vnni:
        return _x86_call(builder, f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", vi32, acc, u, s)
    n = _TILE_CHUNK * lanes
    vb, wide = ir.VectorType(_i8, n), ir.VectorType(_i32, n)
    p = builder.mul(builder.zext(builder.bitcast(u, vb), wide), builder.sext(builder.bitcast(s, vb), wide))
    for i in range(_TILE_CHUNK):
        acc = builder.add(acc, builder.shuffle_vector(p, p, ir.Constant(vi32, list(range(i, n, _TILE_CHUNK)))))
    return acc


def _make_tile_dot_q8_0(lanes: int):
    """tile_dot(w, w_offs, xt, xt_off, xdt, xdt_off, n, out, out_off): out[out_off + r * lanes + j]
    = Q8_0 row r (at byte w_offs[r] of w, n weights) . lane j's token of the tile at xt_off
    (tile_activations' layout: block b, chunk c, lane j, byte i at xt_off + ((b * 8 + c) * lanes + j) * 4
    + i; its scales at xdt[xdt_off + b * lanes + j]), for the TILE_ROWS rows. The last lane's
    result is 0."""
    vi32, vf32 = ir.VectorType(_i32, lanes), ir.VectorType(_f32, lanes)
    chunks = _GROUP // _TILE_CHUNK
    fmt = _format(Q8_0)

    @intrinsic
    def tile_dot(typingctx, w, w_offs, xt, xt_off, xdt, xdt_off, n, out, out_off):
        if not (_is_c_array(w, types.uint8) and _is_c_array(xt, types.uint8) and _is_c_array(xdt, types.float32)
                and _is_c_array(out, types.float32)):
            return None
        sig = types.void(w, types.UniTuple(types.intp, TILE_ROWS), xt, types.intp, xdt, types.intp, types.intp, out,
                         types.intp)

        def codegen(context, builder, sig, args):
            w, w_offs, xt, xt_off, xdt, xdt_off, n, out, out_off = args

            def data(i, value):
                return context.make_array(sig.args[i])(context, builder, value).data

            wp, xtp, xdp, op = data(0, w), data(2, xt), data(4, xdt), data(7, out)
            rows = [builder.gep(wp, [builder.extract_value(w_offs, r)]) for r in range(TILE_ROWS)]
            xtp, xdp = builder.gep(xtp, [xt_off]), builder.gep(xdp, [xdt_off])
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf32, [0.0] * lanes)) for _ in rows]
            last = ir.Constant(vi32, [lanes - 1] * lanes)
            half = _half_to_f32_f16c if _x86_has(builder, "f16c") else _half_to_f32_int
            vnni = _tile_vnni(builder, lanes)
            with cgutils.for_range(builder, builder.sdiv(n, _const(_GROUP))) as loop:
                b = loop.index
                bps = [builder.gep(row, [builder.mul(b, _const(fmt.block_bytes))]) for row in rows]
                for bp in bps:
                    _prefetch(builder, builder.gep(bp, [_const(_PREFETCH_BYTES)]))
                block = builder.gep(xtp, [builder.mul(b, _const(_GROUP * lanes))])
                isums = [ir.Constant(vi32, [0] * lanes)] * len(rows)
                for c in range(chunks):
                    xc = _load(builder, block, vi32, c * _TILE_CHUNK * lanes)  # 4 bytes of every lane's token
                    for r, bp in enumerate(bps):
                        weights4 = _splat(builder, _load(builder, bp, _i32, fmt.offset("qs") + _TILE_CHUNK * c), lanes)
                        isums[r] = _dot_bytes(builder, isums[r], xc, weights4, lanes, vnni)
                dx = _load(builder, builder.gep(xdp, [builder.mul(b, _const(lanes))]), vf32)
                for bp, isum, acc in zip(bps, isums, accs):
                    correction = builder.shuffle_vector(isum, isum, last)  # 128 times the weights' sum
                    products = builder.sitofp(builder.sub(isum, correction), vf32)
                    scale = builder.fmul(_splat(builder, half(builder, bp), lanes), dx)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(products, scale, flags=_FLAGS),
                                               flags=_FLAGS), acc)
            first = builder.gep(op, [out_off])
            for r, acc in enumerate(accs):
                dest = builder.bitcast(builder.gep(first, [_const(r * lanes)]), vf32.as_pointer())
                builder.store(builder.load(acc), dest, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile_dot


tile_dot_q8_0_8 = _make_tile_dot_q8_0(8)
tile_dot_q8_0_16 = _make_tile_dot_q8_0(16)


@intrinsic
def decode_row(typingctx, qtype, w, w_off, out, out_off, n):
    """out.flat[out_off + i] = w_row[i] for i < n, bit-exact with gguf-py's dequantize."""
    if not (
        isinstance(qtype, types.Integer) and _is_c_array(w, types.uint8) and _is_c_array(out, types.float32)
    ):
        return None
    sig = types.void(qtype, w, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        qtype, w, w_off, out, out_off, n = args
        wp = builder.gep(context.make_array(sig.args[1])(context, builder, w).data, [w_off])
        op = builder.gep(context.make_array(sig.args[3])(context, builder, out).data, [out_off])

        def emit(fmt: _IRFormat):
            def body(first, lo, hi):
                os = builder.gep(op, [first])
                builder.store(_weights(builder, lo), builder.bitcast(os, _vf32.as_pointer()), align=4)
                builder.store(
                    _weights(builder, hi),
                    builder.bitcast(builder.gep(os, [_const(_LANES)]), _vf32.as_pointer()),
                    align=4,
                )

            _for_each_group(builder, fmt, wp, n, body)
            if fmt.one is not None:
                tail = builder.mul(builder.sdiv(n, _const(_GROUP)), _const(_GROUP))
                with cgutils.for_range(builder, n, start=tail) as loop:
                    wi = fmt.one(builder, builder.gep(wp, [builder.mul(loop.index, _const(fmt.elem_bytes))]))
                    builder.store(wi, builder.gep(op, [loop.index]))

        _switch_on_qtype(context, builder, qtype, sig.args[0], emit)
        return context.get_dummy_value()

    return sig, codegen


TOKEN_TILE = 4  # activation rows that share one decode of a weight row (tile_offsets lists 4)
# moe_rows: output rows that share the hidden rows read for them. 64, not 16: each block reads
# every pair's hidden row once, so for a 256-token batch of Qwen3-30B-A3B's shapes (1.5 MB of
# hidden rows, beyond L2) 16 read them 128 times and the two threads waited on L3 (the down
# products 1.3x faster at two threads, 1.09x at one; decode unchanged).
OUT_BLOCK = 64

# dot_row(qtype, w, w_off, x, x_off, n) -> float32; dot_row_tile: the same for TOKEN_TILE offsets
dot_row = _make_row_dot(1)
dot_row_tile = _make_row_dot(TOKEN_TILE)
dot_row_q8 = _make_row_dot_q8(1)
dot_row_q8_tile = _make_row_dot_q8(TOKEN_TILE)
Q8_GROUP = _GROUP  # elements per quantize_q8 offset sum (xs)
@njit(nogil=True)
def _to_half(v):
    """float32 v rounded to the nearest float16 (ties to even), as float32: ggml's fp16 store."""
    a = abs(v)
    if a >= np.float32(65520.0):
        return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
    if a < np.float32(2.0**-14):  # float16 subnormals: multiples of 2^-24
        return np.float32(np.rint(np.float64(v) * 2.0**24) * 2.0**-24)
    ulp = math.ldexp(1.0, math.frexp(np.float64(a))[1] - 11)  # 11 significant bits
    return np.float32(np.rint(np.float64(v) / ulp) * ulp)


@njit(nogil=True)
def quantize_q8(x, q8, block):
    """x float32 [T, n] quantized for the integer row loops, when q8 (else empty arrays), as
    llama.cpp's CPU backend quantizes activations: per `block` elements (32: Q8_0/Q8_1 for
    the 32-blocks, 256: Q8_K for the K-quants and IQ4_XS) xq = round(x * 127 / max |x|)
    (ties to even), and the block's d = max |x| / 127 rounded to fp16 (block 32) or
    1 / (127 / max |x|) (block 256). Returns the row loops' `xa` = (xq int8 [T, n],
    xd float32 [T, n / block], xs float32 [T, n / 32]: max |x| / 127 times the sum of a
    32-group's xq, rounded to fp16, Q8_1's s for Q4_1/Q5_1's offsets, xb int16 [T, n / 16]:
    the sums of 16 xq, Q8_K's bsums for the K-quants' mins). n: a multiple of block."""
    n_tokens, n = x.shape
    rows = n_tokens if q8 else 0
    xq, xd, xs, xb = _q8_arrays(rows, n, block)
    for t in range(rows):
        _quantize_q8_row(x, t, block, xq, xd, xs, xb)
    return xq, xd, xs, xb


QUANTIZE_PARALLEL_ROWS = 32  # fewer rows (a decode step's) quantize in less time than a parallel loop wakes


@njit(parallel=True, nogil=True)
def quantize_q8_rows(x, q8, block):
    """quantize_q8 in parallel over tokens: a prompt's activations (a serial pass over 1024
    A3B rows and their hidden rows took 8 ms of a 42 ms experts' call)."""
    rows = x.shape[0] if q8 else 0
    xq, xd, xs, xb = _q8_arrays(rows, x.shape[1], block)
    for t in prange(rows):
        _quantize_q8_row(x, t, block, xq, xd, xs, xb)
    return xq, xd, xs, xb


@njit(nogil=True)
def _q8_arrays(rows, n, block):
    """quantize_q8's (xq, xd, xs, xb) for `rows` rows of n elements, uninitialized."""
    return (np.empty((rows, n), np.int8), np.empty((rows, n // block), np.float32),
            np.empty((rows, n // Q8_GROUP), np.float32), np.empty((rows, n // 16), np.int16))


@njit(nogil=True)
def _quantize_q8_row(x, t, block, xq, xd, xs, xb):
    """quantize_q8 of row t of x into row t of xq, xd, xs and xb."""
    n = x.shape[1]
    for b in range(n // block):
        amax = np.float32(0.0)
        for i in range(b * block, (b + 1) * block):
            amax = max(amax, abs(x[t, i]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        if block == Q8_GROUP:
            xd[t, b] = _to_half(d)
        else:
            xd[t, b] = np.float32(1.0) / inv if amax > 0 else np.float32(0.0)
        for i in range(b * block, (b + 1) * block):
            xq[t, i] = np.int8(np.rint(x[t, i] * inv))
        for g in range(b * block // Q8_GROUP, (b + 1) * block // Q8_GROUP):
            total = 0
            for h in range(2):
                q_sum = 0
                for i in range(Q8_GROUP * g + 16 * h, Q8_GROUP * g + 16 * h + 16):
                    q_sum += xq[t, i]
                xb[t, 2 * g + h] = q_sum
                total += q_sum
            xs[t, g] = _to_half(d * np.float32(total))


@njit(parallel=True, nogil=True, cache=True)
def quantized_rows(x, block, out):
    """out[t, i] = xq[t, i] * xd[t, i // block] of quantize_q8(x, True, block), in parallel over
    tokens: the activation the integer products see, as float32, for BLAS products of many tokens."""
    n_tokens, n = x.shape
    xq, xd, xs, xb = _q8_arrays(n_tokens, n, block)
    for t in prange(n_tokens):
        _quantize_q8_row(x, t, block, xq, xd, xs, xb)
        for i in range(n):
            out[t, i] = np.float32(xq[t, i]) * xd[t, i // block]


TILE_MIN_PAIRS = 4  # a group of fewer pairs stays in the row loops: a tile costs its lanes' work whatever it holds


@njit(nogil=True)
def group_tiles(group_starts, lanes):
    """tile_first [groups + 1]: group g's tiles are tile_first[g]..tile_first[g + 1] - 1, each
    of lanes - 1 of its pairs in order; groups of fewer than TILE_MIN_PAIRS pairs (and all, when
    lanes is 0) have none."""
    n_groups = group_starts.shape[0] - 1
    first = np.zeros(n_groups + 1, np.int64)
    for g in range(n_groups):
        count = group_starts[g + 1] - group_starts[g]
        tiles = (count + lanes - 2) // (lanes - 1) if lanes and count >= TILE_MIN_PAIRS else 0
        first[g + 1] = first[g] + tiles
    return first


@njit(parallel=True, nogil=True)
def tile_activations(xa, pairs, group_starts, tile_first, divisor, lanes):
    """(xt uint8 [tiles, n * lanes], xdt float32 [tiles, n / 32 * lanes]): every group's tiles in
    the layout of _make_tile_dot_q8_0, from quantize_q8's xa (block 32) of the rows
    pairs[q] // divisor. Lanes without a token, and the last, hold 128 (xq = 0) with scale 0."""
    xq, xd = xa[0], xa[1]
    n = xq.shape[1]
    n_tiles = tile_first[-1]
    xt = np.full((n_tiles, n * lanes), 128, np.uint8)
    xdt = np.zeros((n_tiles, n // Q8_GROUP * lanes), np.float32)
    for tile in prange(n_tiles):
        q0, m = tile_pairs(group_starts, tile_first, tile, lanes)
        for j in range(m):
            row = pairs[q0 + j] // divisor
            for b in range(n // Q8_GROUP):
                xdt[tile, b * lanes + j] = xd[row, b]
            for e in range(n):
                xt[tile, ((e // _TILE_CHUNK) * lanes + j) * _TILE_CHUNK + e % _TILE_CHUNK] = xq[row, e] + 128
    return xt, xdt


@njit(nogil=True, inline="always")
def tile_pairs(group_starts, tile_first, tile, lanes):
    """(first pair, number of pairs) of tile `tile` (group_tiles' numbering)."""
    g = np.searchsorted(tile_first, tile, side="right") - 1
    q0 = group_starts[g] + (tile - tile_first[g]) * (lanes - 1)
    return q0, min(lanes - 1, group_starts[g + 1] - q0)


@njit(nogil=True, inline="always")
def tile_product(lanes, w, w_offs, xt, tile, xdt, n, out, out_off):
    """_make_tile_dot_q8_0's product of TILE_ROWS rows with tile `tile` of tile_activations' arrays."""
    if lanes == 16:
        tile_dot_q8_0_16(w, w_offs, xt, tile * n * 16, xdt, tile * (n // Q8_GROUP) * 16, n, out, out_off)
    else:
        tile_dot_q8_0_8(w, w_offs, xt, tile * n * 8, xdt, tile * (n // Q8_GROUP) * 8, n, out, out_off)


@njit(nogil=True, inline="always")
def tile_rows(base, first, limit, stride):
    """Byte offsets base + (first + i) * stride of a tile call's TILE_ROWS rows; rows at or past
    `limit` repeat the last one (computed again, not stored)."""
    last = limit - 1
    return (base + first * stride, base + min(first + 1, last) * stride, base + min(first + 2, last) * stride,
            base + min(first + 3, last) * stride)


@njit(nogil=True, inline="always")
def row_product(qtype, w, w_off, x, xa, q8, x_off, n):
    """The row's product with the activation row at x_off: integer on xa = quantize_q8(x) (q8)
    or float32 on x."""
    if q8:
        return dot_row_q8(qtype, w, w_off, xa[0], xa[1], xa[2], xa[3], x_off, n)
    return dot_row(qtype, w, w_off, x, x_off, n)


@njit(nogil=True, inline="always")
def row_product_tile(qtype, w, w_off, x, xa, q8, x_offs, n):
    """row_product for TOKEN_TILE activation rows."""
    if q8:
        return dot_row_q8_tile(qtype, w, w_off, xa[0], xa[1], xa[2], xa[3], x_offs, n)
    return dot_row_tile(qtype, w, w_off, x, x_offs, n)


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


MATMUL_WEIGHTS = 3  # matmul_rows' weights per call: a layer's q, k and v projections


@njit(parallel=True, nogil=True, cache=True)
def matmul_rows(qtypes, ws, row_bytes, x, q8, q8_block, outs):
    """outs[j][t, r] = ws[j][r] . x[t] for the MATMUL_WEIGHTS weights j and all their rows r,
    in parallel over all those rows.

    ws: flat weight bytes [rows_j * row_bytes[j]] of weights that multiply the same x (one
    call for a layer's q, k and v: one quantization of x, one wake of the threads, and the
    small k and v shared out among them); an unused weight is empty, with an out of 0 rows.
    x: float32 [T, n]; outs[j]: float32 [T, rows_j]; q8: integer products on x quantized by
    quantize_q8 in blocks of q8_block (the formats' block, the same for all; block formats
    only), else float32. Each row is read from memory once and decoded once per TOKEN_TILE
    tokens, so this is the kernel for few tokens (decode); many tokens go to BLAS.
    """
    n_tokens, n = x.shape
    tokens = np.arange(n_tokens)
    xa = quantize_q8(x, q8, q8_block)
    rows0, rows1 = outs[0].shape[1], outs[1].shape[1]
    for i in prange(rows0 + rows1 + outs[2].shape[1]):
        j = 0 if i < rows0 else (1 if i < rows0 + rows1 else 2)
        r = i - (0 if j == 0 else (rows0 if j == 1 else rows0 + rows1))
        qtype, w, out, w_off = qtypes[j], ws[j], outs[j], r * row_bytes[j]
        for t in range(0, n_tokens, TOKEN_TILE):
            m = min(TOKEN_TILE, n_tokens - t)
            if m == 1:
                out[t, r] = row_product(qtype, w, w_off, x, xa, q8, t * n, n)
            else:
                offs = tile_offsets(tokens, t, m, 1, n)
                y = row_product_tile(qtype, w, w_off, x, xa, q8, offs, n)
                for k in range(m):
                    out[t + k, r] = y[k]


@njit(parallel=True, nogil=True, cache=True)
def matmul_tiles(w, row_bytes, x, lanes, out):
    """out[t, r] = w[r] . x[t] for a Q8_0 weight's rows r, integer products in tiles of
    `lanes` lanes (_make_tile_dot_q8_0) on x quantized by quantize_q8: a prompt's projections,
    the same integer sums as matmul_rows' in another float order. In parallel over blocks of
    TILE_ROWS rows, each times every tile. x: float32 [T, n], T >= 1; out: float32 [T, rows]."""
    n_tokens, n = x.shape
    rows = out.shape[1]
    pairs = np.arange(n_tokens)
    starts = np.array([0, n_tokens])
    tile_first = np.array([0, (n_tokens + lanes - 2) // (lanes - 1)])
    xt, xdt = tile_activations(quantize_q8_rows(x, True, Q8_GROUP), pairs, starts, tile_first, 1, lanes)
    for i in prange((rows + TILE_ROWS - 1) // TILE_ROWS):
        r0 = i * TILE_ROWS
        offs = tile_rows(0, r0, rows, row_bytes)
        y = np.empty(TILE_ROWS * lanes, np.float32)
        for tile in range(tile_first[1]):
            tile_product(lanes, w, offs, xt, tile, xdt, n, y, 0)
            t0 = tile * (lanes - 1)
            for r in range(min(TILE_ROWS, rows - r0)):
                for j in range(min(lanes - 1, n_tokens - t0)):
                    out[t0 + j, r0 + r] = y[r * lanes + j]


@njit(parallel=True, nogil=True, cache=True)
def dequantize_rows(qtype, w, row_bytes, first_row, out):
    """out[i] = w[first_row + i] as float32, in parallel over rows.  out: float32 [R, n]."""
    n_rows, n = out.shape
    for i in prange(n_rows):
        decode_row(qtype, w, (first_row + i) * row_bytes, out, i * n, n)


@njit(parallel=True, nogil=True, cache=True)
def moe_rows(
    gate, up, down, qtypes, row_bytes, x, k, pairs, group_starts, group_experts, pair_weights, n_ff, q8, q8_blocks,
    tile_lanes, out
):
    """out[t] += sum over pairs p = t * k + j of weight[p] * down_e (silu(gate_e x[t]) * up_e x[t]).

    gate, up: flat bytes of [E, n_ff, n_embd] weights; down: of [E, n_embd, n_ff];
    qtypes, row_bytes: (gate, up, down); x: float32 [T, n_embd]; out: float32 [T, n_embd];
    q8: (gate, up, down) each integer products on quantize_q8's activation, or float32;
    q8_blocks: (x, hidden) quantization blocks (gate's and up's block must be x's).
    The (token, expert) pairs to compute come grouped by expert: group g is expert
    group_experts[g] for pairs[group_starts[g]:group_starts[g + 1]], pair p being token
    p // k. Each weight row is read from memory once per group and decoded once per
    TOKEN_TILE of its pairs. Two parallel passes: the hidden rows of every pair, then
    every output row summed over the pairs of its token.
    tile_lanes (8 or 16; 0: never): integer Q8_0 products of groups of TILE_MIN_PAIRS pairs
    or more go through tiles of that many lanes (_make_tile_dot_q8_0) instead of the row loops.
    """
    n_tokens, n_embd = x.shape
    n_groups = group_experts.shape[0]
    hidden = np.empty((n_tokens * k, n_ff), np.float32)  # [pair, n_ff]
    if n_tokens < QUANTIZE_PARALLEL_ROWS:
        xa = quantize_q8(x, q8[0] or q8[1], q8_blocks[0])
    else:
        xa = quantize_q8_rows(x, q8[0] or q8[1], q8_blocks[0])
    tiled_in = q8[0] and q8[1] and qtypes[0] == Q8_0 and qtypes[1] == Q8_0
    tiled_out = q8[2] and qtypes[2] == Q8_0
    tile_first = group_tiles(group_starts, tile_lanes if tiled_in or tiled_out else 0)
    lanes = max(tile_lanes, 1)
    if tiled_in and tile_first[-1]:
        xt, xdt = tile_activations(xa, pairs, group_starts, tile_first, k, tile_lanes)
        tiled = np.nonzero(tile_first[1:] > tile_first[:-1])[0]
        row_blocks = (n_ff + TILE_ROWS - 1) // TILE_ROWS
        # one task: TILE_ROWS gate and up rows (in L1) times each of the group's tiles (in L2)
        for i in prange(len(tiled) * row_blocks):
            g, r0 = tiled[i // row_blocks], (i % row_blocks) * TILE_ROWS
            rows_gate = tile_rows(group_experts[g] * n_ff * row_bytes[0], r0, n_ff, row_bytes[0])
            rows_up = tile_rows(group_experts[g] * n_ff * row_bytes[1], r0, n_ff, row_bytes[1])
            y = np.empty(2 * TILE_ROWS * lanes, np.float32)
            for tile in range(tile_first[g], tile_first[g + 1]):
                q0, m = tile_pairs(group_starts, tile_first, tile, tile_lanes)
                tile_product(tile_lanes, gate, rows_gate, xt, tile, xdt, n_embd, y, 0)
                tile_product(tile_lanes, up, rows_up, xt, tile, xdt, n_embd, y, TILE_ROWS * lanes)
                for r in range(min(TILE_ROWS, n_ff - r0)):
                    for j in range(m):
                        hidden[pairs[q0 + j], r0 + r] = silu(y[r * lanes + j]) * y[(TILE_ROWS + r) * lanes + j]
    for i in prange(n_groups * n_ff):
        g = i // n_ff
        if tiled_in and tile_first[g + 1] > tile_first[g]:
            continue
        r = i - g * n_ff
        e = group_experts[g]
        off_gate, off_up = (e * n_ff + r) * row_bytes[0], (e * n_ff + r) * row_bytes[1]
        for q in range(group_starts[g], group_starts[g + 1], TOKEN_TILE):
            m = min(TOKEN_TILE, group_starts[g + 1] - q)
            if m == 1:
                t_off = pairs[q] // k * n_embd
                a = row_product(qtypes[0], gate, off_gate, x, xa, q8[0], t_off, n_embd)
                b = row_product(qtypes[1], up, off_up, x, xa, q8[1], t_off, n_embd)
                hidden[pairs[q], r] = silu(a) * b
            else:
                t_offs = tile_offsets(pairs, q, m, k, n_embd)
                a4 = row_product_tile(qtypes[0], gate, off_gate, x, xa, q8[0], t_offs, n_embd)
                b4 = row_product_tile(qtypes[1], up, off_up, x, xa, q8[1], t_offs, n_embd)
                for j in range(m):
                    hidden[pairs[q + j], r] = silu(a4[j]) * b4[j]
    if n_tokens * k < QUANTIZE_PARALLEL_ROWS:
        ha = quantize_q8(hidden, q8[2], q8_blocks[1])
    else:
        ha = quantize_q8_rows(hidden, q8[2], q8_blocks[1])
    if tiled_out and tile_first[-1]:
        ht, hdt = tile_activations(ha, pairs, group_starts, tile_first, 1, tile_lanes)
    else:
        ht, hdt = np.empty((0, 0), np.uint8), np.empty((0, 0), np.float32)
    # Output rows in blocks of OUT_BLOCK, so that a tile of hidden rows is read from L1 for a
    # whole block of down rows instead of from L2 or memory for every one of them.
    for cb in prange((n_embd + OUT_BLOCK - 1) // OUT_BLOCK):
        c_end = min(n_embd, (cb + 1) * OUT_BLOCK)
        y = np.empty(TILE_ROWS * lanes, np.float32)
        tokens, weights = np.empty(lanes, np.int64), np.empty(lanes, np.float32)  # a tile's lanes
        for g in range(n_groups):
            base = group_experts[g] * n_embd * row_bytes[2]
            if tiled_out and tile_first[g + 1] > tile_first[g]:
                for tile in range(tile_first[g], tile_first[g + 1]):
                    q0, m = tile_pairs(group_starts, tile_first, tile, tile_lanes)
                    for j in range(m):
                        tokens[j], weights[j] = pairs[q0 + j] // k, pair_weights[pairs[q0 + j]]
                    for c0 in range(cb * OUT_BLOCK, c_end, TILE_ROWS):
                        tile_product(tile_lanes, down, tile_rows(base, c0, c_end, row_bytes[2]), ht, tile, hdt, n_ff,
                                     y, 0)
                        for c in range(min(TILE_ROWS, c_end - c0)):
                            for j in range(m):
                                out[tokens[j], c0 + c] += weights[j] * y[c * lanes + j]
                continue
            for q in range(group_starts[g], group_starts[g + 1], TOKEN_TILE):
                m = min(TOKEN_TILE, group_starts[g + 1] - q)
                for c in range(cb * OUT_BLOCK, c_end):
                    off_down = base + c * row_bytes[2]
                    if m == 1:
                        p = pairs[q]
                        y1 = row_product(qtypes[2], down, off_down, hidden, ha, q8[2], p * n_ff, n_ff)
                        out[p // k, c] += pair_weights[p] * y1
                    else:
                        offs = tile_offsets(pairs, q, m, 1, n_ff)
                        y4 = row_product_tile(qtypes[2], down, off_down, hidden, ha, q8[2], offs, n_ff)
                        for j in range(m):
                            p = pairs[q + j]
                            out[p // k, c] += pair_weights[p] * y4[j]


@njit(nogil=True, cache=True)  # moe_rows runs its own parallel loops
def route_moe_one(x, router, k, normalize, scale, gate, up, down, qtypes, row_bytes, n_ff, q8, q8_blocks, logits, ids,
                  weights, out):
    """One token's softmax router and routed experts in one call: pointwise's router product and
    top-k into logits [1, E], ids [1, k], weights [1, k], then moe_rows into out [1, n_embd] over
    the k groups of one pair each, by ascending expert (moe.ExpertGroups' order for one token of
    distinct experts, which a top-k always is).

    A decode step's router, grouping and experts were three calls with a dozen numpy calls
    between them, each slow to start after a weight product (moe.StackedExperts): one call
    makes the time between a layer's attention and its experts shorter by about a third of
    a millisecond on the development VM. The arithmetic is the separate calls', bit for bit.
    """
    _route_softmax_topk(x, router, k, normalize, scale, logits, ids, weights)
    pairs = np.argsort(ids[0], kind="mergesort")  # pair j of token 0 is choice j
    experts = ids[0][pairs]
    starts = np.arange(k + 1)
    moe_rows(gate, up, down, qtypes, row_bytes, x, k, pairs, starts, experts, weights[0], n_ff, q8, q8_blocks, 0, out)


@njit(nogil=True, cache=True)  # matmul_rows and the attention run their own parallel loops
def attention_one(qkv_types, qkv, qkv_row_bytes, x, q8, q8_block, o_type, o, o_row_bytes, o_q8, o_block, n_head,
                  q_norm, k_norm, norm, eps, clamp, cos, sin, position, rope_dim, neox, k_cache, v_cache, scale, out):
    """One token's attention from its normed input x [1, n_embd] to the output projection's
    out [1, n_embd], in one call: matmul_rows for the q, k and v products (qkv: their flat
    weights, which share x's quantization), attention.decode_attention's norms, rotation, cache
    write and attention over cache positions 0..position, and matmul_rows for the output
    product on the heads' outputs (o, quantized in blocks of o_block when o_q8).

    These were four calls with Python between them (models.base.Attention's _decode), each slow
    to start after a weight product; the arithmetic is theirs, bit for bit."""
    n_head_kv, _, d = k_cache.shape
    d_v = v_cache.shape[2]
    q = np.empty((1, n_head * d), np.float32)
    k = np.empty((1, n_head_kv * d), np.float32)
    v = np.empty((1, n_head_kv * d_v), np.float32)
    matmul_rows(qkv_types, qkv, qkv_row_bytes, x, q8, q8_block, (q, k, v))
    heads = np.empty((n_head, d_v), np.float32)
    _decode_attention(q.reshape(n_head, d), k.reshape(n_head_kv, d), v.reshape(n_head_kv, d_v), q_norm, k_norm, norm,
                      eps, clamp, cos, sin, position, rope_dim, neox, k_cache, v_cache, scale, heads)
    none = np.empty((1, 0), np.float32)
    matmul_rows((o_type, o_type, o_type), (o, o[:0], o[:0]), (o_row_bytes, 0, 0), heads.reshape(1, n_head * d_v),
                o_q8, o_block, (out, none, none))

@njit(nogil=True)
def _activate(a, gelu):
    """Exact (erf) GELU when `gelu`, else SiLU."""
    if gelu:
        return (
            np.float32(0.5) * a * (np.float32(1.0) + np.float32(math.erf(a * np.float32(0.7071067811865476))))
        )
    return silu(a)


@njit(parallel=True, nogil=True, cache=True)
def mlp_top(q1, w1, rb1, b1, q2, w2, rb2, b2, gelu, x, count, out):
    """out[t] = the `count` largest of fc2(act(fc1 x[t] + b1)) + b2, best first (ties: lower index).

    w1, w2: flat weight bytes of [H, n] and [E, H]; x: float32 [T, n]; out: int64 [T, count].
    fc1's rows are split over the kernel threads: they are nearly all of the bytes (2 MB a
    layer at the default width, never in cache across 48 layers), and in the model's thread
    (the CPU default) the other cores would otherwise wait: 2048 -> 1024 -> 128 at q8_0, 48
    layers in turn, 0.23 ms a layer serial, 0.11 ms on two threads. fc2 and the sort are serial.
    """
    n_tokens, n = x.shape
    hidden_size, n_out = b1.shape[0], b2.shape[0]
    hidden = np.empty((n_tokens, hidden_size), np.float32)
    scores = np.empty(n_out, np.float32)
    for r in prange(hidden_size):
        for t in range(n_tokens):
            hidden[t, r] = _activate(dot_row(q1, w1, r * rb1, x, t * n, n) + b1[r], gelu)
    for t in range(n_tokens):
        for e in range(n_out):
            scores[e] = dot_row(q2, w2, e * rb2, hidden, t * hidden_size, hidden_size) + b2[e]
        order = np.argsort(-scores, kind="mergesort")
        out[t] = order[:count]
