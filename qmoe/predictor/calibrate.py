"""Recording what the router does, token by token, for predictor training.

`record(model, texts, out_dir, max_tokens)` runs the model over calibration text
(prefill only: no sampling, so it is fast) and, at every MoE layer, stores the
pre-attention activation (attn_norm output), the router input (ffn_norm output),
the router logits and the experts chosen, in the on-disk format of
`qmoe.predictor.calib_data`. Texts are cut into windows of `window` tokens,
each run in a fresh context, so positions cover the range a user's prompts do.

`self_generated_text(model, n_tokens)` samples calibration text from the model
itself, for users who have no corpus: what the model writes is, by
construction, the distribution it routes at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from qmoe.errors import QmoeError
from qmoe.predictor.calib_data import CalibMeta, CalibWriter
from qmoe.predictor.sidecar import model_identity
from qmoe.sampling import SamplingParams

if TYPE_CHECKING:  # a loaded model is handed in (cli); calibration drives it through its public API
    from qmoe.engine import Model


class _Recorder:
    """Observer that pairs each MoE layer's pre-attention input with its routing."""

    def __init__(self, writer: CalibWriter):
        self.writer = writer
        self.x_pre: dict[int, torch.Tensor] = {}

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        self.x_pre[layer] = x

    def attended(self, layer: int, h: torch.Tensor) -> None:
        pass

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.writer.append(layer, self.x_pre.pop(layer), x, logits, ids)


def tokenize_files(model: Model, paths: list[str | os.PathLike]) -> list[list[int]]:
    texts = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QmoeError(f"{path}: cannot read calibration text ({e.strerror})") from e
        if text.strip():
            texts.append(model.tokenize(text))
    if not texts:
        raise QmoeError("the calibration text files are empty")
    return texts


def self_generated_text(model: Model, n_tokens: int, seed: int = 0, window: int = 256) -> list[list[int]]:
    """Sample ~n_tokens from the model at temperature 1, in documents of up to `window` tokens."""
    docs: list[list[int]] = []
    total = 0
    start = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else [0]
    with tqdm(total=n_tokens, desc="self-generate", unit="tok") as bar:
        while total < n_tokens:
            sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed + len(docs))
            doc = list(model.stream(start, min(window, n_tokens - total, model.n_ctx - 1), sampling))
            docs.append(start + doc)
            total += len(doc) + 1
            bar.update(len(doc) + 1)
    return docs


GROUP_TOKENS = 4096  # windows run layer-major together: what their activations and KV caches hold


def _window_groups(windows: list[list[int]], n_tokens: int, group_tokens: int) -> list[list[list[int]]]:
    """The first `n_tokens` tokens of `windows` (the last window cut), in groups of about `group_tokens`."""
    groups: list[list[list[int]]] = [[]]
    size = 0
    left = n_tokens
    for w in windows:
        w = w[:left]
        if not w:
            break
        if size and size + len(w) > group_tokens:
            groups.append([])
            size = 0
        groups[-1].append(w)
        size += len(w)
        left -= len(w)
    return groups


def record(model: Model, docs: list[list[int]], out_dir: str | os.PathLike, max_tokens: int,
           window: int = 256, progress: bool = True, group_tokens: int = GROUP_TOKENS) -> CalibMeta:
    """Run `docs` (token lists) through the model and record up to `max_tokens` tokens.

    Each window is at most one prefill batch, so every forward pass records all of
    its tokens; the last window is cut to what is left of `max_tokens`. Windows run
    in groups of about `group_tokens` tokens through `Model.eval_windows`: with an
    expert store, each group goes layer by layer, so that each expert is read once
    per group rather than once per window (a model larger than RAM calibrates in
    minutes, not hours). The recording is the same either way.
    """
    window = min(window, model.n_batch, model.n_ctx)
    windows = [doc[i:i + window] for doc in docs for i in range(0, len(doc), window)]
    n_tokens = min(max_tokens, sum(len(w) for w in windows))
    if n_tokens <= 0:
        raise QmoeError("no calibration tokens to record")
    hp = model.net.hp
    meta = CalibMeta(n_layers=hp.n_layer, moe_layers=tuple(model.net.moe_layers), n_embd=hp.n_embd,
                     n_expert=hp.n_expert, k=hp.n_expert_used, model_identity=model_identity(model.file))
    writer = CalibWriter(out_dir, meta, n_tokens)
    recorder = _Recorder(writer)
    try:
        with tqdm(total=n_tokens, desc="calibrate", unit="tok", disable=not progress) as bar:
            for group in _window_groups(windows, n_tokens, group_tokens):
                model.eval_windows(group, observer=recorder)
                bar.update(sum(len(w) for w in group))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def calibration_router_weights(model: Model) -> dict[int, np.ndarray]:
    """Each MoE layer's router matrix [E, n_embd] float32 (for the gate baselines)."""
    return {i: model.net.blocks[i].ffn.router.cpu().numpy() for i in model.net.moe_layers}
