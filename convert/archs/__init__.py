"""One module per supported Hugging Face model class, each with the same surface:

HF_CLASS                      the `architectures[0]` of config.json it converts
ARCH                          the gguf.MODEL_ARCH it writes (general.architecture)
add_metadata(writer, cfg)     the hyperparameter keys, as llama.cpp reads them
tensors(cfg)                  the output tensors (convert.plan.OutputTensor), in file order
"""

from __future__ import annotations

from types import ModuleType

from convert.archs import deepseek2, mixtral, olmoe, phimoe, qwen3moe
from convert.checkpoint import HFConfig
from qmoe.errors import UnsupportedArchitectureError

ARCHITECTURES: dict[str, ModuleType] = {m.HF_CLASS: m for m in (qwen3moe, deepseek2, phimoe, mixtral, olmoe)}


def for_config(cfg: HFConfig) -> ModuleType:
    """The architecture module for config.json's model class."""
    module = ARCHITECTURES.get(cfg.architecture)
    if module is None:
        raise UnsupportedArchitectureError(
            f"{cfg.path}: architecture {cfg.architecture!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return module
