"""What a read from the drive costs the kernels beside it: compute lost per overlapped read.

A prefetch only pays if the stall it saves exceeds what it costs. On a machine whose
DMA goes through bounce buffers (virtual machines with SWIOTLB, like the 2-core
development VMs), every O_DIRECT read ends in a kernel memcpy of the whole read,
in the reading thread or an interrupt, and that copy competes with the expert kernels
for the cores and for memory bandwidth. A demand read pays it while the model waits
(free); a prefetch pays it while the kernels run. This bench measures it:

  1. expert-sized q8_0 products (3 x 768 rows of 2048, 60 distinct matrices, more than
     the last-level cache) on --threads kernel threads, alone;
  2. the same beside one reader thread issuing O_DIRECT reads of --read-mib at random
     offsets of FILE, back to back and with a gap between reads;
  3. compute lost per read = (slowdown of the products) x (seconds) / (reads made).

    python bench/read_contention.py /tmp/qmoe-ltr/qwen3-a3b-shapes-48l-q8_0.gguf
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmoe import kernels  # noqa: E402
from qmoe.kernels.formats import QT, row_bytes  # noqa: E402

ROWS, COLS, MATRICES = 3 * 768, 2048, 60  # one A3B expert's three matrices as one


def expert_matrices(rng: np.random.Generator) -> list[np.ndarray]:
    """Random q8_0 blocks with small float16 scales (the products' speed does not depend on the values)."""
    out = []
    for _ in range(MATRICES):
        w = rng.integers(0, 255, (ROWS, row_bytes(QT.Q8_0, COLS)), dtype=np.uint8)
        w.reshape(ROWS, -1, 34)[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        out.append(w)
    return out


def product_seconds(weights: list[np.ndarray], x: np.ndarray, count: int = 60, repeats: int = 5) -> float:
    """Median seconds of one product over `repeats` sweeps of `count` products."""
    sweeps = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            kernels.matmul(weights[i % len(weights)], QT.Q8_0, x)
        sweeps.append((time.perf_counter() - start) / count)
    return float(np.median(sweeps))


def read_loop(path: Path, read_bytes: int, gap_s: float, stop: threading.Event, counts: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, read_bytes)  # page-aligned, as O_DIRECT needs
    rng = np.random.default_rng(0)
    pages = (os.path.getsize(path) - read_bytes) // mmap.PAGESIZE
    try:
        while not stop.is_set():
            os.preadv(fd, [buf], int(rng.integers(0, pages)) * mmap.PAGESIZE)
            counts[0] += 1
            if gap_s:
                time.sleep(gap_s)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a large file on the drive to read from (a model file)")
    parser.add_argument("--threads", type=int, default=2, help="kernel threads")
    parser.add_argument("--read-mib", type=float, default=5.0, help="size of each read (an A3B q8_0 slab: 5)")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        raise SystemExit(f"{args.file}: no such file")
    read_bytes = int(args.read_mib * 2**20) // mmap.PAGESIZE * mmap.PAGESIZE
    if os.path.getsize(args.file) < 4 * read_bytes:
        raise SystemExit(f"{args.file}: too small to read {args.read_mib} MiB at random offsets")
    kernels.set_num_threads(args.threads)
    weights = expert_matrices(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((1, COLS)).astype(np.float32)
    product_seconds(weights, x, repeats=1)  # compile and warm up
    alone = product_seconds(weights, x)
    print(f"{args.threads} kernel threads, products alone: {1e6 * alone:.0f} us each")
    for gap_s in (0.0, 0.004):
        stop, counts = threading.Event(), [0]
        reader = threading.Thread(target=read_loop, args=(args.file, read_bytes, gap_s, stop, counts))
        reader.start()
        start = time.perf_counter()
        beside = product_seconds(weights, x)
        stop.set()
        reader.join()
        seconds = time.perf_counter() - start
        rate = counts[0] / seconds
        lost = (1 - alone / beside) * seconds / max(counts[0], 1)  # compute seconds lost per read
        print(f"beside reads ({1e3 * gap_s:.0f} ms apart): {1e6 * beside:.0f} us each; {rate:.0f} reads/s "
              f"({rate * read_bytes / 1e9:.2f} GB/s); compute lost per read: {1e3 * lost:.2f} ms")


if __name__ == "__main__":
    main()
