"""qmoe's logits against transformers' on the same tiny checkpoint, per architecture.

Tolerances (issue 3): an f32 file matches to 1e-3 x max|logit|; q8_0 weights keep the
cosine similarity of every position's logits >= 0.999; q4_0 experts (q8_0 elsewhere) >= 0.99.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qmoe
from tests.tiny_models import TINY_KINDS

N_TOKENS = 16


def reference_logits(hf_dir, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt_ids(n_vocab: int) -> list[int]:
    return np.random.default_rng(1234).integers(3, n_vocab, N_TOKENS).tolist()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_f32_logits_match_transformers(kind, tiny_hf, tiny_gguf):
    m = qmoe.load(tiny_gguf(kind, "f32"))
    ids = prompt_ids(m.n_vocab)
    ref = reference_logits(tiny_hf(kind), ids)
    got = m.logits(ids)
    assert got.shape == ref.shape == (N_TOKENS, m.n_vocab)
    assert np.abs(ref).max() > 1e-2, "reference logits are ~0: the tiny model would test nothing"
    err = np.abs(got - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"max |diff| {err:.3g} vs max |logit| {np.abs(ref).max():.3g}"


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("outtype,expert_type,min_cos", [("q8_0", None, 0.999), ("q8_0", "q4_0", 0.99)])
def test_quantized_logits_close_to_transformers(kind, outtype, expert_type, min_cos, tiny_hf, tiny_gguf):
    m = qmoe.load(tiny_gguf(kind, outtype, expert_type))
    ids = prompt_ids(m.n_vocab)
    cos = cosine_rows(m.logits(ids), reference_logits(tiny_hf(kind), ids))
    assert cos.min() >= min_cos, f"worst position cosine {cos.min():.5f} < {min_cos}"


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_incremental_decode_equals_full_pass(kind, tiny_gguf):
    """Prefill in small batches + one token at a time gives the logits of one full pass."""
    m = qmoe.load(tiny_gguf(kind, "f32"), n_batch=5)
    ids = prompt_ids(m.n_vocab)
    full = m.logits(ids)
    cache = m.new_cache()
    m.eval(ids[:11], cache)
    steps = [m.eval([t], cache)[-1].numpy() for t in ids[11:]]
    np.testing.assert_allclose(np.stack(steps), full[11:], rtol=1e-4, atol=1e-4 * np.abs(full).max())
