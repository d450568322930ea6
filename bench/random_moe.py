"""Random-weight Qwen3-MoE GGUFs whose routing behaves like a trained model's.

For the offload benchmark (bench/offload.py: the 1.4 GB model with Qwen3-30B-A3B's
layer shapes) and the memory test (tests/test_memory.py: a model that is nearly all
experts). Speed and memory depend on shapes and types, not on what the weights say,
so these are written from random quantized blocks in seconds; what they must get
right is the one property prefetching relies on:

    The scales make the residual stream dominate each layer's update, as in trained
    transformers (embeddings std 1, attention output std 0.002, experts 0.02), so a
    layer's routing is predictable from its pre-attention activation. With an
    attention update as large as the residual, routing would be no more predictable
    from attn_norm than from anything else.

The vocabulary is byte-level ("gpt2", split as Qwen2/3 do): the 256 bytes, one merge (two spaces), unused
tokens up to the size asked for, then BOS and EOS.
(bench/bench_model.py writes the decode benchmark's model instead: the real 151k
SentencePiece vocabulary and fan-in scales, to compare speed with llama.cpp.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from qmoe.tokenizer import gpt2_byte_alphabet

QT = GGMLQuantizationType
BLOCK_BYTES_AND_SPREAD = {QT.Q4_0: (18, 4.6), QT.Q8_0: (34, 73.3)}  # std of w / d for uniform quants


@dataclass(frozen=True)
class MoEShape:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_vocab: int  # >= 259: the bytes, the merge, BOS, EOS
    expert_type: GGMLQuantizationType  # Q4_0 or Q8_0; everything else quantized is Q8_0
    router_std: float = 0.02


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: QT, std: float) -> np.ndarray:
    """Random quantized weights of `shape` (numpy order) with about `std`: uint8 [..., row_bytes].

    Q4_0: every block's fp16 scale d and uniform nibbles, w = d * (q - 8), std ~ 4.6 d.
    Q8_0: scale d and uniform int8 in [-127, 127], std ~ 73 d.
    """
    block_bytes, spread = BLOCK_BYTES_AND_SPREAD[qtype]
    n_blocks = math.prod(shape) // 32
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    if qtype == QT.Q8_0:
        blocks[:, 2:][blocks[:, 2:] == 128] = 129  # int8 -128 is outside Q8_0's symmetric range
    blocks[:, :2] = np.array([std / spread], np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // 32 * block_bytes)


def tensor_plan(s: MoEShape) -> list[tuple[str, tuple[int, ...], QT, float]]:
    """Every tensor: (name, numpy shape, type, std); F32 tensors of std 1.0 are norms (all ones)."""
    d, hd, e, ff = s.n_embd, s.head_dim, s.n_expert, s.n_ff_exp
    plan = [("token_embd.weight", (s.n_vocab, d), QT.Q8_0, 1.0)]
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (d,), QT.F32, 1.0),
            (p + "attn_q.weight", (s.n_head * hd, d), QT.Q8_0, 0.02),
            (p + "attn_k.weight", (s.n_head_kv * hd, d), QT.Q8_0, 0.02),
            (p + "attn_v.weight", (s.n_head_kv * hd, d), QT.Q8_0, 0.02),
            (p + "attn_q_norm.weight", (hd,), QT.F32, 1.0),
            (p + "attn_k_norm.weight", (hd,), QT.F32, 1.0),
            (p + "attn_output.weight", (d, s.n_head * hd), QT.Q8_0, 0.002),
            (p + "ffn_norm.weight", (d,), QT.F32, 1.0),
            (p + "ffn_gate_inp.weight", (e, d), QT.F32, s.router_std),
            (p + "ffn_gate_exps.weight", (e, ff, d), s.expert_type, 0.02),
            (p + "ffn_up_exps.weight", (e, ff, d), s.expert_type, 0.02),
            (p + "ffn_down_exps.weight", (e, d, ff), s.expert_type, 0.02),
        ]
    return plan + [("output_norm.weight", (d,), QT.F32, 1.0), ("output.weight", (s.n_vocab, d), QT.Q8_0, 0.02)]


def nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    return 4 * math.prod(shape) if qtype == QT.F32 else math.prod(shape) // 32 * BLOCK_BYTES_AND_SPREAD[qtype][0]


def expert_bytes(s: MoEShape) -> int:
    """Bytes of all routed experts of a model of shape `s`."""
    return sum(nbytes(shape, qtype) for name, shape, qtype, _ in tensor_plan(s) if "_exps." in name)


def write_random_moe(path: str | os.PathLike, s: MoEShape, name: str, seed: int = 0) -> Path:
    """Write the model to `path`, atomically (a temporary file renamed at the end)."""
    path = Path(path)
    plan = tensor_plan(s)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(tmp, "qwen3moe")
    writer.add_name(name)
    writer.add_context_length(4096)
    writer.add_embedding_length(s.n_embd)
    writer.add_block_count(s.n_layers)
    writer.add_feed_forward_length(s.n_ff_exp)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_head_kv)
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(s.n_expert)
    writer.add_expert_used_count(s.n_expert_used)
    writer.add_expert_feed_forward_length(s.n_ff_exp)
    writer.add_expert_weights_norm(True)
    writer.add_vocab_size(s.n_vocab)
    _add_byte_tokenizer(writer, s.n_vocab)
    for tensor, shape, qtype, _ in plan:
        writer.add_tensor_info(tensor, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, shape, qtype, std in plan:
        if qtype != QT.F32:
            writer.write_tensor_data(random_blocks(rng, shape, qtype, std))
        elif std == 1.0:
            writer.write_tensor_data(np.full(shape, std, np.float32))  # a norm
        else:
            writer.write_tensor_data(rng.normal(0, std, shape).astype(np.float32))  # a router
    writer.close()
    os.replace(tmp, path)
    return path


def _add_byte_tokenizer(writer: GGUFWriter, n_vocab: int) -> None:
    alphabet = gpt2_byte_alphabet()
    space = alphabet[ord(" ")]
    tokens = [alphabet[b] for b in range(256)] + [space * 2] + [f"<unused{i}>" for i in range(n_vocab - 259)]
    tokens += ["<|bos|>", "<|eos|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # Qwen3's split rules; llama.cpp knows no "gpt2"
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [5] * (n_vocab - 259) + [3, 3])  # normal, unused, control
    writer.add_token_merges([f"{space} {space}"])
    writer.add_bos_token_id(n_vocab - 2)
    writer.add_eos_token_id(n_vocab - 1)
