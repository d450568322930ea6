"""Peak memory and time of converting a multi-GB checkpoint: does the converter stream?

Builds a random bfloat16 checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048,
32 query / 4 KV heads of 128, 128 experts of width 768, 8 used) but only --layers
blocks and a 32k vocabulary, saved as one shard per block like a real checkpoint.
Then converts it in a fresh child process and reports the child's peak resident
memory (VmHWM, Linux) and wall time, next to the checkpoint size and the
largest output tensor, which is what the peak should stay near. A child that only
imports the converter gives the baseline (interpreter + numpy + gguf).

    python -m bench.convert_bench [--layers 2] [--outtype q8_0|q4_k_m|...] [--expert-type q4_0|none]
                                  [--out out/convert_bench]

Writes convert_bench.json to --out. The checkpoint and the GGUF go to a temporary
directory (about 2.7 GB + 1 GB for 2 layers) that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors.torch import save_file

from convert.qtypes import OUTTYPES, SINGLE_TYPES
from tests.tokenizer_fixtures import make_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent

# Qwen3-30B-A3B's per-layer shapes
CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "norm_topk_prob": True,
    "vocab_size": 32768,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def layer_tensors(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Block i's weights, random bfloat16, with Hugging Face's names and shapes."""
    c = CONFIG
    n_embd, hd, n_ff = c["hidden_size"], c["head_dim"], c["moe_intermediate_size"]
    n_q, n_kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {
        "input_layernorm.weight": (n_embd,),
        "post_attention_layernorm.weight": (n_embd,),
        "self_attn.q_proj.weight": (n_q, n_embd),
        "self_attn.k_proj.weight": (n_kv, n_embd),
        "self_attn.v_proj.weight": (n_kv, n_embd),
        "self_attn.o_proj.weight": (n_embd, n_q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate.weight": (c["num_experts"], n_embd),
    }
    for e in range(c["num_experts"]):
        shapes |= {
            f"mlp.experts.{e}.gate_proj.weight": (n_ff, n_embd),
            f"mlp.experts.{e}.up_proj.weight": (n_ff, n_embd),
            f"mlp.experts.{e}.down_proj.weight": (n_embd, n_ff),
        }
    return {
        f"model.layers.{i}.{name}": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }


def build_checkpoint(hf_dir: Path, n_layers: int) -> int:
    """Write the checkpoint (one shard per block, plus one for embedding and head); returns its bytes."""
    hf_dir.mkdir(parents=True)
    config = CONFIG | {"num_hidden_layers": n_layers}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    make_bpe_tokenizer(hf_dir, "qwen2")
    gen = torch.Generator().manual_seed(0)
    n_shards = n_layers + 1
    weight_map = {}
    for shard_index in range(n_shards):
        if shard_index < n_layers:
            tensors = layer_tensors(shard_index, gen)
        else:
            shape = (CONFIG["vocab_size"], CONFIG["hidden_size"])
            tensors = {
                "model.embed_tokens.weight": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16),
                "lm_head.weight": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16),
                "model.norm.weight": torch.ones(CONFIG["hidden_size"], dtype=torch.bfloat16),
            }
        shard = f"model-{shard_index + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, hf_dir / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))


def largest_output_tensor(gguf: Path) -> int:
    """Bytes of the biggest tensor the file holds (an expert stack or the embedding)."""
    return max(int(t.n_bytes) for t in GGUFReader(gguf).tensors)


# appended to a child's code: its peak resident set, from the kernel's high-water mark of its
# own address space (ru_maxrss would also count the parent's pages the child had before exec)
_REPORT_PEAK_RSS = (
    "\nprint('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"
)


def run_child(code: str) -> tuple[float, int]:
    """Run `code` in a fresh Python; return (wall seconds, its peak RSS in bytes)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code + _REPORT_PEAK_RSS], check=False, cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"child failed:\n{result.stderr[-2000:]}")
    kib = int(result.stdout.split("VmHWM")[-1].split()[0].strip("'[]"))
    return seconds, kib * 1024


def bench(n_layers: int, outtype: str, expert_type: str | None, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        hf_dir, gguf = Path(scratch) / "hf", Path(scratch) / "model.gguf"
        start = time.perf_counter()
        checkpoint_bytes = build_checkpoint(hf_dir, n_layers)
        build_seconds = time.perf_counter() - start
        _, baseline_rss = run_child("import convert.to_gguf")
        seconds, peak_rss = run_child(
            "from convert.to_gguf import convert\n"
            f"convert({str(hf_dir)!r}, {str(gguf)!r}, {outtype!r}, {expert_type!r}, progress=False)"
        )
        output_bytes = gguf.stat().st_size
        largest = largest_output_tensor(gguf)
    result = {
        "checkpoint": {
            "layers": n_layers,
            **{k: CONFIG[k] for k in ("hidden_size", "num_experts", "moe_intermediate_size", "vocab_size")},
            "dtype": "bfloat16",
            "bytes": checkpoint_bytes,
            "build_seconds": round(build_seconds, 1),
        },
        "outtype": outtype,
        "expert_type": expert_type,
        "output_bytes": output_bytes,
        "largest_output_tensor_bytes": largest,
        "seconds": round(seconds, 2),
        "checkpoint_mb_per_s": round(checkpoint_bytes / 2**20 / seconds, 1),
        "peak_rss_bytes": peak_rss,
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_minus_baseline_bytes": peak_rss - baseline_rss,
        "peak_rss_over_checkpoint": round(peak_rss / checkpoint_bytes, 3),
    }
    (out / "convert_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="MoE blocks (each ~1.2 GB of bfloat16 experts)")
    parser.add_argument("--outtype", default="q8_0", choices=OUTTYPES)
    parser.add_argument(
        "--expert-type", default="q4_0", choices=[*SINGLE_TYPES, "none"], help="none: as --outtype decides"
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "convert_bench")
    args = parser.parse_args(argv)
    expert_type = None if args.expert_type == "none" else args.expert_type
    result = bench(args.layers, args.outtype, expert_type, args.out)
    print(json.dumps(result, indent=2))
    gib = 2**30
    print(
        f"{result['checkpoint']['bytes'] / gib:.2f} GiB checkpoint -> {result['output_bytes'] / gib:.2f} GiB GGUF "
        f"in {result['seconds']:.1f} s; peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"(baseline {result['baseline_rss_bytes'] / 2**20:.0f} MiB, largest tensor "
        f"{result['largest_output_tensor_bytes'] / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
