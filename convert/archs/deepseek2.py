"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM) -> GGUF architecture "deepseek2".

Multi-head latent attention (MLA): K and V come from a compressed latent
c = kv_a_layernorm(kv_a_proj(x)[:kv_lora_rank]) of size kv_lora_rank, shared by
all heads, plus a rope part of size qk_rope_head_dim. V2 also compresses Q through
q_lora_rank (attn_q_a, attn_q_a_norm, attn_q_b); V2-Lite projects Q directly
(attn_q) and has no q_lora_rank in config.json.

The current llama.cpp runs MLA in its "absorbed" form and wants kv_b_proj
[n_head * (nope + v), kv_lora] split per head into
    attn_k_b [n_head, kv_lora, nope]   (the K part, transposed)
    attn_v_b [n_head, v, kv_lora]
and records the cache as one "MQA head": head_count_kv = 1, key_length =
kv_lora + rope, value_length = kv_lora; the per-head sizes of the decompressed
attention go in key_length_mla / value_length_mla.

The first first_k_dense_replace blocks have a dense FFN; the others have routed
experts (softmax router, top-k, weights times routed_scaling_factor, renormalized
only when norm_topk_prob) plus n_shared_experts always-on experts, stored as one
FFN of width n_shared * moe_intermediate_size. RoPE applies to adjacent pairs in
Hugging Face's code and in llama.cpp, so nothing is permuted. Context extension
is YaRN; llama.cpp reads mscale_all_dim as 0.1 * rope.scaling.yarn_log_multiplier,
and that is what is written (it assumes mscale == mscale_all_dim, as the released
checkpoints have).

q_lora_rank is written as 0 for V2-Lite: llama.cpp skips the key only for the
released Lite depths (26/27 blocks) and requires it otherwise, and 0 tells it
(and qmoe) to use attn_q.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, ExpertGatingFuncType, GGUFWriter
from gguf import MODEL_TENSOR as T

from convert.archs.common import (
    add_common_metadata,
    add_rope_scaling,
    experts,
    n_expert,
    output_head,
    token_embedding,
)
from convert.checkpoint import HFConfig
from convert.plan import OutputTensor, copied, transformed
from qmoe.errors import ConversionError

HF_CLASS = "DeepseekV2ForCausalLM"
ARCH = MODEL_ARCH.DEEPSEEK2

_GATING = {"softmax": ExpertGatingFuncType.SOFTMAX, "sigmoid": ExpertGatingFuncType.SIGMOID}


def _mla_sizes(cfg: HFConfig) -> tuple[int, int, int, int]:
    """(qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank)."""
    return tuple(
        int(cfg.require(k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    )


def add_metadata(w: GGUFWriter, cfg: HFConfig) -> None:
    nope, rope_dim, v_dim, kv_lora = _mla_sizes(cfg)
    add_common_metadata(w, cfg, head_count_kv=1, feed_forward_length=int(cfg.require("intermediate_size")))
    add_rope_scaling(w, cfg)
    mscale_all_dim = cfg.rope().get("mscale_all_dim")
    if mscale_all_dim:
        w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))
    w.add_rope_dimension_count(rope_dim)
    w.add_q_lora_rank(int(cfg.get("q_lora_rank", default=0)))
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(nope + rope_dim)
    w.add_value_length_mla(v_dim)
    w.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace", default=0)))
    w.add_expert_feed_forward_length(int(cfg.require("moe_intermediate_size")))
    w.add_expert_shared_count(int(cfg.get("n_shared_experts", default=0)))
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", default=1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", default=False)))
    scoring = cfg.get("scoring_func", default="softmax")
    if scoring not in _GATING:
        raise ConversionError(f"{cfg.path}: scoring_func {scoring!r} is not supported (softmax or sigmoid)")
    w.add_expert_gating_func(_GATING[scoring])
    if cfg.get("topk_method", default="greedy") == "group_limited_greedy":
        w.add_expert_group_count(int(cfg.require("n_group")))
        w.add_expert_group_used_count(int(cfg.require("topk_group")))


