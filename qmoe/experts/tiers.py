"""The memory tiers above the file: a RAM pool of quantized slabs and a compute-ready fast tier.

Each tier preallocates `n_slots` equal slots for its whole life (so its memory
is its budget, whatever the traffic) and keeps a `SlotCache` saying which slab
is in which slot. Filling a slot is the store's transfer workers' job; computing
from one is the model's thread's.

RamPool   quantized slabs exactly as in the file (raw bytes), for the CPU
          kernels: what a machine whose RAM cannot hold the model keeps of it.
FastTier  experts in the form its compute engine multiplies fastest:
          CUDA  (`--gpu-budget`) dequantized fp16 slots (bf16 when the file stores bf16) in GPU
                memory. A slab's raw bytes are copied into a pinned staging
                buffer, moved to the GPU on a side stream, and dequantized there
                by torch ops (`dequantize_torch`), so the link carries the
                quantized bytes; the transfer thread waits on the stream's event
                before the slot counts as ready, and the model's thread only
                releases a slot after its products came back to the host
                (`compute` ends with .cpu()), so a slot is never overwritten while
                in use.
          simulated, in CPU memory (`--sim-fast-budget`): quantized slabs in
                host memory, computed by the numba kernels, which read quantized
                blocks faster than any dequantized copy (a float32 slab is 4-8x the
                bytes). It is the same tier with its own budget behind its own
                simulated link, so every store path runs and is tested on machines
                without CUDA, and its results are bit-identical to the plain
                runtime's.
          simulated, dense=True: the CUDA tier's compute path (dequantize_torch,
                then dense products) with float32 slots in CPU memory: slower, and
                there to test that path where no GPU is at hand.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from qmoe import kernels
from qmoe.experts.cache import SlotCache
from qmoe.experts.slabs import SlabLayout, slot_views
from qmoe.kernels import dequantize_torch

QT = GGMLQuantizationType


def host_slots(n_slots: int, shapes: list[tuple[int, int]], align: int = 1, residue: int = 0) -> list[np.ndarray]:
    """Preallocated uint8 slots [n_slots, *shape] per slab part, every page touched now.

    align, residue: each part's array starts at an address that is `residue` modulo
    `align` (a divisor of the page size): the RAM pool lines its slots up with the
    file's offsets so that O_DIRECT reads land in them directly (slabs.py).

    An untouched page faults the first time a transfer writes it: filling a fresh 2.6 MB
    slot took 6.6 ms against 0.35 ms for a touched one (A3B shapes, on a busy 2-core
    machine), a cost that would land on the first use of each slot, in the middle of a
    generation. Touching them here moves it to load time, and the budget's memory is
    committed from the start.
    """
    parts = []
    for shape in shapes:
        nbytes = n_slots * shape[0] * shape[1]
        # Private anonymous memory starts on a page boundary; it faulted in at 1 GiB/s here
        # against 0.4 for a shared mapping (tmpfs pages).
        memory = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        part = np.frombuffer(memory, np.uint8, nbytes, residue % align).reshape(n_slots, *shape)
        part.fill(0)
        parts.append(part)
    return parts


class RamPool:
    """Quantized slabs in host RAM: three uint8 arrays [n_slots, rows, row_bytes]."""

    name = "ram"
    dense = False  # the kernels' form: a layer whose slabs are all here is one moe_ffn call

    def __init__(self, layout: SlabLayout, n_slots: int, align: int = 1, residue: int = 0):
        self.layout = layout
        self.slab_bytes = layout.nbytes
        self.parts = host_slots(n_slots, layout.raw_shapes, align, residue)
        self.stacked = kernels.StackedExperts.of(*self.parts, layout.qtypes, "the RAM pool's slots")
        self.cache = SlotCache(n_slots)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def views(self, slot: int, layout: SlabLayout) -> tuple[np.ndarray, ...]:
        """The slab of `layout` (its layer's) in `slot`: raw gate, up [n_ff, row_bytes], down [n_embd, row_bytes]."""
        return slot_views(self.parts, slot, layout)

    def describe(self) -> str:
        return f"RAM pool of quantized slabs, {self.cache.n_slots} slots"

    def release(self) -> None:
        """Give the slots' memory back now (the store is closed), not whenever the collector
        finds the model: a closed model may sit in a reference cycle while its caller goes on."""
        self.parts = []
        self.stacked = None


def dense_expert_ffn(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One expert's SwiGLU on dequantized weights: x [T, n_embd] -> [T, n_embd] (in x's dtype).

    gate, up: [n_ff, n_embd]; down: [n_embd, n_ff]. The fast tier's compute path,
    and the reference it is tested against.
    """
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


class FastTier:
    """Compute-ready experts in preallocated slots (see the module docstring for the forms).

    dense: gate, up [n_slots, n_ff, n_embd] and down [n_slots, n_embd, n_ff] as
    torch tensors; quantized: three uint8 arrays [n_slots, rows, row_bytes] as in the pool.
    """

    name = "fast"

    def __init__(self, layout: SlabLayout, n_slots: int, device: torch.device, dense: bool):
        self.layout = layout
        self.device = device
        self.dense = dense
        self.dtype = self.slot_dtype(layout, device, dense)
        self.slab_bytes = self.slot_bytes(layout, device, dense)
        self.stacked = None  # quantized slots checked once for the kernels (not dense)
        if not dense:
            self.parts = host_slots(n_slots, layout.raw_shapes)
            self.stacked = kernels.StackedExperts.of(*self.parts, layout.qtypes, "the fast tier's slots")
        else:
            self.parts = [
                torch.empty((n_slots, *shape), dtype=self.dtype, device=device) for shape in layout.dense_shapes
            ]
        self.cache = SlotCache(n_slots)
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.staging = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
            self.raw = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
            self.uploaded = torch.cuda.Event()

    @staticmethod
    def slot_dtype(layout: SlabLayout, device: torch.device, dense: bool) -> torch.dtype:
        if not dense:
            return torch.uint8
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if QT.BF16 in layout.qtypes else torch.float16

    @classmethod
    def slot_bytes(cls, layout: SlabLayout, device: torch.device, dense: bool) -> int:
        """Bytes one slab takes in this tier: what its budget counts."""
        if not dense:
            return layout.nbytes
        return layout.dense_nbytes(torch.finfo(cls.slot_dtype(layout, device, dense)).bits // 8)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def describe(self) -> str:
        if not self.dense:
            return (
                f"simulated fast tier of quantized slabs in CPU memory (the kernels' form), "
                f"{self.cache.n_slots} slots"
            )
        where = "GPU" if self.device.type == "cuda" else "CPU memory (simulated)"
        return (
            f"fast tier of dequantized {str(self.dtype).removeprefix('torch.')} experts in {where}, "
            f"{self.cache.n_slots} slots"
        )

    def release(self) -> None:
        """Give the slots' memory (GPU memory and the pinned staging buffer, on CUDA) back now."""
        self.parts = []
        self.stacked = None
        self.staging = self.raw = None

    def upload(self, slot: int, raw: tuple[np.ndarray, np.ndarray, np.ndarray], layout: SlabLayout) -> None:
        """Fill `slot` with the slab (of `layout`) whose raw parts are `raw` (runs in a transfer worker)."""
        if not self.dense:
            for dst, src in zip(slot_views(self.parts, slot, layout), raw):
                dst[...] = src
            return
        if self.device.type != "cuda":
            for part, src, qtype, (_, n) in zip(self.parts, raw, layout.qtypes, layout.dense_shapes):
                part[slot].copy_(dequantize_torch(torch.from_numpy(src), qtype, n))
            return
        staging = self.staging.numpy()
        offsets = np.cumsum((0, *layout.part_bytes))
        for src, start, stop in zip(raw, offsets, offsets[1:]):
            staging[start:stop] = src.reshape(-1)
        with torch.cuda.stream(self.stream):
            self.raw.copy_(self.staging, non_blocking=True)
            for part, qtype, (rows, row_bytes), (_, n), start, stop in zip(
                self.parts,
                layout.qtypes,
                layout.raw_shapes,
                layout.dense_shapes,
                offsets,
                offsets[1:],
            ):
                part[slot].copy_(dequantize_torch(self.raw[start:stop].view(rows, row_bytes), qtype, n))
            self.uploaded.record(self.stream)
        self.uploaded.synchronize()  # the staging buffer is free again, and the slot is complete

    def compute(self, slot: int, x: np.ndarray, layout: SlabLayout) -> np.ndarray:
        """The expert (of `layout`) in `slot` on token rows x [T, n_embd] float32 -> float32 [T, n_embd] on the host."""
        if not self.dense:
            return kernels.expert_ffn(*slot_views(self.parts, slot, layout), layout.qtypes, x)
        xs = torch.from_numpy(x).to(self.device, self.dtype)
        y = dense_expert_ffn(self.parts[0][slot], self.parts[1][slot], self.parts[2][slot], xs)
        return y.float().cpu().numpy()
