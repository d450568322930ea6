"""qmoe: a quantized runtime for Mixture-of-Experts LLMs with pre-attention expert prediction.

    import qmoe
    m = qmoe.load("model.gguf")
    print(m.generate("def main(", max_tokens=32))
"""

from qmoe.engine import Model, load
from qmoe.errors import QmoeError

__all__ = ["Model", "QmoeError", "load"]
__version__ = "0.1.0"
