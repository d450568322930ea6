"""Converted files load in llama.cpp and give transformers' next-token logits.

This is the check that the GGUF is right for the program the format belongs to:
tensor names, layouts (stacked experts, Mixtral's permuted Q/K, DeepSeek's split
kv_b), and metadata (YaRN, LongRoPE, MLA sizes, routing) all have to agree with
llama.cpp's loader and graph for the logits to match.

Two llama.cpp behaviours are accounted for here, not in the files:
- its CPU "extra buffer types" (AMX / repacked Q8_0 and Q4_0) crash on these tiny
  shapes (64-wide rows) on CPUs with AMX; they are a speed feature, so they are
  turned off and the plain CPU kernels read the same tensors;
- it runs Phimoe with RMSNorm (plus bias) where Hugging Face uses LayerNorm, and with
  softmax top-k routing where Hugging Face uses "sparsemixer"; the Phimoe reference
  is computed with those two substitutions, so what is compared is the file.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from convert.to_gguf import convert
from tests.tiny_models import TINY_KINDS, build_tiny_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
)

PROMPT = [5, 17, 99, 123, 42, 7, 300, 250, 3, 64, 128, 200]


@pytest.fixture
def plain_cpu_buffers(monkeypatch):
    """llama.cpp model params with the AMX/repack buffer types off (see the module docstring)."""
    import llama_cpp.llama_cpp as low_level

    default_params = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(low_level, "llama_model_default_params", without_extra_buffers)


def _rms_norm_with_bias(layer_norm: torch.nn.LayerNorm):
    def forward(self, x):
        return (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer_norm.eps) * layer_norm.weight
            + layer_norm.bias
        )

    return forward


def _softmax_top_k(router):
    def forward(self, hidden):
        logits = torch.nn.functional.linear(hidden, router.weight)
        weights, experts = logits.softmax(-1).topk(router.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), experts

    return forward


def as_llama_cpp_runs_phimoe(model) -> None:
    """Swap, on this model instance only, Phimoe's LayerNorms and router for llama.cpp's versions."""
    norms = [model.model.norm] + [
        n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    for norm in norms:
        norm.forward = types.MethodType(_rms_norm_with_bias(norm), norm)
    for layer in model.model.layers:
        router = layer.mlp.router
        router.forward = types.MethodType(_softmax_top_k(router), router)


def reference_logits(kind: str, hf_dir) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if kind == "phimoe":
        as_llama_cpp_runs_phimoe(model)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


def llama_cpp_logits(path) -> np.ndarray:
    # An f32 KV cache: the default f16 cache alone moves logits by ~0.5%.
    model = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, seed=0, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model.eval(PROMPT)
    return np.array(model.scores[: len(PROMPT)], dtype=np.float32)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_llama_cpp_logits_match_transformers(kind, outtype, tiny_hf, tiny_gguf, plain_cpu_buffers):
    ref = reference_logits(kind, tiny_hf(kind))
    got = llama_cpp_logits(tiny_gguf(kind, outtype))
    assert got.shape == ref.shape
    assert np.abs(ref).max() > 0.5, "reference logits are ~0: the tiny model would test nothing"
    if outtype == "f32":
        err = np.abs(got - ref).max()
        assert err <= 2e-3 * np.abs(ref).max(), f"max |diff| {err:.3g} vs max |logit| {np.abs(ref).max():.3g}"
    else:
        cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cos.min() >= 0.99, f"worst position cosine {cos.min():.5f}"


def test_phimoe_without_biases_gets_the_zero_biases_llama_cpp_requires(tmp_path, plain_cpu_buffers):
    """llama.cpp's phimoe requires attn_output.bias and output.bias ("check_tensor_dims:
    tensor 'output.bias' not found"); a checkpoint without them converts with zeros there."""
    hf_dir = build_tiny_model("phimoe", tmp_path / "hf", attention_bias=False, lm_head_bias=False)
    path = convert(hf_dir, tmp_path / "m.gguf", "f32", progress=False)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert "blk.0.attn_q.bias" not in tensors  # optional in llama.cpp: not invented
    for name in ("blk.0.attn_output.bias", "blk.1.attn_output.bias", "output.bias"):
        assert not tensors[name].data.any(), name
    ref = reference_logits("phimoe", hf_dir)
    got = llama_cpp_logits(path)
    assert np.abs(ref).max() > 0.5
    err = np.abs(got - ref).max()
    assert err <= 2e-3 * np.abs(ref).max(), f"max |diff| {err:.3g} vs max |logit| {np.abs(ref).max():.3g}"
