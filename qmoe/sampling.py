"""Choosing the next token from the logits: greedy, or temperature, top-k and top-p, with llama.cpp's
repeat penalty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmoe.errors import QmoeError


@dataclass
class SamplingParams:
    """temperature 0 = greedy. repeat_penalty (llama.cpp's): the logits of the tokens among the
    last `repeat_last_n` (prompt included) are divided by it where positive and multiplied where
    negative, so > 1 discourages repeating them; 1 = off."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise QmoeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QmoeError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QmoeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            raise QmoeError(f"repeat_penalty must be a finite number > 0 (1 = off), got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise QmoeError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    """Greedy at temperature 0; otherwise temperature, top-k, then top-p (nucleus)."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, recent: list[int] = ()) -> int:
        """The next token from `logits` [n_vocab]; `recent`: the tokens so far, for the repeat penalty."""
        window = recent[-self.p.repeat_last_n :] if self.p.repeat_last_n else []
        if self.p.repeat_penalty != 1 and len(window):
            seen = np.unique(np.asarray(window))
            logits = logits.copy()
            penalized = logits[seen]
            logits[seen] = np.where(penalized > 0, penalized / self.p.repeat_penalty, penalized * self.p.repeat_penalty)
        if self.p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.p.temperature
        order = np.argsort(-z)
        if self.p.top_k:
            order = order[: self.p.top_k]
        probs = np.exp(z[order] - z[order[0]])
        probs /= probs.sum()
        keep = min(int(np.searchsorted(np.cumsum(probs), self.p.top_p)) + 1, len(probs))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(keep, p=probs)])
