"""Tiny random Hugging Face MoE checkpoints, one per supported architecture.

Tests must not download weights, so each kind is built here from a config with
transformers' own model class: hidden size 64, 2-3 blocks, 4-8 experts of which 2
are used, every matrix row length a multiple of 32 (so Q4_0/Q8_0 apply to every
matrix), the family's tokenizer trained locally (tests/tokenizer_fixtures.py), and
the real family's structural features: DeepSeek-V2's leading dense block, shared
experts, routed scaling and YaRN; Phimoe's LayerNorms, biases and LongRoPE;
Qwen3's per-head q/k norms; OLMoE's full-width q/k norms.

Weights are drawn from a seeded generator (std 0.06, routers 1.0 so routing is
decisive, norms 1 +- 0.1, biases +- 0.1) so logits are far from zero and a swapped
or mis-permuted tensor changes them. The checkpoint is saved with a small
max_shard_size so that it has several shards and an index, like a real one.

    build_tiny_model(kind, out_dir, seed=0) -> out_dir
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tokenizer_fixtures import make_bpe_tokenizer, make_sentencepiece_tokenizer

TINY_KINDS = ["qwen3moe", "deepseek2-lite", "deepseek2-qlora", "phimoe", "mixtral", "olmoe"]

WEIGHT_STD = 0.06
ROUTER_STD = 1.0
SHARD_SIZE = "150KB"

# kind -> (tokenizer: BPE pre-tokenizer name or "spm", HF model class name)
_FAMILIES = {
    "qwen3moe": ("qwen2", "Qwen3MoeForCausalLM"),
    "deepseek2-lite": ("deepseek-llm", "DeepseekV2ForCausalLM"),
    "deepseek2-qlora": ("deepseek-llm", "DeepseekV2ForCausalLM"),
    "phimoe": ("spm", "PhimoeForCausalLM"),
    "mixtral": ("spm", "MixtralForCausalLM"),
    "olmoe": ("olmo", "OlmoeForCausalLM"),
}


def _config_kwargs(kind: str, n_vocab: int, n_ff: int, n_embd: int = 64) -> dict:
    """transformers config arguments of `kind`; `n_ff` is the expert FFN width."""
    common = {
        "vocab_size": n_vocab,
        "hidden_size": n_embd,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if kind == "qwen3moe":
        return common | {
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "head_dim": n_embd // 2,
            "num_experts": 8,
            "moe_intermediate_size": n_ff,
            "intermediate_size": 128,
            "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rms_norm_eps": 1e-6,
        }
    if kind.startswith("deepseek2"):
        lite = kind == "deepseek2-lite"
        return common | {
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "intermediate_size": 128,
            "n_routed_experts": 4 if lite else 8,
            "n_shared_experts": 2 if lite else 1,
            "moe_intermediate_size": n_ff,
            "routed_scaling_factor": 2.5 if lite else 1.5,
            "norm_topk_prob": False,
            "topk_method": "greedy",
            "q_lora_rank": None if lite else 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        }
    if kind == "phimoe":
        head_dim = n_embd // 4
        return common | {
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "intermediate_size": n_ff,
            "attention_bias": True,
            "lm_head_bias": True,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 1024,
                "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
                "long_factor": [1.5 + 0.25 * i for i in range(head_dim // 2)],
                "short_mscale": 1.1,
                "long_mscale": 1.1,
            },
        }
    if kind == "mixtral":
        return common | {
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "intermediate_size": n_ff,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        }
    if kind == "olmoe":
        return common | {
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "num_experts": 8,
            "intermediate_size": n_ff,
            "norm_topk_prob": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        }
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")


def _special_ids(out_dir: Path, tokenizer: str) -> dict:
    """bos/eos/pad ids as the written tokenizer defines them."""
    if tokenizer == "spm":
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    ids = {}
    for field in ("bos", "eos", "pad"):
        token = config.get(f"{field}_token")
        ids[f"{field}_token_id"] = vocab.token_to_id(token) if token else None
    return ids


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in name order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(noise * ROUTER_STD)
            elif p.ndim >= 2:
                p.copy_(noise * WEIGHT_STD)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.1)


def build_tiny_model(
    kind: str,
    out_dir: Path,
    seed: int = 0,
    *,
    ff_not_multiple_of_32: bool = False,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 64,
    **config: object,
) -> Path:
    """Write a tiny random checkpoint of `kind` (see TINY_KINDS) with its tokenizer into
    `out_dir` and return `out_dir`. `ff_not_multiple_of_32` makes the expert FFN width 48,
    so ffn_down_exps rows do not divide into 32-element blocks (the F16 fallback);
    `dtype` is the stored weight type (real checkpoints are bfloat16). `hidden_size` 256
    (expert FFN width too) makes the K-quants' 256-blocks fit most matrices; `config`
    overrides config keys (e.g. attention_bias=False)."""
    import transformers

    if kind not in _FAMILIES:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    tokenizer, hf_class = _FAMILIES[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_vocab = make_sentencepiece_tokenizer(out_dir)
    else:
        n_vocab = make_bpe_tokenizer(out_dir, tokenizer)

    model_class = getattr(transformers, hf_class)
    config = model_class.config_class(
        **(
            _config_kwargs(kind, n_vocab, 48 if ff_not_multiple_of_32 else hidden_size, hidden_size)
            | _special_ids(out_dir, tokenizer)
            | config
        ),
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    return out_dir
