"""Matrix products straight on raw GGUF weights, compiled by numba.

Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, IQ4_XS (qmoe/formats.py's table says how each is laid out).

    matmul(w, qtype, x, out=None)       x [T, n] @ W.T -> [T, rows]
    matmul_many([(w, qtype), ...], x)   the same for several weights, few tokens in one call
    matmul_matrix(Matrix.of(w, qtype), x)   matmul with the weight checked once, for every step
    dequantize(w, qtype)                raw [..., row] -> float32 [..., n]
    dequantize_torch(raw, qtype, n)     the same in torch ops, on any device (the CUDA tier)
    expert_ffn(gate, up, down, qtypes, x)                     one expert's SwiGLU on T tokens
    stacked_expert_ffns(StackedExperts, slots, xs)   expert_ffn of several experts of a stack,
                                        each on its own rows, the few-token ones in one call
    moe_ffn(gate_exps, up_exps, down_exps, qtypes, x, ids, weights)   routed sum over top-k experts
    stacked_moe_ffn(StackedExperts.of(gate_exps, up_exps, down_exps, qtypes), x, ids, weights)
                                        the same with the weights checked once, for every step
    ExpertGroups(ids), add_expert_output(out, groups, g, y, weights)
                                        moe_ffn's grouping of tokens by expert and its weighted
                                        sum, for callers that compute the experts one at a time
    MLPTopK(fc1, t1, b1, fc2, t2, b2, activation)(x, count)   top outputs of a 2-layer net, in one call
    rms_norm(x, weight, eps), rope(x, positions, cos, sin, dim, neox), softmax_topk(logits, k, ...)
                                        a CPU model's norms, rotations and router, one call each
    add_rms_norm(h, delta, weight, eps)   a residual add and the RMS norm after it, one call
    route_softmax_topk(x, router, k, ...)   the router's product and softmax_topk in one call
    route_moe_one(StackedExperts, x, router, k, ...)   route_softmax_topk and stacked_moe_ffn
                                        for one token, one call
    one_query_attention(q, k, v, n_keys, scale)   a decode step's attention over a KV cache
    decode_qkv(q, k, v, norms, rope, caches, ...)   a decode step's q/k norms, rotation and cache
                                        write, one call for models.base.Attention
    decode_attention(..., scale)        decode_qkv and one_query_attention in one call
    AttentionProducts(wq, wk, wv, wo)(x, ...)   decode_attention with the q, k, v and output
                                        products around it, one call for one token
    set_num_threads(n)

ops.py holds the products and dequantization, moe.py the routed-experts reduction (its
order of summation, fixed once), compiled.py everything numba compiles for them, pointwise.py
the norm, the rotation and the router, attention.py a decode step's attention, formats.py the
weight formats.

Weights are the raw views of qmoe.gguf_file (F32 float32 [rows, n], F16 float16,
BF16 uint16, block types uint8 [rows, row_bytes] in ggml's block layout) or the same
bytes as uint8; stacked expert tensors are [E, rows, ...] and `stacked[e]` is one
expert's slab. Nothing is repacked or copied: the kernels read the memory-mapped
file's blocks as they are, so an expert slab is usable the moment it is paged in.

Accuracy contract: every weight is decoded exactly (bit for bit as gguf-py's
dequantize: fp16 scales and sub-scales times integers, plus an offset for Q4_1, Q5_1,
Q2_K, Q4_K, Q5_K). Two kinds of product, chosen by `exact` (per call) or
set_exact_products (the process's default, False; Model's `exact_products`):
- exact: activations stay float32, so for every type the result equals
  x @ dequantize(W).T up to float32 summation order: relative error about 1e-6 of the
  row's sum of |w * x| (tests allow 1e-5). The F32 path therefore meets the runtime's
  1e-3 parity with transformers with a wide margin, and the quantized paths add no
  error beyond the weights' own quantization.
- integer (the default): few-token products of block formats quantize x to 8 bits per
  block of the weight's format (32 elements as llama.cpp's Q8_0, 256 as its Q8_K) and
  sum integers, as llama.cpp's CPU backend does: the result is x_hat @ dequantize(W).T
  for the quantized x_hat, to float32 rounding, so off the exact product by at most
  sum_i |w_i| * d_i / 2 (d_i = max |x| / 127 over x_i's block). On random weights and
  normal x that is a relative error of 0.5-0.8% per product (tests/test_kernels_q8.py).
  Float formats
  (F32, F16, BF16) stay float32; products of BLAS_MIN_TOKENS tokens or more multiply the
  same quantized activation with BLAS, so batch size does not change a prompt's result.
  Q8_0 experts on a CPU with VNNI (set_tile_lanes) take the same integer sums in tiles of
  tokens at any count, in another float order: a token's result never depends on its
  neighbours, though a hidden value within float rounding of an 8-bit step's midpoint can
  round to the other step than the row loops' (tests/test_kernels_q8.py).

Threads: numba's parallel loops over output rows; `set_num_threads` (CLI `-t`) sets
numba's count for the calling thread. All kernels release the GIL, so a prefetch
worker can run beside them; concurrent calls from several threads need numba's
"omp" or "tbb" threading layer (the default when either is installed), not
"workqueue". Many-token products dequantize tiles and multiply them with torch's BLAS,
whose threads follow torch.set_num_threads (ops.py says why torch and not numpy).
"""

from qmoe.kernels.attention import (
    NORM_FULL,
    NORM_HEAD,
    NORM_NONE,
    ONE_QUERY_MAX_KEYS,
    decode_attention,
    decode_qkv,
    one_query_attention,
)
from qmoe.kernels.moe import (
    ExpertGroups,
    StackedExperts,
    add_expert_output,
    expert_ffn,
    moe_ffn,
    route_moe_one,
    stacked_expert_ffns,
    stacked_moe_ffn,
)
from qmoe.kernels.ops import (
    AttentionProducts,
    Matrix,
    MLPTopK,
    dequantize,
    exact_products,
    matmul,
    matmul_many,
    matmul_matrix,
    set_exact_products,
    set_num_threads,
    set_tile_lanes,
    tile_lanes,
)
from qmoe.kernels.pointwise import add_rms_norm, rms_norm, rope, route_softmax_topk, softmax_topk
from qmoe.kernels.torch_dequant import dequantize_torch

__all__ = [
    "AttentionProducts",
    "NORM_FULL",
    "NORM_HEAD",
    "NORM_NONE",
    "ONE_QUERY_MAX_KEYS",
    "ExpertGroups",
    "MLPTopK",
    "Matrix",
    "StackedExperts",
    "add_expert_output",
    "add_rms_norm",
    "decode_attention",
    "decode_qkv",
    "dequantize",
    "dequantize_torch",
    "exact_products",
    "expert_ffn",
    "matmul",
    "matmul_many",
    "matmul_matrix",
    "moe_ffn",
    "one_query_attention",
    "rms_norm",
    "rope",
    "route_moe_one",
    "route_softmax_topk",
    "set_exact_products",
    "set_tile_lanes",
    "tile_lanes",
    "set_num_threads",
    "softmax_topk",
    "stacked_expert_ffns",
    "stacked_moe_ffn",
]
