"""A Hugging Face checkpoint directory, read one tensor at a time.

A 60 GB checkpoint must convert on a machine with a few GB of RAM, so nothing
here loads a shard. Opening a checkpoint reads only config.json and the JSON
headers of the safetensors shards (names, dtypes, shapes, byte ranges); `read`
then memory-maps the byte range of one tensor, converts it to float32 and drops
the map, so the pages it touched leave the process with it.

The safetensors layout is simple and documented: an 8-byte little-endian header
length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}},
then the data, offsets relative to the end of the header. Parsing it here
(rather than through `safetensors.safe_open`, which keeps the whole shard
mapped while it is open) gives exact byte ranges, so a truncated shard is
reported with the file and the tensor that runs past its end.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmoe.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype of the stored bits
_STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # the top 16 bits of a float32
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor of the checkpoint lives."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name: F32, F16, BF16, F64
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _STORED_DTYPES[self.dtype].itemsize


class HFConfig:
    """config.json, with lookups that name the file and the key when they fail."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ConversionError(f"{path}: no such file (a Hugging Face checkpoint needs config.json)")
        try:
            self.values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: not readable JSON ({e})") from e
        if not isinstance(self.values, dict):
            raise ConversionError(f"{path}: expected a JSON object at the top level")

    @property
    def architecture(self) -> str:
        archs = self.values.get("architectures") or []
        if not archs:
            raise ConversionError(f"{self.path}: no 'architectures' entry, so the model class is unknown")
        return str(archs[0])

    def get(self, *keys: str, default: Any = None) -> Any:
        """The value of the first of `keys` present and not null, else `default`."""
        for key in keys:
            if self.values.get(key) is not None:
                return self.values[key]
        return default

    def require(self, *keys: str) -> Any:
        """Like `get`, but a missing key is an error (several keys: accepted spellings)."""
        value = self.get(*keys)
        if value is None:
            spellings = " or ".join(repr(k) for k in keys)
            raise ConversionError(f"{self.path}: required key {spellings} is missing")
        return value

    def rope(self) -> dict[str, Any]:
        """RoPE parameters in one dict however config.json spells them.

        transformers >= 5 writes `rope_parameters` (rope_theta inside, "rope_type");
        older checkpoints write `rope_theta` beside `rope_scaling` (with "type" or
        "rope_type"), and Phi-3.5 repeats original_max_position_embeddings at the top.
        """
        params = dict(self.values.get("rope_scaling") or {})
        params.update(self.values.get("rope_parameters") or {})
        if "rope_theta" not in params and "rope_theta" in self.values:
            params["rope_theta"] = self.values["rope_theta"]
        if "rope_type" not in params:
            params["rope_type"] = params.get("type", "default")
        if "original_max_position_embeddings" not in params and self.get("original_max_position_embeddings"):
            params["original_max_position_embeddings"] = self.values["original_max_position_embeddings"]
        return params


class Checkpoint:
    """config.json plus the index of every tensor in the safetensors shards."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a directory (expected a Hugging Face checkpoint)")
        self.config = HFConfig(self.dir / "config.json")
        index = self.dir / INDEX_FILE
        # where a missing tensor should have been listed, for error messages
        self.listing = index if index.is_file() else self.dir
        self.tensors: dict[str, SourceTensor] = {}
        for shard, expected in self._shards().items():
            found = {t.name: t for t in _read_header(shard)}
            for name in expected:
                if name not in found:
                    raise ConversionError(
                        f"{shard}: {INDEX_FILE} places tensor {name!r} in this shard, but the shard lacks it"
                    )
            self.tensors.update(found)

    def _shards(self) -> dict[Path, list[str]]:
        """Each shard file and the tensor names the index places in it ([] without an index)."""
        index = self.dir / INDEX_FILE
        if not index.is_file():
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ConversionError(
                    f"{self.dir}: no *.safetensors files (only safetensors checkpoints convert)"
                )
            return {shard: [] for shard in shards}
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        shards: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(self.dir / file, []).append(name)
        for shard, names in shards.items():
            if not shard.is_file():
                raise ConversionError(
                    f"{shard}: shard listed in {INDEX_FILE} is missing "
                    f"(it holds {names[0]!r} and {len(names) - 1} other tensors)"
                )
        return shards

    def source(self, name: str) -> SourceTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ConversionError(f"{self.listing}: tensor {name!r} is missing (in no safetensors shard)")
        return tensor

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop (leading axis) of tensor `name` as a new float32 array.

        Only those rows are mapped, and only while they are converted."""
        t = self.source(name)
        stored = _STORED_DTYPES[t.dtype]
        rows = t.shape[0] if t.shape else 1
        stop = rows if stop is None else min(stop, rows)
        row_elements = math.prod(t.shape[1:])
        shape = (stop - start, *t.shape[1:]) if t.shape else ()
        count = (stop - start) * row_elements
        if count == 0:
            return np.zeros(shape, np.float32)
        offset = t.offset + start * row_elements * stored.itemsize
        view = np.memmap(t.file, dtype=stored, mode="r", offset=offset, shape=(count,))
        if t.dtype == "BF16":
            values = (view.astype(np.uint32) << 16).view(np.float32)
        else:
            values = view.astype(np.float32)
        del view
        return values.reshape(shape)


def _read_header(shard: Path) -> list[SourceTensor]:
    """The tensors a safetensors file declares, each checked to lie inside the file."""
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{shard}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ConversionError(f"{shard}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{shard}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{shard}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{shard}: header entry of tensor {name!r} is malformed ({e!r})") from e
        if dtype not in _STORED_DTYPES:
            raise ConversionError(
                f"{shard}: tensor {name!r} has dtype {dtype}; only {', '.join(_STORED_DTYPES)} convert"
            )
        tensor = SourceTensor(name, shard, dtype, shape, data_start + begin)
        if begin < 0 or end - begin != tensor.nbytes:
            raise ConversionError(
                f"{shard}: tensor {name!r} spans {end - begin} bytes but {dtype} {list(shape)} needs {tensor.nbytes}"
            )
        if data_start + end > size:
            raise ConversionError(
                f"{shard}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes "
                "(truncated download?)"
            )
        tensors.append(tensor)
    return tensors
