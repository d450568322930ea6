"""The weight formats the kernels read, and checking a raw weight against its format.

One table (`FORMATS`) says, per GGUF type, how a row of n weights is stored: in
blocks of `block` elements taking `block_bytes` bytes each, and which numpy dtype
qmoe's GGUF reader uses for the raw view. Everything else (row bytes, the
checks in `weight_bytes`) derives from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from qmoe.errors import QmoeError

QT = GGMLQuantizationType


@dataclass(frozen=True)
class Format:
    block: int  # elements per block
    block_bytes: int  # bytes per block
    raw_dtype: type  # dtype of the raw view handed out by qmoe.gguf_file


FORMATS: dict[GGMLQuantizationType, Format] = {
    QT.F32: Format(1, 4, np.float32),
    QT.F16: Format(1, 2, np.float16),
    QT.BF16: Format(1, 2, np.uint16),
    QT.Q8_0: Format(32, 34, np.uint8),  # fp16 d, 32 x int8 q;  w = d * q
    QT.Q4_0: Format(
        32, 18, np.uint8
    ),  # fp16 d, 16 bytes: low nibble = element i, high = i + 16;  w = d * (q - 8)
}


def check_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    """`qtype` as a member of FORMATS, or an error that lists the supported types."""
    try:
        qtype = QT(int(qtype))
    except ValueError:
        raise QmoeError(f"unknown GGML tensor type {qtype!r}") from None
    if qtype not in FORMATS:
        supported = ", ".join(t.name for t in FORMATS)
        raise QmoeError(
            f"tensor type {qtype.name} is not supported by qmoe's kernels (supported: {supported})"
        )
    return qtype


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n weights of type qtype."""
    fmt = FORMATS[qtype]
    return n // fmt.block * fmt.block_bytes


def weight_bytes(w: np.ndarray, qtype: GGMLQuantizationType, what: str) -> tuple[np.ndarray, int]:
    """The raw weight `w` as a flat read-only uint8 array, and its row length n (elements).

    `w` is either the raw view of qmoe.gguf_file (dtype per FORMATS, last dimension
    n for float types, row bytes for block types) or the same bytes as uint8
    [..., row_bytes]. Read-only, so that every caller hits the same compiled
    kernel signature whether the weight comes from a memory map or from RAM.
    """
    fmt = FORMATS[qtype]
    if w.ndim < 1:
        raise QmoeError(f"{what}: expected a weight array with rows, got a scalar")
    if w.dtype == np.uint8:
        nbytes_row = w.shape[-1]
        if nbytes_row % fmt.block_bytes:
            raise QmoeError(
                f"{what}: {qtype.name} rows of {nbytes_row} bytes are not a whole number of "
                f"{fmt.block_bytes}-byte blocks"
            )
        n = nbytes_row // fmt.block_bytes * fmt.block
    elif w.dtype == fmt.raw_dtype:
        n = w.shape[-1]
    else:
        raise QmoeError(
            f"{what}: a {qtype.name} weight must be {np.dtype(fmt.raw_dtype).name} or raw uint8 bytes, "
            f"got {w.dtype}"
        )
    flat = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    flat.flags.writeable = False
    return flat, n
