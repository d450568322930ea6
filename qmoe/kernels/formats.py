"""Checking a raw weight against its format before a kernel reads it.

The layouts themselves are qmoe/formats.py's table; this module adds the checks at
the kernels' boundary: a type the kernels compute with, and raw bytes that make whole
rows of it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from qmoe.errors import QmoeError
from qmoe.formats import FORMATS, KERNEL_TYPES, QT, row_bytes, supported_names

_KERNEL_SET = frozenset(KERNEL_TYPES)

__all__ = ["FORMATS", "KERNEL_TYPES", "QT", "check_qtype", "row_bytes", "weight_bytes"]


def check_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    """`qtype` as a member of FORMATS, or an error that lists the supported types."""
    if qtype in _KERNEL_SET:  # the usual case, a member already, without the enum lookup
        return qtype if isinstance(qtype, QT) else QT(int(qtype))
    try:
        qtype = QT(int(qtype))
    except ValueError:
        raise QmoeError(f"unknown GGML tensor type {qtype!r}") from None
    if qtype not in KERNEL_TYPES:
        raise QmoeError(
            f"tensor type {qtype.name} is not supported by qmoe's kernels (supported: {supported_names()})"
        )
    return qtype


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
