"""The predictor sidecar: a GGUF file of its own next to the model (`model.pred.gguf`),
or the same predictors embedded in a copy of the model (`model.pred-embedded.gguf`).

llama.cpp refuses a model file with tensors its architecture does not create, so
by default the predictors live in a separate GGUF with `general.architecture =
"qmoe-predictor"`. It stores, per MoE block l, the exported (BatchNorm-folded) predictor:

    blk.{l}.pred_fc1.weight  [H, n_embd]   f16 or q8_0
    blk.{l}.pred_fc1.bias    [H]           f32
    blk.{l}.pred_fc2.weight  [E, H]        f16 or q8_0
    blk.{l}.pred_fc2.bias    [E]           f32

and, per MoE block the calibration recorded, how often its router chose each expert:

    blk.{l}.pred_route_count [E]           f32   (tokens; exact up to 2^24 of them)

(numpy order; GGUF's ne is reversed). q8_0 needs rows that are a multiple of 32
values; a matrix whose rows are not falls back to f16. Metadata under
`qmoe-predictor.`: the base model's identity, sizes, activation, architecture,
k and the suggested over-provisioning k', the input the predictors read, the
held-out fraction of their training split, the list of layers, and the number
of calibration tokens the route counts cover (`routed_tokens`; sidecars written
before the counts were recorded have neither).

The base model's identity is a sha256 over its metadata and tensor table (names,
types, shapes, offsets), not its tensor data: fast on a 30 GB file, and any
reconversion or requantization changes it, so predictors trained on one file are
refused for another (`PredictorMismatchError`).

An embedded file is the model, byte for byte (every metadata key and tensor, in
order, at the same offsets within the data section), plus the sidecar's
`qmoe-predictor.*` keys and `blk.{l}.pred_*` tensors after the model's own. Its
identity leaves those out and counts offsets from the first model tensor, so it
is the original model's identity and the same predictors fit both files. qmoe
runs it like the model (architectures read only the tensors they know); llama.cpp
refuses it for the extra tensors.

Where the runtime finds predictors (`predictor_source`): the path given
explicitly, else the predictors embedded in the model file, else the sidecar
beside the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tqdm import tqdm

from qmoe import kernels
from qmoe.errors import GGUFFormatError, PredictorMismatchError, QmoeError
from qmoe.gguf_file import GGUF_MAGIC, GGUFFile, Tensor, read_header_layout
from qmoe.predictor.model import ACTIVATIONS, PredictorSet, PredictorWeights

ARCH = "qmoe-predictor"
SIDECAR_SUFFIX = ".pred.gguf"
EMBEDDED_SUFFIX = ".pred-embedded.gguf"
WEIGHT_TYPES = ("f16", "q8_0")
Q8_0_BLOCK = 32
_PREDICTOR_TENSOR = re.compile(r"blk\.\d+\.pred_.+")
_ROUTE_COUNT = re.compile(r"blk\.(\d+)\.pred_route_count")
_COPY_CHUNK = 64 * 2**20  # bytes written per call when copying the model's tensors


def _key(name: str) -> str:
    return f"{ARCH}.{name}"


def tensor_name(layer: int, part: str) -> str:
    """part: fc1.weight, fc1.bias, fc2.weight, fc2.bias, route_count."""
    return f"blk.{layer}.pred_{part}"


def _is_predictor_key(key: str) -> bool:
    return key.startswith(ARCH + ".")


def _is_predictor_tensor(name: str) -> bool:
    return _PREDICTOR_TENSOR.fullmatch(name) is not None


def default_sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where the sidecar of `model.gguf` lives: `model.pred.gguf` beside it."""
    path = Path(model_path)
    stem = path.name.removesuffix(".gguf")
    return path.with_name(stem + SIDECAR_SUFFIX)


def default_embedded_path(model_path: str | os.PathLike) -> Path:
    """Where `train-predictors --embed` writes by default: `model.pred-embedded.gguf` beside the model.

    Not `model.gguf` itself (the original stays loadable by llama.cpp) and not a name
    ending in `.pred.gguf` (that would read as a sidecar).
    """
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".gguf") + EMBEDDED_SUFFIX)


def has_embedded_predictors(model: GGUFFile) -> bool:
    """Whether a model file carries predictors of its own (written by `embed_predictors`)."""
    return model.arch != ARCH and _key("base_model_identity") in model.fields


