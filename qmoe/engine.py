"""Loading a GGUF model and generating from it: the public Python API.

    m = qmoe.load("model.gguf", device="cpu")
    ids = m.tokenize("def main(")
    logits = m.logits(ids)                      # [len(ids), n_vocab] float32, fresh context
    text = m.generate("def main(", max_tokens=32)

Generation is a generator underneath (`stream`): the prompt is prefilled in
batches of `n_batch` tokens, then one token per step, each step yielding the
token so that the CLI can print it at once and the caller can stop early.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from qmoe import kernels
from qmoe.errors import ContextOverflowError, QmoeError
from qmoe.experts.attach import Offload, attach
from qmoe.experts.options import OffloadOptions
from qmoe.experts.prefetch import OraclePolicy, Prefetcher, RoutingTrace, TraceRecorder
from qmoe.experts.store import ExpertStore
from qmoe.gguf_file import GGUFFile
from qmoe.models import build_model
from qmoe.models.base import KVCache, Observer, Transformer
from qmoe.sampling import Sampler, SamplingParams
from qmoe.tokenizer import Tokenizer

__all__ = ["Model", "SamplingParams", "Timings", "load"]

T = TypeVar("T")

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256
# The default: a RAM pool of experts only when they do not fit the memory available
# (qmoe/experts/budget.py); offload=None turns every store off.
AUTO_OFFLOAD = OffloadOptions()


@dataclass
class Timings:
    """What llama.cpp prints at the end of a run, in seconds and tokens."""

    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def summary(self) -> str:
        def rate(n: int, s: float) -> str:
            if n == 0 or s <= 0:
                return f"{n:5d} tokens"
            return f"{n:5d} tokens in {s * 1e3:9.2f} ms ({s * 1e3 / n:8.2f} ms per token, {n / s:8.2f} tokens per second)"

        return "\n".join([
            f"qmoe: load time    = {self.load_s * 1e3:9.2f} ms",
            f"qmoe: prompt eval  = {rate(self.prompt_tokens, self.prompt_s)}",
            f"qmoe: decode       = {rate(self.decode_tokens, self.decode_s)}",
        ])


class _Observers:
    """Two observers of one forward pass (e.g. the prefetcher and a calibration recorder)."""

    def __init__(self, first: Observer, second: Observer):
        self.first, self.second = first, second

    def pre_attention(self, layer: int, x: torch.Tensor) -> None:
        self.first.pre_attention(layer, x)
        self.second.pre_attention(layer, x)

    def attended(self, layer: int, h: torch.Tensor) -> None:
        self.first.attended(layer, h)
        self.second.attended(layer, h)

    def routed(self, layer: int, x: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.first.routed(layer, x, logits, ids)
        self.second.routed(layer, x, logits, ids)


class Model:
    """A loaded GGUF MoE model: tokenizer, weights (memory-mapped) and settings.

    With `offload`, the routed experts come from an expert store with budgeted
    tiers (qmoe/experts/), prefetched by the chosen policy; without it they are
    computed straight from the memory-mapped file. The default, `--ram-budget auto`,
    makes a store only when the experts do not fit the memory available. Call `close()` (or use the
    model as a context manager) to stop the store's threads.

    `exact_products`: the CPU kernels' products keep float32 activations (True) instead of
    quantizing them to 8 bits for integer products as llama.cpp does (the default, faster:
    qmoe/kernels/ops.py); like `threads`, it sets the process's kernels, for every model.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", n_ctx: int | None = None,
                 threads: int | None = None, n_batch: int = DEFAULT_BATCH,
                 offload: OffloadOptions | None = AUTO_OFFLOAD, exact_products: bool = False):
        start = time.perf_counter()
        self.device = _resolve_device(device)
        if threads:
            kernels.set_num_threads(threads)
            torch.set_num_threads(threads)
        kernels.set_exact_products(exact_products)
        self.file = GGUFFile(path)
        self.path = Path(path)
        n_ctx_train = int(self.file.arch_get("context_length", DEFAULT_CTX))
        self.n_ctx = int(n_ctx or min(DEFAULT_CTX, n_ctx_train))
        if self.n_ctx < 1:
            raise QmoeError(f"context size must be >= 1, got {self.n_ctx}")
        self.n_batch = max(1, int(n_batch))
        self.torch_threads = torch.get_num_threads()  # for batches; one-token steps use one (eval)
        self.net: Transformer = build_model(self.file, self.device, self.n_ctx)
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.offload: Offload | None = None
        self.recording = False  # record_routing(): the prefetcher sits the run out
        if offload is not None:
            self.offload = attach(self.net, self.file, offload, self.device, self.n_ctx, self.n_batch,
                                  say=lambda line: print(f"qmoe: {line}", file=sys.stderr))
        if self.device.type == "cpu" and self.store is None:
            self._warm_up()
        self.timings = Timings(load_s=time.perf_counter() - start)

    def _warm_up(self) -> None:
        """One decode step of token 0 on a throwaway one-token cache, as llama.cpp warms up at load:
        numba loads a decode step's compiled calls from its cache the first time each is called,
        about 0.3 s for the fused attention and experts calls (models.base), which would otherwise
        fall in the first token's time. Not with an expert store: its reads and statistics belong
        to the run."""
        self.eval([0], KVCache(1))

    # -- expert offloading (qmoe/experts/)

    @property
    def store(self) -> ExpertStore | None:
        return self.offload.store if self.offload is not None else None

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.offload.prefetcher if self.offload is not None else None

    def record_routing(self, prompt_ids: list[int], max_tokens: int,
                       sampling: SamplingParams | None = None) -> RoutingTrace:
        """Generate once and record every MoE layer's routing (the oracle's script).

        The prefetcher sits this run out, and the store is emptied afterwards, so the
        run that replays the recording starts as cold as any other.
        """
        trace = RoutingTrace()
        self.recording = True
        try:
            for _ in self.stream(prompt_ids, max_tokens, sampling, observer=TraceRecorder(trace)):
                pass
        finally:
            self.recording = False
        self.reset_offload()
        return trace

    def replay_routing(self, trace: RoutingTrace) -> None:
        """Give `--prefetch oracle` the recording of the run it is about to see."""
        if self.prefetcher is None or not isinstance(self.prefetcher.policy, OraclePolicy):
            raise QmoeError("replay_routing() is for models loaded with prefetch='oracle'")
        self.prefetcher.set_policy(OraclePolicy(trace))

    def reset_offload(self) -> None:
        """Empty the expert store's tiers and zero its statistics (a cold start)."""
        if self.offload is not None:
            self.offload.reset()

    def offload_stats(self) -> dict | None:
        """The store's statistics (stats.py) once every pending prediction and transfer is done."""
        return self.offload.stats() if self.offload is not None else None

    def close(self) -> None:
        """Stop the prefetch and transfer threads (if any). Idempotent."""
        if self.offload is not None:
            self.offload.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_vocab(self) -> int:
        return self.net.hp.n_vocab

    # -- text <-> tokens

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- forward passes

    def new_cache(self) -> KVCache:
        return KVCache(self.n_ctx)

    def check_fits(self, n_prompt: int, max_tokens: int = 0) -> None:
        """Refuse a prompt of `n_prompt` tokens (and `max_tokens` to generate) that the context cannot hold."""
        if max_tokens < 0:
            raise QmoeError(f"max_tokens must be >= 0, got {max_tokens}")
        self._check_fits(n_prompt + max(max_tokens - 1, 0))

    def _check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"{n_tokens} tokens do not fit the context of {self.n_ctx} tokens; "
                f"raise the context (--ctx, at most {self.net.hp.n_ctx_train} as trained) or shorten the prompt"
            )

    @torch.inference_mode()
    def eval(self, ids: list[int], cache: KVCache, observer: Observer | None = None,
             all_logits: bool = False) -> torch.Tensor:
        """Feed `ids` after what `cache` holds, in batches; logits of the last (or every) token."""
        self._check_fits(cache.n_past + len(ids))
        observer = self._with_prefetcher(observer)
        chunks = [np.asarray(ids[start:start + self.n_batch], dtype=np.int64)
                  for start in range(0, len(ids), self.n_batch)]
        if len(chunks) > 1 and self.layer_major:
            torch.set_num_threads(self.torch_threads)
            outs = self._timed(len(ids), self.net.forward_layer_major, [(chunk, cache) for chunk in chunks],
                               observer, all_logits)
            return torch.cat(outs) if all_logits else outs[-1]
        outs = []
        for n, chunk in enumerate(chunks):
            # One token's torch ops take microseconds, and with more threads each may first wake
            # OpenMP's workers, which sleep once idle for a moment (qmoe/__init__.py), ~90 us an op:
            # a decode step runs torch on one thread (tiny model at 2 threads: 7.6 -> 5.0 ms a
            # token; A3B shapes unchanged), a batch on all of them (A3B shapes, 512-token
            # prefill: 2.6 s on two, 3.2 s on one). The kernels keep their own threads.
            torch.set_num_threads(1 if len(chunk) == 1 else self.torch_threads)
            keep = all_logits or n + 1 == len(chunks)
            out = self._timed(len(chunk), self.net.forward, chunk, cache, observer, all_logits=all_logits)
            if keep:
                outs.append(out)
        return torch.cat(outs) if all_logits else outs[-1]

    @torch.inference_mode()
    def eval_step(self, tokens: list[int], caches: list[KVCache], observer: Observer | None = None
                  ) -> torch.Tensor:
        """One decode step of several sequences together (a server's slots): tokens[b] after what
        caches[b] holds; logits [B, n_vocab]. See Transformer.forward_step: row b is what
        `eval([tokens[b]], caches[b])` gives, up to rounding, and shared experts are read once."""
        for cache in caches:
            self._check_fits(cache.n_past + 1)
        torch.set_num_threads(1)  # one token per sequence: microsecond ops, as in a decode step (eval)
        return self._timed(len(tokens), self.net.forward_step, np.asarray(tokens, dtype=np.int64), caches,
                           self._with_prefetcher(observer))

    def _timed(self, n_tokens: int, forward: Callable[..., T], *args, **kwargs) -> T:
        """Run one forward pass of `n_tokens` tokens and report its time to the prefetcher, whose
        governor keeps prefetching only while it makes passes faster (qmoe/experts/governor.py)."""
        if self.prefetcher is None or self.recording:
            return forward(*args, **kwargs)
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the pass's time, not its launch's
        self.prefetcher.passed(start, time.perf_counter(), n_tokens)
        return out

    def _with_prefetcher(self, observer: Observer | None) -> Observer | None:
        """`observer` and the prefetcher (if any), both watching the same forward pass."""
        if self.prefetcher is None or self.recording:
            return observer
        return self.prefetcher if observer is None else _Observers(self.prefetcher, observer)

    @property
    def layer_major(self) -> bool:
        """Prefill goes layer by layer over the whole prompt (Transformer.forward_layer_major): with
        a store that reads experts, so that each is read once per prompt rather than once per batch.
        Without one, the page cache keeps what the batches share, and prefill runs batch by batch."""
        return self.store is not None and self.store.compute_tier is not None

    @torch.inference_mode()
    def eval_windows(self, windows: list[list[int]], observer: Observer | None = None) -> None:
        """Feed each of `windows` in a fresh context of its own (calibration): layer-major across
        all of them when prefill is (one read of each expert for them all), else one after another."""
        if not self.layer_major:
            for w in windows:
                self.eval(w, self.new_cache(), observer)
            return
        segments = []
        for w in windows:
            self._check_fits(len(w))
            cache = KVCache(len(w))
            segments += [(np.asarray(w[s:s + self.n_batch], dtype=np.int64), cache)
                         for s in range(0, len(w), self.n_batch)]
        torch.set_num_threads(self.torch_threads)
        self._timed(sum(len(s) for s, _ in segments), self.net.forward_layer_major, segments,
                    self._with_prefetcher(observer))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` in a fresh context: float32 [len(ids), n_vocab]."""
        if len(ids) == 0:
            raise QmoeError("logits() needs at least one token")
        bad = [i for i in ids if not 0 <= int(i) < self.n_vocab]
        if bad:
            raise QmoeError(f"token ids {bad[:5]} are outside the vocabulary of {self.n_vocab}")
        return self.eval(list(ids), self.new_cache(), all_logits=True).float().cpu().numpy()

    # -- generation

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams | None = None,
               observer: Observer | None = None) -> Iterator[int]:
        """Yield up to `max_tokens` sampled tokens, stopping at end-of-generation."""
        if not prompt_ids:
            raise QmoeError("the prompt is empty: give at least one token (or a model that adds BOS)")
        self.check_fits(len(prompt_ids), max_tokens)
        sampler = Sampler(sampling or SamplingParams())
        cache = self.new_cache()
        t0 = time.perf_counter()
        logits = self.eval(prompt_ids, cache, observer)
        self.timings.prompt_tokens, self.timings.prompt_s = len(prompt_ids), time.perf_counter() - t0
        self.timings.decode_tokens, self.timings.decode_s = 0, 0.0
        t0 = time.perf_counter()
        context = list(prompt_ids)
        for n in range(max_tokens):
            token = sampler(logits[-1].float().cpu().numpy(), context)
            if token in self.tokenizer.eos_ids:
                break
            context.append(token)
            yield token
            if n + 1 == max_tokens:
                break
            logits = self.eval([token], cache, observer)
            self.timings.decode_tokens += 1
            self.timings.decode_s = time.perf_counter() - t0

    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 top_k: int = 40, top_p: float = 0.95, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64) -> str:
        """The continuation of `prompt` (without the prompt); sampling as in `SamplingParams`."""
        sampling = SamplingParams(temperature, top_k, top_p, seed, repeat_penalty, repeat_last_n)
        return self.detokenize(list(self.stream(self.tokenize(prompt), max_tokens, sampling)))


def _resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise QmoeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QmoeError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def load(path: str | os.PathLike, device: str = "cpu", **kwargs) -> Model:
    """Open a GGUF model (memory-mapped; nothing is copied until used)."""
    return Model(path, device=device, **kwargs)
