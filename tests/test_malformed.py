"""Malformed GGUF files: each must raise GGUFFormatError, promptly, with a message naming the file.

The corpus starts from one small valid file written by gguf-py's GGUFWriter (`write_seed_file`)
and breaks it in targeted ways (one case per rule the reader enforces), by truncation at every
offset and by flipped header bytes. A few hundred random mutations from hypothesis follow; some
of those still make valid files, so for them the rule is: refused with GGUFFormatError, or read
into a consistent result (`open_and_check`), never another exception and never a hang. The
random mutations (`mutated_files`) and `open_and_check` are shared with bench/fuzz_gguf.py, which
runs them at scale.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import MAX_ARRAY_NESTING, GGUFFile

CASE_SECONDS = 10  # a generous bound: a valid parse of these files takes about a millisecond

# Metadata of the seed file after the writer's own general.architecture and general.alignment:
# (key, value, type, array element type). Two keys and two tensor names have equal lengths so a
# mutation can turn one into a duplicate of the other without moving any other byte.
SEED_KV = [
    ("test.aaaa", 7, GGUFValueType.UINT32, None),
    ("test.bbbb", 8, GGUFValueType.UINT32, None),
    ("test.i64", -5, GGUFValueType.INT64, None),
    ("test.f64", 0.25, GGUFValueType.FLOAT64, None),
    ("test.flag", True, GGUFValueType.BOOL, None),
    ("test.text", "héllo", GGUFValueType.STRING, None),
    ("test.words", ["a", "bc", "def"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    ("test.nums", [1.5, 2.5], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    ("test.bits", [True, False], GGUFValueType.ARRAY, GGUFValueType.BOOL),
    ("test.nest", [[1, 2], [3]], GGUFValueType.ARRAY, None),
]
SEED_ALIGNMENT = 64
_SCALAR_WIDTHS = {
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
    GGUFValueType.BOOL: 1,
}
# (name, numpy shape, type); Q8_0 and Q4_0 rows of 64 are two blocks each.
SEED_TENSORS = [
    ("tensor_a", (64,), GGMLQuantizationType.F32),
    ("tensor_b", (2, 3, 64), GGMLQuantizationType.Q8_0),
    ("tensor_c", (2, 3, 64), GGMLQuantizationType.Q4_0),
]


def write_seed_file(path: Path) -> bytes:
    """Write the small valid GGUF the corpus mutates; return its bytes."""
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_custom_alignment(SEED_ALIGNMENT)
    for key, value, vtype, sub_type in SEED_KV:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(0)
    for name, shape, qtype in SEED_TENSORS:
        w.add_tensor(
            name, gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype), raw_dtype=qtype
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


# ---- where the fields of the seed file are, found by their key and tensor name bytes ----


def key_at(data: bytes, key: str) -> int:
    """Byte offset of the key's length field."""
    return data.index(struct.pack("<Q", len(key)) + key.encode())


def value_at(data: bytes, key: str) -> int:
    """Byte offset of the key's value (just after its u32 value type)."""
    return key_at(data, key) + 8 + len(key.encode()) + 4


def tensor_fields(data: bytes, name: str) -> dict[str, int]:
    """Byte offsets of a tensor info's fields: name (length), n_dims, dim0.., type, offset."""
    at = key_at(data, name)
    n_dims_at = at + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
    fields = {"name": at, "n_dims": n_dims_at}
    fields.update({f"dim{d}": n_dims_at + 4 + 8 * d for d in range(n_dims)})
    fields["type"] = n_dims_at + 4 + 8 * n_dims
    fields["offset"] = fields["type"] + 4
    return fields


