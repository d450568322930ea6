"""The one table of GGUF tensor layouts: how a row of each type is stored.

A row of n weights is n / block blocks, each `block_bytes` bytes made of the named
fields below, in order. The names are those of ggml-quants.c and gguf-py's
gguf/quants.py, whose `dequantize` is the reference every kernel matches bit for bit.
Everything else derives from this table: qmoe.gguf_file's raw views and row sizes,
the kernels' checks, the byte offsets the compiled row loops and the torch
dequantizer read (`Format.offset`). Adding a quant type is one entry here plus its
decoders in qmoe/kernels/compiled.py and qmoe/kernels/torch_dequant.py.

How the weights come out of the fields (K-quants: 256 weights in 8 groups of 32, or
16 of 16; "d" and "dmin" are fp16, products are float32 in the order written):
    Q8_0    d * qs[i]                                        qs int8
    Q4_0    d * (nibble - 8)                 byte i: element i in the low nibble, i + 16 in the high
    Q4_1    d * nibble + m
    Q5_0    d * ((nibble | bit << 4) - 16)   bit i of the u32 qh is element i's fifth bit
    Q5_1    d * (nibble | bit << 4) + m
    IQ4_NL  d * KVALUES[nibble]              nibbles as Q4_0
    Q2_K    (d * (sc & 15)) * q - dmin * (sc >> 4)          16-groups; q: 2 bits of qs
    Q3_K    (d * (scale6 - 32)) * (q2 - 4 * !hbit)          16-groups; 6-bit scales in 12 bytes
    Q4_K    (d * sc6) * nibble - dmin * m6                   32-groups; sc6, m6 packed in 12 bytes
    Q5_K    (d * sc6) * (nibble | hbit << 4) - dmin * m6     32-groups; hbits: bit g of qh[i]
    Q6_K    (d * scales[g]) * ((nibble | 2 bits << 4) - 32)  16-groups; int8 scales
    IQ4_XS  (d * (scale6 - 32)) * KVALUES[nibble]            32-groups; scale6 from scales_l/_h
qmoe/kernels/compiled.py spells out which bits of which bytes each group reads. numba
caches that file's compiled code by its own timestamp, so an edit here that moves a field
needs compiled.py touched too (ggml fixes these layouts; new entries come with new code
there anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType
QK_K = 256  # elements of a K-quant (and IQ4_XS) super-block

# IQ4_NL and IQ4_XS: the 16 int8 values a nibble indexes (ggml's kvalues_iq4nl).
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Format:
    """How one tensor type is stored: blocks of `block` elements made of `fields`."""

    block: int  # elements per block
    fields: tuple[tuple[str, int], ...]  # (name, bytes) in block order
    raw_dtype: np.dtype  # dtype of qmoe.gguf_file's raw view: the element type, or uint8 blocks
    kernels: bool = True  # qmoe's kernels compute with it (False: stored and readable only)

    @cached_property  # read on every kernel call's checks: worked out once
    def block_bytes(self) -> int:
        return sum(size for _, size in self.fields)

    def offset(self, field: str) -> int:
        """Byte offset of `field` inside a block."""
        start = 0
        for name, size in self.fields:
            if name == field:
                return start
            start += size
        raise KeyError(field)


def _element(dtype: str, kernels: bool = True) -> Format:
    dt = np.dtype(dtype)
    return Format(1, (("value", dt.itemsize),), dt, kernels)


_U8 = np.dtype(np.uint8)

FORMATS: dict[GGMLQuantizationType, Format] = {
    QT.F32: _element("<f4"),
    QT.F16: _element("<f2"),
    QT.BF16: _element("<u2"),  # the top half of a float32
    QT.Q8_0: Format(32, (("d", 2), ("qs", 32)), _U8),
    QT.Q4_0: Format(32, (("d", 2), ("qs", 16)), _U8),
    QT.Q4_1: Format(32, (("d", 2), ("m", 2), ("qs", 16)), _U8),
    QT.Q5_0: Format(32, (("d", 2), ("qh", 4), ("qs", 16)), _U8),
    QT.Q5_1: Format(32, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)), _U8),
    QT.IQ4_NL: Format(32, (("d", 2), ("qs", 16)), _U8),
    QT.Q2_K: Format(QK_K, (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)), _U8),
    QT.Q3_K: Format(QK_K, (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)), _U8),
    QT.Q4_K: Format(QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)), _U8),
    QT.Q5_K: Format(QK_K, (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)), _U8),
    QT.Q6_K: Format(QK_K, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)), _U8),
    QT.IQ4_XS: Format(QK_K, (("d", 2), ("scales_h", 2), ("scales_l", 4), ("qs", 128)), _U8),
    # plain numbers that may appear in a file but that no model weight uses
    QT.F64: _element("<f8", kernels=False),
    QT.I8: _element("<i1", kernels=False),
    QT.I16: _element("<i2", kernels=False),
    QT.I32: _element("<i4", kernels=False),
    QT.I64: _element("<i8", kernels=False),
}

KERNEL_TYPES = tuple(t for t, fmt in FORMATS.items() if fmt.kernels)


def format_of(qtype: GGMLQuantizationType) -> Format:
    """The entry for `qtype`; a type qmoe has no layout for (IQ2_XXS, TQ1_0, ...) still gets
    its block size from gguf-py, so that a file holding it opens and lists, and is refused
    only where a kernel would have to read it."""
    fmt = FORMATS.get(qtype)
    if fmt is not None:
        return fmt
    block, block_bytes = GGML_QUANT_SIZES[qtype]  # KeyError: not a type at all
    return Format(block, (("opaque", block_bytes),), _U8, kernels=False)


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n weights of type qtype."""
    fmt = format_of(qtype)
    return n // fmt.block * fmt.block_bytes


def supported_names() -> str:
    """The types the kernels compute with, for error messages."""
    return ", ".join(t.name for t in KERNEL_TYPES)
