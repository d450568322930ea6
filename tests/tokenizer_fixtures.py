"""Small, real tokenizers for tests, trained here from local text.

Tests must not download anything, yet the tokenizer code has to be checked
against the Hugging Face tokenizers of the model families qmoe supports. So
each fixture trains a tiny tokenizer (a few hundred tokens) with the *same
rules* as the family's real one: the same pre-tokenizer split regexes,
normalizer, byte-level or SentencePiece model, special tokens, and
tokenizer_config.json conventions. Only the vocabulary is small.

Training is deterministic: the text is a fixed list of Python standard-library
modules plus a fixed multilingual paragraph, and both trainers run on one
thread, so the same Python version gives the same vocabulary every time.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The families' split regexes, exactly as their tokenizer.json files declare them.
from qmoe.tokenizer import DEEPSEEK_LLM_SPLIT_REGEXES, QWEN2_SPLIT_REGEX

# Modules whose source is the training text: ordinary, varied Python code.
_TRAINING_MODULES = ("textwrap", "string", "heapq", "bisect", "shlex", "json.decoder", "json.encoder")

# Multilingual text so that merges also form inside multi-byte UTF-8 characters.
_MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Voilà, déjà vu: café, naïve, façade, Ångström.\n"
    "Γειά σου κόσμε, ἀρχὴ ἥμισυ παντός. Привет, мир! Здравствуйте.\n"
    "你好，世界。我们在这里测试分词器。今天天气很好。日本語のテキストです。\n"
    "안녕하세요 세계. 숫자 12345 와 67890.\n"
    "Emoji: 😀 🚀 👍🏽 ❤️ — and symbols: ≤ ≥ ≠ ∑ ∫ € £ ¥.\n"
)

_BPE_VOCAB_SIZE = 480
_SPM_VOCAB_SIZE = 560

_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
_DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_OLMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Per family: special tokens (appended after the trained vocabulary, as in the real files),
# non-special added tokens, and the tokenizer_config.json fields.
_BPE_FAMILIES = {
    "qwen2": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "user_defined": ["<think>", "</think>"],
        "config": {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "chat_template": _QWEN2_CHAT_TEMPLATE,
        },
    },
    "deepseek-llm": {
        "special": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        "user_defined": [],
        "config": {
            "tokenizer_class": "LlamaTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<｜begin▁of▁sentence｜>",
            "eos_token": "<｜end▁of▁sentence｜>",
            "pad_token": "<｜end▁of▁sentence｜>",
            "unk_token": None,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "chat_template": _DEEPSEEK_CHAT_TEMPLATE,
        },
    },
    "olmo": {
        "special": ["<|endoftext|>", "<|padding|>"],
        "user_defined": [],
        "config": {
            "tokenizer_class": "GPTNeoXTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|padding|>",
            "unk_token": None,
            "clean_up_tokenization_spaces": True,
            "chat_template": _OLMO_CHAT_TEMPLATE,
        },
    },
}


def training_text() -> Iterator[str]:
    """The fixed training corpus, one chunk at a time."""
    for name in _TRAINING_MODULES:
        yield inspect.getsource(importlib.import_module(name))
    yield _MULTILINGUAL


def _bpe_pipeline(pre: str) -> Tokenizer:
    """An untrained byte-level BPE with the family's normalizer and pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE(dropout=None, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre == "deepseek-llm":
        tokenizer.normalizer = normalizers.Sequence([])
        splits = [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
            for pattern in DEEPSEEK_LLM_SPLIT_REGEXES
        ]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    elif pre == "olmo":
        # GPT-NeoX style, as OLMo/OLMoE ship it: NFC, then ByteLevel with GPT-2's built-in regex.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=True
        )
    else:
        raise ValueError(f"unknown pre-tokenizer fixture {pre!r}; expected one of {sorted(_BPE_FAMILIES)}")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def make_bpe_tokenizer(out_dir: Path, pre: str) -> int:
    """Train a small byte-level BPE with the rules of family `pre` ("qwen2", "deepseek-llm" or
    "olmo"); write tokenizer.json and tokenizer_config.json into `out_dir`. Returns the vocab
    size, added tokens included."""
    tokenizer = _bpe_pipeline(pre)
    family = _BPE_FAMILIES[pre]
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    tokenizer.add_special_tokens(family["special"])
    tokenizer.add_tokens(family["user_defined"])

    config = dict(family["config"])
    if pre == "deepseek-llm":
        bos = config["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config["added_tokens_decoder"] = _added_tokens_decoder(tokenizer, set(family["special"]))
    config["model_max_length"] = 4096
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _added_tokens_decoder(tokenizer: Tokenizer, special: set[str]) -> dict[str, dict]:
    """tokenizer_config.json's description of the added tokens, as transformers writes it."""
    return {
        str(token_id): {
            "content": token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token.content in special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }


def make_sentencepiece_tokenizer(out_dir: Path, add_dummy_prefix: bool = True) -> int:
    """Train a small Llama-style SentencePiece BPE (byte fallback, dummy prefix, identity
    normalization, <unk>=0 <s>=1 </s>=2); write tokenizer.model and tokenizer_config.json into
    `out_dir`. Returns the vocab size."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for chunk in training_text() for line in chunk.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=_SPM_VOCAB_SIZE,
        byte_fallback=True,
        add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 4096,
        "chat_template": _LLAMA_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).get_piece_size()
