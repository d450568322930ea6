"""The converter's quantizers and mixes against llama.cpp's own.

- Bytes: convert/quants.py on float arrays (random, all-zero, constant, negative-only,
  outliers, tiny, exact ties) against ggml_quantize_chunk from llama.cpp's shared
  library, the function llama_model_quantize calls for every tensor (no imatrix).
- Types: for tiny checkpoints of every architecture, 64 wide (every K-quant falls back)
  and 256 wide (K-quants fit most matrices), our F32 file quantized by
  llama_model_quantize to each mix, against the types `--outtype <mix>` gives.
- Files: `--outtype <mix>` straight from the checkpoint equals llama.cpp's quantization
  of our F32 file tensor for tensor, byte for byte, and loads in llama.cpp with the
  same logits.
"""

from __future__ import annotations

import ctypes
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from convert.mixes import BASE_TYPE, MIXES
from convert.qtypes import SINGLE_TYPES
from convert.quants import quantize
from convert.to_gguf import convert, main, plan_types
from tests.test_llama_cpp import llama_cpp, llama_cpp_logits, plain_cpu_buffers  # noqa: F401 (fixture)
from tests.tiny_models import TINY_KINDS, build_tiny_model

QT = GGMLQuantizationType
BLOCK_TYPES = [t for t in SINGLE_TYPES.values() if t not in (QT.F32, QT.F16, QT.BF16)]


# ---------------------------------------------------------------- bytes


