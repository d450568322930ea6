"""`--ram-budget auto`: how large a RAM pool of experts this machine can hold, if one is needed.

A model whose routed experts fit in the memory left over runs as it always did: the
experts are served from the memory-mapped file and the page cache keeps them. One whose
experts do not fit would thrash that map (every token faults in experts that push out
others), so the store gets a RAM pool of what is left, filled with O_DIRECT reads that
leave no second copy in the page cache.

"Left over" is MemAvailable (/proc/meminfo: what the kernel can hand out without
swapping) less what the rest of the run needs:

    non-expert weights  memory-mapped, touched every token: they stay resident
    KV cache            float32 keys and values for the whole context (an upper bound for
                        MLA models, which cache less)
    activations         one prefill batch through the widest layer, the attention scores of
                        a batch over the context, the layer-major prefill's hidden states
    runtime overhead    the interpreter, torch, numba and its kernels: the fixed overhead
                        tests/test_memory.py measures (354-369 MiB on these machines, one
                        slab included), rounded up
    a margin            a sixteenth of MemAvailable, at least 256 MiB: other processes grow too.
                        An eighth kept 2.8 GiB idle on a 23.5 GiB machine while the 48-layer bench
                        used 1.7 GiB besides its pool; every GiB of pool is a GiB less read per
                        few tokens, so the margin is no larger than it must be

The pool is anonymous memory, so it is the one part of the run that the kernel could kill
the process for; every other part is file-backed or small. The pool is therefore never
larger than what is left over, and if what is left over cannot hold the experts of one
token of one layer, loading stops with an error instead of running into the OOM killer.

`choose_ram_budget` is a pure function of the sizes and MemAvailable, so that tests can
call it with any machine they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmoe.errors import QmoeError
from qmoe.experts.options import format_bytes
from qmoe.experts.slabs import ExpertSlabs
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import HParams

MEASURED_OVERHEAD_BYTES = 370 * 2**20  # tests/test_memory.py's fixed overhead: 354-369 MiB here
RUNTIME_OVERHEAD_BYTES = 512 * 2**20  # what auto leaves for it: the measured figure, rounded up
MIN_MARGIN_BYTES = 256 * 2**20
MARGIN_SHARE = 16  # keep MemAvailable / 16 free besides
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class RunSizes:
    """The bytes a run needs, from the model's shapes and the run's settings."""

    expert_bytes: int  # all routed experts, quantized as in the file
    slab_bytes: int  # one expert of one layer (the pool's unit)
    slabs_per_token: int  # experts one token uses in one layer: the smallest pool that runs
    other_weights_bytes: int  # everything in the file besides the routed experts
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def rest_of_run(self) -> int:
        """What the run needs besides the routed experts."""
        return self.other_weights_bytes + self.kv_cache_bytes + self.activation_bytes + RUNTIME_OVERHEAD_BYTES


@dataclass(frozen=True)
class RamBudget:
    """What `auto` chose: a pool of `budget` bytes (O_DIRECT reads), or None (the mapped file)."""

    budget: int | None
    message: str  # one line for the user


def run_sizes(hp: HParams, file: GGUFFile, slabs: ExpertSlabs, n_ctx: int, n_batch: int) -> RunSizes:
    """What a run needs besides its routed experts, from the model's shapes (the module docstring's terms)."""
    kv = hp.n_layer * n_ctx * hp.n_head_kv * (hp.head_dim + hp.head_dim_v) * 4  # float32 K and V
    widest = max(hp.n_vocab, 3 * hp.n_expert_used * hp.n_ff_exp, 2 * hp.n_ff, 8 * hp.n_embd)
    activations = (4 * n_batch * widest  # one batch through the widest layer, float32, a few copies
                   + 4 * hp.n_head * n_batch * n_ctx  # a batch's attention scores over the context
                   + 4 * 4 * n_ctx * hp.n_embd)  # layer-major prefill: a few hidden states per token
    return RunSizes(
        expert_bytes=slabs.total_bytes, slab_bytes=slabs.layout.nbytes, slabs_per_token=hp.n_expert_used,
        other_weights_bytes=max(file.path.stat().st_size - slabs.total_bytes, 0),
        kv_cache_bytes=kv, activation_bytes=activations,
    )


def choose_ram_budget(sizes: RunSizes, mem_available: int | None) -> RamBudget:
    """The RAM pool for `sizes` on a machine with `mem_available` bytes (None: unknown)."""
    if mem_available is None:
        return RamBudget(None, "MemAvailable is unknown on this system: experts served from the mapped file "
                         "(give --ram-budget SIZE for a pool)")
    margin = max(MIN_MARGIN_BYTES, mem_available // MARGIN_SHARE)
    spare = mem_available - sizes.rest_of_run - margin
    if sizes.expert_bytes <= spare:
        return RamBudget(None, f"the routed experts ({format_bytes(sizes.expert_bytes)}) fit in the memory "
                         f"available ({format_bytes(spare)}): served from the mapped file")
    smallest = sizes.slab_bytes * sizes.slabs_per_token
    if spare < smallest:
        raise QmoeError(
            f"not enough memory for this model: MemAvailable is {format_bytes(mem_available)}, the rest of "
            f"the run needs {format_bytes(sizes.rest_of_run)} (+ {format_bytes(margin)} kept free), which leaves "
            f"{format_bytes(max(spare, 0))}, less than one token's experts of one layer "
            f"({format_bytes(smallest)}); free memory, shrink the context (--ctx), or force a size with "
            "--ram-budget SIZE"
        )
    budget = spare // sizes.slab_bytes * sizes.slab_bytes
    return RamBudget(budget, f"the routed experts ({format_bytes(sizes.expert_bytes)}) do not fit in the "
                     f"memory available ({format_bytes(mem_available)} less {format_bytes(sizes.rest_of_run)} "
                     f"for the rest of the run and {format_bytes(margin)} kept free): a "
                     f"{format_bytes(budget)} RAM pool read with O_DIRECT (--ram-budget SIZE or off overrides)")


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes, or None where /proc/meminfo does not say (not Linux)."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file's unit is kB (KiB)
    return None
