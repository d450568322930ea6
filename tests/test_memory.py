"""Peak RSS under a RAM budget: the budget plus a fixed overhead, however large the experts are.

With `--ram-budget B` the routed experts live in a pool of at most B bytes that the store fills
with explicit reads from the file (`--no-page-cache`: O_DIRECT, so the page cache keeps no second
copy either); no expert is touched through the memory map. A process's peak RSS is then

    peak RSS <= fixed overhead + pool (<= B)

The fixed overhead is everything that does not depend on the budget: the interpreter, torch,
numba and its compiled kernels, the non-expert weights (memory-mapped; a touched page of a mapped
file counts in RSS), the KV cache and the store's I/O buffers (one slab). It is measured here as
the peak RSS of the same generation with the smallest pool, one slab.

The model is written here: a qwen3moe with 4 layers of 64 experts (FFN 512, n_embd 256, q8_0),
about 100 MiB of experts next to about 1 MiB of everything else. Each run is `qmoe run` in a
fresh process, and the test reads the numbers it reports (its peak RSS and its pool) from its
stderr, as a user would. A run without a budget serves the experts from the memory map; its
RSS grows by nearly all the experts (the prompt routes to almost all of them), which shows that
the measurement would see a store that touched them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from qmoe.tokenizer import gpt2_byte_alphabet

QT = GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parent.parent

# The test model: small everywhere except the routed experts.
N_LAYER, N_EMBD, N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 256, 64, 8, 512
N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 2, 64
N_VOCAB = 256 + 2  # the bytes, BOS, EOS

# Bytes of RSS a run may differ by besides its pool: allocator and interpreter noise, the
# store's per-slot bookkeeping. What the tests allow on top of the measured fixed overhead.
SLACK_BYTES = 16 * 2**20

# Many different bytes, so that the prompt's tokens route to nearly every expert of every layer.
PROMPT = "The quick brown fox jumps over the lazy dog; 0123456789 PACK MY BOX!"
N_PREDICT = 16
BUDGET_PERCENT = 25  # of the experts


def q8_0_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) // 32 * 34


def random_q8_0(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Random Q8_0 weights of `shape` (numpy order) with about `std`: uint8 [..., row_bytes].

    Every block: an fp16 scale d, then 32 int8 uniform in [-127, 127] (std ~73 d)."""
    blocks = rng.integers(0, 256, (math.prod(shape) // 32, 34), dtype=np.uint8)
    blocks[:, 2:][blocks[:, 2:] == 128] = 129  # int8 -128 is outside Q8_0's symmetric range
    blocks[:, :2] = np.array([std / 73.3], np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // 32 * 34)


def write_model(path: Path) -> int:
    """Write the test model (see the module docstring) to `path`; return its routed experts' bytes."""
    hd = HEAD_DIM
    # (name, numpy shape, type, std); norms are all ones. The residual stream (embeddings, std 1)
    # dominates each layer's update, and the routers are decisive: routing follows the token.
    plan = [("token_embd.weight", (N_VOCAB, N_EMBD), QT.Q8_0, 1.0)]
    for i in range(N_LAYER):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (N_EMBD,), QT.F32, 1.0),
            (p + "attn_q.weight", (N_HEAD * hd, N_EMBD), QT.Q8_0, 0.02),
            (p + "attn_k.weight", (N_HEAD_KV * hd, N_EMBD), QT.Q8_0, 0.02),
            (p + "attn_v.weight", (N_HEAD_KV * hd, N_EMBD), QT.Q8_0, 0.02),
            (p + "attn_q_norm.weight", (hd,), QT.F32, 1.0),
            (p + "attn_k_norm.weight", (hd,), QT.F32, 1.0),
            (p + "attn_output.weight", (N_EMBD, N_HEAD * hd), QT.Q8_0, 0.002),
            (p + "ffn_norm.weight", (N_EMBD,), QT.F32, 1.0),
            (p + "ffn_gate_inp.weight", (N_EXPERT, N_EMBD), QT.F32, 0.1),
            (p + "ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), QT.Q8_0, 0.02),
            (p + "ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), QT.Q8_0, 0.02),
            (p + "ffn_down_exps.weight", (N_EXPERT, N_EMBD, N_FF_EXP), QT.Q8_0, 0.02),
        ]
    plan += [
        ("output_norm.weight", (N_EMBD,), QT.F32, 1.0),
        ("output.weight", (N_VOCAB, N_EMBD), QT.Q8_0, 0.02),
    ]

    writer = GGUFWriter(path, "qwen3moe")
    writer.add_name("qmoe memory test model")
    writer.add_context_length(512)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF_EXP)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(N_EXPERT_USED)
    writer.add_expert_feed_forward_length(N_FF_EXP)
    writer.add_expert_weights_norm(True)
    writer.add_vocab_size(N_VOCAB)
    alphabet = gpt2_byte_alphabet()  # a byte-level vocabulary: one token per byte, no merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([alphabet[b] for b in range(256)] + ["<|bos|>", "<|eos|>"])
    writer.add_token_types([1] * 256 + [3, 3])  # normal, control
    writer.add_token_merges([f"{alphabet[ord('a')]} {alphabet[ord('b')]}"])
    writer.add_bos_token_id(N_VOCAB - 2)
    writer.add_eos_token_id(N_VOCAB - 1)
    for name, shape, qtype, _ in plan:
        nbytes = 4 * math.prod(shape) if qtype == QT.F32 else q8_0_bytes(shape)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, qtype, std in plan:
        if qtype != QT.F32:
            values = random_q8_0(rng, shape, std)
        elif std == 1.0:
            values = np.ones(shape, np.float32)  # a norm
        else:
            values = rng.normal(0, std, shape).astype(np.float32)  # a router
        writer.write_tensor_data(values)
    writer.close()
    return sum(q8_0_bytes(shape) for name, shape, _, _ in plan if "_exps." in name)


def slab_bytes() -> int:
    """One expert of one layer: its gate, up and down rows; the smallest pool there is."""
    return 3 * q8_0_bytes((N_FF_EXP, N_EMBD))


def peak_rss_and_slabs(model: Path, *budget_args: str) -> tuple[int, int | None]:
    """`qmoe run` in a fresh process: its peak RSS (bytes, to 0.1 MiB) and its RAM pool (slabs), as
    it reports them; no pool: None. One kernel thread: the model is small, the cores are shared."""
    result = subprocess.run(
        [sys.executable, "-m", "qmoe.cli", "run", str(model), "-p", PROMPT, "-n", str(N_PREDICT), "-t", "1",
         *budget_args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak = re.search(r"peak RSS\s*=\s*([\d.]+) MiB", result.stderr)
    pool = re.search(r"RAM pool\s*=\s*[\d.]+ MiB \((\d+) expert slabs\)", result.stderr)
    assert peak is not None, result.stderr
    return round(float(peak.group(1)) * 2**20), None if pool is None else int(pool.group(1))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("memory") / "big-experts.gguf"
    return path, write_model(path)


def test_the_model_is_mostly_experts(model):
    path, expert_bytes = model
    assert expert_bytes > 50 * path.stat().st_size // 51  # > 98%


def test_peak_rss_stays_under_the_budget_plus_the_fixed_overhead(model):
    path, expert_bytes = model
    budget = expert_bytes * BUDGET_PERCENT // 100
    configs = (
        (),
        ("--ram-budget", str(slab_bytes()), "--no-page-cache"),
        ("--ram-budget", f"{BUDGET_PERCENT}%", "--no-page-cache"),
    )
    # Each configuration once first: numba compiles (and caches on disk) the kernel signatures a
    # run needs the first time it needs them, and LLVM's memory would then count in that run's peak.
    for args in configs:
        peak_rss_and_slabs(path, *args)
    (unbudgeted, no_pool), (overhead, one_slab), (budgeted, slabs) = (
        peak_rss_and_slabs(path, *args) for args in configs
    )
    pool = slabs * slab_bytes()
    print(f"fixed overhead {overhead / 2**20:.1f} MiB, with a {pool / 2**20:.1f} MiB pool "
          f"{budgeted / 2**20:.1f} MiB, without a budget {unbudgeted / 2**20:.1f} MiB, "
          f"experts {expert_bytes / 2**20:.1f} MiB")  # fmt: skip
    assert no_pool is None and one_slab == 1
    assert pool <= budget
    # The run without a budget touches (nearly) every expert through the map; the fixed overhead
    # must hold none of them, or it would hide a store that does the same.
    assert overhead + expert_bytes // 2 < unbudgeted
    assert budgeted <= overhead + pool + SLACK_BYTES
