"""The expert predictor network: trainable form, exported form, and the per-token forward.

One predictor per MoE layer maps an activation x [n_embd] to one score per expert;
its top-k is the predicted router top-k (paper.md, "The predictor").

    Architecture 1: Linear(n_embd -> H) -> BatchNorm1d -> GELU -> Dropout(0.1) -> Linear(H -> E)
    Architecture 2: Linear(n_embd -> H) -> SiLU -> Linear(H -> E)

Training uses the torch modules (`build_predictor`). The runtime never sees them:
`fold_batchnorm` turns a trained net into `PredictorWeights` (BatchNorm folded into
the first Linear, dropout gone), which is what the sidecar GGUF stores, and
`predict_scores` is two matmuls and an activation, without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# architecture number -> activation between the two matmuls
ACTIVATIONS = {1: "gelu", 2: "silu"}
DROPOUT = 0.1
DEFAULT_MAX_HIDDEN = 1024  # the paper used 2048; see default_hidden

# What a predictor reads (stored in the sidecar so a file says which kind it holds).
INPUT_PRE_ATTN = "attn_norm"  # layer l's attn_norm output: ours ("pre-attn")
INPUT_PREV_ROUTER = "prev_ffn_norm"  # the previous MoE layer's router input: "cross-layer-trained"
INPUTS = (INPUT_PRE_ATTN, INPUT_PREV_ROUTER)


def default_hidden(n_embd: int) -> int:
    """Hidden width: 1024, or n_embd when that is smaller.

    Measured (bench/predictors.py, README "Expert predictors"): on the Qwen3-30B-A3B
    layer shapes the paper's 2048 predicted no better than 1024 (68.3 vs 68.8 % exact
    match) and cost twice as much per token on the CPU (3.4 vs 1.7 % of a decode step:
    the forward is memory-bound, fc1 alone is n_embd x width bytes per layer). On the
    trained tiny model (n_embd 256) width 1024 bought 2 points over 256 for 2.8x the
    cost (5.5 vs 2.0 %). `--hidden` overrides it.
    """
    return min(DEFAULT_MAX_HIDDEN, n_embd)


def build_predictor(n_embd: int, n_expert: int, hidden: int, arch: int = 1) -> nn.Sequential:
    """A fresh, trainable predictor of architecture `arch` (1 or 2)."""
    if arch == 1:
        return nn.Sequential(
            nn.Linear(n_embd, hidden),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
            nn.Dropout(DROPOUT),
            nn.Linear(hidden, n_expert),
        )
    if arch == 2:
        return nn.Sequential(nn.Linear(n_embd, hidden), nn.SiLU(), nn.Linear(hidden, n_expert))
    raise ValueError(f"predictor architecture must be one of {sorted(ACTIVATIONS)}, got {arch}")


@dataclass
class PredictorWeights:
    """The exported predictor of one layer: scores = fc2(act(fc1(x)))."""

    fc1_weight: torch.Tensor  # [H, n_embd]
    fc1_bias: torch.Tensor  # [H]
    fc2_weight: torch.Tensor  # [E, H]
    fc2_bias: torch.Tensor  # [E]
    activation: str  # "gelu" | "silu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS.values():
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS.values())}, got {self.activation!r}"
            )

    @property
    def hidden(self) -> int:
        return self.fc1_weight.shape[0]

    @property
    def n_embd(self) -> int:
        return self.fc1_weight.shape[1]

    @property
    def n_expert(self) -> int:
        return self.fc2_weight.shape[0]

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> PredictorWeights:
        """A copy on `device` with matrices in `dtype`; biases stay float32 (they are added in float32)."""
        return PredictorWeights(
            self.fc1_weight.to(device=device, dtype=dtype),
            self.fc1_bias.to(device=device, dtype=torch.float32),
            self.fc2_weight.to(device=device, dtype=dtype),
            self.fc2_bias.to(device=device, dtype=torch.float32),
            self.activation,
        )


@torch.no_grad()
def fold_batchnorm(net: nn.Sequential) -> PredictorWeights:
    """Export a trained predictor: BatchNorm (eval statistics) folded into fc1, dropout dropped.

    BN(W1 x + b1) = s * (W1 x + b1 - mean) + beta with s = gamma / sqrt(var + eps),
    so W1' = s[:, None] * W1 and b1' = s * (b1 - mean) + beta.
    """
    fc1, fc2 = net[0], net[-1]
    w1 = fc1.weight.detach().float().cpu().clone()  # [H, D]
    b1 = fc1.bias.detach().float().cpu().clone()  # [H]
    if isinstance(net[1], nn.BatchNorm1d):
        bn = net[1]
        scale = bn.weight.float().cpu() / torch.sqrt(bn.running_var.float().cpu() + bn.eps)  # [H]
        w1 = w1 * scale[:, None]
        b1 = (b1 - bn.running_mean.float().cpu()) * scale + bn.bias.float().cpu()
        activation = "gelu"
    else:
        activation = "silu"
    return PredictorWeights(
        w1, b1, fc2.weight.detach().float().cpu().clone(), fc2.bias.detach().float().cpu().clone(), activation
    )


@torch.inference_mode()
def predict_scores(weights: PredictorWeights, x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Expert scores [T, E] (float32) for activations x [T, n_embd] (or [n_embd] for one token).

    Computes in the weights' dtype on the weights' device (the caller picks: float32
    on CPU, float16 on CUDA) and adds the biases in float32.
    """
    x = torch.as_tensor(x).to(device=weights.fc1_weight.device, dtype=weights.fc1_weight.dtype)
    if x.ndim == 1:
        x = x[None, :]
    h = (x @ weights.fc1_weight.T).float() + weights.fc1_bias  # [T, H]
    h = torch.nn.functional.gelu(h) if weights.activation == "gelu" else torch.nn.functional.silu(h)
    return (h.to(weights.fc2_weight.dtype) @ weights.fc2_weight.T).float() + weights.fc2_bias  # [T, E]


