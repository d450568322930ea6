"""The predictors at run time on the CPU: the file's quantized matrices, multiplied by the kernels.

A decode step asks each MoE layer's predictor about one token, from the prefetch
worker thread, while the model's thread runs attention. At that size a torch
forward costs more in dispatch than in arithmetic, holds the GIL while it
dispatches (which the model's thread then waits for), and reads float32 weights
(4x the bytes of q8_0). Here the forward is two `kernels.matmul` calls straight on
the q8_0 (or f16) blocks as they lie in the memory-mapped GGUF, and one compiled
bias + activation pass; all three release the GIL.

The arithmetic is the exported predictor's (`predict_scores`): fc1, bias, GELU
(exact) or SiLU, fc2, bias, in float32 on the dequantized weights, so both paths
agree to float32 rounding. CUDA keeps the torch path (fp16 on the GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import GGUFFile, Tensor
from qmoe.predictor.model import PredictorSet
from qmoe.predictor.sidecar import tensor_name


class KernelPredictors:
    """Every MoE layer's predictor as raw weight views of the GGUF that holds them."""

    def __init__(self, gguf: GGUFFile, predictors: PredictorSet):
        """gguf: the file `predictors` were loaded from (a sidecar, or a model with embedded predictors)."""
        self.gguf = gguf
        self.n_embd = predictors.n_embd
        self.k_prime = predictors.k_prime
        self.activation = predictors.activation
        self.layers: dict[int, tuple[Tensor, np.ndarray, Tensor, np.ndarray]] = {}
        for layer, weights in predictors.layers.items():
            fc1 = gguf.tensor(tensor_name(layer, "fc1.weight"))
            fc2 = gguf.tensor(tensor_name(layer, "fc2.weight"))
            if fc1.shape != tuple(weights.fc1_weight.shape) or fc2.shape != tuple(weights.fc2_weight.shape):
                raise GGUFFormatError(f"{gguf.path}: the predictor tensors of block {layer} changed shape")
            self.layers[layer] = (
                fc1,
                weights.fc1_bias.numpy().astype(np.float32),
                fc2,
                weights.fc2_bias.numpy().astype(np.float32),
            )

    def predict(self, layer: int, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Expert scores [T, E] (float32) for layer `layer` from x [T, n_embd] (or [n_embd])."""
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        x = np.ascontiguousarray(x.reshape(-1, self.n_embd), dtype=np.float32)
        fc1, b1, fc2, b2 = self.layers[layer]
        h = kernels.bias_activation(kernels.matmul(fc1.data, fc1.qtype, x), b1, self.activation)  # [T, H]
        scores = kernels.matmul(fc2.data, fc2.qtype, h)  # [T, E]
        scores += b2
        return scores

    def predict_topk(self, layer: int, x: torch.Tensor | np.ndarray, count: int | None = None) -> np.ndarray:
        """The `count` (default k') best predicted experts [T, count], best first."""
        scores = self.predict(layer, x)
        count = count or self.k_prime
        top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)
