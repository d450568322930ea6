"""What a user chooses about expert offloading, checked once, in one place.

The CLI (`qmoe run --ram-budget ... --prefetch ...`) and the Python API
(`qmoe.load(path, offload=OffloadOptions(...))`) both build an `OffloadOptions`;
the engine hands it to the expert store and the prefetcher.

Budgets are bytes of expert slabs a tier may hold: a size ("6G", "512M", "300K",
"123456"; binary units, so 6G = 6 GiB) or a share of all the model's experts in
that tier's own form ("40%": of the quantized bytes for the RAM pool, of the
bytes a slab takes in the fast tier). The RAM pool's budget may also be "auto"
(the default: a pool, read with O_DIRECT, only when the experts do not fit the
memory available; budget.py) or "off" (no pool).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

from qmoe.errors import QmoeError
from qmoe.experts.link import SimulatedLink

AUTO, OFF = "auto", "off"
POLICIES = ("none", "cross-layer", "pre-attn", "oracle")
PREDICT_IN = ("auto", "model", "worker")
MISS_POLICIES = ("cpu", "wait")
# MoE layers ahead that pre-attn and the oracle predict by default: a slab read (2.5-4 ms from
# the bench drive) then overlaps two blocks' experts and attention instead of one attention.
# On the 12-layer A3B-shaped bench file under a 4 GiB pool pre-attn decoded 4.7-6.5 tokens/s
# at 2, 5.4-5.9 at 1 and 5.8-6.0 at 0, against none's 4.3-5.1 (prefetch.py).
LOOKAHEAD = 2

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*%\s*$")


def parse_budget(spec: str | int, total_bytes: int, flag: str) -> int:
    """Bytes meant by `spec`, where "N%" is N percent of `total_bytes`.

    flag: the option's name for error messages (e.g. "--ram-budget").
    """
    if isinstance(spec, int):
        value = spec
    else:
        share, size = _SHARE.match(spec), _SIZE.match(spec)
        if share:
            value = math.floor(total_bytes * float(share.group(1)) / 100)
        elif size:
            value = math.floor(float(size.group(1)) * _UNITS[size.group(2).upper()])
        else:
            raise QmoeError(
                f"{flag} {spec!r} is not a size: give bytes with an optional K/M/G/T suffix "
                "(binary units, e.g. 6G) or a share of the experts such as 40%"
            )
    if value < 0:
        raise QmoeError(f"{flag} must not be negative, got {spec!r}")
    return value


def format_bytes(n: float) -> str:
    """`n` bytes for people: 512 B, 2.5 MiB, 1.4 GiB."""
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


@dataclass
class OffloadOptions:
    """Tiers, prefetch policy and miss policy for the routed experts.

    ram_budget: host-RAM pool of quantized slabs, read from the file explicitly;
        "auto" (default): sized at load to the memory available, and only when the experts
        do not fit it (budget.py; attach() resolves it); None or "off" = no pool (the
        experts are served from the memory-mapped file).
    gpu_budget: GPU memory for the compute-ready fast tier of dequantized experts
        (CUDA). Without CUDA it is a deprecated spelling of sim_fast_budget.
    sim_fast_budget: a SIMULATED fast tier in CPU memory: quantized slabs for the CPU
        kernels (bit-identical results) behind `link`, so that every path of the store
        and what prediction buys behind a slower link can be measured without a GPU.
    prefetch: "none" | "cross-layer" | "pre-attn" | "oracle".
    on_miss: what a fast-tier miss does: "cpu" computes it with the CPU kernels from
        the quantized slab (and queues the slab for the fast tier in the background),
        "wait" loads it and computes it in the fast tier.
        Without a fast tier every expert is computed by the CPU kernels from the
        pool, and a pool miss is always read (there is nothing else to compute from).
    k_prime: candidates a prediction names per token (default: twice the predictors' k', else
        twice ceil(1.5 k)); of those the store reads only the ranks that are right more often
        than wrong (admission.py).
    lookahead: for "pre-attn" and "oracle", how many MoE layers ahead each layer's experts are
        predicted, right after an earlier block's attention (prefetch.py); 0 = the paper's
        schedule, each layer at its own pre-attention. None: LOOKAHEAD for those two, else 0.
    predict_in: where predictions run: "model" (the model's thread), "worker" (a thread beside
        it), "auto" = worker on CUDA, model on the CPU (prefetch.py says why).
    govern: for "pre-attn" and "cross-layer", prefetch only while forward passes measure faster
        with it than without (governor.py); False prefetches on every pass.
    predictors: predictor GGUF for "pre-attn" (default: embedded in the model, else MODEL.pred.gguf).
    direct_io: read the file with O_DIRECT so the page cache does not hold a second copy.
    io_depth: expert reads from the file in flight at once (transfer workers): a drive serves
        several requests in little more than the time of one (bench/larger_than_ram.py
        measures it at 1-16).
    link: simulated link into the compute tier (None: transfers run at real speed).
    cpu_fast_tier_dense: the simulated fast tier runs the CUDA tier's dense path instead
        (float32 slots in CPU memory): slower, for testing that path on machines without a GPU.
    """

    ram_budget: str | int | None = AUTO
    gpu_budget: str | int | None = None
    sim_fast_budget: str | int | None = None
    prefetch: str = "none"
    on_miss: str = "cpu"
    k_prime: int | None = None
    lookahead: int | None = None
    predict_in: str = "auto"
    govern: bool = True
    predictors: str | None = None
    direct_io: bool = False
    io_depth: int = 4
    link: SimulatedLink | None = None
    cpu_fast_tier_dense: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.ram_budget, str) and self.ram_budget.strip().lower() in (AUTO, OFF):
            self.ram_budget = self.ram_budget.strip().lower()
        if self.ram_budget == OFF:
            self.ram_budget = None
        if self.ram_budget is None and self.gpu_budget is None and self.sim_fast_budget is None:
            raise QmoeError(
                "expert offloading needs a tier to manage: give --ram-budget (auto or a size) and/or "
                "--gpu-budget (or --sim-fast-budget); for none at all, load with offload=None"
            )
        if self.gpu_budget is not None and self.sim_fast_budget is not None:
            raise QmoeError("give --gpu-budget (a GPU tier) or --sim-fast-budget (a simulated one), not both")
        if self.prefetch not in POLICIES:
            raise QmoeError(f"--prefetch must be one of {', '.join(POLICIES)}, got {self.prefetch!r}")
        if self.on_miss not in MISS_POLICIES:
            raise QmoeError(f"--on-miss must be one of {', '.join(MISS_POLICIES)}, got {self.on_miss!r}")
        if self.k_prime is not None and self.k_prime < 1:
            raise QmoeError(f"--k-prime must be >= 1, got {self.k_prime}")
        if self.predict_in not in PREDICT_IN:
            raise QmoeError(f"--predict-in must be one of {', '.join(PREDICT_IN)}, got {self.predict_in!r}")
        if self.io_depth < 1:
            raise QmoeError(f"--io-depth must be >= 1, got {self.io_depth}")
        if self.lookahead is None:
            self.lookahead = LOOKAHEAD if self.prefetch in ("pre-attn", "oracle") else 0
        if self.lookahead < 0:
            raise QmoeError(f"--lookahead must be >= 0, got {self.lookahead}")
        if self.lookahead and self.prefetch not in ("pre-attn", "oracle"):
            raise QmoeError(f"--lookahead applies to --prefetch pre-attn and oracle, not {self.prefetch}")
        if not self.govern and self.prefetch not in ("pre-attn", "cross-layer"):
            raise QmoeError(f"--always-prefetch applies to --prefetch pre-attn and cross-layer, not {self.prefetch}")

    def fast_budget(self, cuda: bool) -> tuple[str | int | None, str, bool]:
        """The fast tier's budget, the flag that gave it, and whether it is the simulated CPU tier."""
        if self.sim_fast_budget is not None:
            return self.sim_fast_budget, "--sim-fast-budget", True
        if self.gpu_budget is not None and not cuda:
            warnings.warn(
                "--gpu-budget without CUDA makes a simulated fast tier in CPU memory; that spelling is "
                "deprecated, use --sim-fast-budget",
                DeprecationWarning,
                stacklevel=3,
            )
            return self.gpu_budget, "--gpu-budget", True
        return self.gpu_budget, "--gpu-budget", False

    @property
    def has_fast_tier(self) -> bool:
        return self.gpu_budget is not None or self.sim_fast_budget is not None

    @property
    def auto_ram(self) -> bool:
        """The RAM pool is still to be sized from the memory available (attach() does it)."""
        return self.ram_budget == AUTO