def split_kv_b(n_head: int, nope: int, v_dim: int, part: str):
    """kv_b_proj [n_head * (nope + v), kv_lora] -> attn_k_b [n_head, kv_lora, nope] or attn_v_b [n_head, v, kv_lora]."""

    def split(kv_b: np.ndarray) -> np.ndarray:
        per_head = kv_b.reshape(n_head, nope + v_dim, kv_b.shape[-1])  # [head, nope + v, kv_lora]
        if part == "k":
            return np.ascontiguousarray(per_head[:, :nope, :].transpose(0, 2, 1))
        return np.ascontiguousarray(per_head[:, nope:, :])

    return split


def attention(cfg: HFConfig, i: int) -> list[OutputTensor]:
    n_embd, n_head = int(cfg.require("hidden_size")), int(cfg.require("num_attention_heads"))
    nope, rope_dim, v_dim, kv_lora = _mla_sizes(cfg)
    q_lora = cfg.get("q_lora_rank")
    p = f"model.layers.{i}.self_attn."
    n_q = n_head * (nope + rope_dim)
    if q_lora is None:
        q = [copied(T.ATTN_Q, i, p + "q_proj.weight", (n_q, n_embd))]
    else:
        q = [
            copied(T.ATTN_Q_A, i, p + "q_a_proj.weight", (int(q_lora), n_embd)),
            copied(T.ATTN_Q_A_NORM, i, p + "q_a_layernorm.weight", (int(q_lora),)),
            copied(T.ATTN_Q_B, i, p + "q_b_proj.weight", (n_q, int(q_lora))),
        ]
    kv_b_shape = (n_head * (nope + v_dim), kv_lora)
    return q + [
        copied(T.ATTN_KV_A_MQA, i, p + "kv_a_proj_with_mqa.weight", (kv_lora + rope_dim, n_embd)),
        copied(T.ATTN_KV_A_NORM, i, p + "kv_a_layernorm.weight", (kv_lora,)),
        transformed(
            T.ATTN_K_B,
            i,
            p + "kv_b_proj.weight",
            kv_b_shape,
            (n_head, kv_lora, nope),
            split_kv_b(n_head, nope, v_dim, "k"),
        ),
        transformed(
            T.ATTN_V_B,
            i,
            p + "kv_b_proj.weight",
            kv_b_shape,
            (n_head, v_dim, kv_lora),
            split_kv_b(n_head, nope, v_dim, "v"),
        ),
        copied(T.ATTN_OUT, i, p + "o_proj.weight", (n_embd, n_head * v_dim)),
    ]


def feed_forward(cfg: HFConfig, i: int) -> list[OutputTensor]:
    n_embd = int(cfg.require("hidden_size"))
    p = f"model.layers.{i}.mlp."
    if i < int(cfg.get("first_k_dense_replace", default=0)):
        n_ff = int(cfg.require("intermediate_size"))
        return [
            copied(T.FFN_GATE, i, p + "gate_proj.weight", (n_ff, n_embd)),
            copied(T.FFN_UP, i, p + "up_proj.weight", (n_ff, n_embd)),
            copied(T.FFN_DOWN, i, p + "down_proj.weight", (n_embd, n_ff)),
        ]
    n_ff_exp = int(cfg.require("moe_intermediate_size"))
    out = [
        copied(T.FFN_GATE_INP, i, p + "gate.weight", (n_expert(cfg), n_embd)),
        *experts(
            cfg,
            i,
            p + "experts.{e}.{proj}.weight",
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
            n_ff_exp,
        ),
    ]
    n_ff_shexp = n_ff_exp * int(cfg.get("n_shared_experts", default=0))
    if n_ff_shexp:
        out += [
            copied(T.FFN_GATE_SHEXP, i, p + "shared_experts.gate_proj.weight", (n_ff_shexp, n_embd)),
            copied(T.FFN_UP_SHEXP, i, p + "shared_experts.up_proj.weight", (n_ff_shexp, n_embd)),
            copied(T.FFN_DOWN_SHEXP, i, p + "shared_experts.down_proj.weight", (n_embd, n_ff_shexp)),
        ]
    return out


def tensors(cfg: HFConfig) -> list[OutputTensor]:
    n_embd = int(cfg.require("hidden_size"))
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        p = f"model.layers.{i}."
        out += [
            copied(T.ATTN_NORM, i, p + "input_layernorm.weight", (n_embd,)),
            *attention(cfg, i),
            copied(T.FFN_NORM, i, p + "post_attention_layernorm.weight", (n_embd,)),
            *feed_forward(cfg, i),
        ]
    return out + output_head(cfg)
