"""Which GGUF type each tensor gets, and turning float32 rows into that type's bytes.

The rules follow llama.cpp's converter, so a file from here loads there and
quantizes the same tensors: 1-D tensors, norms, router weights (ffn_gate_inp)
and anything that is not a `.weight` (biases) stay F32, because llama.cpp's
kernels expect them so and they are tiny; the stacked expert tensors (`*_exps`)
take --expert-type when given; everything else, token embedding and output
included, takes --outtype. Block types need the row length (the last numpy
dimension) to be a multiple of their block size; a tensor whose rows are not
falls back to F16 with a warning that names it.

Quantization uses `gguf.quants.quantize`, bit-exact with ggml's reference
quantizers, and works row-wise, so quantizing an expert at a time gives the
same bytes as quantizing the stacked tensor.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

from qmoe.errors import ConversionError

QT = GGMLQuantizationType

OUTTYPES: dict[str, GGMLQuantizationType] = {
    "f32": QT.F32,
    "f16": QT.F16,
    "bf16": QT.BF16,
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
}

# general.file_type for a file whose bulk (its experts) has this type
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    QT.F32: LlamaFileType.ALL_F32,
    QT.F16: LlamaFileType.MOSTLY_F16,
    QT.BF16: LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}


class BlockSizeFallbackWarning(UserWarning):
    """A tensor's rows do not divide into the requested type's blocks; it was written as F16."""


def parse_type(name: str, option: str) -> GGMLQuantizationType:
    qtype = OUTTYPES.get(name.lower())
    if qtype is None:
        raise ConversionError(f"{option} {name!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    return qtype


def is_expert_tensor(name: str) -> bool:
    return name.endswith("_exps.weight")


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp's converter always writes as F32."""
    return (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or ".ffn_gate_inp." in name
        or not name.endswith(".weight")
    )


def choose_type(
    name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType, expert_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    """The GGUF type of tensor `name` (numpy `shape`), warning when it has to fall back."""
    if keeps_f32(name, shape):
        return QT.F32
    wanted = expert_type if is_expert_tensor(name) else outtype
    block_size = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block_size == 0:
        return wanted
    warnings.warn(
        f"{name}: row length {shape[-1]} is not a multiple of {wanted.name}'s block size {block_size}; "
        "writing it as F16",
        BlockSizeFallbackWarning,
        stacklevel=2,
    )
    return QT.F16


def byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Shape of the uint8 array that holds a tensor of `shape` in `qtype`."""
    return tuple(quant_shape_to_byte_shape(shape, qtype))


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    return math.prod(byte_shape(shape, qtype))


def to_bytes(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 `values` [..., n] in `qtype`, as uint8 [..., row_bytes]."""
    encoded = np.ascontiguousarray(quantize(np.ascontiguousarray(values, dtype=np.float32), qtype))
    return encoded.view(np.uint8).reshape(byte_shape(values.shape, qtype))
