"""The pieces every architecture shares: hyperparameters, linear layers over raw
GGUF weights, norms, RoPE, attention with a KV cache, SwiGLU FFNs, the routed
MoE layer, and the block loop.

An architecture file (qwen3moe.py, deepseek2.py, ...) only says how its blocks
are assembled from these parts and how its router turns logits into experts;
the forward pass itself lives here, once:

    h = embed(tokens)
    for each block:
        x = attn_norm(h)                 # the pre-attention activation the predictors read
        h = h + attention(x)
        h = h + ffn(ffn_norm(h))         # dense SwiGLU, or router -> k experts (+ shared)
    logits = output(output_norm(h))

Activations are float32 torch tensors of shape [T, n_embd] (T = tokens of this
pass). On the CPU the matrix products run in the numba kernels straight on the
quantized blocks; on CUDA dense weights are dequantized once into GPU memory and
the experts stay quantized in host memory (computed on the CPU, like llama.cpp's
--cpu-moe) unless an expert store gives them a fast tier.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from qmoe import kernels
from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import GGUFFile, Tensor

# ----------------------------------------------------------------------------- hyperparameters


@dataclass
class HParams:
    """What every architecture reads from `{arch}.*` metadata.

    Architecture-specific extras (MLA ranks, shared experts, ...) are read by the
    architecture file itself, next to the code that uses them.
    """

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim: int  # of keys (and queries)
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    n_ff: int  # dense FFN width (leading dense blocks); 0 when there are none
    n_ff_exp: int  # one expert's FFN width
    norm_eps: float
    rope_base: float
    rope_dim: int
    rope_scaling: dict = field(default_factory=dict)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> HParams:
        n_embd = int(f.arch_get("embedding_length"))
        n_head = int(f.arch_get("attention.head_count"))
        head_dim = int(f.arch_get("attention.key_length", n_embd // n_head))
        n_ff = f.arch_get("feed_forward_length", 0)
        if isinstance(n_ff, list):  # llama.cpp allows a per-layer list
            n_ff = max(n_ff)
        scaling = {}
        for key in ("type", "factor", "original_context_length", "yarn_log_multiplier",
                    "yarn_beta_fast", "yarn_beta_slow", "attn_factor"):
            value = f.arch_get(f"rope.scaling.{key}", None)
            if value is not None:
                scaling[key] = value
        n_expert = int(f.arch_get("expert_count"))
        hp = cls(
            arch=f.arch,
            n_vocab=f.tensor("token_embd.weight").shape[0],
            n_embd=n_embd,
            n_layer=int(f.arch_get("block_count")),
            n_ctx_train=int(f.arch_get("context_length")),
            n_head=n_head,
            n_head_kv=int(f.arch_get("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            head_dim_v=int(f.arch_get("attention.value_length", head_dim)),
            n_expert=n_expert,
            n_expert_used=int(f.arch_get("expert_used_count")),
            n_ff=int(n_ff),
            n_ff_exp=int(f.arch_get("expert_feed_forward_length", n_ff)),
            norm_eps=float(f.arch_get("attention.layer_norm_rms_epsilon")),
            rope_base=float(f.arch_get("rope.freq_base", 10000.0)),
            rope_dim=int(f.arch_get("rope.dimension_count", head_dim)),
            rope_scaling=scaling,
        )
        if not 0 < hp.n_expert_used <= hp.n_expert:
            raise GGUFFormatError(
                f"{f.path}: {f.arch}.expert_used_count = {hp.n_expert_used} must be in 1..{hp.n_expert}"
            )
        return hp


# ----------------------------------------------------------------------------- weights


def to_numpy(t: Tensor) -> np.ndarray:
    """A tensor dequantized to float32 (for small tensors: norms, biases, routers)."""
    return kernels.dequantize(t.data.reshape(-1, t.data.shape[-1]), t.qtype).reshape(t.shape)


def to_torch(t: Tensor, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(to_numpy(t), dtype=np.float32)).to(device)


class Linear:
    """y = x @ W.T (+ b) with W kept as its raw GGUF view (no copy on the CPU).

    On CUDA the weight is dequantized once into GPU memory (fp16, or fp32 for an
    f32 file) because GPU matmuls on dequantized weights beat anything we could
    do on quantized blocks from Python.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, device: torch.device):
        self.weight = weight
        self.device = device
        self.bias = to_torch(bias, device) if bias is not None else None
        self.bias_np = self.bias.numpy() if self.bias is not None and device.type == "cpu" else None
        self.w_gpu = None
        self.matrix = kernels.Matrix.of(weight.data, weight.qtype, weight.name) if device.type == "cpu" else None
        if device.type == "cuda":
            dtype = torch.float32 if weight.qtype == GGMLQuantizationType.F32 else torch.float16
            self.w_gpu = to_torch(weight, device).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.w_gpu is not None:
            return self.add_bias(F.linear(x.to(self.w_gpu.dtype), self.w_gpu).float())
        return self.add_bias(torch.from_numpy(kernels.matmul_matrix(self.matrix, _np(x))))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


