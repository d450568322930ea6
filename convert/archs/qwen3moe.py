"""Qwen3-MoE (Qwen3MoeForCausalLM) -> GGUF architecture "qwen3moe".

Every block is MoE: a softmax router over all experts, top-k, weights renormalized
when norm_topk_prob (true for Qwen3-30B-A3B). q and k get a per-head RMS norm
({head_dim}) before NEOX RoPE, so Q/K rows are written unpermuted.
"""

from __future__ import annotations

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
from qmoe.errors import ConversionError

HF_CLASS = "Qwen3MoeForCausalLM"
ARCH = MODEL_ARCH.QWEN3MOE


def add_metadata(w: GGUFWriter, cfg: HFConfig) -> None:
    n_ff_exp = int(cfg.require("moe_intermediate_size"))
    add_common_metadata(
        w,
        cfg,
        head_count_kv=int(cfg.require("num_key_value_heads")),
        feed_forward_length=int(cfg.get("intermediate_size", default=n_ff_exp)),
    )
    add_rope_scaling(w, cfg)
    w.add_key_length(head_dim(cfg))
    w.add_value_length(head_dim(cfg))
    w.add_rope_dimension_count(head_dim(cfg))
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", default=False)))


def tensors(cfg: HFConfig) -> list[OutputTensor]:
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", default=1)) != 1:
        raise ConversionError(
            f"{cfg.path}: dense layers (mlp_only_layers, decoder_sparse_step) are not supported"
        )
    hd, n_ff_exp = head_dim(cfg), int(cfg.require("moe_intermediate_size"))
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        out += attention(cfg, i, qk_norm=(hd, hd)) + routed_ffn(cfg, i, n_ff_exp)
    return out + output_head(cfg)
