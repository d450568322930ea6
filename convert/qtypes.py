"""Which GGUF type each tensor gets, and turning float32 rows into that type's bytes.

The rules follow llama.cpp, so a file from here loads there and is typed as users
know it: 1-D tensors, norms, router weights (ffn_gate_inp) and anything that is not a
`.weight` (biases) stay F32, because llama.cpp's kernels expect them so and they are
tiny. The matrices take --outtype, which is either
- a single type (f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q3_k q4_k q5_k iq4_nl): every
  matrix, token embedding and output included, gets it; or
- one of llama-quantize's mixes (q2_k q3_k_m q4_k_m q5_k_m q6_k iq4_xs), typed per
  tensor by its recipe (convert/mixes.py). `pure=True` (--pure, as llama-quantize's)
  gives every matrix the mix's base type instead, which is also how Q2_K, Q6_K and
  IQ4_XS are had as single types.
The stacked expert tensors (`*_exps`) take --expert-type (a single type) when given.

A type whose block does not divide a tensor's rows falls back as llama.cpp's does
(Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, a 32-block type -> F16), with a
warning that names the tensor.

Quantization itself is convert/quants.py: bit-exact with llama.cpp's quantizer, and
row-wise, so quantizing an expert at a time gives the same bytes as quantizing the
stacked tensor.
"""

from __future__ import annotations

import math
import warnings

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape

from convert.mixes import BASE_TYPE, MIXES, ModelFacts, fallback, mix_types
from qmoe.errors import ConversionError

QT = GGMLQuantizationType
FT = LlamaFileType

SINGLE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": QT.F32,
    "f16": QT.F16,
    "bf16": QT.BF16,
    "q8_0": QT.Q8_0,
    "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1,
    "q5_0": QT.Q5_0,
    "q5_1": QT.Q5_1,
    "q2_k": QT.Q2_K,
    "q3_k": QT.Q3_K,
    "q4_k": QT.Q4_K,
    "q5_k": QT.Q5_K,
    "q6_k": QT.Q6_K,
    "iq4_nl": QT.IQ4_NL,
    "iq4_xs": QT.IQ4_XS,
}

# --outtype: a mix where llama.cpp has one of that name (q2_k, q6_k, iq4_xs), else a single type
OUTTYPES: list[str] = list(dict.fromkeys([*SINGLE_TYPES, *MIXES]))

# general.file_type of a file whose bulk (its experts) has this type
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    QT.F32: FT.ALL_F32,
    QT.F16: FT.MOSTLY_F16,
    QT.BF16: FT.MOSTLY_BF16,
    QT.Q8_0: FT.MOSTLY_Q8_0,
    QT.Q4_0: FT.MOSTLY_Q4_0,
    QT.Q4_1: FT.MOSTLY_Q4_1,
    QT.Q5_0: FT.MOSTLY_Q5_0,
    QT.Q5_1: FT.MOSTLY_Q5_1,
    QT.Q2_K: FT.MOSTLY_Q2_K,
    QT.Q3_K: FT.MOSTLY_Q3_K_S,  # llama.cpp has no plain Q3_K/Q4_K/Q5_K file type; _S is the closest
    QT.Q4_K: FT.MOSTLY_Q4_K_S,
    QT.Q5_K: FT.MOSTLY_Q5_K_S,
    QT.Q6_K: FT.MOSTLY_Q6_K,
    QT.IQ4_NL: FT.MOSTLY_IQ4_NL,
    QT.IQ4_XS: FT.MOSTLY_IQ4_XS,
}


class BlockSizeFallbackWarning(UserWarning):
    """A tensor's rows do not divide into the requested type's blocks; it was written as another type."""


def check_outtype(name: str) -> str:
    if name.lower() not in OUTTYPES:
        raise ConversionError(f"--outtype {name!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    return name.lower()


def parse_type(name: str, option: str) -> GGMLQuantizationType:
    """A single type by name (--expert-type)."""
    qtype = SINGLE_TYPES.get(name.lower())
    if qtype is None:
        raise ConversionError(f"{option} {name!r} is not supported; choose one of {', '.join(SINGLE_TYPES)}")
    return qtype


def is_expert_tensor(name: str) -> bool:
    return name.endswith("_exps.weight")


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp's converter always writes as F32 (and its quantizer leaves alone)."""
    return (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or ".ffn_gate_inp." in name
        or not name.endswith(".weight")
    )


def choose_types(
    shapes: dict[str, tuple[int, ...]],
    outtype: str,
    expert_type: str | None,
    model: ModelFacts,
    pure: bool = False,
) -> tuple[dict[str, GGMLQuantizationType], LlamaFileType]:
    """The GGUF type of every tensor (name -> numpy shape) and the file's general.file_type,
    warning for each tensor that has to fall back."""
    outtype = check_outtype(outtype)
    mix = MIXES.get(outtype)
    base = BASE_TYPE[mix] if mix is not None else SINGLE_TYPES[outtype]
    experts = parse_type(expert_type, "--expert-type") if expert_type else None
    matrices = {name: shape for name, shape in shapes.items() if not keeps_f32(name, shape)}
    if mix is not None and not pure:
        wanted = mix_types(matrices, mix, model)
    else:
        wanted = dict.fromkeys(matrices, base)
    if experts is not None:
        wanted.update((name, experts) for name in matrices if is_expert_tensor(name))
    types = {}
    for name, shape in shapes.items():
        if name not in matrices:
            types[name] = QT.F32
            continue
        types[name] = fallback(wanted[name], shape[-1])
        if types[name] != wanted[name]:
            warnings.warn(
                f"{name}: row length {shape[-1]} is not a multiple of {wanted[name].name}'s block size "
                f"{GGML_QUANT_SIZES[wanted[name]][0]}; writing it as {types[name].name}",
                BlockSizeFallbackWarning,
                stacklevel=2,
            )
    file_type = FILE_TYPES[experts] if experts is not None else mix if mix is not None else FILE_TYPES[base]
    return types, file_type


def byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Shape of the uint8 array that holds a tensor of `shape` in `qtype`."""
    return tuple(quant_shape_to_byte_shape(shape, qtype))


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    return math.prod(byte_shape(shape, qtype))
