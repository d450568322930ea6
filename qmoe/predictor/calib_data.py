"""Calibration data on disk: what the router did, token by token, per MoE layer.

Predictors are trained and evaluated on recordings of the real model. A recording
is a directory that can hold millions of tokens without holding them in RAM:

    CALIB_DIR/
      meta.json                 written last, at close: its presence marks a complete recording
      layer_003/                one folder per MoE layer (zero-padded block index)
        x_pre.npy     float16 [N, n_embd]   attn_norm output = pre-attention activation (predictor input)
        x_router.npy  float16 [N, n_embd]   ffn_norm output  = this layer's router input
        scores.npy    float32 [N, n_expert] router logits
        topk.npy      int16   [N, k]        the experts the router chose, best first

Row i of every array of every layer is the same token. Cross-layer baselines for
layer l read `x_router` of the *previous MoE layer* (`CalibData.previous_moe_layer`).

`CalibWriter` preallocates each array with `np.lib.format.open_memmap` for
`max_tokens` rows, fills it incrementally, and at `close()` rewrites each .npy
header to the number of rows written and truncates the file, so the result is a
set of ordinary .npy files. `CalibData` opens them read-only as memmaps.

The held-out split (`split_tokens`) lives here because training and evaluation
must agree on it: no token a predictor was trained on may be evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmoe.errors import CalibrationDataError

FORMAT_NAME = "qmoe-calibration"
FORMAT_VERSION = 1
META_FILE = "meta.json"

# Array name -> (dtype, width attribute of CalibMeta). Every array has N rows.
ARRAYS: dict[str, tuple[np.dtype, str]] = {
    "x_pre": (np.dtype(np.float16), "n_embd"),
    "x_router": (np.dtype(np.float16), "n_embd"),
    "scores": (np.dtype(np.float32), "n_expert"),
    "topk": (np.dtype(np.int16), "k"),
}

# Held-out tokens are taken in whole blocks of consecutive tokens: neighbouring
# tokens of one text are strongly correlated, so a token-level random split would
# evaluate on near-copies of training tokens.
SPLIT_BLOCK_TOKENS = 256
DEFAULT_HELDOUT_FRACTION = 0.1

_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class CalibMeta:
    """What a recording is: the model it came from and the sizes of its arrays."""

    n_layers: int  # blocks in the base model (dense and MoE)
    moe_layers: tuple[int, ...]  # block indices that have a router, ascending
    n_embd: int
    n_expert: int
    k: int  # experts used per token
    model_identity: str  # qmoe.predictor.sidecar.model_identity of the base GGUF
    n_tokens: int = 0  # rows recorded; set by CalibWriter.close()

    def __post_init__(self) -> None:
        layers = tuple(int(layer) for layer in self.moe_layers)
        object.__setattr__(self, "moe_layers", layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.n_layers:
            raise CalibrationDataError(
                f"moe_layers {list(layers)} must be distinct, ascending block indices below n_layers={self.n_layers}"
            )
        if not 0 < self.k <= self.n_expert:
            raise CalibrationDataError(f"k={self.k} must be between 1 and n_expert={self.n_expert}")
        if self.n_embd <= 0 or self.n_tokens < 0:
            raise CalibrationDataError(f"bad sizes: n_embd={self.n_embd}, n_tokens={self.n_tokens}")


def layer_dir(root: Path, layer: int) -> Path:
    return root / f"layer_{layer:03d}"


def split_tokens(
    n_tokens: int, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, heldout_idx) over `n_tokens` rows, both ascending.

    Tokens are grouped in blocks of consecutive rows (SPLIT_BLOCK_TOKENS, smaller
    for short recordings so that there are at least 100 blocks); block b is held
    out when floor((b+1)*f) > floor(b*f), which spreads the held-out blocks evenly
    through the recording (every 10th block for f=0.1) so that every text and
    domain in it is represented on both sides. Same inputs, same split: train.py
    and evaluate.py both call this.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise CalibrationDataError(f"held-out fraction {heldout_fraction} must be strictly between 0 and 1")
    block = max(1, min(SPLIT_BLOCK_TOKENS, n_tokens // 100))
    block_of_token = np.arange(n_tokens) // block
    heldout_block = np.floor((block_of_token + 1) * heldout_fraction) > np.floor(
        block_of_token * heldout_fraction
    )
    return np.flatnonzero(~heldout_block), np.flatnonzero(heldout_block)


class CalibWriter:
    """Writes a recording incrementally: `append(layer, ...)` per batch of tokens, then `close()`.

    Each MoE layer must receive the same tokens in the same order; close() checks
    that every layer got the same number of rows.
    """

    def __init__(self, directory: str | os.PathLike, meta: CalibMeta, max_tokens: int):
        self.root = Path(directory)
        if self.root.exists() and any(self.root.iterdir()):
            raise CalibrationDataError(
                f"{self.root}: exists and is not empty; remove it or choose another directory"
            )
        if max_tokens <= 0:
            raise CalibrationDataError(f"max_tokens must be positive, got {max_tokens}")
        self.meta = meta
        self.max_tokens = max_tokens
        self.count = {layer: 0 for layer in meta.moe_layers}  # rows written per layer
        self._arrays: dict[int, dict[str, np.memmap]] = {}
        self._closed = False
        for layer in meta.moe_layers:
            folder = layer_dir(self.root, layer)
            folder.mkdir(parents=True, exist_ok=True)
            self._arrays[layer] = {
                name: np.lib.format.open_memmap(
                    folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(max_tokens, getattr(meta, width))
                )
                for name, (dtype, width) in ARRAYS.items()
            }

    def __enter__(self) -> CalibWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, layer: int, x_pre: Any, x_router: Any, scores: Any, topk: Any) -> None:
        """Add T tokens for one MoE layer.

        x_pre, x_router: [T, n_embd]; scores: [T, n_expert]; topk: [T, k] (numpy or torch).
        """
        if self._closed:
            raise CalibrationDataError(f"{self.root}: append after close")
        if layer not in self._arrays:
            raise CalibrationDataError(
                f"{self.root}: layer {layer} is not an MoE layer {list(self.meta.moe_layers)}"
            )
        values = {"x_pre": x_pre, "x_router": x_router, "scores": scores, "topk": topk}
        rows = {name: _as_numpy(value) for name, value in values.items()}
        t = rows["x_pre"].shape[0]
        for name, (_, width) in ARRAYS.items():
            expected = (t, getattr(self.meta, width))
            if rows[name].shape != expected:
                raise CalibrationDataError(
                    f"{self.root}: layer {layer} {name} has shape {list(rows[name].shape)}, expected {list(expected)}"
                )
        start = self.count[layer]
        if start + t > self.max_tokens:
            raise CalibrationDataError(
                f"{self.root}: layer {layer} would hold {start + t} tokens, more than max_tokens={self.max_tokens}"
            )
        arrays = self._arrays[layer]
        # float16 saturates at 65504; an outlier beyond it would become inf and poison training.
        arrays["x_pre"][start : start + t] = np.clip(rows["x_pre"], -_F16_MAX, _F16_MAX)
        arrays["x_router"][start : start + t] = np.clip(rows["x_router"], -_F16_MAX, _F16_MAX)
        arrays["scores"][start : start + t] = rows["scores"]
        arrays["topk"][start : start + t] = rows["topk"]
        self.count[layer] = start + t

    def close(self) -> CalibMeta:
        """Shrink every array to the rows written and write meta.json; returns the final meta."""
        if self._closed:
            raise CalibrationDataError(f"{self.root}: closed twice")
        counts = set(self.count.values())
        if len(counts) != 1:
            self.abort()
            raise CalibrationDataError(
                f"{self.root}: MoE layers received different token counts {self.count}"
            )
        n_tokens = counts.pop()
        for layer in list(self._arrays):
            arrays = self._arrays.pop(layer)
            for name in list(arrays):
                array = arrays.pop(name)
                array.flush()
                path = Path(array.filename)
                del array  # the last reference: unmaps the file before it is cut
                _shrink_npy(path, n_tokens)
        self._closed = True
        final = CalibMeta(**{**asdict(self.meta), "n_tokens": n_tokens})
        record = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(final)}
        record["moe_layers"] = list(final.moe_layers)
        tmp = self.root / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.root / META_FILE)
        return final

    def abort(self) -> None:
        """Drop a failed recording: remove the layer folders written so far."""
        self._arrays.clear()
        self._closed = True
        for layer in self.meta.moe_layers:
            shutil.rmtree(layer_dir(self.root, layer), ignore_errors=True)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = (
            value.detach().float().cpu().numpy()
            if value.is_floating_point()
            else value.detach().cpu().numpy()
        )
    return np.asarray(value)


def _shrink_npy(path: Path, n_rows: int) -> None:
    """Rewrite a .npy header to `n_rows` rows (same header length) and cut the file after them."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        data_offset = f.tell()
        header = repr(
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": fortran_order,
                "shape": (n_rows, *shape[1:]),
            }
        )
        # The header (magic + length field + text) keeps its size, so the data does not move.
        length_field = 2 if version == (1, 0) else 4
        room = data_offset - 6 - 2 - length_field
        assert len(header) + 1 <= room, "a shorter shape always fits the preallocated header"
        f.seek(6 + 2 + length_field)
        f.write((header.ljust(room - 1) + "\n").encode("latin1"))
        f.truncate(data_offset + n_rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class CalibData:
    """A complete recording, opened read-only: arrays are memmaps, nothing is loaded."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        meta_path = self.root / META_FILE
        if not self.root.is_dir():
            raise CalibrationDataError(f"{self.root}: no such calibration directory")
        if not meta_path.is_file():
            raise CalibrationDataError(
                f"{self.root}: no {META_FILE}; not a calibration directory, or the recording did not finish"
            )
        try:
            record = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CalibrationDataError(f"{meta_path}: unreadable ({e})") from e
        if record.get("format") != FORMAT_NAME or record.get("version") != FORMAT_VERSION:
            raise CalibrationDataError(
                f"{meta_path}: format {record.get('format')!r} v{record.get('version')}, "
                f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
            )
        fields = {name: record.get(name) for name in CalibMeta.__dataclass_fields__}
        missing = [name for name, value in fields.items() if value is None]
        if missing:
            raise CalibrationDataError(f"{meta_path}: missing keys {missing}")
        self.meta = CalibMeta(**fields)
        self._arrays: dict[int, dict[str, np.ndarray]] = {layer: {} for layer in self.meta.moe_layers}
        for layer in self.meta.moe_layers:
            for name, (dtype, width) in ARRAYS.items():
                path = layer_dir(self.root, layer) / f"{name}.npy"
                expected = (self.meta.n_tokens, getattr(self.meta, width))
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise CalibrationDataError(f"{path}: cannot be read ({e})") from e
                if array.shape != expected or array.dtype != dtype:
                    raise CalibrationDataError(
                        f"{path}: {array.dtype} {list(array.shape)}, expected {dtype} {list(expected)} from {META_FILE}"
                    )
                self._arrays[layer][name] = array

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.meta.moe_layers

    @property
    def n_tokens(self) -> int:
        return self.meta.n_tokens

    def previous_moe_layer(self, layer: int) -> int | None:
        """The MoE layer before `layer`, whose router input the cross-layer baselines use; None for the first."""
        index = self.meta.moe_layers.index(layer)
        return self.meta.moe_layers[index - 1] if index > 0 else None

    def array(self, layer: int, name: str) -> np.ndarray:
        if layer not in self._arrays:
            raise CalibrationDataError(
                f"{self.root}: layer {layer} is not among the recorded layers {list(self.moe_layers)}"
            )
        return self._arrays[layer][name]

    def x_pre(self, layer: int) -> np.ndarray:
        """float16 [N, n_embd]: attn_norm output of `layer`."""
        return self.array(layer, "x_pre")

    def x_router(self, layer: int) -> np.ndarray:
        """float16 [N, n_embd]: ffn_norm output of `layer` (its router input)."""
        return self.array(layer, "x_router")

    def scores(self, layer: int) -> np.ndarray:
        """float32 [N, n_expert]: router logits of `layer`."""
        return self.array(layer, "scores")

    def topk(self, layer: int) -> np.ndarray:
        """int16 [N, k]: experts the router of `layer` chose."""
        return self.array(layer, "topk")
