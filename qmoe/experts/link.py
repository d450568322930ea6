"""A simulated link between two memory tiers (a SIMULATION, not a driver).

On a development machine every "transfer" is a memcpy or a read from a file
that sits in fast storage, so bringing an expert in costs almost nothing and a
prefetcher has nothing to hide. `--sim-link-gbps X --sim-link-latency-us L` makes
every transfer into the compute tier last at least

    latency + bytes / bandwidth

like a PCIe bus (~25 GB/s, ~10 us) or a flash drive (~2 GB/s, ~100 us). The
transfer thread sleeps for whatever the real work (read, dequantize, copy) left
of that time. It sleeps in the transfer thread, never in the thread that runs the
model, so a simulated transfer overlaps compute exactly as a DMA would, and the
measured stall time is what a real link of that speed would cost.
The bytes counted are the quantized slab's: what crosses the link when experts
are dequantized on the far side (as the CUDA fast tier does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from qmoe.errors import QmoeError


@dataclass(frozen=True)
class SimulatedLink:
    gbps: float  # gigabytes (10^9 bytes) per second
    latency_us: float = 0.0

    def __post_init__(self) -> None:
        if not (self.gbps > 0 and math.isfinite(self.gbps)):
            raise QmoeError(f"--sim-link-gbps must be a positive number of GB/s, got {self.gbps}")
        if not (self.latency_us >= 0 and math.isfinite(self.latency_us)):
            raise QmoeError(f"--sim-link-latency-us must be >= 0, got {self.latency_us}")

    def seconds(self, nbytes: int) -> float:
        """How long moving `nbytes` takes on this link."""
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)

    def finish(self, started: float, nbytes: int) -> float:
        """Sleep until a transfer of `nbytes` begun at `started` (perf_counter) would end; returns the sleep."""
        remaining = started + self.seconds(nbytes) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            return remaining
        return 0.0
