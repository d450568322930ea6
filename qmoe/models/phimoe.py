"""Phi-MoE (Phi-3.5-MoE, Phi-mini-MoE): LayerNorms with bias, biased attention
projections and LM head, NEOX RoPE (LongRoPE factors when the file has them),
and top-2 routing by transformers' "sparsemixer" (inference branch).

llama.cpp approximates the router with a softmax over the top 2; we follow
transformers exactly, since the two can pick different weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import (
    Attention,
    HParams,
    LayerNorm,
    MmapExperts,
    MoE,
    Rope,
    Transformer,
    assemble,
    make_rope,
    to_numpy,
)

ARCH = "phimoe"

# transformers' router_jitter_noise for every released Phi-MoE; converted files record theirs.
DEFAULT_JITTER = 0.01


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 experts and their weights as transformers' sparsemixer computes them.

    Each pick is the best remaining expert; its weight is a softmax over the
    experts whose logit lies within 2*jitter_eps (relative) of that pick's,
    evaluated at the pick. So a clear winner gets weight ~1, a tie ~1/2.
    """
    scores = logits.float()
    picks, weights = [], []
    remaining = scores
    for _ in range(2):
        best, best_id = remaining.max(dim=-1, keepdim=True)  # [T, 1]
        factor = scores.abs().clamp(min=best)
        far = ((best - scores) / factor) > 2 * jitter_eps
        gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)
        picks.append(best_id)
        weights.append(gates.gather(-1, best_id))
        remaining = remaining.scatter(-1, best_id, float("-inf"))
    return torch.cat(picks, dim=-1), torch.cat(weights, dim=-1)


class LongRope:
    """LongRoPE: per-frequency divisors, the "short" set while the sequence fits the
    original training context and the "long" set beyond it.

    Chosen per forward pass by the sequence length so far, as Phi's reference code
    and transformers do (keys already cached keep the rotation they got); llama.cpp
    instead decides once from the context size, which differs on short prompts in a
    long context.
    """

    def __init__(self, f: GGUFFile, hp: HParams, n_ctx: int, device: torch.device):
        self.original = int(hp.rope_scaling.get("original_context_length", hp.n_ctx_train))
        scale = hp.n_ctx_train / self.original
        default_magnitude = math.sqrt(1 + math.log(scale) / math.log(self.original)) if scale > 1 else 1.0
        magnitude = float(hp.rope_scaling.get("attn_factor", default_magnitude))
        base = hp.rope_base ** (np.arange(0, hp.rope_dim, 2, dtype=np.float64) / hp.rope_dim)
        self.ropes = {}
        for which in ("short", "long"):
            factors = to_numpy(f.tensor(f"rope_factors_{which}.weight", (hp.rope_dim // 2,))).astype(np.float64)
            self.ropes[which] = Rope(hp.rope_dim, 1.0 / (factors * base), magnitude, n_ctx, "neox", device)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.for_position(int(positions[-1]))(x, positions)

    def for_position(self, last: int) -> Rope:
        """The set of a pass whose last token is at position `last`."""
        return self.ropes["long" if last + 1 > self.original else "short"]


def build(f: GGUFFile, device: torch.device, n_ctx: int) -> Transformer:
    hp = HParams.from_gguf(f)  # llama.cpp keeps the LayerNorm eps under the RMS key for phimoe
    if hp.n_expert_used != 2:
        raise GGUFFormatError(f"{f.path}: phimoe routes to exactly 2 experts, file says {hp.n_expert_used}")
    rope = LongRope(f, hp, n_ctx, device) if f.has("rope_factors_long.weight") else make_rope(hp, n_ctx, "neox", device)
    experts = MmapExperts(f, hp, list(range(hp.n_layer)))
    jitter = float(f.get("qmoe.router_jitter_noise", DEFAULT_JITTER))

    def route(logits: torch.Tensor):
        return sparsemixer_top2(logits, jitter)

    def norm(name: str, layer: int | None) -> LayerNorm:
        prefix = "" if layer is None else f"blk.{layer}."
        return LayerNorm(f.tensor(f"{prefix}{name}.weight", (hp.n_embd,)),
                         f.tensor(f"{prefix}{name}.bias", (hp.n_embd,)), hp.norm_eps, device)

    return assemble(
        f, hp, device, norm,
        attention=lambda i: Attention(f, hp, i, rope, device, biases=f.has(f"blk.{i}.attn_q.bias")),
        ffn=lambda i: MoE(f, hp, i, route, experts, device),
        output_bias=f.has("output.bias"),
    )
