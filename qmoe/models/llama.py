"""Mixtral, stored by llama.cpp as `llama` with experts: plain GQA whose Q/K rows
the converter permuted for llama's adjacent-pair RoPE ("norm" style), and a
router that renormalizes the softmax over its top-k (equivalently, a softmax
over the top-k logits)."""

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

ARCH = "llama"


def build(f: GGUFFile, device: torch.device, n_ctx: int) -> Transformer:
    hp = HParams.from_gguf(f)
    rope = make_rope(hp, n_ctx, "norm", device)
    experts = MmapExperts(f, hp, list(range(hp.n_layer)))

    route = SoftmaxRouter(hp.n_expert_used, normalize=True)

    return assemble(
        f, hp, device, rms_norms(f, hp, device),
        attention=lambda i: Attention(f, hp, i, rope, device),
        ffn=lambda i: MoE(f, hp, i, route, experts, device),
    )
