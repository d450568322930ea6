"""Convert a Hugging Face MoE checkpoint into a GGUF that qmoe and llama.cpp both run.

    python convert/to_gguf.py HF_DIR -o model.gguf --outtype q4_k_m [--expert-type q4_0] [--pure] [--force]

The conversion streams, so a checkpoint far larger than RAM converts:
1. read config.json and the safetensors headers (no weights);
2. plan every output tensor (convert/archs/<arch>.py) and check each source name
   and shape against the checkpoint, so a bad checkpoint fails before a byte is written;
3. write the GGUF header, metadata, tokenizer and tensor infos (sizes are known
   from the plan);
4. produce each tensor in turn: read a few rows (or one expert) from the memory-mapped
   shards, quantize, append; only the tensor being written is held in memory;
5. the file is written beside the target under a temporary name and renamed on
   success; a failure, Ctrl-C or SIGTERM removes it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make `convert` and `qmoe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from gguf import GGML_QUANT_VERSION, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter
from tqdm import tqdm

from convert import archs
from convert.archs.common import n_expert
from convert.checkpoint import Checkpoint, HFConfig
from convert.mixes import ModelFacts
from convert.plan import OutputTensor, Piece
from convert.qtypes import OUTTYPES, SINGLE_TYPES, byte_shape, check_outtype, choose_types, nbytes, parse_type
from convert.quants import quantize
from convert.tokenizer_meta import add_tokenizer
from qmoe.errors import ConversionError, QmoeError

# float32 bytes read and quantized at a time when a tensor is streamed in row chunks
_CHUNK_BYTES = 32 << 20


class UnusedTensorsWarning(UserWarning):
    """The checkpoint holds tensors the architecture does not use; they are not written."""


def convert(
    hf_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    outtype: str = "q8_0",
    expert_type: str | None = None,
    force: bool = False,
    progress: bool = True,
    pure: bool = False,
) -> Path:
    """Convert checkpoint `hf_dir` to the GGUF file `out_path`; returns `out_path`.

    `outtype` is a single type for every matrix or one of llama-quantize's mixes
    (convert/qtypes.py); `pure` gives every matrix the mix's base type; `expert_type`,
    when given, is the type of the stacked expert tensors instead. Norms, router weights
    and 1-D tensors stay F32. Raises ConversionError (or UnsupportedArchitectureError)
    for a bad checkpoint or an existing `out_path` without `force`.
    """
    out_path = Path(out_path)
    check_outtype(outtype)
    if expert_type:
        parse_type(expert_type, "--expert-type")
    if out_path.exists() and not force:
        raise ConversionError(f"{out_path}: already exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise ConversionError(f"{out_path.parent}: output directory does not exist")

    checkpoint = Checkpoint(hf_dir)
    arch = archs.for_config(checkpoint.config)
    plan = arch.tensors(checkpoint.config)
    _check_sources(checkpoint, plan)
    _warn_unused(checkpoint, plan)
    types, file_type = _types(checkpoint.config, arch, plan, outtype, expert_type, pure)

    with _temporary_beside(out_path) as tmp, _sigterm_raises():
        _write(tmp, checkpoint, arch, plan, types, file_type, progress)
    return out_path


def plan_types(
    hf_dir: str | os.PathLike, outtype: str, expert_type: str | None = None, pure: bool = False
) -> tuple[dict[str, GGMLQuantizationType], int]:
    """The type of every tensor `convert` would write, and general.file_type, without
    reading a weight (only config.json and the safetensors headers)."""
    checkpoint = Checkpoint(hf_dir)
    arch = archs.for_config(checkpoint.config)
    return _types(checkpoint.config, arch, arch.tensors(checkpoint.config), outtype, expert_type, pure)


def _types(cfg: HFConfig, arch: ModuleType, plan: list[OutputTensor], outtype, expert_type, pure):
    # What llama.cpp's mix recipes read from the file's metadata. (Head counts matter only
    # for attn_v, which DeepSeek's MLA, the one layout that writes head_count_kv = 1, lacks.)
    n_head = int(cfg.require("num_attention_heads"))
    model = ModelFacts(
        arch=MODEL_ARCH_NAMES[arch.ARCH],
        n_layer=int(cfg.require("num_hidden_layers")),
        n_expert=n_expert(cfg),
        n_head=n_head,
        n_head_kv=int(cfg.get("num_key_value_heads", default=n_head)),
    )
    return choose_types({t.name: t.shape for t in plan}, outtype, expert_type, model, pure)


def _write(
    path: Path,
    checkpoint: Checkpoint,
    arch: ModuleType,
    plan: list[OutputTensor],
    types: dict[str, GGMLQuantizationType],
    file_type: int,
    progress: bool,
) -> None:
    """Header, metadata, tokenizer and tensor infos first (sizes come from the plan),
    then each tensor's data as soon as it is produced."""
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch.ARCH])
    try:
        writer.add_name(checkpoint.dir.resolve().name)
        arch.add_metadata(writer, checkpoint.config)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        add_tokenizer(writer, checkpoint.dir)
        sizes = {t.name: nbytes(t.shape, types[t.name]) for t in plan}
        for t in plan:
            writer.add_tensor_info(
                t.name, t.shape, np.dtype(np.float32), sizes[t.name], raw_dtype=types[t.name]
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(
            total=sum(sizes.values()), unit="B", unit_scale=True, desc="converting", disable=not progress
        )
        with bar:
            for number, t in enumerate(plan, 1):
                bar.set_postfix_str(f"tensor {number}/{len(plan)} {t.name}", refresh=False)
                writer.write_tensor_data(_produce(checkpoint, t, types[t.name]))
                bar.update(sizes[t.name])
    finally:
        writer.close()


def _check_sources(checkpoint: Checkpoint, plan: list[OutputTensor]) -> None:
    """Every tensor the plan reads exists with the shape config.json implies."""
    for t in plan:
        for piece in t.pieces:
            for src in piece.sources:
                found = checkpoint.source(src.name)
                if found.shape != src.shape:
                    raise ConversionError(
                        f"{found.file}: tensor {src.name!r} has shape {list(found.shape)}, but "
                        f"{checkpoint.config.path} implies {list(src.shape)} (for {t.name})"
                    )


def _warn_unused(checkpoint: Checkpoint, plan: list[OutputTensor]) -> None:
    used = {src.name for t in plan for piece in t.pieces for src in piece.sources}
    unused = sorted(set(checkpoint.tensors) - used)
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        warnings.warn(
            f"{checkpoint.dir}: {len(unused)} checkpoint tensors are not used by "
            f"{checkpoint.config.architecture} and are not written: {shown}",
            UnusedTensorsWarning,
            stacklevel=3,
        )


def _produce(checkpoint: Checkpoint, tensor: OutputTensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes of `tensor` in `qtype`: uint8 [..., row_bytes], one piece (expert) at a time."""
    out = np.empty(byte_shape(tensor.shape, qtype), np.uint8)
    if len(tensor.pieces) == 1:
        _fill(checkpoint, tensor.pieces[0], tensor.piece_shape, qtype, out)
    else:
        for index, piece in enumerate(tensor.pieces):
            _fill(checkpoint, piece, tensor.piece_shape, qtype, out[index])
    return out


def _fill(
    checkpoint: Checkpoint,
    piece: Piece,
    shape: tuple[int, ...],
    qtype: GGMLQuantizationType,
    dest: np.ndarray,
) -> None:
    """Write `piece` (float32 `shape`) into `dest` (its uint8 bytes); copies stream in row chunks."""
    if piece.is_copy and len(shape) >= 2:
        rows_per_chunk = max(1, _CHUNK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], rows_per_chunk):
            rows = checkpoint.read(piece.sources[0].name, start, start + rows_per_chunk)
            dest[start : start + len(rows)] = quantize(rows, qtype)
        return
    values = piece.make(*(checkpoint.read(src.name) for src in piece.sources))
    assert values.shape == shape, f"piece made {values.shape}, plan says {shape}"
    dest[...] = quantize(values, qtype)


@contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary path in target's directory, renamed to `target` if the block succeeds
    and removed if it raises (including KeyboardInterrupt and SystemExit)."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While converting, SIGTERM raises SystemExit so the cleanup above still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "hf_dir", type=Path, help="Hugging Face checkpoint directory (config.json, *.safetensors)"
    )
    parser.add_argument("-o", "--outfile", type=Path, required=True, help="GGUF file to write")
    parser.add_argument(
        "--outtype",
        default="q8_0",
        choices=OUTTYPES,
        help="type of the weight matrices: a single type, or llama-quantize's mix of that name "
        "(q2_k q3_k_m q4_k_m q5_k_m q6_k iq4_xs)",
    )
    parser.add_argument(
        "--expert-type", choices=list(SINGLE_TYPES), help="type of the expert tensors (default: --outtype)"
    )
    parser.add_argument(
        "--pure", action="store_true", help="no mix: every matrix gets the --outtype mix's base type"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    warnings.showwarning = _print_warning
    try:
        out = convert(
            args.hf_dir, args.outfile, args.outtype, args.expert_type, force=args.force, pure=args.pure
        )
    except QmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
