"""Phi-3.5-MoE / Phi-mini-MoE (PhimoeForCausalLM) -> GGUF architecture "phimoe".

Hugging Face's Phimoe uses LayerNorm with a bias (eps from rms_norm_eps), biases
on q/k/v/o and on the output head, a "sparsemixer" top-2 router, and LongRoPE:
per-frequency factors for short and long contexts, stored here as the tensors
rope_factors_short / rope_factors_long, plus one cos/sin scale (short_mscale,
which Phi-3.5 sets equal to long_mscale) as rope.scaling.attn_factor. NEOX RoPE,
so Q/K rows are written unpermuted. llama.cpp requires attn_output.bias and
output.bias, so a checkpoint without attention or lm_head biases gets zeros there.
"""

from __future__ import annotations

import math

from gguf import MODEL_ARCH, GGUFWriter
from gguf import MODEL_TENSOR as T

from convert.archs.common import (
    add_common_metadata,
    experts,
    head_dim,
    n_expert,
    output_head,
    token_embedding,
)
from convert.checkpoint import HFConfig
from convert.plan import OutputTensor, constant, copied
from qmoe.errors import ConversionError

HF_CLASS = "PhimoeForCausalLM"
ARCH = MODEL_ARCH.PHIMOE


def rope_dims(cfg: HFConfig) -> int:
    return int(float(cfg.rope().get("partial_rotary_factor", 1.0)) * head_dim(cfg))


def longrope(cfg: HFConfig) -> dict | None:
    """The LongRoPE parameters, None for plain RoPE; other scalings are an error."""
    rope = cfg.rope()
    if rope["rope_type"] == "default":
        return None
    if rope["rope_type"] not in ("longrope", "su"):
        raise ConversionError(f"{cfg.path}: RoPE scaling {rope['rope_type']!r} is not supported for Phimoe")
    for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
        if rope.get(key) is None:
            raise ConversionError(f"{cfg.path}: LongRoPE needs rope_scaling.{key}")
    for key in ("short_factor", "long_factor"):
        if len(rope[key]) != rope_dims(cfg) // 2:
            raise ConversionError(
                f"{cfg.path}: rope_scaling.{key} has {len(rope[key])} values, expected {rope_dims(cfg) // 2}"
            )
    return rope


def longrope_attn_factor(cfg: HFConfig, rope: dict) -> float:
    """The cos/sin scale: Phi's explicit mscale, else transformers' LongRoPE default."""
    short, long = rope.get("short_mscale"), rope.get("long_mscale")
    if short is not None or long is not None:
        if short != long:
            raise ConversionError(
                f"{cfg.path}: short_mscale {short} != long_mscale {long}; GGUF has one rope.scaling.attn_factor"
            )
        return float(short)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = int(rope["original_max_position_embeddings"])
    scale = int(cfg.require("max_position_embeddings")) / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def add_metadata(w: GGUFWriter, cfg: HFConfig) -> None:
    add_common_metadata(
        w,
        cfg,
        head_count_kv=int(cfg.require("num_key_value_heads")),
        feed_forward_length=int(cfg.require("intermediate_size")),
    )
    w.add_rope_dimension_count(rope_dims(cfg))
    # sparsemixer's masking threshold; GGUF has no key for it (llama.cpp uses plain top-2)
    w.add_float32("qmoe.router_jitter_noise", float(cfg.get("router_jitter_noise", default=0.01)))
    rope = longrope(cfg)
    if rope is not None:
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        w.add_rope_scaling_attn_factors(longrope_attn_factor(cfg, rope))


def tensors(cfg: HFConfig) -> list[OutputTensor]:
    n_embd, hd = int(cfg.require("hidden_size")), head_dim(cfg)
    n_q, n_kv = int(cfg.require("num_attention_heads")) * hd, int(cfg.require("num_key_value_heads")) * hd
    attention_bias = bool(cfg.get("attention_bias", default=False))
    out = [token_embedding(cfg)]
    rope = longrope(cfg)
    if rope is not None:
        out += [
            constant(T.ROPE_FACTORS_LONG, rope["long_factor"]),
            constant(T.ROPE_FACTORS_SHORT, rope["short_factor"]),
        ]
    for i in range(int(cfg.require("num_hidden_layers"))):
        p = f"model.layers.{i}."
        out += [
            copied(T.ATTN_NORM, i, p + "input_layernorm.weight", (n_embd,)),
            copied(T.ATTN_NORM, i, p + "input_layernorm.bias", (n_embd,), "bias"),
        ]
        for kind, proj, rows in (
            (T.ATTN_Q, "q_proj", n_q),
            (T.ATTN_K, "k_proj", n_kv),
            (T.ATTN_V, "v_proj", n_kv),
        ):
            out.append(copied(kind, i, p + f"self_attn.{proj}.weight", (rows, n_embd)))
            if attention_bias:
                out.append(copied(kind, i, p + f"self_attn.{proj}.bias", (rows,), "bias"))
        out.append(copied(T.ATTN_OUT, i, p + "self_attn.o_proj.weight", (n_embd, n_q)))
        if attention_bias:
            out.append(copied(T.ATTN_OUT, i, p + "self_attn.o_proj.bias", (n_embd,), "bias"))
        else:  # llama.cpp's phimoe requires it (q/k/v biases are optional there)
            out.append(constant(T.ATTN_OUT, [0.0] * n_embd, i, "bias"))
        out += [
            copied(T.FFN_NORM, i, p + "post_attention_layernorm.weight", (n_embd,)),
            copied(T.FFN_NORM, i, p + "post_attention_layernorm.bias", (n_embd,), "bias"),
            copied(T.FFN_GATE_INP, i, p + "block_sparse_moe.gate.weight", (n_expert(cfg), n_embd)),
            *experts(
                cfg,
                i,
                p + "block_sparse_moe.experts.{e}.{proj}.weight",
                {"gate": "w1", "up": "w3", "down": "w2"},
                int(cfg.require("intermediate_size")),
            ),
        ]
    lm_head_bias = bool(cfg.get("lm_head_bias", default=False))
    out += output_head(cfg, norm_bias=True, output_bias=lm_head_bias)
    if not lm_head_bias:  # required by llama.cpp's phimoe
        out.append(constant(T.OUTPUT, [0.0] * int(cfg.require("vocab_size")), None, "bias"))
    return out
