"""qmoe: a quantized runtime for Mixture-of-Experts LLMs with pre-attention expert prediction.

    import qmoe
    m = qmoe.load("model.gguf")
    print(m.generate("def main(", max_tokens=32))

The engine (torch, numba) is imported on first use, so tools that need only the
GGUF reader or the error classes (the converter, `qmoe info`) start fast.
"""

import os

# numba's and torch's OpenMP threads take turns on the same cores many times per
# token; spinning while they wait (the OpenMP default) stalls the other runtime's
# threads on small machines. Set before either runtime loads, unless the user chose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qmoe.errors import QmoeError  # noqa: E402

__all__ = ["Model", "QmoeError", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Model", "load"):
        from qmoe import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'qmoe' has no attribute {name!r}")
