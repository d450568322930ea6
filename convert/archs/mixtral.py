"""Mixtral (MixtralForCausalLM) -> GGUF architecture "llama" with experts.

llama.cpp runs Mixtral as a Llama whose FFN is MoE (w1 = gate, w3 = up, w2 = down;
softmax over the top-k router logits). Its "llama" RoPE rotates adjacent pairs
(x[2i], x[2i+1]) while Hugging Face's rotates halves (x[i], x[i + d/2]), so the
rows of Q and K are permuted within each head to make the two agree.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter
from gguf import MODEL_TENSOR as T

from convert.archs.common import (
    add_common_metadata,
    add_rope_scaling,
    experts,
    head_dim,
    n_expert,
    output_head,
    token_embedding,
)
from convert.checkpoint import HFConfig
from convert.plan import OutputTensor, copied, transformed

HF_CLASS = "MixtralForCausalLM"
ARCH = MODEL_ARCH.LLAMA


def rope_halves_to_pairs(n_head: int):
    """Row permutation of a Q or K weight [n_head * d, n_embd]: within each head, row
    j of the first half goes to 2j and row j of the second half to 2j + 1."""

    def permute(w: np.ndarray) -> np.ndarray:
        rows, cols = w.shape
        # [head, half, j, col] -> [head, j, half, col]
        return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)

    return permute


def add_metadata(w: GGUFWriter, cfg: HFConfig) -> None:
    add_common_metadata(
        w,
        cfg,
        head_count_kv=int(cfg.require("num_key_value_heads")),
        feed_forward_length=int(cfg.require("intermediate_size")),
    )
    add_rope_scaling(w, cfg)
    w.add_rope_dimension_count(head_dim(cfg))
    if cfg.get("head_dim") is not None:
        w.add_key_length(head_dim(cfg))
        w.add_value_length(head_dim(cfg))


def tensors(cfg: HFConfig) -> list[OutputTensor]:
    n_embd, hd = int(cfg.require("hidden_size")), head_dim(cfg)
    n_head, n_head_kv = int(cfg.require("num_attention_heads")), int(cfg.require("num_key_value_heads"))
    q_shape, kv_shape = (n_head * hd, n_embd), (n_head_kv * hd, n_embd)
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        p = f"model.layers.{i}."
        out += [
            copied(T.ATTN_NORM, i, p + "input_layernorm.weight", (n_embd,)),
            transformed(
                T.ATTN_Q, i, p + "self_attn.q_proj.weight", q_shape, q_shape, rope_halves_to_pairs(n_head)
            ),
            transformed(
                T.ATTN_K,
                i,
                p + "self_attn.k_proj.weight",
                kv_shape,
                kv_shape,
                rope_halves_to_pairs(n_head_kv),
            ),
            copied(T.ATTN_V, i, p + "self_attn.v_proj.weight", kv_shape),
            copied(T.ATTN_OUT, i, p + "self_attn.o_proj.weight", (n_embd, n_head * hd)),
            copied(T.FFN_NORM, i, p + "post_attention_layernorm.weight", (n_embd,)),
            copied(T.FFN_GATE_INP, i, p + "block_sparse_moe.gate.weight", (n_expert(cfg), n_embd)),
            *experts(
                cfg,
                i,
                p + "block_sparse_moe.experts.{e}.{proj}.weight",
                {"gate": "w1", "up": "w3", "down": "w2"},
                int(cfg.require("intermediate_size")),
            ),
        ]
    return out + output_head(cfg)
