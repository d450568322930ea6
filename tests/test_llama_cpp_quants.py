"""Files quantized by llama.cpp's own quantizer run in qmoe, with llama.cpp's logits.

A tiny qwen3moe checkpoint 256 wide (so that K-quants, with their 256-element
super-blocks, apply to every matrix instead of their fallbacks) is converted by qmoe's
converter at f32, then quantized by `llama_model_quantize` to llama.cpp's mixes.
Per file, logits over the same prompt from:
- qmoe on the quantized file;
- the float reference: the f32 file with every tensor replaced by gguf-py's
  dequantization of the quantized one, run by qmoe and by llama.cpp. Same weights,
  float activations: qmoe on the quantized file must match both to float error;
- llama.cpp on the quantized file. It quantizes the activations to 8 bits (Q8_0 /
  Q8_1 / Q8_K) for its integer dot products, and so does qmoe by default; with
  exact_products=True qmoe keeps them float32. Activation quantization, on this
  random model, moves llama.cpp's own logits away from its float run of the same
  weights by more than a cosine of 0.999 at some positions (0.96-0.9993 by mix: a
  router choice flips). What is asserted is that qmoe, both ways, is as close to
  llama.cpp's quantized run as llama.cpp's float run of the same weights is.
The float-reference comparisons use exact_products=True (float activations).
"""

from __future__ import annotations

import ctypes
import shutil
from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import qmoe
from qmoe.formats import KERNEL_TYPES
from qmoe.gguf_file import GGUFFile

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
)
from tests.test_llama_cpp import plain_cpu_buffers  # noqa: E402, F401  (a fixture)

QT = GGMLQuantizationType
PROMPT = [5, 17, 99, 123, 42, 7, 300, 250, 3, 64, 128, 200]
# llama.cpp's file types (llama_ftype) -> name; together they use every type of issue 13
MIXES = {
    "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30,
}  # fmt: skip
LISTED_TYPES = {QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory):
    from convert.to_gguf import convert
    from tests.tiny_models import build_tiny_model

    hf = build_tiny_model("qwen3moe", tmp_path_factory.mktemp("hf-wide"), seed=0, hidden_size=256)
    return convert(hf, tmp_path_factory.mktemp("gguf-wide") / "wide-f32.gguf", outtype="f32", progress=False)


@pytest.fixture(scope="module")
def quantized(wide_f32, tmp_path_factory):
    """quantized(mix) -> path of wide_f32 quantized by llama.cpp to that mix (once per module)."""
    out_dir = tmp_path_factory.mktemp("llama-quantized")
    built = {}

    def get(mix: str):
        if mix not in built:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = MIXES[mix]
            params.nthread = 2
            out = out_dir / f"wide-{mix}.gguf"
            rc = llama_cpp.llama_model_quantize(str(wide_f32).encode(), str(out).encode(), ctypes.byref(params))
            assert rc == 0, f"llama_model_quantize to {mix} failed ({rc})"
            built[mix] = out
        return built[mix]

    return get


def dequantized_copy(quantized_path, f32_path, out_path):
    """The f32 file with each tensor's values replaced by gguf-py's dequantization of the
    quantized file's tensor of the same name (llama.cpp keeps names, shapes and metadata)."""
    shutil.copyfile(f32_path, out_path)
    src, dst = GGUFFile(quantized_path), GGUFFile(out_path)
    out = np.memmap(out_path, dtype=np.uint8, mode="r+")
    for name, t in dst.tensors.items():
        assert t.qtype == QT.F32, f"{name}: the f32 conversion stored {t.qtype.name}"
        q = src.tensor(name, t.shape)
        values = gguf_dequantize(np.asarray(q.data).view(np.uint8) if q.qtype != QT.F32 else q.data, q.qtype)
        out[t.offset : t.offset + t.nbytes] = np.ascontiguousarray(values, np.float32).reshape(-1).view(np.uint8)
    out.flush()
    del out
    return out_path


def llama_cpp_logits(path) -> np.ndarray:
    model = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, seed=0, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model.eval(PROMPT)
    return np.array(model.scores[: len(PROMPT)], dtype=np.float32)


