"""float32 rows -> GGUF block bytes, byte for byte what llama.cpp's quantizer writes.

gguf-py already quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 as ggml does
(but for the sign of a zero scale or min, patched here); this module adds the K-quants
(Q2_K .. Q6_K) and the non-linear 4-bit types (IQ4_NL, IQ4_XS), following the algorithms of ggml-quants.c on the path
`llama_model_quantize` takes without an importance matrix:
- Q2_K, Q4_K, Q5_K: per sub-block a scale and a min, fitted by a grid search
  around the min-max fit (make_qkx2_quants), then the scales themselves are
  quantized to 4 or 6 bits against one fp16 super-block scale, and the values
  are re-quantized with the scales as stored;
- Q3_K, Q6_K: symmetric per-sub-block scales (Q3_K by iterative refinement,
  Q6_K by a search over 18 nearby scales), the same two-level scale storage;
- IQ4_NL, IQ4_XS: the 16-value non-linear grid of kvalues_iq4nl, a search over
  15 scales per block of 32 (IQ4_XS adds 6-bit block scales in a 256 super-block).

The arithmetic is vectorized over blocks, but it stays float32 and keeps ggml's
operation order, because a last-bit difference in a scale changes bytes: every
sum over a block's values is a sequential float32 sum (`_sum`), every
product is grouped as the C expression groups it, and rounding to an integer is
ggml's `nearest_int` (round half to even through the float32 mantissa). ggml's
base library is built without FMA (no -march), so no product is fused.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape
from gguf.quants import quantize as gguf_quantize

QT = GGMLQuantizationType
F32 = np.float32

# blocks quantized at a time: bounds the temporaries (a few MiB each) whatever the tensor size
_BATCH_BLOCKS = 1024

# ggml's GROUP_MAX_EPS: a (sub-)block whose largest magnitude is below it counts as all zero
_GROUP_MAX_EPS = F32(1e-15)

# the IQ4 grid (kvalues_iq4nl), as int and as float32
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_VALUES_F32 = IQ4_VALUES.astype(F32)


# ---------------------------------------------------------------- float32 helpers, ggml's order
#
# The fits work on "columns": x [n, m] holds m sub-blocks of n values, one per column, so a
# per-sub-block quantity is an [m] array that broadcasts against x, and a sum over a
# sub-block is n - 1 vector additions down the columns (fast, and in ggml's order).


def _columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """[nb, block_size] -> [n, nb * block_size / n]: consecutive runs of n values as columns."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _uncolumns(columns: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return columns.T.reshape(shape)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the integer off the mantissa."""
    shifted = (v.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _sum(terms: np.ndarray) -> np.ndarray:
    """Column sums in row order, as `s = 0; for i: s += t[i]` does in float32 (np.sum adds
    pairwise, which rounds differently)."""
    total = F32(0) + terms[0]
    for row in terms[1:]:
        total += row
    return total


def _sum_from_first(terms: np.ndarray) -> np.ndarray:
    """`s = t[0]; for i >= 1: s += t[i]` (make_qkx2_quants' sum_w and sum_x)."""
    total = terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _first_abs_max(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(largest |x|, the signed x it came from) along `axis`; the first one on ties, like
    ggml's `if (ax > amax) { amax = ax; max = x[i]; }` loops."""
    index = np.expand_dims(np.argmax(np.abs(x), axis=axis), axis)
    signed = np.take_along_axis(x, index, axis=axis).squeeze(axis)
    return np.abs(signed), signed


def _fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.asarray(v, F32).astype(np.float16)


# ---------------------------------------------------------------- per-sub-block fits (ggml's make_*_quants)


def _fit_scale_min(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over columns x [n, m]: x ~ scale * L - the_min with L in 0..nmax.

    Starts from the min-max fit, then tries nstep + 1 stretched grids, each followed by a
    weighted least-squares scale and min, keeping whichever has the least weighted error.
    Returns (scale [m], the_min [m], L [n, m] uint8)."""
    minimum = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == minimum
    sum_w = _sum_from_first(weights)
    sum_x = _sum_from_first(weights * x)

    def error(scale, offset, levels):
        diff = (scale * levels + offset) - x
        return _sum(weights * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / (hi - minimum)
    scale = F32(1) / iscale
    levels = np.clip(_nearest_int(iscale * (x - minimum)), 0, nmax).astype(F32)
    best_error = error(scale, minimum, levels)
    for step in range(nstep + 1):
        # ggml uses the min found so far, so a better fit moves the next grids
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - minimum)
        trial = np.clip(_nearest_int(iscale * (x - minimum)), 0, nmax).astype(F32)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * trial), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_min[positive_min] = 0
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        trial_error = error(this_scale, this_min, trial)
        better = (det > 0) & (trial_error < best_error) & ~flat
        np.copyto(levels, trial, where=better)
        best_error = np.where(better, trial_error, best_error)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
    scale[flat] = 0
    levels[:, flat] = 0
    return scale, -minimum, levels.astype(np.uint8)


def _fit_symmetric_search(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1 over columns x [n, m]: x ~ scale * (L - nmax),
    L in 0..2*nmax-1, the scale the best of 19 grids around nmax / max by x^2-weighted
    least squares. All-zero sub-blocks give scale 0 and L 0. Returns (scale, L int32)."""
    amax, signed_max = _first_abs_max(x, 0)
    zero = amax < _GROUP_MAX_EPS
    weights = x * x
    wx = weights * x

    def grid(iscale):
        q = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        qf = q.astype(F32)
        return q, _sum(wx * qf), _sum((weights * qf) * qf)

    q, sumlx, suml2 = grid(F32(-nmax) / signed_max)
    levels = q + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        q, sumlx, suml2 = grid(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.copyto(levels, q + nmax, where=better)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    scale[zero] = 0
    levels[:, zero] = 0
    return scale, levels


def _fit_symmetric_refine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants (rmse) over columns x [n, m]: start at nmax / max, then up to 5
    passes that move one value at a time to the level that raises the x^2-weighted fit.
    A pass that changes nothing leaves the state as it was, so running all 5 passes equals
    C's early exit. All-zero sub-blocks give scale 0 and L 0. Returns (scale, L int32)."""
    amax, signed_max = _first_abs_max(x, 0)
    zero = amax < _GROUP_MAX_EPS
    q = np.clip(_nearest_int((F32(-nmax) / signed_max) * x), -nmax, nmax - 1)
    qf = q.astype(F32)
    weights = x * x
    wx = weights * x
    sumlx = _sum(wx * qf)
    suml2 = _sum((weights * qf) * qf)
    for _ in range(5):
        for i in range(x.shape[0]):
            qi = qf[i]
            w, wxi = weights[i], wx[i]
            slx = sumlx - wxi * qi
            sl2 = suml2 - (w * qi) * qi
            new_q = np.clip(_nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1)
            new_qf = new_q.astype(F32)
            take = (slx > 0) & (new_q != q[i])
            slx = slx + wxi * new_qf
            sl2 = sl2 + (w * new_qf) * new_qf
            take &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            np.copyto(q[i], new_q, where=take)
            np.copyto(qf[i], new_qf, where=take)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    scale[zero] = 0
    levels = q + nmax
    levels[:, zero] = 0
    return scale, levels


# ---------------------------------------------------------------- bit packing shared by the K-quants


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """[nb, 256] values 0..3 -> [nb, 64]: byte l of each 128-half holds values l, l+32, l+64, l+96."""
    q = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_nibbles_by_64(levels: np.ndarray) -> np.ndarray:
    """[nb, 256] values 0..15 -> [nb, 128]: per 64 values, byte l holds l (low) and l+32 (high)."""
    q = levels.astype(np.uint8).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_scale_min_6bit(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 8 six-bit scales and 8 six-bit mins [nb, 8]."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _as_bytes(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields (fp16, uint16 or uint8 arrays with leading dim nb) into bytes."""
    nb = parts[0].shape[0]
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(nb, -1) for p in parts], axis=1)


def _requantize(x: np.ndarray, fitted: np.ndarray, sub_d: np.ndarray, lo: int, hi: int, sub_m=None):
    """Re-quantize sub-blocks x [nb, nsub, n] with their scales as stored (sub_d [nb, nsub],
    and mins sub_m for the asymmetric types): round((x + m) / d) clipped to lo..hi. A
    sub-block whose stored scale is 0 keeps its `fitted` levels, as ggml's `continue` does.
    Returns levels [nb, nsub * n]."""
    shifted = x if sub_m is None else x + sub_m[:, :, None]
    q = np.clip(_nearest_int(shifted / sub_d[:, :, None]), lo, hi)
    return np.where((sub_d == 0)[:, :, None], fitted, q).reshape(x.shape[0], -1)


# ---------------------------------------------------------------- the block types


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    xs = _columns(blocks, 16)
    scales, mins, fitted = _fit_scale_min(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    has_scale, has_min = max_scale > 0, max_min > 0
    q_scale = np.where(has_scale[:, None], _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
    q_min = np.where(has_min[:, None], _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed_scales = ((q_scale & 0xFF) | ((q_min << 4) & 0xFF)).astype(np.uint8)
    d = np.where(has_scale, _fp16(max_scale / F32(15)), np.float16(0))
    dmin = np.where(has_min, _fp16(max_min / F32(15)), np.float16(0))
    sub_d = d.astype(F32)[:, None] * (packed_scales & 0xF).astype(F32)
    sub_m = dmin.astype(F32)[:, None] * (packed_scales >> 4).astype(F32)
    x = blocks.reshape(nb, 16, 16)
    levels = _requantize(x, _uncolumns(fitted, x.shape), sub_d, 0, 3, sub_m)
    return _as_bytes(packed_scales, _pack_2bit(levels), d, dmin)


def _symmetric_super_scale(scales: np.ndarray, code_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K/Q6_K: the scales [nb, 16] of largest magnitude, and iscale = code_scale / it
    (1 where there is none, a lane the caller masks)."""
    amax, max_scale = _first_abs_max(scales, -1)
    return amax, F32(code_scale) / np.where(amax > 0, max_scale, F32(1))


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales, fitted = _fit_symmetric_refine(_columns(blocks, 16), 4)
    scales = scales.reshape(nb, 16)
    amax, iscale = _symmetric_super_scale(scales, -32)
    has_scale = amax > 0
    code = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    code[~has_scale] = 0
    d = np.where(has_scale, _fp16(F32(1) / iscale), np.float16(0))
    packed = np.zeros((nb, 12), np.uint8)
    low = (code & 0xF).astype(np.uint8)
    packed[:, 0:8] = low[:, 0:8] | (low[:, 8:16] << 4)
    high = (code >> 4).astype(np.uint8).reshape(nb, 4, 4)  # [nb, j // 4, j % 4]
    packed[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    sub_d = d.astype(F32)[:, None] * (code - 32).astype(F32)
    x = blocks.reshape(nb, 16, 16)
    levels = _requantize(x, _uncolumns(fitted, x.shape) - 4, sub_d, -4, 3) + 4
    high_bit = levels > 3
    levels = np.where(high_bit, levels - 4, levels)
    hmask = np.zeros((nb, 32), np.uint8)  # byte m, bit b <- value 32 * b + m
    for bit in range(8):
        hmask |= high_bit[:, 32 * bit : 32 * (bit + 1)].astype(np.uint8) << bit
    return _as_bytes(hmask, _pack_2bit(levels), packed, d)


def _q4_or_q5_k(blocks: np.ndarray, bits: int) -> np.ndarray:
    nb = blocks.shape[0]
    xs = _columns(blocks, 32)
    av_x = np.sqrt(_sum(xs * xs) / F32(32))
    levels_max = (1 << bits) - 1
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    scales, mins, fitted = _fit_scale_min(xs, av_x + np.abs(xs), levels_max, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    sub_d = d.astype(F32)[:, None] * ls.astype(F32)
    sub_m = dmin.astype(F32)[:, None] * lm.astype(F32)
    x = blocks.reshape(nb, 8, 32)
    levels = _requantize(x, _uncolumns(fitted, x.shape), sub_d, 0, levels_max, sub_m)
    packed = _pack_scale_min_6bit(ls, lm)
    if bits == 4:
        return _as_bytes(d, dmin, packed, _pack_nibbles_by_64(levels))
    high = (levels >> 4).astype(np.uint8).reshape(nb, 8, 32)  # bit k of qh[j] <- value 32 * k + j
    qh = np.zeros((nb, 32), np.uint8)
    for k in range(8):
        qh |= high[:, k] << k
    return _as_bytes(d, dmin, packed, qh, _pack_nibbles_by_64(levels & 0xF))


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales, fitted = _fit_symmetric_search(_columns(blocks, 16), 32)
    scales = scales.reshape(nb, 16)
    amax, iscale = _symmetric_super_scale(scales, -128)
    zero = amax < _GROUP_MAX_EPS
    d = np.where(zero, np.float16(0), _fp16(F32(1) / iscale))
    code = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    code[zero] = 0
    sub_d = d.astype(F32)[:, None] * code.astype(F32)
    x = blocks.reshape(nb, 16, 16)
    fitted = _uncolumns(fitted, x.shape)
    levels = _requantize(x, fitted - 32, sub_d, -32, 31) + 32
    levels[zero] = 0  # ggml zeroes the whole block
    levels = levels.astype(np.uint8).reshape(nb, 2, 4, 32)  # [nb, half, quarter, l]
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return _as_bytes(ql.reshape(nb, 128), qh.reshape(nb, 64), code, d)


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8 on the IQ4 grid: the nearest value's index, the upper one unless the
    lower is strictly nearer (float32 distances)."""
    upper = np.clip(np.searchsorted(_IQ4_VALUES_F32, v, side="right"), 1, 15)
    lower_value, upper_value = _IQ4_VALUES_F32[upper - 1], _IQ4_VALUES_F32[upper]
    index = np.where(v - lower_value < upper_value - v, upper - 1, upper)
    index = np.where(v <= _IQ4_VALUES_F32[0], 0, index)
    return np.where(v >= _IQ4_VALUES_F32[15], 15, index)


def _iq4_block_scales(x: np.ndarray) -> np.ndarray:
    """quantize_row_iq4_nl_impl's scale per block of 32 (ntry 7, weights x^2), columns x [32, m]."""
    weights = x * x
    amax, signed_max = _first_abs_max(x, 0)

    def sums(inverse):
        q = _IQ4_VALUES_F32[_iq4_index(inverse * x)]
        wq = weights * q
        return _sum(wq * x), _sum(wq * q)

    sumqx, sumq2 = sums(F32(1) / (-signed_max / _IQ4_VALUES_F32[0]))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for step in range(-7, 8):
        sumqx, sumq2 = sums(F32(step + int(IQ4_VALUES[0])) / signed_max)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    d[amax < _GROUP_MAX_EPS] = 0
    return d


def _pack_iq4(levels: np.ndarray) -> np.ndarray:
    """[nb, n] indices 0..15 -> [nb, n/2]: per 32 values, byte j holds j (low) and j+16 (high)."""
    q = levels.astype(np.uint8).reshape(levels.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(levels.shape[0], -1)


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1 / d : 0`."""
    return np.where(d != 0, F32(1) / d, F32(0))


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = _iq4_block_scales(_columns(blocks, 32))
    return _as_bytes(_fp16(d), _pack_iq4(_iq4_index(_inverse(d)[:, None] * blocks)))


def _iq4_xs(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales = _iq4_block_scales(_columns(blocks, 32)).reshape(nb, 8)
    _, max_scale = _first_abs_max(scales, -1)
    d = -max_scale / F32(32)
    code = np.clip(_nearest_int(_inverse(d)[:, None] * scales), -32, 31)
    sub_inverse = _inverse(d[:, None] * code.astype(F32))
    levels = _iq4_index(sub_inverse[:, :, None] * blocks.reshape(nb, 8, 32)).reshape(nb, 256)
    code = (code + 32).astype(np.uint16)
    low = (code & 0xF).astype(np.uint8)
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    scales_h = np.zeros(nb, np.uint16)
    for ib in range(8):
        scales_h |= (code[:, ib] >> 4) << (2 * ib)
    return _as_bytes(_fp16(d), scales_h, scales_l, _pack_iq4(levels))


_QUANTIZERS = {
    QT.Q2_K: _q2_k,
    QT.Q3_K: _q3_k,
    QT.Q4_K: lambda blocks: _q4_or_q5_k(blocks, 4),
    QT.Q5_K: lambda blocks: _q4_or_q5_k(blocks, 5),
    QT.Q6_K: _q6_k,
    QT.IQ4_NL: _iq4_nl,
    QT.IQ4_XS: _iq4_xs,
}


def _signed_zeros_as_ggml(blocks: np.ndarray, out: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """gguf-py's fp16 fields can differ from ggml's in the sign of a zero, which ggml's
    loops fix by their order: Q4_0/Q5_0 start from max = +0.0, so an all-zero block has
    d = +0.0 / -8 = -0.0; Q4_1/Q5_1 keep the first of equal minima (-0.0 or +0.0) as m,
    and an all-zero block's d is (max - min) / 31 of those first values. Patch the bytes."""
    zero = ~blocks.any(axis=1)
    if qtype in (QT.Q4_0, QT.Q5_0):
        out[zero, 0:2] = np.array([-0.0], np.float16).view(np.uint8)
    elif qtype in (QT.Q4_1, QT.Q5_1):
        rows = np.arange(blocks.shape[0])
        lo, hi = blocks[rows, blocks.argmin(axis=1)], blocks[rows, blocks.argmax(axis=1)]
        out[:, 2:4] = lo.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[zero, 0:2] = (hi[zero] - lo[zero]).astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 `values` [..., n] (n a multiple of the block size) as `qtype`: uint8 [..., row_bytes]."""
    values = np.ascontiguousarray(values, dtype=F32)
    byte_shape = tuple(quant_shape_to_byte_shape(values.shape, qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    quantizer = _QUANTIZERS.get(qtype)
    if quantizer is None:
        out = np.ascontiguousarray(gguf_quantize(values, qtype)).view(np.uint8)
        if block_size > 1:
            _signed_zeros_as_ggml(values.reshape(-1, block_size), out.reshape(-1, type_size), qtype)
        return out.reshape(byte_shape)
    blocks = values.reshape(-1, block_size)
    out = np.empty((blocks.shape[0], type_size), np.uint8)
    # lanes that ggml's branches skip (all-zero blocks, det <= 0) are computed and then masked
    # out, so their inf/nan are expected
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], _BATCH_BLOCKS):
            out[start : start + _BATCH_BLOCKS] = quantizer(blocks[start : start + _BATCH_BLOCKS])
    return out.reshape(byte_shape)
