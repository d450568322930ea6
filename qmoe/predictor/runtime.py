"""The predictors at run time: the kernels on the CPU, torch on CUDA; and finding them for a model.

A decode step asks each MoE layer's predictor about one token, in the model's
thread before attention or in a prefetch worker beside it (prefetch.py). At that
size a torch forward costs more in dispatch than in arithmetic, every op is a
turn at the GIL, and it reads float32 weights (4x the bytes of q8_0). Here the
whole forward and the top-k are a `kernels.MLPTopK`: one compiled call on
the q8_0 (or f16) blocks as they lie in the memory-mapped GGUF, without the GIL.

The arithmetic is the exported predictor's (`predict_scores`): fc1, bias, GELU
(exact) or SiLU, fc2, bias, in float32 on the dequantized weights, so both paths
rank the experts alike up to float32 rounding. CUDA keeps the torch path (fp16
on the GPU: `TorchPredictors`). Both answer `predict_topk` with a numpy array, so
the prefetch policy does not care which it has (`Predictors`).

`load_predictors` finds a model's predictors (--predictors, embedded, or the
sidecar), checks that they fit it, and builds the runtime for the device.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import GGUFFormatError, QmoeError
from qmoe.gguf_file import GGUFFile
from qmoe.predictor.model import INPUT_PRE_ATTN, PredictorSet
from qmoe.predictor.sidecar import load_sidecar, model_identity, predictor_source, tensor_name


class Predictors(Protocol):
    k_prime: int

    def predict_topk(self, layer: int, x: torch.Tensor | np.ndarray, count: int | None = None) -> np.ndarray:
        """The `count` (default k') best predicted experts [T, count] for x [T, n_embd], best first."""
        ...


class KernelPredictors:
    """Every MoE layer's predictor over raw weight views of the GGUF that holds them."""

    def __init__(self, gguf: GGUFFile, predictors: PredictorSet):
        """gguf: the file `predictors` were loaded from (a sidecar, or a model with embedded predictors)."""
        self.gguf = gguf
        self.n_embd = predictors.n_embd
        self.k_prime = predictors.k_prime
        self.layers: dict[int, kernels.MLPTopK] = {}
        for layer, weights in predictors.layers.items():
            fc1 = gguf.tensor(tensor_name(layer, "fc1.weight"))
            fc2 = gguf.tensor(tensor_name(layer, "fc2.weight"))
            if fc1.shape != tuple(weights.fc1_weight.shape) or fc2.shape != tuple(weights.fc2_weight.shape):
                raise GGUFFormatError(f"{gguf.path}: the predictor tensors of block {layer} changed shape")
            self.layers[layer] = kernels.MLPTopK(
                fc1.data, fc1.qtype, weights.fc1_bias.numpy(), fc2.data, fc2.qtype, weights.fc2_bias.numpy(),
                predictors.activation,
            )  # fmt: skip
        # Compile (or load from numba's cache) now: the first predictions would otherwise wait
        # for the compiler and arrive after their layers ran.
        self.predict_topk(next(iter(self.layers)), np.zeros((1, self.n_embd), np.float32))

    def predict_topk(self, layer: int, x: torch.Tensor | np.ndarray, count: int | None = None) -> np.ndarray:
        """The `count` (default k') best predicted experts [T, count] for x [T, n_embd], best first."""
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        return self.layers[layer](x.reshape(-1, self.n_embd), count or self.k_prime)


class TorchPredictors:
    """The predictors in torch on a CUDA device (fp16), where the GPU runs them beside attention."""

    def __init__(self, predictors: PredictorSet, device: torch.device):
        self.predictors = predictors.to(device, torch.float16)
        self.k_prime = predictors.k_prime

    def predict_topk(self, layer: int, x: torch.Tensor | np.ndarray, count: int | None = None) -> np.ndarray:
        return self.predictors.predict_topk(layer, x, count).cpu().numpy()


def load_predictors(model: GGUFFile, explicit: str | os.PathLike | None, moe_layers: list[int],
                    device: torch.device) -> Predictors:
    """The pre-attention predictors for `model` (explicit file, else embedded, else the sidecar),
    checked to read every MoE layer's attn_norm output, ready to run on `device`."""
    path = predictor_source(model, explicit)
    source = model if path == model.path else GGUFFile(path)  # embedded: the model's file, parsed once
    predictors = load_sidecar(source, model_identity(model))
    missing = sorted(set(moe_layers) - set(predictors.layers))
    if predictors.input != INPUT_PRE_ATTN or missing:
        raise QmoeError(f"{path}: these predictors do not read every MoE layer's attn_norm output "
                        f"(input {predictors.input!r}, layers missing: {missing}); pre-attn needs those")
    if device.type == "cuda":
        return TorchPredictors(predictors, device)
    return KernelPredictors(source, predictors)