@dataclass
class PredictorSet:
    """The predictors of every MoE layer of one base model, as the runtime holds them."""

    model_identity: str  # qmoe.predictor.sidecar.model_identity of the base GGUF
    n_embd: int
    n_expert: int
    k: int
    k_prime: int  # suggested over-provisioning: prefetch the top-k' predicted experts
    arch: int  # 1 or 2
    input: str  # one of INPUTS
    heldout_fraction: float  # the calibration split it was trained with; evaluation reuses it
    layers: dict[int, PredictorWeights] = field(default_factory=dict)
    # How often the router chose each expert over the calibration (every MoE layer, [E] counts,
    # and the tokens counted): the routing's concentration, from which `qmoe plan` forecasts a
    # pool's hit rate. Empty for sidecars written before they were recorded.
    route_counts: dict[int, np.ndarray] = field(default_factory=dict)
    routed_tokens: int = 0

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"predictor input must be one of {INPUTS}, got {self.input!r}")

    @property
    def hidden(self) -> int:
        return next(iter(self.layers.values())).hidden

    @property
    def activation(self) -> str:
        return ACTIVATIONS[self.arch]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PredictorSet:
        moved = {layer: weights.to(device, dtype) for layer, weights in self.layers.items()}
        return PredictorSet(
            self.model_identity,
            self.n_embd,
            self.n_expert,
            self.k,
            self.k_prime,
            self.arch,
            self.input,
            self.heldout_fraction,
            moved,
            self.route_counts,
            self.routed_tokens,
        )

    def predict(self, layer: int, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Expert scores [T, E] for layer `layer` from x [T, n_embd]."""
        return predict_scores(self.layers[layer], x)

    def predict_topk(
        self, layer: int, x: torch.Tensor | np.ndarray, count: int | None = None
    ) -> torch.Tensor:
        """The `count` (default k') best predicted experts [T, count], best first."""
        return self.predict(layer, x).topk(count or self.k_prime, dim=-1).indices
