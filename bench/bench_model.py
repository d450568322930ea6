"""A random-weight GGUF with Qwen3-30B-A3B's layer shapes, for speed benchmarks.

Speed depends on shapes and types, not on what the weights say, so the benches
build this file locally instead of downloading 17 GB: n_embd 2048, 32 query / 4
KV heads of 128, 128 experts of which 8 are used, expert FFN 768, vocabulary
151936; Q4_0 experts and Q8_0 elsewhere (the usual edge choice); 8 blocks by
default (48 = the real depth). Quantized blocks are written as random bytes with
sane fp16 scales, which is as valid a Q4_0/Q8_0 tensor as any and takes seconds
instead of the minutes a float quantizer would.

The vocabulary is a synthetic SentencePiece one ("llama" model: <unk>, <s>,
</s>, the 256 byte tokens, then generated pieces), enough for llama.cpp and qmoe
to tokenize a prompt.

    python bench/bench_model.py -o /tmp/qwen3-shapes.gguf [--layers 8]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from tqdm import tqdm

Q4_0, Q8_0, F32 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 2048, 32, 4, 128
N_EXPERT, N_EXPERT_USED, N_FF_EXP = 128, 8, 768
N_VOCAB = 151936


def _random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType,
                   scale: float) -> np.ndarray:
    """Raw quantized bytes [..., row_bytes] for a tensor of logical `shape` (numpy order)."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape[:-1])) * (shape[-1] // block)
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    d = np.full(n_blocks, scale, dtype=np.float16) * rng.uniform(0.5, 1.5, n_blocks).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < N_VOCAB:
        word, n = "", i
        while True:
            word = letters[n % 26] + word
            n = n // 26 - 1
            if n < 0:
                break
        tokens.append(("▁" if i % 2 == 0 else "") + word)
        types.append(TokenType.NORMAL)
        i += 1
    scores = [0.0] * 3 + [0.0] * 256 + [-float(j) for j in range(N_VOCAB - 259)]
    return tokens, scores, [int(t) for t in types]


def make_bench_gguf(path: str | os.PathLike, n_layers: int = 8, seed: int = 0) -> Path:
    """Write the bench model to `path` (atomically: a temporary file renamed at the end)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    w = GGUFWriter(tmp, "qwen3moe")
    w.add_name(f"random Qwen3-30B-A3B shapes, {n_layers} layers")
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(6144)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    w.add_expert_feed_forward_length(N_FF_EXP)
    w.add_file_type(2)  # MOSTLY_Q4_0
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)

    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [("token_embd.weight", (N_VOCAB, N_EMBD), Q8_0)]
    for i in range(n_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (N_EMBD,), F32),
            (p + "attn_q.weight", (N_HEAD * HEAD_DIM, N_EMBD), Q8_0),
            (p + "attn_k.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q8_0),
            (p + "attn_v.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q8_0),
            (p + "attn_output.weight", (N_EMBD, N_HEAD * HEAD_DIM), Q8_0),
            (p + "attn_q_norm.weight", (HEAD_DIM,), F32),
            (p + "attn_k_norm.weight", (HEAD_DIM,), F32),
            (p + "ffn_norm.weight", (N_EMBD,), F32),
            (p + "ffn_gate_inp.weight", (N_EXPERT, N_EMBD), F32),
            (p + "ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), Q4_0),
            (p + "ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), Q4_0),
            (p + "ffn_down_exps.weight", (N_EXPERT, N_EMBD, N_FF_EXP), Q4_0),
        ]
    plan += [("output_norm.weight", (N_EMBD,), F32), ("output.weight", (N_VOCAB, N_EMBD), Q8_0)]

    # Scales keep activations O(1) through the stack: ~1/sqrt(fan_in) per weight.
    for name, shape, qtype in plan:
        if qtype == F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            raw_shape = (*shape[:-1], shape[-1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
            w.add_tensor_info(name, raw_shape, np.dtype(np.uint8), int(np.prod(raw_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, shape, qtype in tqdm(plan, desc=f"writing {path.name}", unit="tensor"):
        if qtype == F32:
            data = norm(shape[0]) if len(shape) == 1 else (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        else:
            step = 1 if qtype == Q8_0 else 8  # int8 spans +-127, Q4_0 nibbles +-8
            data = _random_blocks(rng, shape, qtype, scale=1.0 / np.sqrt(shape[-1]) / 127 * step * 1.7)
        w.write_tensor_data(data)
    w.close()
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_bench_gguf(args.output, args.layers, args.seed))


if __name__ == "__main__":
    main()
