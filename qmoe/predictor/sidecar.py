"""The predictor sidecar: a GGUF file of its own next to the model (`model.pred.gguf`).

llama.cpp refuses a model file with tensors its architecture does not create, so
the predictors live in a separate GGUF with `general.architecture = "qmoe-predictor"`.
It stores, per MoE block l, the exported (BatchNorm-folded) predictor:

    blk.{l}.pred_fc1.weight  [H, n_embd]   f16 or q8_0
    blk.{l}.pred_fc1.bias    [H]           f32
    blk.{l}.pred_fc2.weight  [E, H]        f16 or q8_0
    blk.{l}.pred_fc2.bias    [E]           f32

(numpy order; GGUF's ne is reversed). q8_0 needs rows that are a multiple of 32
values; a matrix whose rows are not falls back to f16. Metadata under
`qmoe-predictor.`: the base model's identity, sizes, activation, architecture,
k and the suggested over-provisioning k', the input the predictors read, the
held-out fraction of their training split, and the list of layers.

The base model's identity is a sha256 over its metadata and tensor table (names,
types, shapes, offsets), not its tensor data: fast on a 30 GB file, and any
reconversion or requantization changes it, so predictors trained on one file are
refused for another (`PredictorMismatchError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from qmoe.errors import GGUFFormatError, PredictorMismatchError
from qmoe.gguf_file import GGUFFile, Tensor
from qmoe.predictor.model import ACTIVATIONS, PredictorSet, PredictorWeights

ARCH = "qmoe-predictor"
SIDECAR_SUFFIX = ".pred.gguf"
WEIGHT_TYPES = ("f16", "q8_0")
Q8_0_BLOCK = 32


def _key(name: str) -> str:
    return f"{ARCH}.{name}"


def _tensor_name(layer: int, part: str) -> str:
    """part: fc1.weight, fc1.bias, fc2.weight, fc2.bias."""
    return f"blk.{layer}.pred_{part}"


def default_sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where the sidecar of `model.gguf` lives: `model.pred.gguf` beside it."""
    path = Path(model_path)
    stem = path.name.removesuffix(".gguf")
    return path.with_name(stem + SIDECAR_SUFFIX)


def model_identity(model: str | os.PathLike | GGUFFile) -> str:
    """sha256 (hex) over a GGUF's metadata and tensor table; never reads tensor data."""
    gguf = model if isinstance(model, GGUFFile) else GGUFFile(model)
    digest = hashlib.sha256()
    for key in sorted(gguf.fields):
        digest.update(json.dumps([key, gguf.fields[key]], default=_json_scalar).encode())
    for name in sorted(gguf.tensors):
        t = gguf.tensors[name]
        digest.update(json.dumps([name, int(t.qtype), list(t.shape), t.offset]).encode())
    return digest.hexdigest()


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metadata value of type {type(value).__name__} cannot be hashed")


def write_sidecar(path: str | os.PathLike, predictors: PredictorSet, weight_type: str = "q8_0") -> None:
    """Write `predictors` to `path` atomically (a temporary file in the same folder, then a rename)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if not predictors.layers:
        raise ValueError("no predictors to write")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, ARCH)
    writer.add_string(_key("base_model_identity"), predictors.model_identity)
    writer.add_uint32(_key("embedding_length"), predictors.n_embd)
    writer.add_uint32(_key("expert_count"), predictors.n_expert)
    writer.add_uint32(_key("expert_used_count"), predictors.k)
    writer.add_uint32(_key("expert_prefetch_count"), predictors.k_prime)
    writer.add_uint32(_key("hidden_size"), predictors.hidden)
    writer.add_uint32(_key("predictor_arch"), predictors.arch)
    writer.add_string(_key("activation"), predictors.activation)
    writer.add_string(_key("input"), predictors.input)
    # float64: evaluation must rebuild exactly the split the predictors were trained with
    writer.add_float64(_key("heldout_fraction"), predictors.heldout_fraction)
    writer.add_array(_key("layers"), sorted(predictors.layers))
    for layer in sorted(predictors.layers):
        weights = predictors.layers[layer]
        _add_matrix(writer, _tensor_name(layer, "fc1.weight"), weights.fc1_weight, weight_type)
        writer.add_tensor(_tensor_name(layer, "fc1.bias"), weights.fc1_bias.float().cpu().numpy())
        _add_matrix(writer, _tensor_name(layer, "fc2.weight"), weights.fc2_weight, weight_type)
        writer.add_tensor(_tensor_name(layer, "fc2.bias"), weights.fc2_bias.float().cpu().numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _add_matrix(writer: GGUFWriter, name: str, matrix: torch.Tensor, weight_type: str) -> None:
    values = matrix.float().cpu().numpy()  # [rows, cols]
    if weight_type == "q8_0" and values.shape[1] % Q8_0_BLOCK == 0:
        writer.add_tensor(
            name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
        )
    else:
        writer.add_tensor(name, values.astype(np.float16))


def load_sidecar(path: str | os.PathLike, expected_identity: str) -> PredictorSet:
    """Read a sidecar (float32, CPU); refuse it unless it was made for the model `expected_identity`."""
    gguf = GGUFFile(path)
    if gguf.arch != ARCH:
        raise GGUFFormatError(
            f"{gguf.path}: general.architecture is {gguf.arch!r}, expected {ARCH!r} (a predictor sidecar)"
        )
    identity = gguf.get(_key("base_model_identity"))
    if identity != expected_identity:
        raise PredictorMismatchError(
            f"{gguf.path}: predictors were trained for model {identity[:16]}..., but this model is "
            f"{expected_identity[:16]}...; train predictors for this model (qmoe train-predictors)"
        )
    n_embd = int(gguf.get(_key("embedding_length")))
    n_expert = int(gguf.get(_key("expert_count")))
    hidden = int(gguf.get(_key("hidden_size")))
    arch = int(gguf.get(_key("predictor_arch")))
    activation = gguf.get(_key("activation"))
    if ACTIVATIONS.get(arch) != activation:
        raise GGUFFormatError(
            f"{gguf.path}: predictor_arch {arch} with activation {activation!r} is not a known pair"
        )
    layers = {}
    for layer in gguf.get(_key("layers")):
        layers[int(layer)] = PredictorWeights(
            _load_float(gguf.tensor(_tensor_name(layer, "fc1.weight"), (hidden, n_embd))),
            _load_float(gguf.tensor(_tensor_name(layer, "fc1.bias"), (hidden,))),
            _load_float(gguf.tensor(_tensor_name(layer, "fc2.weight"), (n_expert, hidden))),
            _load_float(gguf.tensor(_tensor_name(layer, "fc2.bias"), (n_expert,))),
            activation,
        )
    try:
        return PredictorSet(
            model_identity=identity,
            n_embd=n_embd,
            n_expert=n_expert,
            k=int(gguf.get(_key("expert_used_count"))),
            k_prime=int(gguf.get(_key("expert_prefetch_count"))),
            arch=arch,
            input=gguf.get(_key("input")),
            heldout_fraction=float(gguf.get(_key("heldout_fraction"))),
            layers=layers,
        )
    except ValueError as e:
        raise GGUFFormatError(f"{gguf.path}: {e}") from e


def _load_float(t: Tensor) -> torch.Tensor:
    """A tensor of the sidecar as float32 torch, dequantized if it is q8_0."""
    if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = t.data
    else:
        values = dequantize(t.data, t.qtype)
    # a copy: the result must not alias the memory-mapped file
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(t.shape))
