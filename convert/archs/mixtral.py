"""Mixtral (MixtralForCausalLM) -> GGUF architecture "llama" with experts.

llama.cpp runs Mixtral as a Llama whose FFN is MoE (w1 = gate, w3 = up, w2 = down;
softmax over the top-k router logits). Its "llama" RoPE rotates adjacent pairs
(x[2i], x[2i+1]) while Hugging Face's rotates halves (x[i], x[i + d/2]), so the
rows of Q and K are permuted within each head to make the two agree.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter

from convert.archs.common import (
    add_common_metadata,
    add_rope_scaling,
    attention,
    head_dim,
    output_head,
    routed_ffn,
    token_embedding,
)
from convert.checkpoint import HFConfig
from convert.plan import OutputTensor

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
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        out += attention(cfg, i, rope_permute=rope_halves_to_pairs) + routed_ffn(
            cfg, i, int(cfg.require("intermediate_size")), module="block_sparse_moe",
            hf_proj={"gate": "w1", "up": "w3", "down": "w2"})
    return out + output_head(cfg)
