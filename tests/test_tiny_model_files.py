"""The committed quick-start model (models/tiny-qwen3moe) is a usable, trained checkpoint.

bench/train_tiny_moe.py wrote it; these checks make sure that what is committed
still loads with transformers' own Qwen3-MoE class and LlamaTokenizer, that the
tokenizer agrees with SentencePiece, and that the weights are trained: on a few
held-out standard-library files the model's perplexity must be far below that of
the unigram baseline recorded in the training log.
"""

import json
import math
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-qwen3moe"
MAX_BYTES = 30_000_000
WINDOW = 512  # tokens per held-out file scored
HELD_OUT_FILES = 3


@pytest.fixture(scope="module")
def train_log() -> dict:
    return json.loads((MODEL_DIR / "train_log.json").read_text())


@pytest.fixture(scope="module")
def model():
    model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(MODEL_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_weights_are_bf16_per_expert_and_small(train_log):
    path = MODEL_DIR / "model.safetensors"
    assert path.stat().st_size <= MAX_BYTES
    config = train_log["model_config"]
    with safe_open(path, "pt") as weights:
        names = set(weights.keys())
        assert {weights.get_slice(name).get_dtype() for name in names} == {"BF16"}
    for layer in range(config["num_hidden_layers"]):
        for expert in range(config["num_experts"]):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight" in names


def test_config_is_the_trained_one(model, train_log):
    """config.json holds every setting the model was trained with, under its usual Qwen3-MoE name."""
    config = json.loads((MODEL_DIR / "config.json").read_text())
    for key, value in train_log["model_config"].items():
        assert config[key] == value, key
    assert model.config.num_experts == config["num_experts"]


def test_tokenizer_agrees_with_sentencepiece(tokenizer):
    text = 'def main(argv):\n    for x in argv:\n        print(f"{x!r} ≠ ☃")\n\treturn 0\n'
    sentencepiece = spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))
    ids = tokenizer(text)["input_ids"]
    assert ids == [sentencepiece.bos_id()] + sentencepiece.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_held_out_perplexity_is_far_below_unigram(model, tokenizer, train_log):
    """Scores the first WINDOW tokens of the first few long-enough validation files of this stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in train_log["corpus"]["validation_files"]:
        if (stdlib / name).is_file() and len(rows) < HELD_OUT_FILES:
            ids = tokenizer((stdlib / name).read_bytes().decode("utf-8", errors="replace"))["input_ids"]
            if len(ids) >= WINDOW:
                rows.append(ids[:WINDOW])
    if len(rows) < HELD_OUT_FILES:
        pytest.skip(f"this Python's stdlib lacks the held-out files of the training log ({stdlib})")
    batch = torch.tensor(rows)  # [F, WINDOW]
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1].float()  # [F, WINDOW-1, V]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert math.exp(loss.item()) < train_log["unigram_validation_perplexity"] / 4
