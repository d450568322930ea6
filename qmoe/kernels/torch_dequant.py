"""Dequantization in torch ops, for weights that live on a GPU (the CUDA fast tier).

The same float32 operations, in the same order, as gguf-py's dequantize and the
numba row loops (qmoe/kernels/compiled.py), so all three give identical values;
written in torch so that it runs on the device next to the slot it fills. Layouts
and field offsets come from qmoe/formats.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from qmoe.formats import FORMATS, KVALUES, QT


def _field(blocks: torch.Tensor, qtype: QT, name: str) -> torch.Tensor:
    """Field `name` of every block: uint8 [rows, n_blocks, field bytes]."""
    fmt = FORMATS[qtype]
    start = fmt.offset(name)
    return blocks[..., start : start + dict(fmt.fields)[name]]


def _half(blocks: torch.Tensor, qtype: QT, name: str) -> torch.Tensor:
    """An fp16 field as float32 [rows, n_blocks, 1]."""
    return _field(blocks, qtype, name).contiguous().view(torch.float16).float()


def _shifted(q: torch.Tensor, shifts: list[int], bits: int) -> torch.Tensor:
    """(q >> s) & mask for each s, stacked before q's last axis: [..., len(shifts), q.shape[-1]]."""
    shift = torch.tensor(shifts, dtype=torch.int16, device=q.device).reshape(-1, 1)
    return (q.to(torch.int16).unsqueeze(-2) >> shift) & ((1 << bits) - 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: low nibbles (elements 0..15) then high."""
    return _shifted(qs, [0, 4], 4).flatten(-2)


def _kvalues(nibbles: torch.Tensor) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=nibbles.device)[nibbles.long()]


def _low_bit(qh_u32: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: bit i of the u32 qh for i < 32: [rows, n_blocks, 32]."""
    qh = qh_u32.contiguous().view(torch.int32).to(torch.int64)
    return (qh >> torch.arange(32, device=qh.device)) & 1


def _q8_0(b):
    return _field(b, QT.Q8_0, "qs").contiguous().view(torch.int8).float() * _half(b, QT.Q8_0, "d")


def _q4_0(b):
    return _half(b, QT.Q4_0, "d") * (_nibbles(_field(b, QT.Q4_0, "qs")) - 8).float()


def _q4_1(b):
    return _half(b, QT.Q4_1, "d") * _nibbles(_field(b, QT.Q4_1, "qs")).float() + _half(b, QT.Q4_1, "m")


def _q5(b, qtype):
    return _nibbles(_field(b, qtype, "qs")) | (_low_bit(_field(b, qtype, "qh")) << 4)


def _q5_0(b):
    return _half(b, QT.Q5_0, "d") * (_q5(b, QT.Q5_0) - 16).float()


def _q5_1(b):
    return _half(b, QT.Q5_1, "d") * _q5(b, QT.Q5_1).float() + _half(b, QT.Q5_1, "m")


def _iq4_nl(b):
    return _half(b, QT.IQ4_NL, "d") * _kvalues(_nibbles(_field(b, QT.IQ4_NL, "qs")))


def _groups(values: torch.Tensor, size: int) -> torch.Tensor:
    return values.reshape(*values.shape[:2], -1, size)


def _two_bits(b, qtype):
    """Q2_K/Q3_K's 2-bit values: element 128h + 32s + i is bits 2s of qs[32h + i]; 16 groups of 16."""
    qs = _field(b, qtype, "qs").reshape(*b.shape[:2], 2, 32)
    return _groups(_shifted(qs, [0, 2, 4, 6], 2), 16)


def _q2_k(b):
    sc = _field(b, QT.Q2_K, "scales").unsqueeze(-1)
    dl = _half(b, QT.Q2_K, "d").unsqueeze(-1) * (sc & 0xF).float()
    ml = _half(b, QT.Q2_K, "dmin").unsqueeze(-1) * (sc >> 4).float()
    return dl * _two_bits(b, QT.Q2_K).float() - ml


def _q3_k(b):
    scales = _field(b, QT.Q3_K, "scales")
    low = _shifted(scales[..., :8], [0, 4], 4).flatten(-2)
    high = _shifted(scales[..., 8:], [0, 2, 4, 6], 2).flatten(-2)
    scale = ((low | (high << 4)) - 32).float().unsqueeze(-1)
    dl = _half(b, QT.Q3_K, "d").unsqueeze(-1) * scale
    hbit = _groups(_shifted(_field(b, QT.Q3_K, "hmask"), list(range(8)), 1), 16)
    return dl * (_two_bits(b, QT.Q3_K) - ((hbit ^ 1) << 2)).float()


def _k4_scales(b, qtype):
    """Q4_K/Q5_K: (d * sc, dmin * m) per 32-group, [rows, n_blocks, 8, 1]."""
    s = _field(b, qtype, "scales").to(torch.int16)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    d_sc = _half(b, qtype, "d").unsqueeze(-1) * sc.float().unsqueeze(-1)
    dm = _half(b, qtype, "dmin").unsqueeze(-1) * mn.float().unsqueeze(-1)
    return d_sc, dm


def _k4_nibbles(b, qtype):
    """Element 64c + 32n + i is nibble n of qs[32c + i]: 8 groups of 32."""
    qs = _field(b, qtype, "qs").reshape(*b.shape[:2], 4, 32)
    return _groups(_shifted(qs, [0, 4], 4), 32)


def _q4_k(b):
    d_sc, dm = _k4_scales(b, QT.Q4_K)
    return d_sc * _k4_nibbles(b, QT.Q4_K).float() - dm


def _q5_k(b):
    d_sc, dm = _k4_scales(b, QT.Q5_K)
    hbit = _groups(_shifted(_field(b, QT.Q5_K, "qh"), list(range(8)), 1), 32)
    return d_sc * (_k4_nibbles(b, QT.Q5_K) | (hbit << 4)).float() - dm


def _q6_k(b):
    ql = _groups(_shifted(_field(b, QT.Q6_K, "ql").reshape(*b.shape[:2], 2, 64), [0, 4], 4), 32)
    qh = _groups(_shifted(_field(b, QT.Q6_K, "qh").reshape(*b.shape[:2], 2, 32), [0, 2, 4, 6], 2), 32)
    q = _groups((ql | (qh << 4)) - 32, 16).float()
    scales = _field(b, QT.Q6_K, "scales").contiguous().view(torch.int8).float().unsqueeze(-1)
    return (_half(b, QT.Q6_K, "d").unsqueeze(-1) * scales) * q


def _iq4_xs(b):
    low = _shifted(_field(b, QT.IQ4_XS, "scales_l"), [0, 4], 4).transpose(-1, -2).flatten(-2)
    high_bits = _field(b, QT.IQ4_XS, "scales_h").contiguous().view(torch.int16).to(torch.int32)
    high = (high_bits >> torch.arange(0, 16, 2, device=b.device)) & 3
    dl = _half(b, QT.IQ4_XS, "d").unsqueeze(-1) * ((low | (high << 4)) - 32).float().unsqueeze(-1)
    qs = _field(b, QT.IQ4_XS, "qs").reshape(*b.shape[:2], 8, 16)
    return dl * _kvalues(_shifted(qs, [0, 4], 4).flatten(-2))


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q8_0: _q8_0,
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.IQ4_NL: _iq4_nl,
    QT.Q2_K: _q2_k,
    QT.Q3_K: _q3_k,
    QT.Q4_K: _q4_k,
    QT.Q5_K: _q5_k,
    QT.Q6_K: _q6_k,
    QT.IQ4_XS: _iq4_xs,
}
_FLOAT_DTYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def dequantize_torch(raw: torch.Tensor, qtype: GGMLQuantizationType, n: int) -> torch.Tensor:
    """Raw rows [rows, row_bytes] (uint8, any device) of type `qtype` -> float32 [rows, n]."""
    qtype = QT(qtype)
    rows = raw.shape[0]
    if qtype in _FLOAT_DTYPES:
        return raw.contiguous().view(_FLOAT_DTYPES[qtype]).float().reshape(rows, n)
    blocks = raw.reshape(rows, -1, FORMATS[qtype].block_bytes)  # [rows, n / block, block_bytes]
    return _BLOCK_DECODERS[qtype](blocks).reshape(rows, n)
