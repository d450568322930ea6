"""Reading GGUF files: validated metadata and memory-mapped tensor views.

A GGUF file (versions 2 and 3, little-endian) is laid out as

    header        magic "GGUF", u32 version, u64 n_tensors, u64 n_kv
    metadata      n_kv x (string key, u32 value type, value)
    tensor infos  n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding       up to `general.alignment` (default 32)
    data          tensor bytes; each offset is relative to the start of this section

where a string is a u64 byte length followed by UTF-8 bytes and an array value is a u32 element
type, a u64 count and the elements (arrays may nest). `ne` is in ggml order: the numpy shape
reversed.

The specification says UTF-8, but llama.cpp keeps a string's bytes as they are, and real files
have strings that are not valid UTF-8 (a vocabulary token that is part of a multi-byte character).
So strings are decoded with `errors="surrogateescape"`: each byte that is not part of valid UTF-8
becomes a lone surrogate U+DC80..U+DCFF, and `s.encode("utf-8", "surrogateescape")` gives the
file's bytes back exactly. Code that prints or encodes metadata must allow for such characters:
`print` to a UTF-8 terminal and `str.encode("utf-8")` refuse them (`json.dumps` escapes them).

qmoe opens files downloaded from anywhere, so this parser validates every field before it trusts
it: each length and count is checked against the bytes that remain before anything is sized by it,
so a corrupt file costs at most one pass over its own bytes and never a huge allocation or a hang.
Every problem raises `GGUFFormatError` naming the file, the key or tensor, and what was expected.

Nothing is copied at load: tensor data are read-only views of one memory map of the file, so a
30 GB model opens in milliseconds and its experts are paged in only when a token touches them.
The file must not be truncated while it is open (the operating system would fault on the lost
pages).

Raw view layouts (numpy order, leading dims = experts and rows), per qmoe/formats.py's table:
    F32  -> float32 [..., n]
    F16  -> float16 [..., n]
    BF16 -> uint16  [..., n]          (the top half of a float32)
    F64, I8, I16, I32, I64 -> float64, int8, int16, int32, int64 [..., n]
    Q8_0, Q4_K, ... every block type -> uint8 [..., row_bytes]
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from qmoe import formats
from qmoe.errors import GGUFFormatError

_MISSING = object()

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions
MAX_ARRAY_NESTING = 4  # arrays of arrays; llama.cpp accepts none, gguf-py writes any depth
_INT64_MAX = 2**63 - 1

_HEADER_BYTES = 4 + 4 + 8 + 8
# The fewest bytes one entry can take; a count that cannot fit the rest of the file is refused
# before the loop that reads it starts.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# How strings are decoded; see the module docstring.
STRING_ERRORS = "surrogateescape"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Fixed-size metadata value types -> their little-endian numpy dtype.
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("<u1"),
}
# Smallest encoding of one array element of each type (a string: its length; an array: its
# element type and count).
_MIN_ELEMENT_BYTES: dict[GGUFValueType, int] = {
    **{vtype: dtype.itemsize for vtype, dtype in _SCALAR_DTYPES.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 4 + 8,
}

@dataclass(frozen=True, eq=False)
class Tensor:
    """One tensor of a GGUF file, viewed in place."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in numpy order, e.g. (n_expert, n_ff, n_embd)
    data: np.ndarray  # raw view, see the module docstring
    offset: int  # absolute offset of the first byte in the file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last dimension) in the file."""
        return formats.row_bytes(self.qtype, self.shape[-1])


