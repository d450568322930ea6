"""What a GGUF file will hold, described before any weight is read.

An architecture module turns config.json into a list of `OutputTensor`s: the
GGUF name, the shape (numpy order), and the `Piece`s it is made of. Each piece
names the Hugging Face tensors it reads, with the shape config.json implies for
them, and a function that makes the piece from them. A tensor of one piece is
produced whole; a tensor of n pieces is n slabs stacked along axis 0, which is
how the experts of a layer-projection become one 3-D tensor without ever
holding more than one expert in float32.

Because the plan is data, the converter can check every source name and shape
against the checkpoint before it writes a byte, and the tests can read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES


def _only(array: np.ndarray) -> np.ndarray:
    return array


@dataclass(frozen=True)
class Source:
    """A Hugging Face tensor and the shape config.json says it has (numpy order)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One slab of an output tensor: `make(*float32 arrays of sources)`."""

    sources: tuple[Source, ...]
    make: Callable[..., np.ndarray] = field(default=_only)

    @property
    def is_copy(self) -> bool:
        """One source written as stored: it can be streamed a few rows at a time."""
        return self.make is _only and len(self.sources) == 1


@dataclass(frozen=True)
class OutputTensor:
    """One GGUF tensor: 1 piece = the whole tensor, n pieces = n slabs along axis 0."""

    name: str
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed
    pieces: tuple[Piece, ...]

    @property
    def piece_shape(self) -> tuple[int, ...]:
        return self.shape if len(self.pieces) == 1 else self.shape[1:]


def gguf_name(kind: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name for a tensor, e.g. (ATTN_Q, 3) -> 'blk.3.attn_q.weight'."""
    return f"{TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def copied(kind: MODEL_TENSOR, bid: int | None, hf_name: str, shape: tuple[int, ...], suffix: str = "weight"):
    """A tensor written as the checkpoint stores it."""
    return OutputTensor(gguf_name(kind, bid, suffix), shape, (Piece((Source(hf_name, shape),)),))


def transformed(
    kind: MODEL_TENSOR,
    bid: int | None,
    hf_name: str,
    hf_shape: tuple[int, ...],
    shape: tuple[int, ...],
    make: Callable[[np.ndarray], np.ndarray],
) -> OutputTensor:
    """A tensor made from one checkpoint tensor by `make` (a permutation, a split)."""
    return OutputTensor(gguf_name(kind, bid), shape, (Piece((Source(hf_name, hf_shape),), make),))


def stacked(kind: MODEL_TENSOR, bid: int, hf_names: list[str], expert_shape: tuple[int, ...]) -> OutputTensor:
    """Per-expert checkpoint tensors stacked into [n_expert, *expert_shape]."""
    pieces = tuple(Piece((Source(name, expert_shape),)) for name in hf_names)
    return OutputTensor(gguf_name(kind, bid), (len(hf_names), *expert_shape), pieces)


def constant(
    kind: MODEL_TENSOR, values: list[float], bid: int | None = None, suffix: str = "weight"
) -> OutputTensor:
    """A float32 tensor given by config.json rather than by the weights (RoPE factors), or
    zeros where llama.cpp requires a tensor the checkpoint does not have (Phi-MoE's biases)."""
    array = np.asarray(values, dtype=np.float32)
    return OutputTensor(gguf_name(kind, bid, suffix), array.shape, (Piece((), lambda: array),))
