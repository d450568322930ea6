"""A random-weight GGUF with Qwen3-30B-A3B's layer shapes, for speed benchmarks.

Speed depends on shapes and types, not on what the weights say, so the benches
build this file locally instead of downloading 17 GB: n_embd 2048, 32 query / 4
KV heads of 128, 128 experts of which 8 are used, expert FFN 768, vocabulary
151936; 8 blocks by default (48 = the real depth). Quantized blocks are written
as random bytes with sane fp16 scales, which is as valid a tensor as any and takes
seconds instead of the minutes a float quantizer would.

Tensor types, by `mix`:
    q4_0     Q4_0 experts and Q8_0 elsewhere (the usual edge choice);
    q4_k_m,  the types llama.cpp's quantizer gives each tensor for that file type
    iq4_xs   (LLAMA_FTYPE_MOSTLY_Q4_K_M / _IQ4_XS). They depend on names, layer
             index, layer count and head/expert counts, not on widths (all of
             A3B's are multiples of 256), so they are read off a narrow probe file
             of the same depth and counts that llama.cpp quantizes (needs
             llama-cpp-python; seconds).

The vocabulary is a synthetic SentencePiece one ("llama" model: <unk>, <s>,
</s>, the 256 byte tokens, then generated pieces), enough for llama.cpp and qmoe
to tokenize a prompt.

    python bench/bench_model.py -o /tmp/qwen3-shapes.gguf [--layers 8] [--mix q4_k_m]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from tqdm import tqdm

from qmoe.formats import FORMATS, row_bytes

QT = GGMLQuantizationType
Q4_0, Q8_0, F32 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
MIXES = {"q4_0": None, "q4_k_m": 15, "iq4_xs": 30}  # name -> llama_ftype (None: the hand-typed mix)
# About the mean |sub-scale x quant| of random blocks of each type: fp16 scales are set to
# (wanted weight size) / this, so that activations stay O(1) through the stack.
_TYPICAL_QUANT = {
    QT.Q8_0: 64, QT.Q4_0: 8, QT.Q4_1: 8, QT.Q5_0: 8, QT.Q5_1: 16, QT.IQ4_NL: 50, QT.Q2_K: 12, QT.Q3_K: 48,
    QT.Q4_K: 250, QT.Q5_K: 500, QT.Q6_K: 1000, QT.IQ4_XS: 800,
}  # fmt: skip

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 2048, 32, 4, 128
N_EXPERT, N_EXPERT_USED, N_FF_EXP = 128, 8, 768
N_VOCAB = 151936


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType,
                   weight_size: float) -> np.ndarray:
    """Raw quantized bytes [..., row_bytes] for a tensor of logical `shape` (numpy order): random
    bytes, with every fp16 scale field (qmoe/formats.py's d, m, dmin) near weight_size / typical quant."""
    fmt = FORMATS[qtype]
    n_blocks = int(np.prod(shape[:-1])) * (shape[-1] // fmt.block)
    raw = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    scale = weight_size / _TYPICAL_QUANT[qtype]
    for field in ("d", "m", "dmin"):
        if field in dict(fmt.fields):
            d = np.full(n_blocks, scale, dtype=np.float16) * rng.uniform(0.5, 1.5, n_blocks).astype(np.float16)
            raw[:, fmt.offset(field) : fmt.offset(field) + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // fmt.block * fmt.block_bytes)


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


def _writer(path: Path, n_layers: int) -> GGUFWriter:
    """A GGUFWriter with the bench model's metadata and vocabulary."""
    w = GGUFWriter(path, "qwen3moe")
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
    return w


def _plan(n_layers: int, n_embd: int = N_EMBD, head_dim: int = HEAD_DIM, n_ff_exp: int = N_FF_EXP,
          n_vocab: int = N_VOCAB) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """Every tensor: (name, shape in numpy order, the q4_0 mix's type)."""
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [("token_embd.weight", (n_vocab, n_embd), Q8_0)]
    for i in range(n_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (n_embd,), F32),
            (p + "attn_q.weight", (N_HEAD * head_dim, n_embd), Q8_0),
            (p + "attn_k.weight", (N_HEAD_KV * head_dim, n_embd), Q8_0),
            (p + "attn_v.weight", (N_HEAD_KV * head_dim, n_embd), Q8_0),
            (p + "attn_output.weight", (n_embd, N_HEAD * head_dim), Q8_0),
            (p + "attn_q_norm.weight", (head_dim,), F32),
            (p + "attn_k_norm.weight", (head_dim,), F32),
            (p + "ffn_norm.weight", (n_embd,), F32),
            (p + "ffn_gate_inp.weight", (N_EXPERT, n_embd), F32),
            (p + "ffn_gate_exps.weight", (N_EXPERT, n_ff_exp, n_embd), Q4_0),
            (p + "ffn_up_exps.weight", (N_EXPERT, n_ff_exp, n_embd), Q4_0),
            (p + "ffn_down_exps.weight", (N_EXPERT, n_embd, n_ff_exp), Q4_0),
        ]
    return plan + [("output_norm.weight", (n_embd,), F32), ("output.weight", (n_vocab, n_embd), Q8_0)]


def llama_cpp_types(n_layers: int, ftype: int) -> dict[str, GGMLQuantizationType]:
    """Tensor name -> the type llama.cpp's quantizer chooses for `ftype` on this model's names,
    depth and counts: a narrow f16 probe (every width 256, a vocabulary of 512) quantized by it."""
    import llama_cpp

    from qmoe.gguf_file import GGUFFile

    with tempfile.TemporaryDirectory() as tmp:
        probe, out = Path(tmp) / "probe.gguf", Path(tmp) / "probe-quantized.gguf"
        w = _writer(probe, n_layers)
        plan = _plan(n_layers, n_embd=256, head_dim=8, n_ff_exp=256, n_vocab=512)
        for name, shape, qtype in plan:
            w.add_tensor(name, np.zeros(shape, np.float32 if qtype == F32 else np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        if llama_cpp.llama_model_quantize(str(probe).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize the probe to ftype {ftype}")
        return {name: t.qtype for name, t in GGUFFile(out).tensors.items()}


def make_bench_gguf(path: str | os.PathLike, n_layers: int = 8, seed: int = 0, mix: str = "q4_0") -> Path:
    """Write the bench model to `path` (atomically: a temporary file renamed at the end)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    w = _writer(tmp, n_layers)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)

    plan = _plan(n_layers)
    if MIXES[mix] is not None:
        types = llama_cpp_types(n_layers, MIXES[mix])
        plan = [(name, shape, types[name]) for name, shape, _ in plan]

    # Scales keep activations O(1) through the stack: ~1/sqrt(fan_in) per weight.
    for name, shape, qtype in plan:
        if qtype == F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            raw_shape = (*shape[:-1], row_bytes(qtype, shape[-1]))
            w.add_tensor_info(name, raw_shape, np.dtype(np.uint8), int(np.prod(raw_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, shape, qtype in tqdm(plan, desc=f"writing {path.name}", unit="tensor"):
        if qtype == F32:
            data = norm(shape[0]) if len(shape) == 1 else (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        else:
            data = random_blocks(rng, shape, qtype, weight_size=1.0 / np.sqrt(shape[-1]) * 0.85)
        w.write_tensor_data(data)
    w.close()
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=list(MIXES), default="q4_0")
    args = parser.parse_args()
    print(make_bench_gguf(args.output, args.layers, args.seed, args.mix))


if __name__ == "__main__":
    main()