def data_start(data: bytes) -> int:
    last = tensor_fields(data, SEED_TENSORS[-1][0])["offset"] + 8
    return -(-last // SEED_ALIGNMENT) * SEED_ALIGNMENT


def integer_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of the seed whose value a mutation may replace."""
    fields = [(4, 4), (8, 8), (16, 8)]  # version, tensor count, key count
    keys = [("general.architecture", GGUFValueType.STRING), ("general.alignment", GGUFValueType.UINT32)]
    keys += [(key, vtype) for key, _, vtype, _ in SEED_KV]
    for key, vtype in keys:
        value = value_at(data, key)
        fields += [(key_at(data, key), 8), (value - 4, 4)]  # key length, value type
        if vtype == GGUFValueType.STRING:
            fields.append((value, 8))  # string length
        elif vtype == GGUFValueType.ARRAY:
            fields += [(value, 4), (value + 4, 8)]  # element type, count
        else:
            fields.append((value, _SCALAR_WIDTHS[vtype]))
    for name, _, _ in SEED_TENSORS:
        for field, at in tensor_fields(data, name).items():
            fields.append((at, 4 if field in ("n_dims", "type") else 8))
    return fields


# ---- helpers ----


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang if the block runs longer than `seconds` (a guard against loops, not a benchmark)."""

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def put(data: bytes, at: int, value: int, width: int) -> bytes:
    """`data` with the little-endian integer field at `at` replaced (value masked to `width`)."""
    value &= (1 << (8 * width)) - 1
    return data[:at] + value.to_bytes(width, "little") + data[at + width :]


def open_and_check(path: Path) -> bool:
    """Open `path`; True if accepted (after checking what was accepted), False if refused cleanly.

    Any other exception propagates. An accepted file must be self-consistent: every tensor
    aligned, inside the file, apart from the others, and readable to its last byte.
    """
    try:
        f = GGUFFile(path)
    except GGUFFormatError as e:
        assert str(path) in str(e), f"message does not name the file: {e}"
        return False
    size = path.stat().st_size
    alignment = f.get("general.alignment", 32)
    ends = []
    for t in f.tensors.values():
        assert t.offset % alignment == 0 and t.offset + t.nbytes <= size, t
        assert len(t.data.tobytes()) == t.nbytes  # touches every page of the view
        ends.append((t.offset, t.offset + t.nbytes))
    ends.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(ends)), ends
    assert isinstance(f.arch, str)
    return True


