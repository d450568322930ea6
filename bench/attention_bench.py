"""One decode step's attention on the CPU: torch's SDPA against the runtime's.

qmoe.models.base.causal_attention computes a single new query (decode, on the CPU) with one
compiled call (kernels.one_query_attention) up to kernels.ONE_QUERY_MAX_KEYS cached tokens and
with one matrix product per K/V head group, a softmax and a second product beyond, instead of
torch's scaled_dot_product_attention, which was many times slower for one query. This
measures both on Qwen3-30B-A3B's attention shapes (32 query heads, 4 K/V heads of 128) as
the context grows, one thread each (torch's and the kernels'), median of 50 calls, and checks
that they agree.

    python -m bench.attention_bench [--contexts 32 512 1500 4096]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from qmoe import kernels
from qmoe.models.base import causal_attention

N_HEAD, N_HEAD_KV, HEAD_DIM = 32, 4, 128


def median_ms(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's SDPA for one query, laid out as causal_attention returns it: [1, H * d_v]."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).transpose(0, 1).reshape(1, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 512, 1500, 4096])
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    scale = HEAD_DIM**-0.5
    print("| context | torch SDPA (ms) | qmoe (ms) | speed-up |")
    print("|---|---|---|---|")
    for context in args.contexts:
        q = torch.randn(N_HEAD, 1, HEAD_DIM)
        k, v = torch.randn(N_HEAD_KV, context, HEAD_DIM), torch.randn(N_HEAD_KV, context, HEAD_DIM)
        sdpa = functools.partial(sdpa_attention, q, k, v, scale)
        runtime = functools.partial(causal_attention, q, k, v, context - 1, scale)
        torch.testing.assert_close(runtime(), sdpa(), rtol=1e-4, atol=1e-5)
        a, b = median_ms(sdpa), median_ms(runtime)
        print(f"| {context} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
