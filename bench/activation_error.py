"""What 8-bit activations cost in accuracy: qmoe's two kinds of product beside llama.cpp's.

On the 256-wide tiny qwen3moe of tests/test_llama_cpp_quants.py, quantized by llama.cpp's
`llama_model_quantize` to each mix, the logits of 12 positions from:
  - qmoe with exact products (float32 activations) and with integer products (the default:
    activations quantized as llama.cpp's Q8_0 / Q8_1 / Q8_K);
  - llama.cpp on the quantized file (its integer products);
each against llama.cpp's float run of the same weights (the file dequantized by gguf-py):
relative RMS error and worst cosine over the positions. Also the worst cosine of qmoe's
integer run to llama.cpp's quantized run.

    python -m bench.activation_error [--json bench/results/activation-error.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

from tests.test_llama_cpp_quants import MIXES, cosine_rows, dequantized_copy, llama_cpp_logits, qmoe_logits


def rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2) / np.mean(ref**2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench/results/activation-error.json")
    args = parser.parse_args()
    from convert.to_gguf import convert
    from tests.tiny_models import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_tiny_model("qwen3moe", tmp / "hf", seed=0, hidden_size=256)
        f32 = convert(hf, tmp / "wide-f32.gguf", outtype="f32", progress=False)
        for mix, ftype in MIXES.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, 2
            path = tmp / f"wide-{mix}.gguf"
            if (
                llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params))
                != 0
            ):
                raise SystemExit(f"llama_model_quantize to {mix} failed")
            llama_float = llama_cpp_logits(dequantized_copy(path, f32, tmp / "dequantized.gguf"))
            runs = {
                "qmoe_exact": qmoe_logits(path, exact_products=True),
                "qmoe_integer": qmoe_logits(path, exact_products=False),
                "llama_cpp": llama_cpp_logits(path),
            }
            row = {"mix": mix}
            for name, logits in runs.items():
                row[name] = {
                    "rel_rms": rel_rms(logits, llama_float),
                    "worst_cosine": float(cosine_rows(logits, llama_float).min()),
                }
            row["qmoe_integer_vs_llama_cpp_worst_cosine"] = float(
                cosine_rows(runs["qmoe_integer"], runs["llama_cpp"]).min()
            )
            rows.append(row)
            print(json.dumps(row))
    print(
        "| llama.cpp mix | qmoe exact: rel. RMS / worst cos | qmoe integer | llama.cpp | qmoe integer vs llama.cpp |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[k]['rel_rms']:.1e} / {r[k]['worst_cosine']:.4f}"
            for k in ("qmoe_exact", "qmoe_integer", "llama_cpp")
        ]
        print(
            f"| {r['mix']} | " + " | ".join(cells) + f" | {r['qmoe_integer_vs_llama_cpp_worst_cosine']:.4f} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