def expect_refused(path: Path, data: bytes, fragment: str | None = None) -> None:
    """Write `data` to `path`; opening it must raise GGUFFormatError naming the file (and `fragment`)."""
    path.write_bytes(data)
    with time_limit(CASE_SECONDS), pytest.raises(GGUFFormatError) as caught:
        GGUFFile(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    if fragment is not None:
        assert fragment in message, message


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    return write_seed_file(tmp_path_factory.mktemp("seed") / "seed.gguf")


def test_seed_file_is_valid(seed, tmp_path):
    path = tmp_path / "seed.gguf"
    path.write_bytes(seed)
    assert open_and_check(path)
    f = GGUFFile(path)
    assert [f.get(key) for key, *_ in SEED_KV] == [value for _, value, *_ in SEED_KV]
    assert [(t.shape, t.qtype) for t in f.tensors.values()] == [(s, q) for _, s, q in SEED_TENSORS]


# ---- one case per rule ----


def _tensor(name: str, field: str, value: int) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        at = tensor_fields(data, name)[field]
        return put(data, at, value, 4 if field in ("n_dims", "type") else 8)

    return mutate


def _offset_of(data: bytes, name: str) -> int:
    return struct.unpack_from("<Q", data, tensor_fields(data, name)["offset"])[0]


def _rename(old: str, new: str) -> Callable[[bytes], bytes]:
    return lambda data: data.replace(
        struct.pack("<Q", len(old)) + old.encode(), struct.pack("<Q", len(new)) + new.encode()
    )


def _value(key: str, value: int, width: int, skip: int = 0) -> Callable[[bytes], bytes]:
    return lambda data: put(data, value_at(data, key) + skip, value, width)


def _value_type(key: str, value: int) -> Callable[[bytes], bytes]:
    return lambda data: put(data, value_at(data, key) - 4, value, 4)


# name -> (mutation of the seed, a fragment the message must contain; None where the error is
# whatever the misread bytes break first)
CASES: dict[str, tuple[Callable[[bytes], bytes], str | None]] = {
    # header
    "empty": (lambda d: b"", "header: file is 0 bytes"),
    "magic-only": (lambda d: d[:4], "header: file is 4 bytes"),
    "bad-magic": (lambda d: b"GGML" + d[4:], "magic: starts with b'GGML'"),
    "version-1": (lambda d: put(d, 4, 1, 4), "GGUF version 1"),
    "version-4": (lambda d: put(d, 4, 4, 4), "GGUF version 4"),
    "big-endian": (lambda d: put(d, 4, 3 << 24, 4), "big-endian"),
    "key-count-huge": (lambda d: put(d, 16, 2**64 - 1, 8), "metadata key count"),
    "key-count-plus-one": (lambda d: put(d, 16, 2 + len(SEED_KV) + 1, 8), None),  # 2: arch, alignment
    "tensor-count-huge": (lambda d: put(d, 8, 2**63, 8), "tensor count"),
    "tensor-count-plus-one": (lambda d: put(d, 8, len(SEED_TENSORS) + 1, 8), None),
    # metadata
    "key-length-past-end": (lambda d: put(d, key_at(d, "test.aaaa"), len(d), 8), "runs past the end"),
    "key-length-huge": (lambda d: put(d, key_at(d, "test.aaaa"), 2**64 - 1, 8), "runs past the end"),
    "duplicate-key": (_rename("test.bbbb", "test.aaaa"), "'test.aaaa': appears twice"),
    "unknown-value-type": (_value_type("test.aaaa", 13), "'test.aaaa': unknown value type 13"),
    "value-type-max": (_value_type("test.aaaa", 2**32 - 1), "unknown value type 4294967295"),
    "string-length-past-end": (_value("test.text", 10**6, 8), "'test.text': string length 1000000"),
    "bool-not-0-or-1": (_value("test.flag", 2, 1), "'test.flag': bool byte is 2"),
    "array-length-huge": (
        _value("test.words", 2**62, 8, skip=4),
        "'test.words': array of 4611686018427387904",
    ),
    "array-element-past-end": (_value("test.words", 2**40, 8, skip=4 + 8 + 8 + 1), "'test.words'[1]"),
    "array-element-type-unknown": (_value("test.nums", 99, 4), "unknown value type 99"),
    "array-bool-not-0-or-1": (_value("test.bits", 3, 1, skip=4 + 8), "'test.bits'[0]: bool byte is 3"),
    "array-nested-element-type-unknown": (_value("test.nest", 42, 4, skip=4 + 8), "unknown value type 42"),
    "alignment-not-power-of-two": (_value("general.alignment", 48, 4), "is 48, expected a power of two"),
    "alignment-zero": (_value("general.alignment", 0, 4), "is 0, expected a power of two"),
    "alignment-wrong-type": (_value_type("general.alignment", GGUFValueType.INT32), "expected UINT32"),
    "architecture-missing": (
        _rename("general.architecture", "general.architecturf"),
        "'general.architecture'",
    ),
    # tensor infos
    "n-dims-zero": (_tensor("tensor_b", "n_dims", 0), "'tensor_b': has 0 dimensions"),
    "n-dims-five": (_tensor("tensor_b", "n_dims", 5), "'tensor_b': has 5 dimensions, expected 1..4"),
    "dim-zero": (_tensor("tensor_b", "dim1", 0), "'tensor_b': dimension 1 is 0"),
    "dim-negative": (
        _tensor("tensor_b", "dim2", 2**64 - 1),
        "'tensor_b': dimension 2 is 18446744073709551615",
    ),
    "dims-product-overflow": (
        lambda d: _tensor("tensor_b", "dim2", 2**40)(_tensor("tensor_b", "dim1", 2**40)(d)),
        "'tensor_b': data [",
    ),
    "row-not-whole-blocks": (
        _tensor("tensor_b", "dim0", 48),
        "row length 48 is not a multiple of Q8_0's block size 32",
    ),
    "removed-tensor-type": (_tensor("tensor_b", "type", 4), "'tensor_b': unknown ggml type 4"),
    "unknown-tensor-type": (_tensor("tensor_b", "type", 2**32 - 1), "unknown ggml type 4294967295"),
    "tensor-name-past-end": (lambda d: put(d, key_at(d, "tensor_c"), 2**50, 8), "tensor info #2 name"),
    "duplicate-tensor-name": (_rename("tensor_c", "tensor_b"), "'tensor_b': appears twice"),
    "offset-past-end": (
        lambda d: _tensor("tensor_c", "offset", len(d) // 64 * 64 + 64)(d),
        "'tensor_c': data [",
    ),
    "offset-huge": (_tensor("tensor_c", "offset", 2**64 - 64), "runs past the end of the data section"),
    "offset-misaligned": (
        lambda d: _tensor("tensor_c", "offset", _offset_of(d, "tensor_c") + 1)(d),
        "alignment 64",
    ),
    "offset-same-as-other": (
        lambda d: _tensor("tensor_c", "offset", _offset_of(d, "tensor_b"))(d),
        "'tensor_c': data at offset 256 overlaps tensor 'tensor_b' [256, 664)",
    ),
    "offset-inside-other": (
        lambda d: _tensor("tensor_c", "offset", _offset_of(d, "tensor_b") + 64)(d),
        "overlaps tensor 'tensor_b'",
    ),
    "data-truncated": (lambda d: d[: len(d) - 100], "'tensor_c': data ["),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_is_enforced(seed, tmp_path, case):
    mutate, fragment = CASES[case]
    mutated = mutate(seed)
    assert mutated != seed
    expect_refused(tmp_path / f"{case}.gguf", mutated, fragment)


def test_arrays_nested_past_the_limit_are_refused(tmp_path):
    value: list = [1]
    for _ in range(MAX_ARRAY_NESTING):
        value = [value]
    w = gguf.GGUFWriter(tmp_path / "deep.gguf", "qwen3moe")
    w.add_array("test.deep", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_refused(tmp_path / "deep.gguf", (tmp_path / "deep.gguf").read_bytes(), "nested deeper than")


def test_architecture_must_be_a_string(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "arch.gguf", "qwen3moe")
    w.add_key_value("general.architecture", 5, GGUFValueType.UINT32)  # replaces the writer's string
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "arch.gguf").read_bytes()
    expect_refused(tmp_path / "arch.gguf", data, "'general.architecture' is int 5, expected str")


def test_every_truncation_is_refused(seed, tmp_path):
    # Past the last tensor's last byte the writer only pads, so a cut there leaves a valid file.
    (tmp_path / "seed.gguf").write_bytes(seed)
    f = GGUFFile(tmp_path / "seed.gguf")
    data_end = max(t.offset + t.nbytes for t in f.tensors.values())
    cuts = list(range(data_start(seed))) + list(range(data_start(seed), data_end, 7))
    for cut in cuts:
        expect_refused(tmp_path / "cut.gguf", seed[:cut])


@pytest.mark.parametrize("flip", [0xFF, 0x80])
def test_flipped_header_bytes_are_refused(seed, tmp_path, flip):
    # (Low-bit flips can make valid files: version 3 -> 2, or 3 tensors -> 2 when the aligned
    # data section starts at the same byte without the third tensor's info. The random
    # mutations cover those.)
    for at in range(24):
        mutated = seed[:at] + bytes([seed[at] ^ flip]) + seed[at + 1 :]
        expect_refused(tmp_path / "flip.gguf", mutated)


# ---- strings that are not UTF-8: read, and kept byte for byte ----
#
# The specification says UTF-8, but llama.cpp keeps a string's bytes as they are and real files
# have tokens cut inside a character, so qmoe reads them too (gguf_file.STRING_ERRORS) and
# everything that prints, hashes or detokenizes them must cope.

NOT_UTF8 = "surrogateescape"  # str -> the file's bytes


def test_strings_that_are_not_utf8_keep_their_bytes(seed, tmp_path):
    data = seed
    for text in ("test.text", "héllo", "def", "tensor_c"):  # a key, a value, an array element, a tensor name
        data = data.replace(text.encode(), b"\xff" + text.encode()[1:], 1)
    path = tmp_path / "not-utf8.gguf"
    path.write_bytes(data)
    assert open_and_check(path)
    f = GGUFFile(path)
    keys = {key.encode("utf-8", NOT_UTF8): key for key in f.fields}
    assert f.get(keys[b"\xffest.text"]).encode("utf-8", NOT_UTF8) == b"\xff" + "héllo".encode()[1:]
    assert f.get("test.words")[2].encode("utf-8", NOT_UTF8) == b"\xffef"
    assert b"\xffensor_c" in {name.encode("utf-8", NOT_UTF8) for name in f.tensors}


def string_array_item(data: bytes, key: str, index: int) -> tuple[int, int]:
    """(offset, length) of the bytes of element `index` of the string array `key`."""
    at = value_at(data, key) + 4 + 8  # past the element type and the count
    for _ in range(index):
        at += 8 + struct.unpack_from("<Q", data, at)[0]
    return at + 8, struct.unpack_from("<Q", data, at)[0]


class UndecodableModel(NamedTuple):
    path: Path
    original: Path  # the same model before the strings were broken
    token_id: int
    token_bytes: bytes  # the token's bytes in the file
    name_bytes: bytes  # general.name's bytes in the file


@pytest.fixture(scope="module")
def undecodable_model(tiny_gguf, tmp_path_factory) -> UndecodableModel:
    """The tiny qwen3moe model (byte-level vocabulary) with two strings that are not UTF-8:
    general.name starts with byte 0xFF, and the last plain vocabulary token ends in 0xE2, the
    first byte of a three-byte character, as a token cut inside a character does."""
    original = tiny_gguf("qwen3moe", "q8_0")
    data = bytearray(original.read_bytes())
    name_at = value_at(data, "general.name") + 8
    data[name_at] = 0xFF
    name_length = struct.unpack_from("<Q", data, name_at - 8)[0]
    f = GGUFFile(original)
    types, tokens = f.get("tokenizer.ggml.token_type"), f.get("tokenizer.ggml.tokens")
    token_id = max(i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL and len(tokens[i]) > 1)
    at, length = string_array_item(data, "tokenizer.ggml.tokens", token_id)
    data[at + length - 1] = 0xE2
    path = tmp_path_factory.mktemp("not-utf8") / "undecodable.gguf"
    path.write_bytes(data)
    return UndecodableModel(
        path, original, token_id, bytes(data[at : at + length]), bytes(data[name_at : name_at + name_length])
    )


def test_a_model_with_undecodable_strings_loads_and_detokenizes_them(undecodable_model):
    import qmoe

    m = undecodable_model
    with qmoe.load(m.path) as model:
        assert model.file.get("general.name").encode("utf-8", NOT_UTF8) == m.name_bytes
        assert model.tokenizer.decode_token(m.token_id) == m.token_bytes
        assert model.tokenizer.decode([m.token_id]).endswith("\ufffd")  # an incomplete character
        assert len(list(model.stream([m.token_id], 2))) == 2  # and it runs with that token as its prompt


def test_info_prints_undecodable_strings(undecodable_model, capsys):
    from qmoe.cli import main

    assert main(["info", str(undecodable_model.path)]) == 0
    name_shown = "\\xff" + undecodable_model.name_bytes[1:].decode()
    assert f"name:          {name_shown}\n" in capsys.readouterr().out


def test_model_identity_hashes_undecodable_strings(undecodable_model):
    from qmoe.predictor.sidecar import model_identity

    path = undecodable_model.path
    assert model_identity(path) == model_identity(GGUFFile(path))
    assert model_identity(path) != model_identity(undecodable_model.original)


def test_sentencepiece_token_that_is_not_utf8_detokenizes_to_its_bytes(tmp_path):
    from qmoe.tokenizer import Tokenizer

    path = tmp_path / "spm-vocab.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", "▁a", b"\xe2\x96"]  # the last: "▁" cut after two of its three bytes
    w.add_key_value("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_token_scores([0.0] * len(tokens))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tokenizer = Tokenizer.from_gguf(GGUFFile(path))
    assert tokenizer.decode_token(4) == b"\xe2\x96"
    assert tokenizer.decode_token(3) == b" a"


# ---- random mutations ----

INTERESTING = [0, 1, 2, 3, 4, 5, 8, 13, 31, 32, 33, 63, 64, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip


def mutated_files(seed: bytes) -> st.SearchStrategy[bytes]:
    """Files made from `seed` by 1-4 edits: overwritten bytes, replaced or nudged integer fields,
    cuts, splices. Edits made after a cut or splice may land on other fields than they aim at,
    which is fine: every result is a file to refuse or read consistently."""
    header_end = data_start(seed)
    fields = integer_fields(seed)
    size = len(seed)
    position = st.one_of(st.integers(0, header_end - 1), st.integers(0, size - 1))
    number = st.one_of(st.sampled_from(INTERESTING + [size, size - header_end]), st.integers(0, 2**64 - 1))
    edit = st.one_of(
        st.tuples(st.just("byte"), position, st.integers(0, 255)),
        st.tuples(st.just("field"), st.sampled_from(fields), number),
        st.tuples(st.just("nudge"), st.sampled_from(fields), st.sampled_from([-2, -1, 1, 2])),
        st.tuples(st.just("cut"), st.integers(0, size)),
        st.tuples(st.just("splice"), position, st.integers(0, 16), st.binary(max_size=16)),
    )
    return st.lists(edit, min_size=1, max_size=4).map(lambda edits: apply_edits(seed, edits))


def apply_edits(data: bytes, edits: list[tuple]) -> bytes:
    for edit in edits:
        kind = edit[0]
        if kind == "byte":
            _, at, value = edit
            data = data[:at] + bytes([value]) + data[at + 1 :] if at < len(data) else data
        elif kind in ("field", "nudge"):
            _, (at, width), number = edit
            if at + width <= len(data):
                current = int.from_bytes(data[at : at + width], "little")
                data = put(data, at, number if kind == "field" else current + number, width)
        elif kind == "cut":
            data = data[: edit[1]]
        else:
            _, at, n_removed, inserted = edit
            data = data[:at] + inserted + data[at + n_removed :]
    return data


@pytest.fixture(scope="module")
def mutation_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutations")


def test_random_mutations_are_refused_or_read_consistently(seed, mutation_dir):
    path = mutation_dir / "mutated.gguf"

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(mutated_files(seed))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        with time_limit(CASE_SECONDS):
            open_and_check(path)

    check()
