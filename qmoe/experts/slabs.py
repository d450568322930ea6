"""Expert slabs: the unit the store moves and accounts, where each lies in the file, and reading it.

A slab is one expert of one MoE layer: its rows of ffn_gate_exps, ffn_up_exps and
ffn_down_exps. Each of the three is contiguous in the GGUF file (stacked tensors
are [E, rows, row] with the expert outermost), so a slab is three byte ranges.
Every slab of a layer has the same layout; layers may differ in their parts' types
(llama.cpp's _M mixes give some layers' ffn_down_exps more bits), so a tier's slot
is sized for the widest layer's slab (`ExpertSlabs.layout`). The store never looks inside a slab
except through the kernels (which take its raw bytes as they are in the file)
and the fast tier (which dequantizes it).

`SlabReader` reads slabs with explicit `os.preadv` calls, optionally with
O_DIRECT so that the page cache does not keep a second, unaccounted copy of what
the RAM pool holds. With O_DIRECT the device writes the bytes straight into the
pool's slot: the pool places its slots at the file's offsets modulo the drive's
block size (`direct_residue`), so that a slab's aligned blocks land where they
belong, and only its partial first and last blocks pass through a small buffer.
Filesystems that refuse O_DIRECT (tmpfs, some overlays) get buffered reads
followed by POSIX_FADV_DONTNEED on the range, with a warning. Several reads are in
flight at once: the store's transfer workers call `read` concurrently (transfers.py),
and a large slab's three parts are read at once.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
from collections import Counter
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


def direct_alignment(path: str | os.PathLike) -> int:
    """Bytes O_DIRECT offsets, lengths and buffers must be multiples of on the drive holding `path`.

    The device's logical block size and DMA alignment, from sysfs; 4096 (a multiple of
    every common block size) where sysfs does not say. 512 rather than 4096 matters:
    GGUF tensors are 32-byte aligned, so slabs lie at the same offset modulo 512
    throughout most files but not modulo 4096.
    """
    try:
        dev = os.stat(path).st_dev
        queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = queue / "queue" if (queue / "queue").is_dir() else queue / ".." / "queue"  # a partition
        block = int((queue / "logical_block_size").read_text())
        dma = int((queue / "dma_alignment").read_text()) + 1
        align = max(block, dma)
    except (OSError, ValueError):
        return 4096
    return align if 0 < align <= 4096 and 4096 % align == 0 else 4096


def direct_residue(slabs: ExpertSlabs, align: int) -> int:
    """The offset modulo `align` of most slab parts in the file: where a pool's slots should start
    (modulo `align`) for O_DIRECT to read into them directly."""
    residues = Counter(offset % align for layer in slabs.layers for e in (0, slabs.n_expert - 1)
                       for offset, _ in slabs.ranges(layer, e))
    return residues.most_common(1)[0][0]


class SlabReader:
    """Explicit reads of slabs from the GGUF file into caller-owned buffers; safe to call from
    `depth` threads at once (each thread has its own small buffers).

    With O_DIRECT, a part whose buffer lies at its file offset modulo `align` is read in
    place: its whole blocks straight into the buffer, its partial first and last blocks
    (a slab rarely starts or ends on a block boundary) through a per-thread buffer of one
    block each. A part whose buffer does not line up is read whole into a per-thread
    bounce buffer and copied (`bounced_bytes` counts them). Through the page cache a read
    is a copy into the buffer, with no alignment to keep.
    """

    # A3B shapes, 25 % pool: 2.6 MB slabs decoded at 19.1 tokens/s with parallel parts and 15.2
    # with serial ones; the tiny model's 0.1 MB slabs at 68 and 86 (the threads' turns at the GIL
    # cost more than the overlap saves).
    FAN_OUT_MIN_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike, direct: bool, depth: int = 1):
        self.path = Path(path)
        self.fd = self._open(os.O_RDONLY)
        self.direct_fd = -1
        self.direct = False
        self.drop_cache = False  # fallback for O_DIRECT: evict what a buffered read cached
        self.align = direct_alignment(self.path)
        self.bounced_bytes = 0  # read through a bounce buffer because the destination did not line up
        if direct and not hasattr(os, "O_DIRECT"):
            self._fall_back("this platform has no O_DIRECT")
        elif direct:
            try:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                self._fall_back(f"cannot open it with O_DIRECT ({e.strerror})")
        # Helper threads for the parts of large slabs: two for each of the store's workers.
        self.helpers = ThreadPoolExecutor(max_workers=2 * max(1, depth), thread_name_prefix="qmoe-read")
        self.lock = threading.Lock()  # the fallback switch and the counters
        self.local = threading.local()  # each reading thread's own O_DIRECT buffers
        self.buffers: list[mmap.mmap] = []  # every thread's, to close

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
        """Fill each writable contiguous buffer of `outs` with its (offset, nbytes) range of the file.

        With O_DIRECT, the parts of a slab of FAN_OUT_MIN_BYTES or more are read at once: the
        calling thread reads the first, helper threads the others. A decode step misses only
        a few slabs per layer, so slab-level parallelism alone would leave the drive with a
        few requests where it serves 16 fastest (bench/larger_than_ram.py measures it).
        """
        parts = []
        for (offset, nbytes), out in zip(ranges, outs):
            flat = out.reshape(-1).view(np.uint8)
            assert flat.nbytes == nbytes and flat.flags.c_contiguous
            parts.append((offset, nbytes, flat))
        if not self.direct or sum(nbytes for _, nbytes in ranges) < self.FAN_OUT_MIN_BYTES:
            for part in parts:
                self._read_part(*part)
            return
        helped = [self.helpers.submit(self._read_part, *part) for part in parts[1:]]
        try:
            self._read_part(*parts[0])
        finally:
            for done in helped:
                done.result()  # raises the part's error, if any

    def _read_part(self, offset: int, nbytes: int, flat: np.ndarray) -> None:
        if self.direct:
            try:
                self._read_direct(offset, nbytes, flat)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise QmoeError(
                        f"{self.path}: reading {nbytes} bytes at {offset} failed ({e.strerror})"
                    ) from e
                with self.lock:
                    if self.direct:
                        self._fall_back("the filesystem refused an O_DIRECT read")
        self._read_exact(self.fd, memoryview(flat), offset)
        if self.drop_cache:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _read_exact(self, fd: int, buf: memoryview, offset: int, need: int | None = None) -> None:
        """Read into `buf` from `offset` until its first `need` bytes (all of it by default) are in.
        With O_DIRECT the file's last block may come back short, which is fine once those are in."""
        got, need = 0, len(buf) if need is None else need
        while got < need:
            try:
                n = os.preadv(fd, [buf[got:]], offset + got)
            except OSError as e:
                if fd == self.direct_fd:
                    raise  # _read_part decides about EINVAL
                raise QmoeError(f"{self.path}: reading {need} bytes at {offset} failed ({e.strerror})") from e
            if n == 0:
                raise GGUFFormatError(f"{self.path}: the file ends before the expert bytes at {offset}+{need}")
            got += n

    def _read_direct(self, offset: int, nbytes: int, flat: np.ndarray) -> None:
        align, end = self.align, offset + nbytes
        first_whole = -(-offset // align) * align  # the first block boundary at or after offset
        last_whole = end // align * align  # the last one at or before end
        if (flat.ctypes.data - offset) % align or first_whole >= last_whole:
            self._read_bounced(offset, nbytes, flat)
            return
        if first_whole > offset:  # the partial first block
            head = self._buffer("head", align)
            self._read_block(head, first_whole - align, align, align)
            flat[: first_whole - offset] = np.frombuffer(head, np.uint8, first_whole - offset, offset % align)
        self._read_exact(self.direct_fd, memoryview(flat)[first_whole - offset : last_whole - offset], first_whole)
        if end > last_whole:  # the partial last block
            tail = self._buffer("tail", align)
            self._read_block(tail, last_whole, align, end - last_whole)
            flat[last_whole - offset :] = np.frombuffer(tail, np.uint8, end - last_whole)

    def _read_block(self, buffer: mmap.mmap, start: int, length: int, need: int) -> None:
        """`length` aligned bytes of the file from aligned `start` into `buffer`, of which the first
        `need` must arrive (the file's last block may be short)."""
        view = memoryview(buffer)[:length]
        try:
            self._read_exact(self.direct_fd, view, start, need)
        finally:
            view.release()

    def _read_bounced(self, offset: int, nbytes: int, flat: np.ndarray) -> None:
        """The whole part through this thread's bounce buffer (its destination does not line up)."""
        start = offset // self.align * self.align
        length = -(-(offset + nbytes - start) // self.align) * self.align
        bounce = self._buffer("bounce", length)
        self._read_block(bounce, start, length, offset + nbytes - start)
        flat[:] = np.frombuffer(bounce, np.uint8, count=nbytes, offset=offset - start)
        with self.lock:
            self.bounced_bytes += nbytes

    def _buffer(self, name: str, nbytes: int) -> mmap.mmap:
        """This thread's page-aligned buffer `name` of at least `nbytes` (anonymous maps are page-aligned)."""
        buffer = getattr(self.local, name, None)
        if buffer is None or len(buffer) < nbytes:
            buffer = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
            setattr(self.local, name, buffer)
            with self.lock:
                self.buffers.append(buffer)
        return buffer

    def close(self) -> None:
        """Close the file and the buffers. Idempotent; no read may be running."""
        self.helpers.shutdown()
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        with self.lock:
            for buffer in self.buffers:
                buffer.close()
            self.buffers.clear()
        self.local = threading.local()
