"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head RMS q/k norms,
NEOX RoPE, every block an MoE with softmax -> top-k, renormalized when the model
says so (`norm_topk_prob`, stored as expert_weights_norm)."""

from __future__ import annotations

import torch

from qmoe.gguf_file import GGUFFile
from qmoe.models.base import (
    Attention,
    HParams,
    MmapExperts,
    MoE,
    SoftmaxRouter,
    Transformer,
    assemble,
    make_rope,
    rms_norms,
)

ARCH = "qwen3moe"


def build(f: GGUFFile, device: torch.device, n_ctx: int) -> Transformer:
    hp = HParams.from_gguf(f)
    rope = make_rope(hp, n_ctx, "neox", device)
    experts = MmapExperts(f, hp, list(range(hp.n_layer)))
    normalize = bool(f.arch_get("expert_weights_norm", True))

    route = SoftmaxRouter(hp.n_expert_used, normalize)

    return assemble(
        f, hp, device, rms_norms(f, hp, device),
        attention=lambda i: Attention(f, hp, i, rope, device, qk_norm="head"),
        ffn=lambda i: MoE(f, hp, i, route, experts, device),
    )
