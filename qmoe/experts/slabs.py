"""Expert slabs: the unit the store moves and accounts, where each lies in the file, and reading it.

A slab is one expert of one MoE layer: its rows of ffn_gate_exps, ffn_up_exps and
ffn_down_exps. Each of the three is contiguous in the GGUF file (stacked tensors
are [E, rows, row] with the expert outermost), so a slab is three byte ranges.
Every slab of a layer has the same layout; layers may differ in their parts' types
(llama.cpp's _M mixes give some layers' ffn_down_exps more bits), so a tier's slot
is sized for the widest layer's slab (`ExpertSlabs.layout`). The store never looks inside a slab
except through the kernels (which take its raw bytes as they are in the file)
and the fast tier (which dequantizes it).

`SlabReader` reads slabs with explicit `os.pread` calls, optionally with
O_DIRECT so that the page cache does not keep a second, unaccounted copy of what
the RAM pool holds: with O_DIRECT the kernel moves the bytes straight from the
device into a page-aligned bounce buffer, from which the slot is filled.
Filesystems that refuse O_DIRECT (tmpfs, some overlays) get buffered reads
followed by POSIX_FADV_DONTNEED on the range, with a warning. With O_DIRECT, the
three parts of a slab of 1 MiB or more are read in parallel; smaller slabs, and all
buffered reads, read them one after the other (`SlabReader` says why).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from qmoe.errors import GGUFFormatError, QmoeError
from qmoe.gguf_file import Tensor

PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class SlabLayout:
    """The shape of a layer's slabs: types and sizes of its gate, up and down parts."""

    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType]
    n_embd: int
    n_ff: int  # one expert's FFN width
    row_bytes: tuple[int, int, int]  # bytes of one row of gate, up, down in the file

    @property
    def raw_shapes(self) -> tuple[tuple[int, int], ...]:
        """Each part as raw bytes [rows, row_bytes] (what the kernels read)."""
        return (
            (self.n_ff, self.row_bytes[0]),
            (self.n_ff, self.row_bytes[1]),
            (self.n_embd, self.row_bytes[2]),
        )

    @property
    def dense_shapes(self) -> tuple[tuple[int, int], ...]:
        """Each part dequantized: gate, up [n_ff, n_embd]; down [n_embd, n_ff]."""
        return (self.n_ff, self.n_embd), (self.n_ff, self.n_embd), (self.n_embd, self.n_ff)

    @property
    def part_bytes(self) -> tuple[int, int, int]:
        return tuple(rows * rb for rows, rb in self.raw_shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of one quantized slab: what the RAM pool holds and a link moves."""
        return sum(self.part_bytes)

    def dense_nbytes(self, itemsize: int) -> int:
        """Bytes of one slab dequantized to elements of `itemsize` bytes."""
        return 3 * self.n_ff * self.n_embd * itemsize


class ExpertSlabs:
    """Every routed expert of a model as slabs: per MoE layer its three stacked tensors.

    tensors: MoE layer -> (ffn_gate_exps, ffn_up_exps, ffn_down_exps) as the model
    loaded them (gate/up [E, n_ff, n_embd], down [E, n_embd, n_ff]).
    """

    def __init__(self, path: str | os.PathLike, tensors: dict[int, tuple[Tensor, Tensor, Tensor]]):
        if not tensors:
            raise QmoeError(f"{path}: the model has no routed experts to offload")
        self.path = Path(path)
        self.tensors = tensors
        self.layers = sorted(tensors)
        first = self.layers[0]
        self.n_expert = tensors[first][0].shape[0]
        # Each layer's own layout: llama.cpp's mixes give some layers' ffn_down_exps more bits
        # (Q4_K_M: Q6_K on some layers, Q4_K on others).
        self.layouts = {layer: self._layout(layer) for layer in self.layers}
        for layer, layout in self.layouts.items():
            if (layout.n_embd, layout.n_ff) != (self.layouts[first].n_embd, self.layouts[first].n_ff) or (
                tensors[layer][0].shape[0] != self.n_expert
            ):
                raise QmoeError(
                    f"{self.path}: the experts of block {layer} ({layout}, {tensors[layer][0].shape[0]} "
                    f"experts) do not have the shapes of block {first}'s ({self.layouts[first]}); the expert "
                    "store needs experts of one shape in every MoE layer"
                )
        # A tier's slot holds any layer's slab: per part, the widest layer's type. A narrower
        # slab fills the front of each part (`slot_views`).
        widest = [max((lay for lay in self.layouts.values()), key=lambda lay: lay.row_bytes[i]) for i in range(3)]
        self.layout = SlabLayout(
            tuple(w.qtypes[i] for i, w in enumerate(widest)), widest[0].n_embd, widest[0].n_ff,
            tuple(w.row_bytes[i] for i, w in enumerate(widest)),
        )  # fmt: skip

    def _layout(self, layer: int) -> SlabLayout:
        gate, up, down = self.tensors[layer]
        n_expert, n_ff, n_embd = gate.shape
        if up.shape != gate.shape or down.shape != (n_expert, n_embd, n_ff):
            raise GGUFFormatError(
                f"{self.path}: block {layer}'s expert tensors do not fit together: gate {gate.shape}, "
                f"up {up.shape}, down {down.shape}"
            )
        return SlabLayout(
            (gate.qtype, up.qtype, down.qtype), n_embd, n_ff, (gate.row_bytes, up.row_bytes, down.row_bytes)
        )

    @property
    def n_slabs(self) -> int:
        return len(self.layers) * self.n_expert

    @property
    def total_bytes(self) -> int:
        """Quantized bytes of all routed experts."""
        return self.n_expert * sum(layout.nbytes for layout in self.layouts.values())

    @property
    def uniform(self) -> bool:
        """Every MoE layer's slabs are laid out alike (then a tier's slots are one stacked tensor per part)."""
        return all(layout == self.layout for layout in self.layouts.values())

    def views(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The slab's three parts in the memory-mapped file, as raw bytes [rows, row_bytes]."""
        return tuple(
            t.data[expert].view(np.uint8).reshape(shape)
            for t, shape in zip(self.tensors[layer], self.layouts[layer].raw_shapes)
        )

    def ranges(self, layer: int, expert: int) -> tuple[tuple[int, int], ...]:
        """(absolute file offset, bytes) of the slab's gate, up and down parts."""
        return tuple(
            (t.offset + expert * nbytes, nbytes)
            for t, nbytes in zip(self.tensors[layer], self.layouts[layer].part_bytes)
        )