def model_identity(model: str | os.PathLike | GGUFFile) -> str:
    """sha256 (hex) over a GGUF's metadata and tensor table; never reads tensor data.

    Embedded predictors (`qmoe-predictor.*` keys, `blk.*.pred_*` tensors) are left out, and
    offsets count from the first model tensor rather than the file's start, so a copy of the
    model with predictors embedded has the original's identity: the header it grows
    moves the data section, not the tensors within it.
    """
    gguf = model if isinstance(model, GGUFFile) else GGUFFile(model)
    digest = hashlib.sha256()
    for key in sorted(gguf.fields):
        if not _is_predictor_key(key):
            digest.update(json.dumps([key, gguf.fields[key]], default=_json_scalar).encode())
    tensors = {name: t for name, t in gguf.tensors.items() if not _is_predictor_tensor(name)}
    base = min((t.offset for t in tensors.values()), default=0)
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, int(t.qtype), list(t.shape), t.offset - base]).encode())
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
        _add_matrix(writer, tensor_name(layer, "fc1.weight"), weights.fc1_weight, weight_type)
        writer.add_tensor(tensor_name(layer, "fc1.bias"), weights.fc1_bias.float().cpu().numpy())
        _add_matrix(writer, tensor_name(layer, "fc2.weight"), weights.fc2_weight, weight_type)
        writer.add_tensor(tensor_name(layer, "fc2.bias"), weights.fc2_bias.float().cpu().numpy())
    if predictors.route_counts:
        writer.add_uint64(_key("routed_tokens"), predictors.routed_tokens)
        for layer in sorted(predictors.route_counts):
            writer.add_tensor(tensor_name(layer, "route_count"), predictors.route_counts[layer].astype(np.float32))
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


def predictor_source(model: GGUFFile, explicit: str | os.PathLike | None = None) -> Path:
    """The GGUF to read `model`'s predictors from: `explicit` when given, else the model file
    itself when it has predictors embedded, else the sidecar `model.pred.gguf` beside it."""
    if explicit is not None:
        path = Path(explicit)
    elif has_embedded_predictors(model):
        return model.path
    else:
        path = default_sidecar_path(model.path)
    if not path.is_file():
        raise QmoeError(
            f"{model.path.name} needs predictors for pre-attn prediction, and {path} does not exist"
            + ("" if explicit is not None else " (nor are predictors embedded in the model)")
            + ": train them with `qmoe calibrate` and `qmoe train-predictors`, or give --predictors PATH"
        )
    return path


def load_sidecar(source: str | os.PathLike | GGUFFile, expected_identity: str) -> PredictorSet:
    """Read predictors (float32, CPU) from a sidecar or from a model file they are embedded in
    (a path, or the file already open); refuse them unless they were made for the model
    `expected_identity`."""
    gguf = source if isinstance(source, GGUFFile) else GGUFFile(source)
    if gguf.arch != ARCH and not has_embedded_predictors(gguf):
        raise GGUFFormatError(
            f"{gguf.path}: holds no predictors: general.architecture is {gguf.arch!r}, not {ARCH!r} "
            f"(a predictor sidecar), and it has no embedded {_key('base_model_identity')} key"
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
            _load_float(gguf.tensor(tensor_name(layer, "fc1.weight"), (hidden, n_embd))),
            _load_float(gguf.tensor(tensor_name(layer, "fc1.bias"), (hidden,))),
            _load_float(gguf.tensor(tensor_name(layer, "fc2.weight"), (n_expert, hidden))),
            _load_float(gguf.tensor(tensor_name(layer, "fc2.bias"), (n_expert,))),
            activation,
        )
    routed_tokens = int(gguf.get(_key("routed_tokens"), 0, kind=int))
    route_counts = {}
    for name in gguf.tensors if routed_tokens else ():
        if (found := _ROUTE_COUNT.fullmatch(name)) is not None:
            counts = _load_float(gguf.tensor(name, (n_expert,))).numpy()
            route_counts[int(found[1])] = np.rint(counts).astype(np.int64)
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
            route_counts=route_counts,
            routed_tokens=routed_tokens,
        )
    except ValueError as e:
        raise GGUFFormatError(f"{gguf.path}: {e}") from e


def _load_float(t: Tensor) -> torch.Tensor:
    """A tensor of the sidecar as float32 torch, dequantized by the kernels if it is q8_0."""
    values = kernels.dequantize(t.data, t.qtype)  # a new array: it does not alias the memory-mapped file
    return torch.from_numpy(values.reshape(t.shape))