@dataclass(frozen=True)
class _TensorInfo:
    """A tensor's entry in the header, checked on its own but not yet placed in the data."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order
    offset: int  # relative to the start of the data section
    nbytes: int


class _Cursor:
    """Reads little-endian fields from the start of the file, checking each against its end."""

    def __init__(self, path: Path, buf: memoryview):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def fail(self, what: str, problem: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what}: {problem}")

    def remaining(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        """Advance over `n` bytes that must exist; return where they start."""
        if n > self.size - self.pos:
            raise self.fail(
                what,
                f"needs {n} bytes at byte {self.pos}, but the file ends at byte {self.size}",
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.skip(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"{what} (length)")
        if n > self.remaining():
            raise self.fail(
                what,
                f"string length {n} at byte {self.pos - 8} runs past the end of the file "
                f"({self.remaining()} bytes left)",
            )
        start = self.skip(n, what)
        return str(self.buf[start : start + n], "utf-8", STRING_ERRORS)


def _value_type(cur: _Cursor, what: str) -> GGUFValueType:
    code = cur.u32(f"{what} (type)")
    try:
        return GGUFValueType(code)
    except ValueError:
        raise cur.fail(what, f"unknown value type {code}, expected 0..{int(max(GGUFValueType))}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, what: str) -> Any:
    """One metadata value of type `vtype` as a python str/int/float/bool/list."""
    if vtype == GGUFValueType.STRING:
        return cur.string(what)
    if vtype == GGUFValueType.ARRAY:
        return _read_array(cur, what, depth=1)
    dtype = _SCALAR_DTYPES[vtype]
    value = np.frombuffer(cur.buf, dtype, 1, cur.skip(dtype.itemsize, what))[0].item()
    if vtype == GGUFValueType.BOOL:
        if value > 1:
            raise cur.fail(what, f"bool byte is {value}, expected 0 or 1")
        return bool(value)
    return value


def _read_array(cur: _Cursor, what: str, depth: int) -> list:
    if depth > MAX_ARRAY_NESTING:
        raise cur.fail(what, f"arrays nested deeper than {MAX_ARRAY_NESTING} levels")
    etype = _value_type(cur, f"{what} (array element)")
    count = cur.u64(f"{what} (array length)")
    if count > cur.remaining() // _MIN_ELEMENT_BYTES[etype]:
        raise cur.fail(
            what,
            f"array of {count} {etype.name} at byte {cur.pos - 12} cannot fit in the "
            f"{cur.remaining()} bytes left in the file",
        )
    if etype == GGUFValueType.STRING:
        return _read_string_array(cur, count, what)
    if etype == GGUFValueType.ARRAY:
        return [_read_array(cur, f"{what}[{i}]", depth + 1) for i in range(count)]
    # Numbers in one piece: a 150k-entry vocabulary's scores become a list in milliseconds.
    dtype = _SCALAR_DTYPES[etype]
    values = np.frombuffer(cur.buf, dtype, count, cur.skip(count * dtype.itemsize, what))
    if etype == GGUFValueType.BOOL:
        if count and values.max() > 1:
            bad = int(np.argmax(values > 1))
            raise cur.fail(f"{what}[{bad}]", f"bool byte is {values[bad]}, expected 0 or 1")
        return values.astype(bool).tolist()
    return values.tolist()


def _read_string_array(cur: _Cursor, count: int, what: str) -> list[str]:
    """`count` strings; the hot loop of a vocabulary, so the length checks are inlined."""
    buf, size, pos = cur.buf, cur.size, cur.pos
    unpack_length = _U64.unpack_from
    out: list[str] = []
    for i in range(count):
        if pos + 8 > size:
            cur.pos = pos
            raise cur.fail(f"{what}[{i}]", f"string length field at byte {pos} is past the end of the file")
        (n,) = unpack_length(buf, pos)
        pos += 8
        if n > size - pos:
            raise cur.fail(
                f"{what}[{i}]",
                f"string length {n} at byte {pos - 8} runs past the end of the file "
                f"({size - pos} bytes left)",
            )
        out.append(str(buf[pos : pos + n], "utf-8", STRING_ERRORS))
        pos += n
    cur.pos = pos
    return out


def _read_header(cur: _Cursor) -> tuple[int, int]:
    """Check magic and version; return (n_tensors, n_kv), each checked against the file size."""
    start = cur.skip(4, "magic")
    magic = bytes(cur.buf[start : start + 4])
    if magic != GGUF_MAGIC:
        raise cur.fail("magic", f"starts with {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise cur.fail("version", "big-endian GGUF files are not supported")
        raise cur.fail("version", f"GGUF version {version}, expected one of {list(SUPPORTED_VERSIONS)}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata key count")
    if n_kv > cur.remaining() // _MIN_KV_BYTES:
        raise cur.fail(
            "metadata key count",
            f"{n_kv} keys cannot fit in the {cur.remaining()} bytes after the header",
        )
    if n_tensors > (cur.remaining() - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(
            "tensor count",
            f"{n_tensors} tensor infos cannot fit in the {cur.remaining()} bytes after the header "
            f"next to {n_kv} metadata keys",
        )
    return n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    """All key-value pairs: (key -> python value, key -> stored value type)."""
    fields: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        what = f"metadata key {key!r}"
        if key in fields:
            raise cur.fail(what, "appears twice, expected unique keys")
        types[key] = _value_type(cur, what)
        fields[key] = _read_value(cur, types[key], what)
    return fields, types


def _alignment(cur: _Cursor, fields: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
    """The data alignment; llama.cpp requires a u32 power of two, and so does qmoe."""
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    what = "metadata key 'general.alignment'"
    if types["general.alignment"] != GGUFValueType.UINT32:
        raise cur.fail(what, f"has type {types['general.alignment'].name}, expected UINT32")
    alignment = fields["general.alignment"]
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(what, f"is {alignment}, expected a power of two")
    return alignment


def _read_tensor_info(cur: _Cursor, index: int) -> _TensorInfo:
    name = cur.string(f"tensor info #{index} name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"{what} (n_dims)")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(what, f"has {n_dims} dimensions, expected 1..{MAX_DIMS}")
    ne = [cur.u64(f"{what} (dimension {d})") for d in range(n_dims)]  # ggml order
    for d, n in enumerate(ne):
        if not 1 <= n <= _INT64_MAX:
            raise cur.fail(what, f"dimension {d} is {n}, expected 1..{_INT64_MAX}")
    code = cur.u32(f"{what} (type)")
    try:
        qtype = GGMLQuantizationType(code)
        fmt = formats.format_of(qtype)
    except (ValueError, KeyError):
        raise cur.fail(what, f"unknown ggml type {code}") from None
    if ne[0] % fmt.block:
        raise cur.fail(what, f"row length {ne[0]} is not a multiple of {qtype.name}'s block size {fmt.block}")
    n_rows = 1
    for n in ne[1:]:
        n_rows *= n  # python ints: no overflow; the data-range check bounds the product
    nbytes = n_rows * formats.row_bytes(qtype, ne[0])
    offset = cur.u64(f"{what} (offset)")
    return _TensorInfo(name, qtype, tuple(reversed(ne)), offset, nbytes)


def _check_placement(cur: _Cursor, infos: list[_TensorInfo], data_start: int, alignment: int) -> None:
    """Every tensor aligned, inside the data section, and apart from every other."""
    data_bytes = cur.size - data_start
    for t in infos:
        what = f"tensor {t.name!r}"
        if t.offset % alignment:
            raise cur.fail(what, f"data offset {t.offset} is not a multiple of the alignment {alignment}")
        if t.offset > data_bytes or t.nbytes > data_bytes - t.offset:
            raise cur.fail(
                what,
                f"data [{t.offset}, {t.offset + t.nbytes}) of shape {list(t.shape)} {t.qtype.name} "
                f"runs past the end of the data section ({data_bytes} bytes from byte {data_start})",
            )
    by_start = sorted(infos, key=lambda t: t.offset)
    for before, after in itertools.pairwise(by_start):
        if before.offset + before.nbytes > after.offset:
            raise cur.fail(
                f"tensor {after.name!r}",
                f"data at offset {after.offset} overlaps tensor {before.name!r} "
                f"[{before.offset}, {before.offset + before.nbytes})",
            )


def _raw_view(mapped: np.memmap, info: _TensorInfo, start: int) -> np.ndarray:
    """The tensor's bytes in place, shaped as the module docstring describes."""
    raw = mapped[start : start + info.nbytes]
    fmt = formats.format_of(info.qtype)
    if fmt.block == 1:
        return raw.view(fmt.raw_dtype).reshape(info.shape)
    return raw.reshape(*info.shape[:-1], formats.row_bytes(info.qtype, info.shape[-1]))


