"""Calibration through a RAM pool, window by window against layer-major (issue 14, item 3).

Records 2048 tokens of the standard library's json package (windows of 256) from the
A3B-shaped 4-layer file of bench/offload.py (written there if absent) through a 25 % pool
read with O_DIRECT, once with each window a group of its own (what batch-by-batch prefill
reads: every window reads the experts again) and once layer-major over all eight windows,
and prints the time, the bytes read and the slab reads of each.

    python bench/calibrate_layer_major.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import qmoe
from bench.offload import a3b_model
from qmoe.experts.options import OffloadOptions
from qmoe.predictor.calibrate import record, tokenize_files

N_TOKENS, WINDOW = 2048, 256


def main() -> None:
    path = a3b_model()
    texts = sorted(Path(json.__file__).parent.glob("*.py"))
    for group in (WINDOW, 2 * N_TOKENS):
        with qmoe.load(path, threads=2, offload=OffloadOptions(ram_budget="25%", direct_io=True)) as m:
            out = Path(tempfile.mkdtemp(prefix="qmoe-calib-"))
            try:
                start = time.perf_counter()
                meta = record(m, tokenize_files(m, texts), out / "calib", N_TOKENS, window=WINDOW,
                              progress=False, group_tokens=group)
                seconds = time.perf_counter() - start
            finally:
                shutil.rmtree(out)
            stats = m.offload_stats()
            how = "window by window" if group == WINDOW else "layer-major"
            print(f"{how}: {meta.n_tokens} tokens in {seconds:.1f} s, read {stats['bytes_into']['ram'] / 1e9:.2f} GB "
                  f"({stats['transfers']} slab reads of {m.store.slabs.n_slabs} slabs)")


if __name__ == "__main__":
    main()
