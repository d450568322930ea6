"""Architecture registry: `general.architecture` -> the module that builds it.

Each module exposes `build(f: GGUFFile, device, n_ctx) -> Transformer`, found by import.
"""

from __future__ import annotations

import importlib

from qmoe.errors import UnsupportedArchitectureError
from qmoe.gguf_file import GGUFFile

ARCHITECTURES = {
    "qwen3moe": "qmoe.models.qwen3moe",
    "deepseek2": "qmoe.models.deepseek2",
    "phimoe": "qmoe.models.phimoe",
    "llama": "qmoe.models.llama",  # Mixtral: llama with experts
    "olmoe": "qmoe.models.olmoe",
}


def build_model(f: GGUFFile, device, n_ctx: int):
    """Build the model a GGUF file describes, or say why qmoe cannot run it."""
    module = ARCHITECTURES.get(f.arch)
    if module is None:
        raise UnsupportedArchitectureError(
            f"{f.path}: architecture {f.arch!r} is not supported; qmoe runs {', '.join(sorted(ARCHITECTURES))}"
        )
    if f.arch_get("expert_count", 0) in (0, None):
        raise UnsupportedArchitectureError(
            f"{f.path}: this {f.arch} model has no experts ({f.arch}.expert_count is missing or 0); "
            "qmoe runs Mixture-of-Experts models only"
        )
    return importlib.import_module(module).build(f, device, n_ctx)