def linears(x: torch.Tensor, *layers: Linear) -> list[torch.Tensor]:
    """[layer(x) for each layer]; on the CPU their products run together (kernels.matmul_many)."""
    if any(layer.w_gpu is not None for layer in layers):
        return [layer(x) for layer in layers]
    return [torch.from_numpy(y) for y in cpu_linears(x, *layers)]


def cpu_linears(x: torch.Tensor, *layers: Linear) -> list[np.ndarray]:
    """linears on the CPU, as numpy arrays: for callers that go on in compiled code."""
    ys = kernels.matmul_many([layer.matrix for layer in layers], _np(x))
    return [y if layer.bias_np is None else y + layer.bias_np for layer, y in zip(layers, ys)]


_NO_WEIGHT = np.empty(0, np.float32)  # a kernel's norm weight where there is no norm


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


class Embedding:
    """Token embedding lookup that dequantizes only the rows it is asked for."""

    def __init__(self, weight: Tensor, device: torch.device):
        self.weight = weight
        self.rows = np.asarray(weight.data)  # a plain view: indexing a np.memmap costs more than the row
        self.device = device

    def __call__(self, tokens: np.ndarray) -> torch.Tensor:  # [T] -> [T, n_embd]
        rows = self.rows[tokens]
        return torch.from_numpy(kernels.dequantize(rows, self.weight.qtype)).to(self.device)


# ----------------------------------------------------------------------------- norms


