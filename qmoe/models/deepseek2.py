"""DeepSeek-V2 (Lite and full): Multi-head Latent Attention, leading dense
blocks, shared experts beside the routed ones, routed weights scaled by
routed_scaling_factor, optional group-limited routing, YaRN RoPE.

MLA caches, per token, one compressed latent c = norm(W_kv_a x)[:kv_lora] and
one shared rotary key k_pe, instead of per-head keys and values. We keep that
cache and absorb the per-head up-projections into the query and the output:

    score[h, t, s] = (k_b[h] q_nope[t, h]) . c[s] + q_pe[t, h] . k_pe[s]
    out[t, h]      = v_b[h] (sum_s p[h, t, s] c[s])

which is the same function as expanding keys and values (transformers' way)
but reads kv_lora + rope floats per cached token instead of H * (nope + rope + v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import (
    CachedAttention,
    HParams,
    KVCache,
    Linear,
    MmapExperts,
    MoE,
    RMSNorm,
    Rope,
    SwiGLU,
    Transformer,
    assemble,
    causal_attention,
    linears,
    make_rope,
    rms_norms,
    softmax_topk,
    to_torch,
)

ARCH = "deepseek2"


@dataclass
class MLADims:
    n_head: int
    q_lora: int  # 0 for Lite: queries come straight from attn_q
    kv_lora: int
    nope: int  # per-head query/key features without position
    rope: int  # rotary features, shared by all heads on the key side
    v: int

    @classmethod
    def from_gguf(cls, f: GGUFFile, hp: HParams) -> MLADims:
        # Files from current llama.cpp describe the absorbed form in key_length and keep
        # the per-head sizes in *_mla keys; older files have the per-head sizes directly.
        qk = int(f.arch_get("attention.key_length_mla", hp.head_dim))
        v = int(f.arch_get("attention.value_length_mla", hp.head_dim_v))
        return cls(hp.n_head, int(f.arch_get("attention.q_lora_rank", 0)),
                   int(f.arch_get("attention.kv_lora_rank")), qk - hp.rope_dim, hp.rope_dim, v)


class MLAttention(CachedAttention):
    def __init__(self, f: GGUFFile, hp: HParams, d: MLADims, layer: int, rope: Rope, scale: float,
                 device: torch.device):
        p = f"blk.{layer}."
        H, qk = d.n_head, d.nope + d.rope
        if d.q_lora:
            self.wq_a = Linear(f.tensor(p + "attn_q_a.weight", (d.q_lora, hp.n_embd)), None, device)
            self.q_a_norm = RMSNorm(f.tensor(p + "attn_q_a_norm.weight", (d.q_lora,)), hp.norm_eps, device)
            self.wq_b = Linear(f.tensor(p + "attn_q_b.weight", (H * qk, d.q_lora)), None, device)
        else:
            self.wq = Linear(f.tensor(p + "attn_q.weight", (H * qk, hp.n_embd)), None, device)
        self.wkv_a = Linear(f.tensor(p + "attn_kv_a_mqa.weight", (d.kv_lora + d.rope, hp.n_embd)), None, device)
        self.kv_a_norm = RMSNorm(f.tensor(p + "attn_kv_a_norm.weight", (d.kv_lora,)), hp.norm_eps, device)
        if f.has(p + "attn_k_b.weight"):  # current llama.cpp layout: split per head
            self.k_b = to_torch(f.tensor(p + "attn_k_b.weight", (H, d.kv_lora, d.nope)), device)
            self.v_b = to_torch(f.tensor(p + "attn_v_b.weight", (H, d.v, d.kv_lora)), device)
        else:  # older layout: one kv_b, rows [head][nope then v]
            kv_b = to_torch(f.tensor(p + "attn_kv_b.weight", (H * (d.nope + d.v), d.kv_lora)), device)
            kv_b = kv_b.view(H, d.nope + d.v, d.kv_lora)
            self.k_b = kv_b[:, : d.nope].transpose(1, 2).contiguous()  # [H, kv_lora, nope]
            self.v_b = kv_b[:, d.nope:].contiguous()  # [H, v, kv_lora]
        self.wo = Linear(f.tensor(p + "attn_output.weight", (hp.n_embd, H * d.v)), None, device)
        self.d, self.layer, self.rope, self.scale = d, layer, rope, scale

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d, T = self.d, x.shape[0]
        q, kv = linears(x, self.wq_a if d.q_lora else self.wq, self.wkv_a)  # kv: [T, kv_lora + rope]
        if d.q_lora:
            q = self.wq_b(self.q_a_norm(q))
        q = q.view(T, d.n_head, d.nope + d.rope)
        q_nope, q_pe = q[..., : d.nope], self.rope(q[..., d.nope:], positions)
        c = self.kv_a_norm(kv[:, : d.kv_lora])
        k_pe = self.rope(kv[:, None, d.kv_lora:], positions)[:, 0]  # [T, rope]
        return q_nope, q_pe, c, k_pe

    def attend(self, parts: tuple[torch.Tensor, ...], cache: KVCache) -> torch.Tensor:
        d, (q_nope, q_pe, c, k_pe) = self.d, parts
        T = c.shape[0]
        c_cache, pe_cache = cache.buffers(self.layer, lambda: (
            torch.zeros(cache.n_ctx, d.kv_lora, device=c.device),
            torch.zeros(cache.n_ctx, d.rope, device=c.device),
        ))
        n_past = cache.n_past
        S = n_past + T
        c_cache[n_past:S], pe_cache[n_past:S] = c, k_pe

        q_lat = torch.einsum("thn,hln->htl", q_nope, self.k_b)  # [H, T, kv_lora]
        query = torch.cat((q_lat, q_pe.transpose(0, 1)), dim=-1)  # [H, T, kv_lora + rope]
        key = torch.cat((c_cache[:S], pe_cache[:S]), dim=-1)[None]  # [1, S, kv_lora + rope]
        o_lat = causal_attention(query, key, c_cache[None, :S], n_past, self.scale)  # [T, H * kv_lora]
        o = torch.einsum("thl,hvl->thv", o_lat.view(T, d.n_head, d.kv_lora), self.v_b)  # [T, H, v]
        return o.reshape(T, d.n_head * d.v)


def group_limited_topk(logits: torch.Tensor, k: int, n_group: int, groups_used: int, normalize: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's routing: softmax, keep the `groups_used` expert groups whose
    best expert scores highest, then top-k inside them (plain top-k when n_group <= 1)."""
    if n_group <= 1:
        return softmax_topk(logits, k, normalize, scale)
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    T, E = probs.shape
    group_best = probs.view(T, n_group, E // n_group).max(dim=-1).values  # [T, G]
    keep = torch.zeros_like(group_best).scatter_(1, torch.topk(group_best, groups_used, dim=-1).indices, 1.0)
    probs = probs * keep.repeat_interleave(E // n_group, dim=1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * scale


def build(f: GGUFFile, device: torch.device, n_ctx: int) -> Transformer:
    hp = HParams.from_gguf(f)
    d = MLADims.from_gguf(f, hp)
    if int(f.arch_get("expert_gating_func", 1)) != 1:
        raise GGUFFormatError(f"{f.path}: only softmax expert gating (DeepSeek-V2) is supported, "
                              "not sigmoid gating (DeepSeek-V3)")
    n_dense = int(f.arch_get("leading_dense_block_count", 0))
    n_shared = int(f.arch_get("expert_shared_count", 0))
    scale = float(f.arch_get("expert_weights_scale", 1.0))
    normalize = bool(f.arch_get("expert_weights_norm", False))
    n_group = int(f.arch_get("expert_group_count", 1))
    groups_used = int(f.arch_get("expert_group_used_count", n_group))

    # YaRN as DeepSeek uses it: mscale == mscale_all_dim, so cos/sin keep magnitude 1
    # and the whole correction moves into the softmax scale, squared.
    softmax_scale = 1.0 / math.sqrt(d.nope + d.rope)
    if hp.rope_scaling.get("type") == "yarn" and "yarn_log_multiplier" in hp.rope_scaling:
        factor = float(hp.rope_scaling.get("factor", 1.0))
        mscale = 1.0 + float(hp.rope_scaling["yarn_log_multiplier"]) * math.log(factor) if factor > 1 else 1.0
        softmax_scale *= mscale * mscale
        hp.rope_scaling.setdefault("attn_factor", 1.0)
    rope = make_rope(hp, n_ctx, "norm", device)
    experts = MmapExperts(f, hp, list(range(n_dense, hp.n_layer)))

    def route(logits: torch.Tensor):
        return group_limited_topk(logits, hp.n_expert_used, n_group, groups_used, normalize, scale)

    def ffn(i: int) -> MoE | SwiGLU:
        if i < n_dense:
            return SwiGLU(f, f"blk.{i}.", "", hp.n_embd, hp.n_ff, device)
        shared = SwiGLU(f, f"blk.{i}.", "_shexp", hp.n_embd, hp.n_ff_exp * n_shared, device) if n_shared else None
        return MoE(f, hp, i, route, experts, device, shared=shared)

    return assemble(
        f, hp, device, rms_norms(f, hp, device),
        attention=lambda i: MLAttention(f, hp, d, i, rope, softmax_scale, device),
        ffn=ffn,
    )