def qmoe_logits(path, exact_products: bool = False) -> np.ndarray:
    m = qmoe.load(path, exact_products=exact_products)
    try:
        return m.logits(PROMPT)
    finally:
        m.close()


def cosine_rows(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_the_mixes_use_every_listed_type(quantized):
    """The mixes below really store the types (not only fallbacks), and nothing qmoe lacks."""
    seen = Counter()
    for mix in MIXES:
        seen.update(t.qtype for t in GGUFFile(quantized(mix)).tensors.values())
    assert LISTED_TYPES <= set(seen), f"missing: {sorted(t.name for t in LISTED_TYPES - set(seen))}"
    assert set(seen) <= set(KERNEL_TYPES)


@pytest.mark.usefixtures("plain_cpu_buffers")
@pytest.mark.parametrize("mix", list(MIXES))
def test_llama_cpp_quantized_file_matches_llama_cpp_and_the_float_reference(
    mix, quantized, wide_f32, tmp_path
):
    path = quantized(mix)
    got = qmoe_logits(path, exact_products=True)
    assert np.abs(got).max() > 0.5, "logits are ~0: the tiny model would test nothing"
    reference = dequantized_copy(path, wide_f32, tmp_path / "dequantized.gguf")
    ref = qmoe_logits(reference, exact_products=True)
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), f"{mix}: max |diff| to the float reference {err:.3g}"
    llama_float = llama_cpp_logits(reference)
    cos = cosine_rows(got, llama_float)
    assert cos.min() >= 0.9999, f"{mix}: worst position cosine to llama.cpp's float run {cos.min():.6f}"
    llama_quantized = llama_cpp_logits(path)
    theirs = cosine_rows(llama_float, llama_quantized)
    for exact_products, logits in ((True, got), (False, qmoe_logits(path))):
        ours = cosine_rows(logits, llama_quantized)
        assert np.all(ours >= theirs - 1e-4), (
            f"{mix} (exact_products={exact_products}): cosines to llama.cpp {ours} vs its float run's {theirs}"
        )


def test_qmoe_info_lists_the_types(quantized, capsys):
    from qmoe.cli import main

    assert main(["info", str(quantized("Q4_K_M"))]) == 0
    out = capsys.readouterr().out
    assert "Q4_K" in out and "Q6_K" in out



@pytest.mark.parametrize("mix", ["Q6_K", "IQ4_NL", "Q5_1", "Q4_K_M"])
def test_the_expert_store_takes_every_type(mix, quantized):
    """RAM pool (O_DIRECT reads), CPU fast tier and the dense fast tier (the CUDA tier's torch
    dequantization, here in CPU memory) on llama.cpp's files: the quantized tiers give the
    plain runtime's logits bit for bit, the dense tier to float error.

    Q4_K_M gives some layers' ffn_down_exps more bits (Q6_K in layer 1 here, Q4_K in layer 0):
    the tiers' slots are sized for the widest layer, each slab read and computed in its own."""
    from qmoe.experts.options import OffloadOptions

    path = quantized(mix)
    plain = qmoe_logits(path)
    if mix == "Q4_K_M":
        with qmoe.load(path, offload=OffloadOptions(ram_budget="100%", direct_io=True)) as m:
            assert not m.store.slabs.uniform  # the case this parametrization is for
    for config in (
        dict(ram_budget="25%", direct_io=True),
        dict(ram_budget="100%", direct_io=True),  # every layer's slabs ready: moe_ffn over the slots if it can
        dict(sim_fast_budget="30%", ram_budget="25%", on_miss="cpu", prefetch="cross-layer"),
    ):
        with qmoe.load(path, offload=OffloadOptions(**config)) as m:
            assert np.array_equal(m.logits(PROMPT), plain), config
    dense_options = OffloadOptions(sim_fast_budget="50%", on_miss="wait", cpu_fast_tier_dense=True)
    with qmoe.load(path, offload=dense_options, exact_products=True) as m:  # float experts: float everywhere
        dense = m.logits(PROMPT)
    exact = qmoe_logits(path, exact_products=True)
    assert np.abs(dense - exact).max() <= 1e-4 * np.abs(exact).max()
