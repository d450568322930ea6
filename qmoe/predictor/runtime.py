"""The predictors at run time on the CPU: the file's quantized matrices, run by one compiled call.

A decode step asks each MoE layer's predictor about one token, in the model's
thread before attention or in a prefetch worker beside it (prefetch.py). At that
size a torch forward costs more in dispatch than in arithmetic, every op is a
turn at the GIL, and it reads float32 weights (4x the bytes of q8_0). Here the
whole forward and the top-k are a `kernels.MLPTopK`: one serial compiled call on
the q8_0 (or f16) blocks as they lie in the memory-mapped GGUF, without the GIL.

The arithmetic is the exported predictor's (`predict_scores`): fc1, bias, GELU
(exact) or SiLU, fc2, bias, in float32 on the dequantized weights, so both paths
rank the experts alike up to float32 rounding. CUDA keeps the torch path (fp16
on the GPU).
"""

from __future__ import annotations

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import GGUFFormatError
from qmoe.gguf_file import GGUFFile
from qmoe.predictor.model import PredictorSet
from qmoe.predictor.sidecar import tensor_name


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
