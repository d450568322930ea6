"""OLMoE: like Qwen3-MoE but its q/k RMS norms span the whole projection (not
one head), q/k/v may be clamped (clip_qkv), and the top-k weights are used as
the softmax gave them unless norm_topk_prob is set."""

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

ARCH = "olmoe"


def build(f: GGUFFile, device: torch.device, n_ctx: int) -> Transformer:
    hp = HParams.from_gguf(f)
    rope = make_rope(hp, n_ctx, "neox", device)
    experts = MmapExperts(f, hp, list(range(hp.n_layer)))
    normalize = bool(f.arch_get("expert_weights_norm", False))
    clamp = f.arch_get("attention.clamp_kqv", None)

    route = SoftmaxRouter(hp.n_expert_used, normalize)

    return assemble(
        f, hp, device, rms_norms(f, hp, device),
        attention=lambda i: Attention(f, hp, i, rope, device, qk_norm="full", clamp=clamp),
        ffn=lambda i: MoE(f, hp, i, route, experts, device),
    )
