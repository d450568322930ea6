"""Peak RSS under a RAM budget: the budget plus a fixed overhead, however large the experts are.

With `--ram-budget B` the routed experts live in a pool of at most B bytes that the store fills
with explicit reads from the file (`--no-page-cache`: O_DIRECT, so the page cache keeps no second
copy either); no expert is touched through the memory map. A process's peak RSS is then

    peak RSS <= fixed overhead + pool (<= B)

The fixed overhead is everything that does not depend on the budget: the interpreter, torch,
numba and its compiled kernels, the non-expert weights (memory-mapped; a touched page of a mapped
file counts in RSS), the KV cache and the store's I/O buffers (one slab). It is measured here as
the peak RSS of the same generation with the smallest pool, one slab.

The model is written here (bench/random_moe.py): a qwen3moe with 4 layers of 64 experts (FFN 512,
n_embd 256, q8_0), about 100 MiB of experts next to about 1 MiB of everything else. Each run is `qmoe run` in a
fresh process, and the test reads the numbers it reports (its peak RSS and its pool) from its
stderr, as a user would. A run without a budget serves the experts from the memory map; its
RSS grows by nearly all the experts (the prompt routes to almost all of them), which shows that
the measurement would see a store that touched them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from bench.random_moe import MoEShape, expert_bytes, nbytes, write_random_moe

REPO_ROOT = Path(__file__).resolve().parent.parent

# The test model: small everywhere except the routed experts. Decisive routers: routing follows the token.
SHAPE = MoEShape(
    n_layers=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=64, n_expert_used=8, n_ff_exp=512,
    n_vocab=259, expert_type=GGMLQuantizationType.Q8_0, router_std=0.1,
)

# Bytes of RSS a run may differ by besides its pool: allocator and interpreter noise, the
# store's per-slot bookkeeping. What the tests allow on top of the measured fixed overhead.
SLACK_BYTES = 16 * 2**20

# Many different bytes, so that the prompt's tokens route to nearly every expert of every layer.
PROMPT = "The quick brown fox jumps over the lazy dog; 0123456789 PACK MY BOX!"
N_PREDICT = 16
BUDGET_PERCENT = 25  # of the experts


def slab_bytes() -> int:
    """One expert of one layer: its gate, up and down rows; the smallest pool there is."""
    return 3 * nbytes((SHAPE.n_ff_exp, SHAPE.n_embd), SHAPE.expert_type)


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
    return write_random_moe(path, SHAPE, "mostly experts"), expert_bytes(SHAPE)


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
