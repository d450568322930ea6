"""Transformer.forward_step (Model.eval_step): one decode step of several sequences, each
against its own KV cache, agrees with decoding each sequence alone."""

from __future__ import annotations

import pytest
import torch

import qmoe

PROMPTS = ["def main(", "import os\nimport sys\n", "x", "class Foo(Bar):\n    pass"]


@pytest.mark.parametrize("kind", ["qwen3moe", "deepseek2-qlora", "phimoe"])
def test_batched_steps_agree_with_single_sequences(tiny_gguf, kind):
    """GQA with q/k norms, MLA, and biases with LongRoPE: 6 steps of 4 sequences of different
    lengths, batched and one by one, give the same logits (to rounding) and greedy tokens."""
    model = qmoe.load(tiny_gguf(kind, "q8_0"), n_ctx=128)
    prompts = [model.tokenize(p) for p in PROMPTS]
    alone, together = [model.new_cache() for _ in prompts], [model.new_cache() for _ in prompts]
    next_alone = [int(model.eval(ids, c)[-1].argmax()) for ids, c in zip(prompts, alone)]
    next_together = [int(model.eval(ids, c)[-1].argmax()) for ids, c in zip(prompts, together)]
    for _ in range(6):
        single = torch.cat([model.eval([t], c) for t, c in zip(next_alone, alone)])
        batched = model.eval_step(next_together, together)
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
        next_alone = single.argmax(-1).tolist()
        next_together = batched.argmax(-1).tolist()
        assert next_together == next_alone
    assert [c.n_past for c in together] == [c.n_past for c in alone] == [len(p) + 6 for p in prompts]


def test_a_batch_of_one_is_exactly_a_decode_step(tiny_gguf):
    model = qmoe.load(tiny_gguf("qwen3moe", "q8_0"), n_ctx=64)
    ids = model.tokenize("def main(")
    a, b = model.new_cache(), model.new_cache()
    token = int(model.eval(ids, a)[-1].argmax())
    model.eval(ids, b)
    assert torch.equal(model.eval_step([token], [a]), model.eval([token], b))