def slot_views(parts: list[np.ndarray], slot: int, layout: SlabLayout) -> tuple[np.ndarray, ...]:
    """A slab of `layout` in `slot` of a tier's host parts [n_slots, rows, slot row bytes]: each part's
    front bytes as [rows, row_bytes] (all of it when the slab is as wide as the slot), contiguous."""
    return tuple(
        part[slot].reshape(-1)[: rows * row_bytes].reshape(rows, row_bytes)
        for part, (rows, row_bytes) in zip(parts, layout.raw_shapes)
    )


class SlabReader:
    """Explicit reads of slabs from the GGUF file into caller-owned buffers.

    With O_DIRECT a slab of FAN_OUT_MIN_BYTES or more has its three parts read at
    once, one thread each: a drive serves parallel requests in little more than the
    time of one. A smaller slab's parts are read one after the other: alone, three
    35 KB reads took 660 us in a row and 170 us together, but beside a running model
    the reader threads' turns at the GIL cost it more than that (below). Through the
    page cache a read is a copy, with no latency to overlap: always one after the
    other. Used by one thread at a time (the store's transfer thread).
    """

    ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size
    # 25 % RAM pool, O_DIRECT: the tiny model's 0.1 MB slabs decoded at 68 tokens/s with parallel
    # parts and 86 with serial ones (pre-attn); the A3B shapes' 2.6 MB slabs at 19.1 parallel and
    # 15.2 serial (none).
    FAN_OUT_MIN_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike, direct: bool):
        self.path = Path(path)
        self.fd = self._open(os.O_RDONLY)
        self.direct_fd = -1
        self.direct = False
        self.drop_cache = False  # fallback for O_DIRECT: evict what a buffered read cached
        if direct and not hasattr(os, "O_DIRECT"):
            self._fall_back("this platform has no O_DIRECT")
        elif direct:
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                self._fall_back(f"cannot open it with O_DIRECT ({e.strerror})")
        self.fallback_lock = threading.Lock()
        self.bounces: list[mmap.mmap | None] = [None] * len(PARTS)  # one O_DIRECT buffer per part
        self.workers = ThreadPoolExecutor(max_workers=len(PARTS), thread_name_prefix="qmoe-read")

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except OSError as e:
            raise QmoeError(f"{self.path}: cannot open the model for reading experts ({e.strerror})") from e

    def _fall_back(self, why: str) -> None:
        warnings.warn(
            f"{self.path}: {why}; reading experts through the page cache and dropping each range "
            "from it afterwards (POSIX_FADV_DONTNEED) instead",
            RuntimeWarning,
            stacklevel=3,
        )
        self.direct = False
        self.drop_cache = hasattr(os, "posix_fadvise")

    def read(self, ranges: tuple[tuple[int, int], ...], outs: tuple[np.ndarray, ...]) -> None:
        """Fill each writable contiguous buffer of `outs` with its (offset, nbytes) range of the file."""
        if not self.direct or sum(nbytes for _, nbytes in ranges) < self.FAN_OUT_MIN_BYTES:
            for i, ((offset, nbytes), out) in enumerate(zip(ranges, outs)):
                self._read_part(i, offset, nbytes, out)
            return
        parts = [
            self.workers.submit(self._read_part, i, offset, nbytes, out)
            for i, ((offset, nbytes), out) in enumerate(zip(ranges, outs))
        ]
        for part in parts:
            part.result()  # raises the part's error, if any

    def _read_part(self, part: int, offset: int, nbytes: int, out: np.ndarray) -> None:
        flat = out.reshape(-1).view(np.uint8)
        assert flat.nbytes == nbytes and flat.flags.c_contiguous
        if self.direct:
            try:
                self._read_direct(part, offset, nbytes, flat)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise QmoeError(
                        f"{self.path}: reading {nbytes} bytes at {offset} failed ({e.strerror})"
                    ) from e
                with self.fallback_lock:
                    if self.direct:
                        self._fall_back("the filesystem refused an O_DIRECT read")
        self._read_exact(memoryview(flat), offset, nbytes)
        if self.drop_cache:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _read_exact(self, buf: memoryview, offset: int, nbytes: int) -> None:
        got = 0
        while got < nbytes:
            try:
                n = os.preadv(self.fd, [buf[got:nbytes]], offset + got)
            except OSError as e:
                raise QmoeError(
                    f"{self.path}: reading {nbytes} bytes at {offset} failed ({e.strerror})"
                ) from e
            if n == 0:
                raise GGUFFormatError(
                    f"{self.path}: the file ends before the expert bytes at {offset}+{nbytes}"
                )
            got += n

    def _read_direct(self, part: int, offset: int, nbytes: int, out: np.ndarray) -> None:
        start = offset // self.ALIGN * self.ALIGN
        end = -(-(offset + nbytes) // self.ALIGN) * self.ALIGN
        bounce = self.bounces[part]
        if bounce is None or len(bounce) < end - start:
            bounce = self.bounces[part] = mmap.mmap(-1, end - start)  # anonymous mappings are page-aligned
        view = memoryview(bounce)
        need = offset + nbytes - start
        got = 0
        while got < need:  # the last block of the file may come back short: that is fine once `need` is in
            n = os.preadv(self.direct_fd, [view[got : end - start]], start + got)
            if n == 0:
                raise GGUFFormatError(
                    f"{self.path}: the file ends before the expert bytes at {offset}+{nbytes}"
                )
            got += n
        out[:] = np.frombuffer(bounce, np.uint8, count=nbytes, offset=offset - start)
        view.release()

    def close(self) -> None:
        """Stop the reading threads and close the file. Idempotent."""
        self.workers.shutdown()
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        for bounce in self.bounces:
            if bounce is not None:
                bounce.close()
        self.bounces = [None] * len(PARTS)