class RMSNorm:
    """On the CPU one compiled call (kernels.rms_norm: a decode step's torch ops cost more to
    launch than to run), elsewhere torch."""

    def __init__(self, weight: Tensor, eps: float, device: torch.device):
        self.weight = to_torch(weight, device)
        self.weight_np = self.weight.numpy() if device.type == "cpu" else None
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_np is not None:
            return torch.from_numpy(kernels.rms_norm(x.numpy(), self.weight_np, self.eps))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def add_then_norm(h: torch.Tensor, delta: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)): a residual add and the norm after it, for an RMS norm on the
    CPU in one compiled call (kernels.add_rms_norm; a torch add and a norm call in a decode step
    each started slowly after a weight product), the same sums either way."""
    if isinstance(norm, RMSNorm) and norm.weight_np is not None:
        h, x = kernels.add_rms_norm(h.numpy(), delta.numpy(), norm.weight_np, norm.eps)
        return torch.from_numpy(h), torch.from_numpy(x)
    h = h + delta
    return h, norm(h)


class LayerNorm:
    """LayerNorm with weight and bias (Phi-MoE)."""

    def __init__(self, weight: Tensor, bias: Tensor, eps: float, device: torch.device):
        self.weight = to_torch(weight, device)
        self.bias = to_torch(bias, device)
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(dim: int, base: float, scaling: dict, n_ctx_train: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude for a RoPE variant.

    "yarn" follows the YaRN paper as transformers implements it: frequencies
    below the ramp are interpolated by `factor`, those above are kept, and the
    magnitude is 0.1*ln(factor)+1 unless the file pins `attn_factor`.
    """
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = scaling.get("type", "none")
    factor = float(scaling.get("factor", 1.0))
    if kind in ("none", None) or factor == 1.0:
        return inv, float(scaling.get("attn_factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "yarn":
        orig_ctx = int(scaling.get("original_context_length", n_ctx_train))
        beta_fast = float(scaling.get("yarn_beta_fast", 32.0))
        beta_slow = float(scaling.get("yarn_beta_slow", 1.0))

        def correction_dim(n_rot: float) -> float:
            return dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        keep = 1.0 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate
        inv = inv / factor * (1 - keep) + inv * keep
        magnitude = float(scaling.get("attn_factor", 0.1 * math.log(factor) + 1.0))
        return inv, magnitude
    raise GGUFFormatError(f"unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")


class Rope:
    """Precomputed cos/sin for positions [0, n_ctx) and both pair layouts.

    "neox" rotates (x[i], x[i + d/2]) pairs (Qwen, OLMoE, Phi); "norm" rotates
    adjacent (x[2i], x[2i+1]) pairs (llama with permuted Q/K, DeepSeek's MLA).
    Only the first `dim` features of a head are rotated.
    """

    def __init__(self, dim: int, inv_freq: np.ndarray, magnitude: float, n_ctx: int, style: str,
                 device: torch.device):
        angles = np.outer(np.arange(n_ctx, dtype=np.float64), inv_freq)  # [n_ctx, dim/2]
        self.cos = torch.from_numpy((np.cos(angles) * magnitude).astype(np.float32)).to(device)
        self.sin = torch.from_numpy((np.sin(angles) * magnitude).astype(np.float32)).to(device)
        self.dim = dim
        self.style = style
        self.cpu = device.type == "cpu"  # one compiled call there (kernels.rope), as RMSNorm
        self.tables = (self.cos.numpy(), self.sin.numpy()) if self.cpu else None  # what the kernels read

    def for_position(self, last: int) -> Rope:
        """The rotation of a pass whose last token is at `last`: this one (Phi's LongRope picks one of two)."""
        return self

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, head_dim] -> same shape, the first `dim` features rotated."""
        if self.cpu:
            return torch.from_numpy(kernels.rope(x.numpy(), positions.numpy(), *self.tables, self.dim,
                                                 self.style == "neox"))
        cos = self.cos[positions][:, None, :]  # [T, 1, dim/2]
        sin = self.sin[positions][:, None, :]
        rot, rest = x[..., : self.dim], x[..., self.dim:]
        if self.style == "neox":
            a, b = rot[..., : self.dim // 2], rot[..., self.dim // 2:]
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


# ----------------------------------------------------------------------------- attention


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int,
                     scale: float) -> torch.Tensor:
    """Scaled dot-product attention of T new queries over n_past + T keys.

    q: [H, T, d], k: [H_kv, >= S, d], v: [H_kv, >= S, d_v], of which the first S = n_past + T
    positions are attended (a layer's whole cache buffers can be passed); H a multiple of H_kv
    (grouped-query attention). Returns [T, H * d_v].
    """
    T = q.shape[1]
    S = n_past + T
    if T == 1 and q.device.type == "cpu":
        # One new token (decode) attends to everything before it. Up to a few hundred cached
        # tokens one compiled call, where torch's ops cost more to launch than to run; beyond,
        # torch's grouped products (kernels/attention.py has the figures). Either beats torch's
        # CPU SDPA for a single query: 12.7 ms against 0.65 ms for these two products at 1,500
        # cached tokens with 32 query / 4 KV heads. The heads that share a K/V head are one product
        # with it: query head h reads K/V head h // (H / H_kv), as in SDPA's GQA.
        if S <= kernels.ONE_QUERY_MAX_KEYS and k.is_contiguous() and v.is_contiguous():
            return torch.from_numpy(kernels.one_query_attention(q[:, 0].numpy(), k.numpy(), v.numpy(), S, scale)
                                    ).reshape(1, -1)
        h, d = q.shape[0], q.shape[2]
        h_kv = k.shape[0]
        scores = (q.reshape(h_kv, h // h_kv, d) @ k[:, :S].transpose(1, 2)) * scale  # [H_kv, H / H_kv, S]
        return (torch.softmax(scores, dim=-1) @ v[:, :S]).reshape(1, -1)  # [1, H * d_v]
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=n_past)
    out = F.scaled_dot_product_attention(q, k[:, :S], v[:, :S], attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[0] != q.shape[0])  # [H, T, d_v]
    return out.transpose(0, 1).reshape(T, -1)


class KVCache:
    """Per-layer key/value buffers sized to the context, filled as tokens arrive.

    Architectures decide what they cache (full K/V, or MLA's compressed latent):
    each layer's buffers are allocated by the attention module of that layer.
    """

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.n_past = 0
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def buffers(self, layer: int, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if layer not in self.layers:
            self.layers[layer] = make()
        return self.layers[layer]


class CachedAttention(ABC):
    """Attention over a KV cache, in three parts: project, attend, output projection.

    A pass of one sequence runs them in a row. A batched decode step
    (Transformer.forward_step) holds one new token of each of B sequences: it
    projects all B tokens in one product per weight, attends each token against its
    own sequence's cache, and projects the B outputs back in one product, so the
    attention weights are read once per step, not once per sequence.

    project(x, positions) -> a tuple of tensors whose first dimension is the token;
    attend(parts, cache) -> [T, H * d_v], writing the new tokens into `cache`;
    wo: the output projection.
    """

    wo: Linear

    @abstractmethod
    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    @abstractmethod
    def attend(self, parts: tuple[torch.Tensor, ...], cache: KVCache) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        return self.wo(self.attend(self.project(x, positions), cache))

    def step(self, x: torch.Tensor, caches: list[KVCache], positions: torch.Tensor) -> torch.Tensor:
        """x: [B, n_embd], token b of the sequence whose cache is caches[b], at positions[b]."""
        parts = self.project(x, positions)
        outs = [self.attend(tuple(p[b:b + 1] for p in parts), cache) for b, cache in enumerate(caches)]
        return self.wo(torch.cat(outs))


class Attention(CachedAttention):
    """Multi-head attention with grouped K/V heads, the variant most MoE models use.

    Options cover the architectures' differences: biases (Phi), RMS norms on
    q/k per head (Qwen3) or over the whole projection (OLMoE), clamping of
    q/k/v (OLMoE's clip_qkv).
    """

    def __init__(self, f: GGUFFile, hp: HParams, layer: int, rope: Rope, device: torch.device,
                 qk_norm: str | None = None, biases: bool = False, clamp: float | None = None):
        p = f"blk.{layer}."

        def linear(name: str, rows: int, cols: int) -> Linear:
            w = f.tensor(p + name + ".weight", (rows, cols))
            b = f.tensor(p + name + ".bias", (rows,)) if biases else None
            return Linear(w, b, device)

        self.hp, self.layer, self.rope, self.device = hp, layer, rope, device
        self.wq = linear("attn_q", hp.n_head * hp.head_dim, hp.n_embd)
        self.wk = linear("attn_k", hp.n_head_kv * hp.head_dim, hp.n_embd)
        self.wv = linear("attn_v", hp.n_head_kv * hp.head_dim_v, hp.n_embd)
        self.wo = linear("attn_output", hp.n_embd, hp.n_head * hp.head_dim_v)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm = RMSNorm(f.tensor(p + "attn_q_norm.weight", (hp.head_dim,)), hp.norm_eps, device)
            self.k_norm = RMSNorm(f.tensor(p + "attn_k_norm.weight", (hp.head_dim,)), hp.norm_eps, device)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(f.tensor(p + "attn_q_norm.weight", (hp.n_head * hp.head_dim,)),
                                  hp.norm_eps, device)
            self.k_norm = RMSNorm(f.tensor(p + "attn_k_norm.weight", (hp.n_head_kv * hp.head_dim,)),
                                  hp.norm_eps, device)
        self.clamp = clamp
        self.scale = 1.0 / math.sqrt(hp.head_dim)
        # one token's attention as one compiled call, products included (kernels.AttentionProducts)
        self.products = None if device.type != "cpu" or biases else kernels.AttentionProducts(
            self.wq.matrix, self.wk.matrix, self.wv.matrix, self.wo.matrix)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hp, T = self.hp, x.shape[0]
        q, k, v = linears(x, self.wq, self.wk, self.wv)
        if self.clamp:
            q, k, v = (t.clamp(-self.clamp, self.clamp) for t in (q, k, v))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(T, hp.n_head, hp.head_dim)
        k = k.view(T, hp.n_head_kv, hp.head_dim)
        v = v.view(T, hp.n_head_kv, hp.head_dim_v)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(q, positions), self.rope(k, positions), v

    def __call__(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.device.type == "cpu":
            return self._decode(x, cache)
        return super().__call__(x, cache, positions)

    def _decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token's attention on the CPU, output product included: after the q, k, v products, one compiled call
        for the norms, the rotation and the cache write (kernels.decode_qkv, the same operations in
        the same order), then the attention, in the same call while the context is short. A decode
        step's small torch and numba calls each ran slowly after the weight products had run (the
        first call of each kind after a few milliseconds of other work took 30-190 us on the
        development VM instead of 2-8): one call took the time between a layer's q/k/v and
        output products from 0.6 to 0.3 ms. While the context is short (the compiled attention's) and
        the layer has no biases, the products go into the same call too (kernels.AttentionProducts):
        the attention's 0.3 ms between kernels became 0.1."""
        hp = self.hp
        k_cache, v_cache = self._caches(cache)
        if self.qk_norm is None:
            norm, q_norm, k_norm = kernels.NORM_NONE, _NO_WEIGHT, _NO_WEIGHT
        else:
            norm = kernels.NORM_HEAD if self.qk_norm == "head" else kernels.NORM_FULL
            q_norm, k_norm = self.q_norm.weight_np, self.k_norm.weight_np
        rope = self.rope.for_position(cache.n_past)
        norm_rope = (q_norm, k_norm, norm, hp.norm_eps, self.clamp or 0.0, *rope.tables, cache.n_past, rope.dim,
                     rope.style == "neox", k_cache.numpy(), v_cache.numpy())
        short = cache.n_past < kernels.ONE_QUERY_MAX_KEYS
        if short and self.products is not None and self.products.fits():
            return torch.from_numpy(self.products(x.detach().numpy(), hp.n_head, *norm_rope, self.scale))
        q, k, v = cpu_linears(x, self.wq, self.wk, self.wv)
        qkv = (q.reshape(hp.n_head, hp.head_dim), k.reshape(hp.n_head_kv, hp.head_dim),
               v.reshape(hp.n_head_kv, hp.head_dim_v))
        if short:  # the attention in the same call as the norms (causal_attention's)
            return self.wo(torch.from_numpy(kernels.decode_attention(*qkv, *norm_rope, self.scale).reshape(1, -1)))
        q = kernels.decode_qkv(*qkv, *norm_rope)
        return self.wo(causal_attention(torch.from_numpy(q)[:, None], k_cache, v_cache, cache.n_past, self.scale))

    def _caches(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hp
        return cache.buffers(self.layer, lambda: (
            torch.zeros(hp.n_head_kv, cache.n_ctx, hp.head_dim, device=self.device),
            torch.zeros(hp.n_head_kv, cache.n_ctx, hp.head_dim_v, device=self.device),
        ))

    def attend(self, parts: tuple[torch.Tensor, ...], cache: KVCache) -> torch.Tensor:
        q, k, v = parts
        T = q.shape[0]
        k_cache, v_cache = self._caches(cache)
        n_past = cache.n_past
        k_cache[:, n_past:n_past + T] = k.transpose(0, 1)
        v_cache[:, n_past:n_past + T] = v.transpose(0, 1)
        return causal_attention(q.transpose(0, 1), k_cache, v_cache, n_past, self.scale)


# ----------------------------------------------------------------------------- feed-forward


class SwiGLU:
    """Dense FFN: down(silu(gate(x)) * up(x)). Leading dense blocks and shared experts."""

    def __init__(self, f: GGUFFile, prefix: str, suffix: str, n_embd: int, n_ff: int, device: torch.device):
        self.gate = Linear(f.tensor(f"{prefix}ffn_gate{suffix}.weight", (n_ff, n_embd)), None, device)
        self.up = Linear(f.tensor(f"{prefix}ffn_up{suffix}.weight", (n_ff, n_embd)), None, device)
        self.down = Linear(f.tensor(f"{prefix}ffn_down{suffix}.weight", (n_embd, n_ff)), None, device)

    def __call__(self, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        """observer: unused (a dense FFN has no routing to report); the signature MoE has."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The common router: softmax over all experts, keep the k largest.

    Returns (expert ids [T, k] int64, weights [T, k] float32). `normalize`
    rescales the k weights to sum to 1 (Qwen3 norm_topk_prob, Mixtral);
    `scale` multiplies them (DeepSeek's routed_scaling_factor).
    On the CPU one compiled call (kernels.softmax_topk), as the norms.
    """
    if logits.device.type == "cpu":
        ids, weights = kernels.softmax_topk(logits.float().numpy(), k, normalize, scale)
        return torch.from_numpy(ids), torch.from_numpy(weights)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * scale


Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SoftmaxRouter:
    """The common router (softmax_topk with its settings) as a value, not a closure, so that MoE
    can see it and, for one token on the CPU, run it together with the router's product in one
    compiled call (kernels.route_softmax_topk)."""

    k: int
    normalize: bool
    scale: float = 1.0

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_topk(logits, self.k, self.normalize, self.scale)


class ExpertCompute(Protocol):
    """Computes the routed experts' weighted sum; the expert store implements it too."""

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray: ...

    def over_segments(self, layer: int, xs: list[np.ndarray], ids: list[np.ndarray],
                      weights: list[np.ndarray]) -> list[np.ndarray]:
        """What __call__ gives for each segment, computed together (layer-major prefill): a store
        brings each expert in once for all of them. Each result equals __call__'s bit for bit."""


class MmapExperts:
    """Experts computed by the numba kernels straight from the memory-mapped file."""

    def __init__(self, f: GGUFFile, hp: HParams, layers: list[int]):
        self.tensors = {}  # layer -> its gate, up, down Tensors (the store reads their place in the file)
        self.stacked = {}  # layer -> the same checked once for the kernels
        for i in layers:
            p = f"blk.{i}."
            gate = f.tensor(p + "ffn_gate_exps.weight", (hp.n_expert, hp.n_ff_exp, hp.n_embd))
            up = f.tensor(p + "ffn_up_exps.weight", (hp.n_expert, hp.n_ff_exp, hp.n_embd))
            down = f.tensor(p + "ffn_down_exps.weight", (hp.n_expert, hp.n_embd, hp.n_ff_exp))
            self.tensors[i] = (gate, up, down)
            self.stacked[i] = kernels.StackedExperts.of(gate.data, up.data, down.data,
                                                        (gate.qtype, up.qtype, down.qtype), f"block {i}'s experts")

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return kernels.stacked_moe_ffn(self.stacked[layer], x, ids, weights)

    def over_segments(self, layer: int, xs: list[np.ndarray], ids: list[np.ndarray],
                      weights: list[np.ndarray]) -> list[np.ndarray]:
        return [self(layer, x, i, w) for x, i, w in zip(xs, ids, weights)]  # the map is read in place


class Observer(Protocol):
    """Hooks into the forward pass: calibration recording, prefetch, statistics."""

    def pre_attention(self, layer: int, x: torch.Tensor) -> None: ...

    def attended(self, layer: int, h: torch.Tensor) -> None:
        """Block `layer`'s residual stream right after its attention, any block (lookahead prefetch)."""

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None: ...


class MoE:
    """Router -> top-k experts -> weighted sum (+ shared experts)."""

    def __init__(self, f: GGUFFile, hp: HParams, layer: int, route: Router, experts: ExpertCompute,
                 device: torch.device, shared: SwiGLU | None = None):
        self.layer = layer
        self.router = to_torch(f.tensor(f"blk.{layer}.ffn_gate_inp.weight", (hp.n_expert, hp.n_embd)), device)
        self.router_t = self.router.T  # [n_embd, n_expert]: the view made once, not once per token
        self.cpu = device.type == "cpu"
        self.router_np = self.router.numpy() if self.cpu else None
        self.route = route
        self.experts = experts
        self.shared = shared

    def __call__(self, x: torch.Tensor, observer: Observer | None) -> torch.Tensor:
        stacked = self._one_call(x)
        if stacked is not None:  # a decode step on the mapped file: router and experts in one compiled call
            r = self.route
            logits, ids, _, out = kernels.route_moe_one(stacked, x.detach().numpy(), self.router_np, r.k, r.normalize, r.scale)
            if observer is not None:
                observer.routed(self.layer, x, torch.from_numpy(logits), torch.from_numpy(ids))
            return self._finish(x, out)
        ids, weights = self.choose(x, observer)
        return self._finish(x, self.experts(self.layer, _np(x), ids, weights))

    def _one_call(self, x: torch.Tensor) -> kernels.StackedExperts | None:
        """The layer's stacked experts when one token's routing and experts can run as one
        compiled call (kernels.route_moe_one): a softmax router, on the CPU, with the experts
        read from the mapped file (an expert store brings them in between the two)."""
        if self.cpu and x.shape[0] == 1 and isinstance(self.route, SoftmaxRouter) \
                and isinstance(self.experts, MmapExperts):
            return self.experts.stacked[self.layer]
        return None

    def choose(self, x: torch.Tensor, observer: Observer | None) -> tuple[np.ndarray, np.ndarray]:
        """The routing of x [T, n_embd]: expert ids int64 [T, k] (the kernels' type) and their weights
        float32 [T, k]."""
        if self.cpu and x.shape[0] == 1 and isinstance(self.route, SoftmaxRouter):
            # a decode step: the product and the top-k in one compiled call (2 torch and 1 numba
            # calls otherwise, each slow to start after the weight products: 210 -> 140 us a layer)
            r = self.route
            logits, ids, weights = kernels.route_softmax_topk(_np(x), self.router_np, r.k, r.normalize, r.scale)
            if observer is not None:
                observer.routed(self.layer, x, torch.from_numpy(logits), torch.from_numpy(ids))
            return ids, weights
        logits = x @ self.router_t  # [T, n_expert]
        ids, weights = self.route(logits)
        if observer is not None:
            observer.routed(self.layer, x, logits, ids)
        if not self.cpu:
            ids, weights = ids.cpu(), weights.cpu()
        return np.ascontiguousarray(ids.numpy(), dtype=np.int64), np.ascontiguousarray(weights.numpy(), dtype=np.float32)

    def over_segments(self, xs: list[torch.Tensor], choices: list[tuple[np.ndarray, np.ndarray]]
                      ) -> list[torch.Tensor]:
        """__call__ for each segment (routed already by `choose`), the experts computed together."""
        outs = self.experts.over_segments(self.layer, [_np(x) for x in xs], [c[0] for c in choices],
                                          [c[1] for c in choices])
        return [self._finish(x, out) for x, out in zip(xs, outs)]

    def _finish(self, x: torch.Tensor, out: np.ndarray) -> torch.Tensor:
        y = torch.from_numpy(out)
        if not self.cpu:
            y = y.to(x.device)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


# ----------------------------------------------------------------------------- the model


@dataclass
class Block:
    attn_norm: Callable[[torch.Tensor], torch.Tensor]
    attn: CachedAttention
    ffn_norm: Callable[[torch.Tensor], torch.Tensor]
    ffn: MoE | SwiGLU  # called alike: ffn(x, observer)

    @property
    def routed(self) -> bool:
        """A block with routed experts (not a leading dense one): what observers and the store are about."""
        return isinstance(self.ffn, MoE)


class Transformer:
    """A decoder-only MoE transformer assembled from the parts above."""

    def __init__(self, hp: HParams, embed: Embedding, blocks: list[Block],
                 output_norm: Callable[[torch.Tensor], torch.Tensor], output: Linear, device: torch.device):
        self.hp, self.embed, self.blocks = hp, embed, blocks
        self.output_norm, self.output, self.device = output_norm, output, device

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.routed]

    def forward(self, tokens: np.ndarray, cache: KVCache, observer: Observer | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Run T tokens at positions n_past.. and return logits [T or 1, n_vocab]."""
        T = len(tokens)
        # numpy's arange made into a tensor, not torch.arange: right after a step's weight products a
        # torch op costs ~100 us (its code is out of cache) and from_numpy runs in the step anyway
        positions = torch.from_numpy(np.arange(cache.n_past, cache.n_past + T, dtype=np.int64))
        if self.device.type != "cpu":
            positions = positions.to(self.device)
        h = self._blocks(tokens, lambda attn, x: attn(x, cache, positions), observer)
        cache.n_past += T
        if not all_logits:
            h = h[-1:]
        return self.output(self.output_norm(h))

    def forward_step(self, tokens: np.ndarray, caches: list[KVCache],
                     observer: Observer | None = None) -> torch.Tensor:
        """One decode step of B sequences at once: token b follows what caches[b] holds.

        Returns logits [B, n_vocab]. Each token attends to its own sequence's cache
        (CachedAttention.step); every other product (attention projections, dense FFNs,
        routers, the LM head, and the routed experts, grouped by expert across the B
        tokens) runs over all B tokens together, so an expert that several sequences
        route to is read once for all of them. Row b equals what `forward` gives
        sequence b alone, up to the rounding of products over B rows instead of one.
        """
        positions = torch.tensor([cache.n_past for cache in caches], device=self.device)
        h = self._blocks(tokens, lambda attn, x: attn.step(x, caches, positions), observer)
        for cache in caches:
            cache.n_past += 1
        return self.output(self.output_norm(h))

    def _blocks(self, tokens: np.ndarray, attend: Callable[[CachedAttention, torch.Tensor], torch.Tensor],
                observer: Observer | None) -> torch.Tensor:
        """The residual stream [T, n_embd] after every block; `attend(block.attn, x)` runs attention."""
        h = self.embed(np.asarray(tokens))  # [T, n_embd]
        x = self.blocks[0].attn_norm(h)
        for i, block in enumerate(self.blocks):
            if observer is not None and block.routed:
                observer.pre_attention(i, x)
            h, y = add_then_norm(h, attend(block.attn, x), block.ffn_norm)
            if observer is not None:
                observer.attended(i, h)
            ffn_out = block.ffn(y, observer)
            if i + 1 < len(self.blocks):  # the residual add with the next block's first norm
                h, x = add_then_norm(h, ffn_out, self.blocks[i + 1].attn_norm)
            else:
                h = h + ffn_out
        return h

    def forward_layer_major(self, segments: list[tuple[np.ndarray, KVCache]], observer: Observer | None = None,
                            all_logits: bool = False) -> list[torch.Tensor]:
        """`forward` over several segments, layer by layer: each block takes every segment before the next.

        segments: (tokens, cache) pairs, each run after what its cache holds; segments that
        share a cache are consecutive parts of one sequence (a long prompt's batches), in
        order; others are separate sequences (calibration windows). In each block, every
        segment's attention runs as `forward` runs it, then the routed experts of all
        segments' tokens in one `MoE.over_segments` call, so that an expert store brings each
        expert in once per block rather than once per segment. The logits equal `forward`'s on
        each segment in turn, bit for bit (tests/test_layer_major.py); the observer sees each
        segment's pre_attention, attended and routed calls in that order, block by block.
        """
        ends: dict[int, int] = {}
        starts = []
        for tokens, cache in segments:
            starts.append(ends.get(id(cache), cache.n_past))
            ends[id(cache)] = starts[-1] + len(tokens)
        positions = [torch.arange(s, s + len(t), device=self.device) for s, (t, _) in zip(starts, segments)]
        hs = [self.embed(np.asarray(tokens)) for tokens, _ in segments]
        for i, block in enumerate(self.blocks):
            ys, choices = [], []
            for j, (_, cache) in enumerate(segments):
                cache.n_past = starts[j]
                x = block.attn_norm(hs[j])
                if observer is not None and block.routed:
                    observer.pre_attention(i, x)
                hs[j] = hs[j] + block.attn(x, cache, positions[j])
                if observer is not None:
                    observer.attended(i, hs[j])
                y = block.ffn_norm(hs[j])
                if block.routed:
                    ys.append(y)
                    choices.append(block.ffn.choose(y, observer))
                else:
                    hs[j] = hs[j] + block.ffn(y, observer)
            if block.routed:
                hs = [h + out for h, out in zip(hs, block.ffn.over_segments(ys, choices))]
        for _, cache in segments:
            cache.n_past = ends[id(cache)]
        return [self.output(self.output_norm(h if all_logits else h[-1:])) for h in hs]


Norm = Callable[[torch.Tensor], torch.Tensor]
NormMaker = Callable[[str, "int | None"], Norm]


def rms_norms(f: GGUFFile, hp: HParams, device: torch.device) -> NormMaker:
    """make(name, layer) -> the RMSNorm `blk.{layer}.{name}` (or `{name}` when layer is None)."""

    def make(name: str, layer: int | None) -> Norm:
        prefix = "" if layer is None else f"blk.{layer}."
        return RMSNorm(f.tensor(f"{prefix}{name}.weight", (hp.n_embd,)), hp.norm_eps, device)

    return make


def make_rope(hp: HParams, n_ctx: int, style: str, device: torch.device) -> Rope:
    inv_freq, magnitude = rope_inv_freq(hp.rope_dim, hp.rope_base, hp.rope_scaling, hp.n_ctx_train)
    return Rope(hp.rope_dim, inv_freq, magnitude, n_ctx, style, device)


def assemble(f: GGUFFile, hp: HParams, device: torch.device, norm: NormMaker,
             attention: Callable[[int], Callable], ffn: Callable[[int], MoE | SwiGLU],
             output_bias: bool = False) -> Transformer:
    """Blocks [attn_norm, attention, ffn_norm, ffn] for every layer, plus embedding and head.

    The LM head is `output.weight`, or the token embedding for tied models.
    """
    blocks = [Block(norm("attn_norm", i), attention(i), norm("ffn_norm", i), ffn(i)) for i in range(hp.n_layer)]
    head = "output.weight" if f.has("output.weight") else "token_embd.weight"
    output = Linear(f.tensor(head, (hp.n_vocab, hp.n_embd)),
                    f.tensor("output.bias", (hp.n_vocab,)) if output_bias else None, device)
    return Transformer(hp, Embedding(f.tensor("token_embd.weight"), device), blocks,
                       norm("output_norm", None), output, device)