def check_output_path(out_path: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool) -> Path:
    """Refuse to write over one of `inputs` (ever) or over an existing file unless `overwrite`."""
    out = Path(out_path)
    for source in inputs:
        if out.exists() and os.path.samefile(out, source):
            raise QmoeError(f"{out}: is the input {source}; choose another output path (-o)")
    if out.exists() and not overwrite:
        raise QmoeError(f"{out}: already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise QmoeError(f"{out.parent}: output directory does not exist")
    return out


def write_embedded(
    model_path: str | os.PathLike,
    predictors: PredictorSet,
    out_path: str | os.PathLike,
    weight_type: str = "q8_0",
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Write a copy of the model with `predictors` embedded (see `embed_predictors`)."""
    out = check_output_path(out_path, [model_path], overwrite)
    sidecar = out.with_name(f".{out.name}.tmp-{os.getpid()}-predictors")
    try:
        write_sidecar(sidecar, predictors, weight_type)
        embed_predictors(model_path, sidecar, out, overwrite=overwrite, progress=progress)
    finally:
        sidecar.unlink(missing_ok=True)


def embed_predictors(
    model_path: str | os.PathLike,
    predictors_path: str | os.PathLike,
    out_path: str | os.PathLike,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Write `out_path`: the model of `model_path` with the predictors of `predictors_path` added.

    The model's metadata and tensor infos are copied byte for byte and its tensors keep their
    offsets within the data section; the predictors' `qmoe-predictor.*` keys and `blk.*.pred_*`
    tensors follow the model's own. Predictors already embedded in `model_path` are dropped,
    and `predictors_path` may be a sidecar or another embedded file. Tensors are copied in
    pieces through one buffer, with plain reads rather than through the memory map, so a
    30 GB model costs neither 30 GB of memory nor 30 GB of resident mapped pages; the file
    appears at `out_path` only when complete.
    """
    model = GGUFFile(model_path)
    out = check_output_path(out_path, [model_path, predictors_path], overwrite)
    load_sidecar(predictors_path, model_identity(model))  # refuses another model's or malformed predictors
    source = GGUFFile(predictors_path)
    model_header, source_header = read_header_layout(model.path), read_header_layout(source.path)
    alignment = model_header.alignment

    keys = [raw for key, raw in model_header.keys if not _is_predictor_key(key)]
    keys += [raw for key, raw in source_header.keys if _is_predictor_key(key)]
    infos = [raw for name, raw in model_header.tensor_infos if not _is_predictor_tensor(name)]
    # (file, tensor, offset within the new data section): the model's tensors where they were,
    # the predictors after them
    placed = [(model, model.tensors[name], model.tensors[name].offset - model_header.data_start)
              for name, _ in model_header.tensor_infos if not _is_predictor_tensor(name)]
    end = max((offset + t.nbytes for _, t, offset in placed), default=0)
    for name, raw in source_header.tensor_infos:
        if _is_predictor_tensor(name):
            offset = _align(end, alignment)
            infos.append(raw[:-8] + struct.pack("<Q", offset))  # a tensor info ends with its u64 offset
            placed.append((source, source.tensors[name], offset))
            end = offset + source.tensors[name].nbytes

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    buffer = memoryview(bytearray(_COPY_CHUNK))
    try:
        with (open(model.path, "rb") as model_bytes, open(source.path, "rb") as source_bytes,
              open(tmp, "wb") as f,
              tqdm(total=sum(t.nbytes for _, t, _ in placed), unit="B", unit_scale=True, desc=out.name,
                   disable=not progress) as bar):
            f.write(GGUF_MAGIC + struct.pack("<IQQ", model_header.version, len(infos), len(keys)))
            for raw in keys + infos:
                f.write(raw)
            data_start = _align(f.tell(), alignment)
            for gguf, t, offset in sorted(placed, key=lambda entry: entry[2]):
                f.write(bytes(data_start + offset - f.tell()))  # zero padding up to the tensor
                src = model_bytes if gguf is model else source_bytes
                src.seek(t.offset)
                for start in range(0, t.nbytes, len(buffer)):
                    piece = buffer[: min(len(buffer), t.nbytes - start)]
                    if src.readinto(piece) != len(piece):
                        raise GGUFFormatError(f"{gguf.path}: tensor {t.name!r} ends early; was the file changed?")
                    f.write(piece)
                    bar.update(len(piece))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