@pytest.fixture(scope="module")
def ggml_quantize():
    """ggml_quantize_chunk(type, float32 rows) -> uint8 rows, from llama-cpp-python's libggml-base."""
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base shared library")
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]

    def run(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        rows = np.ascontiguousarray(rows, np.float32)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows.shape[0], rows.shape[1] // block_size * type_size), np.uint8)
        written = lib.ggml_quantize_chunk(
            int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
        )
        assert written == out.size
        return out

    return run


def _cases() -> dict[str, np.ndarray]:
    """Float rows of 512 (two 256 super-blocks) that exercise ggml's branches."""
    rng = np.random.default_rng(13)
    normal = rng.standard_normal((24, 512)).astype(np.float32)
    outliers = normal * 0.01
    outliers[:, 7] = 100.0
    outliers[:, 300] = -50.0
    half_zero = normal.copy()
    half_zero[:, :48] = 0.0  # all-zero sub-blocks (and a zero 32-block) beside normal ones
    bf16 = ((normal * 0.02).view(np.uint32) & 0xFFFF0000).view(np.float32)  # what checkpoints hold
    return {
        "normal": normal,
        "heavy-tailed": (rng.standard_t(2, (24, 512)) * 0.02).astype(np.float32),
        "bf16-weights": bf16,
        "all-zero": np.zeros((2, 512), np.float32),
        "constant": np.full((2, 512), 0.37, np.float32),
        "negative-constant": np.full((2, 512), -0.37, np.float32),
        "negative-only": -np.abs(normal[:8]),
        "positive-only": np.abs(normal[:8]),
        "outliers": outliers,
        "half-zero": half_zero,
        "tiny": normal[:4] * 1e-20,
        "small-integers": rng.integers(-3, 4, (16, 512)).astype(np.float32),  # exact ties
        "sparse": (normal * (rng.random(normal.shape) < 0.05)).astype(np.float32),
        "signed-zeros": np.where(rng.random((8, 512)) < 0.5, np.float32(0.0), np.float32(-0.0)),
    }


CASES = _cases()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantizer_bytes_equal_llama_cpp(qtype, ggml_quantize):
    for name, rows in CASES.items():
        want = ggml_quantize(rows, qtype)
        got = quantize(rows, qtype)
        assert got.shape == want.shape, name
        differing = np.flatnonzero((got != want).any(axis=1))
        assert differing.size == 0, f"{qtype.name} {name}: rows {differing.tolist()} differ from llama.cpp"


def test_quantizing_stacked_experts_equals_one_at_a_time():
    """The converter quantizes an expert at a time; a 3-D tensor gives the same bytes."""
    stacked = np.stack([CASES["normal"][:8], CASES["outliers"][:8]])
    for qtype in (QT.Q4_K, QT.IQ4_XS):
        np.testing.assert_array_equal(
            quantize(stacked, qtype), np.stack([quantize(expert, qtype) for expert in stacked])
        )


# ---------------------------------------------------------------- types and files


@pytest.fixture(scope="session")
def hf_of_width(tiny_hf, tmp_path_factory):
    """hf_of_width(kind, width) -> tiny checkpoint; width 64 is the shared tiny_hf one."""
    built: dict[tuple[str, int], Path] = {}

    def get(kind: str, width: int) -> Path:
        if width == 64:
            return tiny_hf(kind)
        if (kind, width) not in built:
            out = tmp_path_factory.mktemp(f"hf-{kind}-{width}")
            built[kind, width] = build_tiny_model(kind, out, seed=1, hidden_size=width)
        return built[kind, width]

    return get


@pytest.fixture(scope="session")
def llama_quantized(hf_of_width, tmp_path_factory):
    """llama_quantized(kind, width, mix, pure) -> our F32 file quantized by llama_model_quantize."""
    f32: dict[tuple[str, int], Path] = {}
    built: dict[tuple, Path] = {}

    def get(kind: str, width: int, mix: str, pure: bool = False) -> Path:
        if (kind, width) not in f32:
            out = tmp_path_factory.mktemp("f32") / f"{kind}-{width}.gguf"
            f32[kind, width] = convert(hf_of_width(kind, width), out, "f32", progress=False)
        key = (kind, width, mix, pure)
        if key not in built:
            out = tmp_path_factory.mktemp("llama-quantized") / f"{kind}-{width}-{mix}-{pure}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = int(MIXES[mix])
            params.pure = pure
            params.nthread = 2
            assert (
                llama_cpp.llama_model_quantize(
                    str(f32[kind, width]).encode(), str(out).encode(), ctypes.byref(params)
                )
                == 0
            ), f"llama_model_quantize failed for {kind} {mix}"
            built[key] = out
        return built[key]

    return get


def gguf_types(path: Path) -> dict[str, GGMLQuantizationType]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def planned(hf_dir: Path, outtype: str, **options) -> tuple[dict, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallbacks; their warning is tested in test_convert.py
        return plan_types(hf_dir, outtype, **options)


# every architecture 256 wide (where the K-quants fit, and some rows of 32 or 128 fall back),
# two 64 wide (where every K-quant falls back)
TYPE_CASES = [(kind, 256) for kind in TINY_KINDS] + [("qwen3moe", 64), ("phimoe", 64)]


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("kind,width", TYPE_CASES)
def test_mix_types_equal_llama_quantize(kind, width, mix, hf_of_width, llama_quantized):
    want = gguf_types(llama_quantized(kind, width, mix))
    got, file_type = planned(hf_of_width(kind, width), mix)
    differing = {n: (got[n].name, want[n].name) for n in want if got.get(n) != want[n]}
    assert sorted(got) == sorted(want) and not differing, f"ours vs llama.cpp: {differing}"
    assert file_type == MIXES[mix]
    if width == 256:  # the mix's own type really is used, not only its fallbacks
        assert BASE_TYPE[MIXES[mix]] in want.values()


@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k"])
def test_pure_types_equal_llama_quantize_pure(mix, hf_of_width, llama_quantized):
    want = gguf_types(llama_quantized("qwen3moe", 256, mix, pure=True))
    got, _ = planned(hf_of_width("qwen3moe", 256), mix, pure=True)
    assert got == want


def test_expert_type_overrides_the_mix(hf_of_width):
    types, file_type = planned(hf_of_width("qwen3moe", 256), "q4_k_m", expert_type="q8_0")
    mix_types, _ = planned(hf_of_width("qwen3moe", 256), "q4_k_m")
    assert int(file_type) == 7  # MOSTLY_Q8_0: the experts' type, the bulk of the file
    for name, qtype in types.items():
        assert qtype == (QT.Q8_0 if name.endswith("_exps.weight") else mix_types[name]), name


# (kind, mix) converted in full: every mix on the 8-expert GQA model, q4_k_m on every architecture
FULL_CONVERSIONS = [("qwen3moe", mix) for mix in MIXES] + [
    (k, "q4_k_m") for k in TINY_KINDS if k != "qwen3moe"
]


@pytest.mark.usefixtures("plain_cpu_buffers")
@pytest.mark.parametrize("kind,mix", FULL_CONVERSIONS)
def test_mix_file_equals_llama_quantize_and_loads(kind, mix, hf_of_width, llama_quantized, tmp_path):
    theirs = llama_quantized(kind, 256, mix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = convert(hf_of_width(kind, 256), tmp_path / "m.gguf", mix, progress=False)
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data, b[name].data), f"{name} ({a[name].tensor_type.name}) bytes differ"
    counts = Counter(t.tensor_type for t in a.values())
    assert counts[BASE_TYPE[MIXES[mix]]] > 0, counts
    got = llama_cpp_logits(ours)
    np.testing.assert_array_equal(got, llama_cpp_logits(theirs))
    assert np.isfinite(got).all() and np.abs(got).max() > 0.5


def test_cli_writes_a_mix(hf_of_width, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(hf_of_width("mixtral", 256)), "-o", str(out), "--outtype", "q4_k_m"]) == 0
    fields = GGUFReader(out).fields
    assert fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = gguf_types(out)
    assert types["output.weight"] == QT.Q6_K and types["blk.0.ffn_gate_exps.weight"] == QT.Q4_K
