"""OLMoE (OlmoeForCausalLM) -> GGUF architecture "olmoe".

Like a Llama block with experts, but q and k are RMS-normed over the whole
projection ({n_head * head_dim}, not per head), the top-k router weights are not
renormalized (norm_topk_prob false), and the output head is untied. NEOX RoPE,
so Q/K rows are written unpermuted.
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

HF_CLASS = "OlmoeForCausalLM"
ARCH = MODEL_ARCH.OLMOE


def add_metadata(w: GGUFWriter, cfg: HFConfig) -> None:
    add_common_metadata(
        w,
        cfg,
        head_count_kv=int(cfg.get("num_key_value_heads", default=cfg.require("num_attention_heads"))),
        feed_forward_length=int(cfg.require("intermediate_size")),
    )
    add_rope_scaling(w, cfg)
    w.add_rope_dimension_count(head_dim(cfg))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", default=False)))
    if cfg.get("clip_qkv") is not None:
        w.add_clamp_kqv(float(cfg.get("clip_qkv")))


def tensors(cfg: HFConfig) -> list[OutputTensor]:
    hd = head_dim(cfg)
    n_q = int(cfg.require("num_attention_heads")) * hd
    n_kv = int(cfg.get("num_key_value_heads", default=cfg.require("num_attention_heads"))) * hd
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        # q/k norms over the whole projection, not one head
        out += attention(cfg, i, qk_norm=(n_q, n_kv)) + routed_ffn(cfg, i, int(cfg.require("intermediate_size")))
    return out + output_head(cfg)
