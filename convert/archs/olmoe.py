"""OLMoE (OlmoeForCausalLM) -> GGUF architecture "olmoe".

Like a Llama block with experts, but q and k are RMS-normed over the whole
projection ({n_head * head_dim}, not per head), the top-k router weights are not
renormalized (norm_topk_prob false), and the output head is untied. NEOX RoPE,
so Q/K rows are written unpermuted.
"""

from __future__ import annotations

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
from convert.plan import OutputTensor, copied

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
    n_embd, hd = int(cfg.require("hidden_size")), head_dim(cfg)
    n_q = int(cfg.require("num_attention_heads")) * hd
    n_kv = int(cfg.get("num_key_value_heads", default=cfg.require("num_attention_heads"))) * hd
    out = [token_embedding(cfg)]
    for i in range(int(cfg.require("num_hidden_layers"))):
        p = f"model.layers.{i}."
        out += [
            copied(T.ATTN_NORM, i, p + "input_layernorm.weight", (n_embd,)),
            copied(T.ATTN_Q, i, p + "self_attn.q_proj.weight", (n_q, n_embd)),
            copied(T.ATTN_K, i, p + "self_attn.k_proj.weight", (n_kv, n_embd)),
            copied(T.ATTN_V, i, p + "self_attn.v_proj.weight", (n_kv, n_embd)),
            copied(T.ATTN_Q_NORM, i, p + "self_attn.q_norm.weight", (n_q,)),
            copied(T.ATTN_K_NORM, i, p + "self_attn.k_norm.weight", (n_kv,)),
            copied(T.ATTN_OUT, i, p + "self_attn.o_proj.weight", (n_embd, n_q)),
            copied(T.FFN_NORM, i, p + "post_attention_layernorm.weight", (n_embd,)),
            copied(T.FFN_GATE_INP, i, p + "mlp.gate.weight", (n_expert(cfg), n_embd)),
            *experts(
                cfg,
                i,
                p + "mlp.experts.{e}.{proj}.weight",
                {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                int(cfg.require("intermediate_size")),
            ),
        ]
    return out + output_head(cfg)