class GGUFFile:
    """An open, validated GGUF file: `arch`, `get(key)`, `tensor(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise GGUFFormatError(f"{self.path}: is a directory, not a GGUF file")
        if not self.path.is_file():
            raise GGUFFormatError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < _HEADER_BYTES:
            raise GGUFFormatError(
                f"{self.path}: header: file is {size} bytes, a GGUF header alone takes {_HEADER_BYTES}"
            )
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFFormatError(f"{self.path}: cannot be memory-mapped ({e})") from e
        with memoryview(self._map) as buf:
            self.fields, self.tensors = self._parse(_Cursor(self.path, buf))
        self.arch: str = self.get("general.architecture", kind=str)

    def _parse(self, cur: _Cursor) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Header, metadata and tensor infos, all checked; tensors as views of the map."""
        n_tensors, n_kv = _read_header(cur)
        fields, types = _read_metadata(cur, n_kv)
        alignment = _alignment(cur, fields, types)
        infos: dict[str, _TensorInfo] = {}
        for i in range(n_tensors):
            info = _read_tensor_info(cur, i)
            if info.name in infos:
                raise cur.fail(f"tensor {info.name!r}", "appears twice, expected unique tensor names")
            infos[info.name] = info
        data_start = -(-cur.pos // alignment) * alignment
        if infos and data_start > cur.size:
            raise cur.fail(
                "data section",
                f"starts at byte {data_start} (aligned to {alignment}), past the end of the file "
                f"({cur.size} bytes)",
            )
        _check_placement(cur, list(infos.values()), data_start, alignment)
        tensors = {}
        for name, info in infos.items():
            start = data_start + info.offset
            tensors[name] = Tensor(name, info.qtype, info.shape, _raw_view(self._map, info, start), start)
        return fields, tensors

    def get(self, key: str, default: Any = _MISSING, *, kind: type | None = None) -> Any:
        """Metadata value for `key`; raises if absent and no default is given.

        With `kind` (int, float, str, bool or list) the stored value must be of that kind, so a
        malformed file fails here with the key's name instead of later inside a model; `float`
        also accepts an integer and returns it as a float.
        """
        if key not in self.fields:
            if default is _MISSING:
                raise GGUFFormatError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        value = self.fields[key]
        if kind is None:
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise GGUFFormatError(
                f"{self.path}: metadata key {key!r} is {type(value).__name__} {shown}, "
                f"expected {kind.__name__}"
            )
        return value

    def arch_get(self, suffix: str, default: Any = _MISSING, *, kind: type | None = None) -> Any:
        """Metadata value for `{arch}.{suffix}`, e.g. arch_get('block_count', kind=int)."""
        return self.get(f"{self.arch}.{suffix}", default, kind=kind)

    def require(self, keys: Iterable[str]) -> None:
        """Raise one error listing every key of `keys` the file lacks."""
        missing = [key for key in keys if key not in self.fields]
        if missing:
            raise GGUFFormatError(f"{self.path}: required metadata keys are missing: {', '.join(missing)}")

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """The tensor `name`; if `shape` is given, check it (numpy order)."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFFormatError(f"{self.path}: required tensor {name!r} is missing")
        if shape is not None and tuple(shape) != t.shape:
            raise GGUFFormatError(
                f"{self.path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} "
                "from the model's hyperparameters"
            )
        return t


@dataclass(frozen=True)
class HeaderLayout:
    """A GGUF header as raw byte pieces, to copy the pieces verbatim into another file."""

    version: int
    keys: list[tuple[str, bytes]]  # (key, its whole key-value entry), in file order
    tensor_infos: list[tuple[str, bytes]]  # (name, its whole tensor info; the last 8 bytes are the offset)
    alignment: int
    data_start: int  # absolute offset of the data section


def read_header_layout(path: str | os.PathLike) -> HeaderLayout:
    """Walk a GGUF header (already validated by GGUFFile) and cut it into its entries, for
    writers that copy a file's metadata and tensor table verbatim (embedding predictors)."""
    path = Path(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with memoryview(mapped) as buf:
        cur = _Cursor(path, buf)
        n_tensors, n_kv = _read_header(cur)
        (version,) = struct.unpack_from("<I", buf, len(GGUF_MAGIC))
        keys, alignment = [], DEFAULT_ALIGNMENT
        for i in range(n_kv):
            start = cur.pos
            key = cur.string(f"metadata key #{i}")
            value = _read_value(cur, _value_type(cur, key), key)
            if key == "general.alignment":
                alignment = value
            keys.append((key, bytes(buf[start:cur.pos])))
        infos = []
        for i in range(n_tensors):
            start = cur.pos
            info = _read_tensor_info(cur, i)
            infos.append((info.name, bytes(buf[start:cur.pos])))
        return HeaderLayout(version, keys, infos, alignment, -(-cur.pos // alignment) * alignment)
