"""What the architectures share: the hyperparameter keys every MoE file carries, the
embedding and output head, the stacked experts, and RoPE scaling.

Each architecture module calls these and adds what is its own, so a difference
between architectures is visible in that architecture's file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import GGUFWriter, RopeScalingType

from convert.checkpoint import HFConfig
from convert.plan import OutputTensor, copied, stacked, transformed
from qmoe.errors import ConversionError

# Projection of a gated expert -> its GGUF tensor; the HF names differ per family.
EXPERT_TENSORS = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}


def n_expert(cfg: HFConfig) -> int:
    return int(cfg.require("num_experts", "num_local_experts", "n_routed_experts"))


def head_dim(cfg: HFConfig) -> int:
    """Per-head size: explicit in newer configs (Qwen3), else hidden_size / heads."""
    return int(cfg.get("head_dim", default=cfg.require("hidden_size") // cfg.require("num_attention_heads")))


def add_common_metadata(
    w: GGUFWriter, cfg: HFConfig, *, head_count_kv: int, feed_forward_length: int
) -> None:
    """Keys every architecture here writes, named as llama.cpp reads them."""
    w.add_context_length(int(cfg.require("max_position_embeddings")))
    w.add_embedding_length(int(cfg.require("hidden_size")))
    w.add_block_count(int(cfg.require("num_hidden_layers")))
    w.add_feed_forward_length(feed_forward_length)
    w.add_head_count(int(cfg.require("num_attention_heads")))
    w.add_head_count_kv(head_count_kv)
    w.add_layer_norm_rms_eps(float(cfg.require("rms_norm_eps")))
    w.add_rope_freq_base(float(cfg.rope().get("rope_theta", 10000.0)))
    w.add_expert_count(n_expert(cfg))
    w.add_expert_used_count(int(cfg.require("num_experts_per_tok")))
    w.add_vocab_size(int(cfg.require("vocab_size")))


def add_rope_scaling(w: GGUFWriter, cfg: HFConfig) -> None:
    """Linear or YaRN RoPE scaling keys; other kinds are an error unless the architecture handles them."""
    rope = cfg.rope()
    kind = rope["rope_type"]
    if kind == "default":
        return
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return
    if kind != "yarn":
        raise ConversionError(f"{cfg.path}: RoPE scaling {kind!r} is not supported for {cfg.architecture}")
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope.get("beta_fast") is not None:
        w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
    if rope.get("beta_slow") is not None:
        w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    if rope.get("attention_factor") is not None:
        w.add_rope_scaling_yarn_attn_factor(float(rope["attention_factor"]))


def token_embedding(cfg: HFConfig) -> OutputTensor:
    shape = (int(cfg.require("vocab_size")), int(cfg.require("hidden_size")))
    return copied(T.TOKEN_EMBD, None, "model.embed_tokens.weight", shape)


def output_head(cfg: HFConfig, *, norm_bias: bool = False, output_bias: bool = False) -> list[OutputTensor]:
    """Final norm and output projection. A tied model's output is written from the
    embedding, so every architecture finds `output.weight` where llama.cpp looks."""
    n_vocab, n_embd = int(cfg.require("vocab_size")), int(cfg.require("hidden_size"))
    tied = bool(cfg.get("tie_word_embeddings", default=False))
    tensors = [copied(T.OUTPUT_NORM, None, "model.norm.weight", (n_embd,))]
    if norm_bias:
        tensors.append(copied(T.OUTPUT_NORM, None, "model.norm.bias", (n_embd,), "bias"))
    tensors.append(
        copied(T.OUTPUT, None, "model.embed_tokens.weight" if tied else "lm_head.weight", (n_vocab, n_embd))
    )
    if output_bias:
        tensors.append(copied(T.OUTPUT, None, "lm_head.bias", (n_vocab,), "bias"))
    return tensors


def experts(cfg: HFConfig, bid: int, template: str, hf_proj: dict[str, str], n_ff: int) -> list[OutputTensor]:
    """ffn_{gate,up,down}_exps of block `bid`: [n_expert, n_ff, n_embd] and [n_expert, n_embd, n_ff].

    `template` is the per-expert HF name with {e} and {proj}; `hf_proj` maps
    gate/up/down to the family's projection names (gate_proj or w1, ...).
    """
    n_embd = int(cfg.require("hidden_size"))
    shapes = {"gate": (n_ff, n_embd), "up": (n_ff, n_embd), "down": (n_embd, n_ff)}
    return [
        stacked(
            EXPERT_TENSORS[proj],
            bid,
            [template.format(e=e, proj=hf_proj[proj]) for e in range(n_expert(cfg))],
            shapes[proj],
        )
        for proj in ("gate", "up", "down")
    ]


# HF projection names of a gated FFN in the Llama-style families (Qwen, OLMoE, DeepSeek).
GATE_UP_DOWN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def attention(cfg: HFConfig, bid: int, qk_norm: tuple[int, int] | None = None,
              rope_permute: Callable[[int], Callable[[np.ndarray], np.ndarray]] | None = None
              ) -> list[OutputTensor]:
    """attn_norm, q/k/v/output projections and, when `qk_norm` gives their widths, the
    q/k RMS norms of Llama-style block `bid`. Q/K rows are written as HF has them (NEOX
    RoPE) unless `rope_permute(n_heads)` gives the row permutation for another layout."""
    n_embd, hd = int(cfg.require("hidden_size")), head_dim(cfg)
    n_head = int(cfg.require("num_attention_heads"))
    n_head_kv = int(cfg.get("num_key_value_heads", default=n_head))
    n_q, n_kv = n_head * hd, n_head_kv * hd
    p = f"model.layers.{bid}."

    def q_or_k(kind: T, name: str, rows: int, heads: int) -> OutputTensor:
        if rope_permute is None:
            return copied(kind, bid, p + name, (rows, n_embd))
        return transformed(kind, bid, p + name, (rows, n_embd), (rows, n_embd), rope_permute(heads))

    out = [
        copied(T.ATTN_NORM, bid, p + "input_layernorm.weight", (n_embd,)),
        q_or_k(T.ATTN_Q, "self_attn.q_proj.weight", n_q, n_head),
        q_or_k(T.ATTN_K, "self_attn.k_proj.weight", n_kv, n_head_kv),
        copied(T.ATTN_V, bid, p + "self_attn.v_proj.weight", (n_kv, n_embd)),
        copied(T.ATTN_OUT, bid, p + "self_attn.o_proj.weight", (n_embd, n_q)),
    ]
    if qk_norm is not None:
        out += [
            copied(T.ATTN_Q_NORM, bid, p + "self_attn.q_norm.weight", (qk_norm[0],)),
            copied(T.ATTN_K_NORM, bid, p + "self_attn.k_norm.weight", (qk_norm[1],)),
        ]
    return out


def routed_ffn(cfg: HFConfig, bid: int, n_ff: int, module: str = "mlp",
               hf_proj: dict[str, str] = GATE_UP_DOWN) -> list[OutputTensor]:
    """ffn_norm, the router and the stacked experts of MoE block `bid`, whose HF MoE
    module is `model.layers.{bid}.{module}` (mlp, block_sparse_moe)."""
    n_embd = int(cfg.require("hidden_size"))
    p = f"model.layers.{bid}."
    return [
        copied(T.FFN_NORM, bid, p + "post_attention_layernorm.weight", (n_embd,)),
        copied(T.FFN_GATE_INP, bid, p + f"{module}.gate.weight", (n_expert(cfg), n_embd)),
        *experts(cfg, bid, p + module + ".experts.{e}.{proj}.weight", hf_proj, n_ff),
    ]
