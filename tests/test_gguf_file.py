"""GGUFFile reads what gguf-py's GGUFWriter writes: every value type, every tensor type, in place.

Malformed files are covered by test_malformed.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import MAX_ARRAY_NESTING, GGUFFile


def write_gguf(path: Path, kv=(), tensors=(), arch: str = "qwen3moe", alignment: int | None = None) -> Path:
    """Write a GGUF with GGUFWriter. kv: (key, value, vtype, sub_type); tensors: (name, array, raw_dtype)."""
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in kv:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SCALARS = [
    (GGUFValueType.UINT8, 255, int),
    (GGUFValueType.INT8, -128, int),
    (GGUFValueType.UINT16, 65535, int),
    (GGUFValueType.INT16, -32768, int),
    (GGUFValueType.UINT32, 2**32 - 1, int),
    (GGUFValueType.INT32, -(2**31), int),
    (GGUFValueType.UINT64, 2**64 - 1, int),
    (GGUFValueType.INT64, -(2**63), int),
    (GGUFValueType.FLOAT32, -1.25, float),
    (GGUFValueType.FLOAT64, 1e-300, float),
    (GGUFValueType.BOOL, True, bool),
    (GGUFValueType.STRING, "héllo, 世界 ✓", str),
]


@pytest.mark.parametrize("vtype,value,pytype", SCALARS, ids=[s[0].name for s in SCALARS])
def test_scalar_value_round_trips(tmp_path, vtype, value, pytype):
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", [("test.value", value, vtype, None)]))
    got = f.get("test.value")
    assert got == value and type(got) is pytype


@pytest.mark.parametrize("vtype,value,pytype", SCALARS, ids=[s[0].name for s in SCALARS])
def test_array_of_each_type_round_trips(tmp_path, vtype, value, pytype):
    values = [value, value, value] if vtype != GGUFValueType.BOOL else [True, False, True]
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", [("test.array", values, GGUFValueType.ARRAY, vtype)]))
    got = f.get("test.array")
    assert got == values and type(got) is list and all(type(v) is pytype for v in got)


def test_nested_arrays_round_trip_up_to_the_nesting_limit(tmp_path):
    deepest = [1, 2]
    for _ in range(MAX_ARRAY_NESTING - 1):
        deepest = [deepest, deepest]
    ragged = [["a", "bc"], ["d"]]
    kv = [
        ("test.deep", deepest, GGUFValueType.ARRAY, None),
        ("test.ragged", ragged, GGUFValueType.ARRAY, None),
    ]
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", kv))
    assert f.get("test.deep") == deepest
    assert f.get("test.ragged") == ragged


def test_vocabulary_metadata_are_python_lists(tmp_path):
    n = 20_000
    tokens = [f"tok{i}" if i % 3 else f"Ġ{i}é" for i in range(n)]
    tokens[7] = ""
    w = gguf.GGUFWriter(tmp_path / "vocab.gguf", "qwen3moe")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([float(i) / 4 for i in range(n)])
    w.add_token_types([i % 6 for i in range(n)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "vocab.gguf")
    assert f.get("tokenizer.ggml.tokens") == tokens
    assert f.get("tokenizer.ggml.scores") == [float(i) / 4 for i in range(n)]
    assert f.get("tokenizer.ggml.token_type") == [i % 6 for i in range(n)]
    assert f.get("tokenizer.ggml.model") == "gpt2"
    assert f.tensors == {}


RAW_TYPES = sorted(GGML_QUANT_SIZES, key=lambda t: t.value)


@pytest.mark.parametrize("qtype", RAW_TYPES, ids=[t.name for t in RAW_TYPES])
def test_every_tensor_type_round_trips_as_raw_bytes(tmp_path, qtype):
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(qtype.value).integers(0, 256, (3, 2, 2 * block_bytes), dtype=np.uint8)
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", tensors=[("w", raw, qtype)]))
    t = f.tensor("w", shape=(3, 2, 2 * block))
    assert t.qtype == qtype
    assert t.row_bytes == 2 * block_bytes and t.nbytes == raw.nbytes
    assert t.offset % 32 == 0
    assert t.data.tobytes() == raw.tobytes()
    with open(f.path, "rb") as fh:
        fh.seek(t.offset)
        assert fh.read(raw.nbytes) == raw.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "int16", "int32", "int64"])
def test_numeric_tensors_are_viewed_with_their_dtype(tmp_path, dtype):
    values = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    t = GGUFFile(write_gguf(tmp_path / "m.gguf", tensors=[("w", values, None)])).tensor("w")
    assert t.shape == (2, 3, 4) and t.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(t.data, values)


def test_bf16_is_viewed_as_uint16_top_halves(tmp_path):
    values = np.array([[1.0, -2.5, 3.0 * 2.0**20, 0.0]], dtype=np.float32)  # exact in bf16
    packed = gguf.quants.quantize(values, GGMLQuantizationType.BF16)
    t = GGUFFile(write_gguf(tmp_path / "m.gguf", tensors=[("w", packed, GGMLQuantizationType.BF16)])).tensor(
        "w"
    )
    assert t.data.dtype == np.uint16 and t.shape == (1, 4)
    np.testing.assert_array_equal((t.data.astype(np.uint32) << 16).view(np.float32), values)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_block_views_dequantize_like_gguf_py(tmp_path, qtype):
    # [n_expert, rows, n] in numpy order, as the expert tensors are stored
    values = np.random.default_rng(0).standard_normal((4, 3, 64)).astype(np.float32)
    packed = gguf.quants.quantize(values, qtype)
    t = GGUFFile(write_gguf(tmp_path / "m.gguf", tensors=[("exps", packed, qtype)])).tensor("exps")
    assert t.shape == (4, 3, 64) and t.data.shape == (4, 3, t.row_bytes) and t.data.dtype == np.uint8
    np.testing.assert_array_equal(
        gguf.quants.dequantize(t.data, qtype), gguf.quants.dequantize(packed, qtype)
    )
    np.testing.assert_allclose(gguf.quants.dequantize(t.data, qtype), values, atol=0.5)


def test_views_are_read_only_windows_onto_the_file(tmp_path):
    values = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "m.gguf", tensors=[("a", values, None), ("b", values + 1, None)])
    f = GGUFFile(path)
    a, b = f.tensor("a"), f.tensor("b")
    assert isinstance(a.data, np.memmap) and not a.data.flags.writeable
    with pytest.raises(ValueError):
        a.data[0, 0] = 1.0
    # A write through another descriptor shows through the view: it is the file's pages, not a copy.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.float32(-9.0).tobytes(), b.offset + 4)
    finally:
        os.close(fd)
    assert b.data[0, 1] == -9.0


def test_alignment_and_version_2(tmp_path):
    values = np.ones((3, 5), dtype=np.float32)  # 60 bytes: the next tensor needs padding
    path = write_gguf(tmp_path / "m.gguf", tensors=[("a", values, None), ("b", values, None)], alignment=64)
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    f = GGUFFile(path)
    assert f.get("general.alignment") == 64
    assert [f.tensor(n).offset % 64 for n in "ab"] == [0, 0]
    np.testing.assert_array_equal(f.tensor("b").data, values)


def test_agrees_with_gguf_py_reader(tmp_path):
    kv = [(f"test.k{i}", value, vtype, None) for i, (vtype, value, _) in enumerate(SCALARS)]
    kv.append(("test.list", [0.5, 1.5], GGUFValueType.ARRAY, None))
    raw = np.zeros((2, 4, 18), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "m.gguf",
        kv,
        tensors=[("x", np.ones((7, 3), np.float16), None), ("q", raw, GGMLQuantizationType.Q4_0)],
    )
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.fields == {k: v.contents() for k, v in theirs.fields.items() if not k.startswith("GGUF.")}
    assert {
        t.name: (t.tensor_type, int(t.data_offset), tuple(reversed(t.shape.tolist()))) for t in theirs.tensors
    } == {t.name: (t.qtype, t.offset, t.shape) for t in ours.tensors.values()}


def test_typed_and_required_metadata(tmp_path):
    kv = [
        ("qwen3moe.block_count", 4, GGUFValueType.UINT32, None),
        ("qwen3moe.rope.freq_base", 10000, GGUFValueType.UINT32, None),
        ("qwen3moe.expert_weights_norm", True, GGUFValueType.BOOL, None),
    ]
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", kv))
    assert f.arch == "qwen3moe"
    assert f.arch_get("block_count", kind=int) == 4
    assert f.arch_get("rope.freq_base", kind=float) == 10000.0
    assert f.arch_get("missing", 7, kind=int) == 7
    with pytest.raises(
        GGUFFormatError, match=r"m\.gguf.*'qwen3moe\.expert_weights_norm' is bool True, expected int"
    ):
        f.arch_get("expert_weights_norm", kind=int)
    with pytest.raises(GGUFFormatError, match=r"'general\.architecture' is str 'qwen3moe', expected float"):
        f.get("general.architecture", kind=float)
    f.require(["general.architecture", "qwen3moe.block_count"])
    with pytest.raises(GGUFFormatError, match=r"m\.gguf: required metadata keys are missing: a\.b, c"):
        f.require(["a.b", "qwen3moe.block_count", "c"])


def test_lookup_errors_name_the_file_and_what_was_expected(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", tensors=[("w", np.zeros((2, 32), np.float32), None)])
    f = GGUFFile(path)
    with pytest.raises(GGUFFormatError, match=r"model\.gguf: required metadata key 'qwen3moe\.block_count'"):
        f.arch_get("block_count")
    with pytest.raises(GGUFFormatError, match=r"model\.gguf: required tensor 'v' is missing"):
        f.tensor("v")
    with pytest.raises(
        GGUFFormatError, match=r"model\.gguf: tensor 'w' has shape \[2, 32\], expected \[32, 2\]"
    ):
        f.tensor("w", shape=(32, 2))
    with pytest.raises(GGUFFormatError, match=r"nothere\.gguf: no such file"):
        GGUFFile(tmp_path / "nothere.gguf")
    assert f.has("w") and not f.has("v")
