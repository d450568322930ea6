"""The tokenizer, both sides: convert/tokenizer_meta.py writes it into GGUF, qmoe/tokenizer.py
reads it back; encode/decode must equal the Hugging Face tokenizer built from the same files.

Each family's tokenizer is a small one trained here with the family's real rules
(tests/tokenizer_fixtures.py), so nothing is downloaded.
"""

from __future__ import annotations

import codecs
import inspect
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
from gguf import TokenType

from convert.tokenizer_meta import add_tokenizer
from qmoe.errors import ConversionError, TokenizerError
from qmoe.gguf_file import GGUFFile
from qmoe.tokenizer import NORMALIZER_KEY, PREPEND_SCHEME_KEY, Tokenizer
from tests.tokenizer_fixtures import make_bpe_tokenizer, make_sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

# Rows past the tokenizer's last id, as real checkpoints pad the embedding (Qwen3: 151936
# rows for 151669 tokens).
_EMBEDDING_PADDING = 13

# kind -> (config.json model_type, fixture writer, tokenizer_config.json overrides)
_KINDS = {
    "qwen2": ("qwen3_moe", lambda d: make_bpe_tokenizer(d, "qwen2"), {}),
    "deepseek-llm": ("deepseek_v2", lambda d: make_bpe_tokenizer(d, "deepseek-llm"), {}),
    "olmo": ("olmoe", lambda d: make_bpe_tokenizer(d, "olmo"), {}),
    "llama": ("mixtral", make_sentencepiece_tokenizer, {}),
    # A non-legacy tokenizer: "▁" only at the start of the text.
    "llama-first": ("mixtral", make_sentencepiece_tokenizer, {"legacy": False}),
    "llama-no-prefix": ("mixtral", lambda d: make_sentencepiece_tokenizer(d, add_dummy_prefix=False), {}),
}

_CODE = inspect.getsource(inspect.getmodule(codecs.IncrementalDecoder))[:6000]

TEXTS = {
    "ascii": "Hello world! The quick brown fox jumps over the lazy dog.",
    "contractions": "don't I'LL we've THEY'RE it's 'ſ 'S",
    "accented": "café naïve façade Ångström déjà vu, and e\u0301 combining (NFC changes it)",
    "greek": "Γειά σου κόσμε ἀρχὴ ἥμισυ \u1f7d\u1fbe\u1fd3\u1fdb \u2126 \u212a",
    "cjk": "你好，世界。我们在这里测试分词器。日本語のテキスト。안녕하세요 세계",
    "long_cjk": "今天天气很好我们在这里测试分词器" * 40,
    "emoji": "Emoji 😀🚀 👍🏽 ❤️ 👨‍👩‍👧 and symbols ≤ ≥ ≠ ∑ € £",
    "code": _CODE,
    "spaces": "  two leading, then   three,    four\tone tab\t\ttwo tabs trailing   ",
    "newlines": "line one\n\nline three\r\nwindows\n   \n\t\n\n\n  end  \n",
    "odd_whitespace": "nbsp\u00a0x ideographic\u3000y \x1cfs \x0bvt \x85nel \u2028ls",
    "digits": "0 12 345 6789 3.14159 1,000,000 2024-05-09 ١٢٣ ½",
    "specials": "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "bos_eos": "<s>Hi</s>there <｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜> <|endoftext|>",
    "user_defined": "a<think>reason</think>  b <unk>",
    "only_space": " ",
    "empty": "",
    "leading_space": " Hello",
    "space_marks": "▁x ▁ ▁▁y",
}


@dataclass
class Converted:
    kind: str
    hf_dir: Path
    n_tokens: int  # tokenizer vocabulary, added tokens included
    gguf: GGUFFile
    tokenizer: Tokenizer
    hf: object  # transformers tokenizer


def _write_gguf(hf_dir: Path, path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    add_tokenizer(writer, hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _build(kind: str, root: Path) -> Converted:
    model_type, make_tokenizer, overrides = _KINDS[kind]
    hf_dir = root / kind
    n_tokens = make_tokenizer(hf_dir)
    if overrides:
        config_path = hf_dir / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **overrides}))
    config = {"model_type": model_type, "vocab_size": n_tokens + _EMBEDDING_PADDING}
    (hf_dir / "config.json").write_text(json.dumps(config))
    _write_gguf(hf_dir, root / f"{kind}.gguf")
    f = GGUFFile(root / f"{kind}.gguf")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return Converted(kind, hf_dir, n_tokens, f, Tokenizer.from_gguf(f), hf)


@pytest.fixture(scope="module", params=list(_KINDS))
def converted(request, tmp_path_factory) -> Converted:
    return _build(request.param, tmp_path_factory.mktemp("tok"))


# --- encode / decode against Hugging Face ---------------------------------------------------


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_equals_hugging_face(converted, name):
    text = TEXTS[name]
    assert converted.tokenizer.encode(text) == converted.hf.encode(text)


@pytest.mark.parametrize("name", ["specials", "bos_eos", "user_defined", "ascii"])
def test_encode_without_parsing_special_tokens_equals_hugging_face(converted, name):
    text = TEXTS[name]
    expected = converted.hf.encode(text, split_special_tokens=True)
    assert converted.tokenizer.encode(text, parse_special=False) == expected


def test_encode_without_bos(converted):
    text = TEXTS["ascii"]
    assert converted.tokenizer.encode(text, add_bos=False) == converted.hf.encode(
        text, add_special_tokens=False
    )


@pytest.mark.parametrize("name", list(TEXTS))
def test_decode_equals_hugging_face(converted, name):
    ids = converted.hf.encode(TEXTS[name])
    assert converted.tokenizer.decode(ids) == converted.hf.decode(ids)
    assert converted.tokenizer.decode(ids, skip_special=True) == converted.hf.decode(
        ids, skip_special_tokens=True
    )


def test_decode_of_arbitrary_ids_equals_hugging_face(converted):
    """Random id sequences split multi-byte characters anywhere: the invalid UTF-8 that
    results must be replaced exactly as Hugging Face does."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(converted.n_tokens) for _ in range(rng.randrange(1, 12))]
        assert converted.tokenizer.decode(ids) == converted.hf.decode(ids), ids


def test_decode_token_streams_the_text(converted):
    """Fed through an incremental UTF-8 decoder, the tokens' bytes give back the text
    (after the prepended space, for SentencePiece)."""
    text = TEXTS["emoji"] + TEXTS["cjk"] + TEXTS["code"][:500]
    ids = converted.tokenizer.encode(text, add_bos=False)
    stream = codecs.getincrementaldecoder("utf-8")()
    streamed = "".join(stream.decode(converted.tokenizer.decode_token(i)) for i in ids) + stream.decode(
        b"", final=True
    )
    assert streamed == (" " + text if converted.kind in ("llama", "llama-first") else text)


@pytest.mark.parametrize("kind", ["llama", "llama-no-prefix"])
def test_sentencepiece_vocabulary_encodes_like_the_sentencepiece_library(kind, tmp_path):
    """llama.cpp tokenizes as the sentencepiece library does; so must qmoe, for plain text."""
    import sentencepiece

    built = _build(kind, tmp_path)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(built.hf_dir / "tokenizer.model"))
    for name in (
        "ascii",
        "accented",
        "cjk",
        "emoji",
        "code",
        "spaces",
        "newlines",
        "digits",
        "leading_space",
    ):
        assert built.tokenizer.encode(TEXTS[name], add_bos=False) == processor.encode(TEXTS[name]), name


def test_long_prompt_round_trips(converted):
    text = (TEXTS["code"] + TEXTS["cjk"] + TEXTS["emoji"]) * 3
    ids = converted.tokenizer.encode(text, add_bos=False)
    assert len(ids) > 3000
    assert ids == converted.hf.encode(text, add_special_tokens=False)
    assert converted.tokenizer.decode(ids) == text


# --- written metadata ----------------------------------------------------------------------


def test_tokens_and_types(converted):
    f, hf, n = converted.gguf, converted.hf, converted.n_tokens
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == n + _EMBEDDING_PADDING
    assert tokens[:n] == hf.convert_ids_to_tokens(list(range(n)))
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + _EMBEDDING_PADDING)]
    assert set(types[n:]) == {TokenType.UNUSED}
    special = set(hf.all_special_ids)
    for i in range(n):
        if tokens[i] == "<unk>":
            assert types[i] == TokenType.UNKNOWN
        elif i in special or tokens[i].startswith("<|"):
            assert types[i] == TokenType.CONTROL, tokens[i]
        elif tokens[i] in ("<think>", "</think>"):
            assert types[i] == TokenType.USER_DEFINED
        elif tokens[i].startswith("<0x") and converted.kind.startswith("llama"):
            assert types[i] == TokenType.BYTE
        else:
            assert types[i] == TokenType.NORMAL, tokens[i]
    assert converted.tokenizer.n_vocab == n + _EMBEDDING_PADDING


def test_vocabulary_model_and_rules(converted):
    f, kind = converted.gguf, converted.kind
    if kind.startswith("llama"):
        assert f.get("tokenizer.ggml.model") == "llama"
        assert len(f.get("tokenizer.ggml.scores")) == converted.n_tokens + _EMBEDDING_PADDING
        expected = {"llama": None, "llama-first": "first", "llama-no-prefix": "never"}[kind]
        assert f.get(PREPEND_SCHEME_KEY, None) == expected
        assert f.get("tokenizer.ggml.add_space_prefix", None) == (False if expected == "never" else None)
        assert f.get("tokenizer.ggml.merges", None) is None
        return
    assert f.get("tokenizer.ggml.model") == "gpt2"
    assert f.get("tokenizer.ggml.pre") == {"gpt2": "gpt-2"}.get(kind, kind)  # llama.cpp's name for GPT-2's rules
    merges = json.loads((converted.hf_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f.get("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert f.get(NORMALIZER_KEY, None) == ("NFC" if kind in ("qwen2", "olmo") else None)


def test_special_ids_flags_and_chat_template(converted):
    f, hf, t = converted.gguf, converted.hf, converted.tokenizer
    config = json.loads((converted.hf_dir / "tokenizer_config.json").read_text())
    assert f.get("tokenizer.ggml.eos_token_id") == hf.eos_token_id == t.eos_id
    assert f.get("tokenizer.ggml.bos_token_id", None) == hf.bos_token_id == t.bos_id
    assert f.get("tokenizer.ggml.padding_token_id", None) == hf.pad_token_id
    assert f.get("tokenizer.ggml.add_bos_token") == config["add_bos_token"]
    assert f.get("tokenizer.ggml.add_eos_token") is False
    assert f.get("tokenizer.chat_template") == config["chat_template"] == t.chat_template
    assert t.eos_id in t.eos_ids


def test_end_of_turn_tokens_stop_generation(tmp_path):
    t = _build("qwen2", tmp_path).tokenizer
    assert {t.encode("<|im_end|>")[0], t.encode("<|endoftext|>")[0]} == set(t.eos_ids)


# --- choosing and refusing -------------------------------------------------------------------


def _with_pre_tokenizer(hf_dir: Path, pre_tokenizer: dict, model_type: str | None) -> None:
    path = hf_dir / "tokenizer.json"
    tokenizer_json = json.loads(path.read_text())
    tokenizer_json["pre_tokenizer"] = pre_tokenizer
    path.write_text(json.dumps(tokenizer_json))
    (hf_dir / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))


def _pre_written(hf_dir: Path, tmp_path: Path) -> str:
    _write_gguf(hf_dir, tmp_path / "t.gguf")
    return GGUFFile(tmp_path / "t.gguf").get("tokenizer.ggml.pre")


_UNKNOWN_SPLIT = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\p{N}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}


def test_gpt2_rules_are_named_by_family(tmp_path):
    make_bpe_tokenizer(tmp_path / "hf", "olmo")
    assert _pre_written(tmp_path / "hf", tmp_path) == "gpt-2"  # no config.json: llama.cpp's name
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    assert _pre_written(tmp_path / "hf", tmp_path) == "olmo"


def test_unrecognized_rules_fall_back_to_the_family(tmp_path, caplog):
    make_bpe_tokenizer(tmp_path / "hf", "qwen2")
    _with_pre_tokenizer(tmp_path / "hf", _UNKNOWN_SPLIT, "qwen3_moe")
    with caplog.at_level(logging.WARNING):
        assert _pre_written(tmp_path / "hf", tmp_path) == "qwen2"
    assert "not recognized" in caplog.text


def test_unrecognized_rules_of_an_unknown_family_are_refused(tmp_path):
    make_bpe_tokenizer(tmp_path / "hf", "qwen2")
    _with_pre_tokenizer(tmp_path / "hf", _UNKNOWN_SPLIT, "mystery")
    with pytest.raises(ConversionError, match=r"tokenizer\.json: pre-tokenizer not recognized"):
        _write_gguf(tmp_path / "hf", tmp_path / "t.gguf")


def test_unsupported_normalizer_is_refused(tmp_path):
    make_bpe_tokenizer(tmp_path / "hf", "qwen2")
    path = tmp_path / "hf" / "tokenizer.json"
    tokenizer_json = json.loads(path.read_text())
    tokenizer_json["normalizer"] = {"type": "Lowercase"}
    path.write_text(json.dumps(tokenizer_json))
    with pytest.raises(ConversionError, match="normalizer"):
        _write_gguf(tmp_path / "hf", tmp_path / "t.gguf")


def test_missing_tokenizer_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConversionError, match="no tokenizer.json or tokenizer.model"):
        _write_gguf(tmp_path / "hf", tmp_path / "t.gguf")


def test_unreadable_sentencepiece_model_is_refused(tmp_path):
    make_sentencepiece_tokenizer(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ConversionError, match=r"tokenizer\.model: not a readable SentencePiece model"):
        _write_gguf(tmp_path / "hf", tmp_path / "t.gguf")


def test_vocabulary_larger_than_the_embedding_is_refused(tmp_path):
    n = make_bpe_tokenizer(tmp_path / "hf", "qwen2")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "vocab_size": n - 1}))
    with pytest.raises(ConversionError, match=f"{n} tokens but config.json's vocab_size is {n - 1}"):
        _write_gguf(tmp_path / "hf", tmp_path / "t.gguf")


def _gguf_with(path: Path, **keys) -> GGUFFile:
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(key.replace("__", "."), value)
        else:
            writer.add_string(key.replace("__", "."), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_runtime_refuses_unknown_model_and_pre_tokenizer(tmp_path):
    base = {"tokenizer__ggml__tokens": ["a", "b"], "tokenizer__ggml__merges": ["a b"]}
    f = _gguf_with(tmp_path / "m.gguf", tokenizer__ggml__model="bert", **base)
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf(f)
    f = _gguf_with(
        tmp_path / "p.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="llama-bpe", **base
    )
    with pytest.raises(
        TokenizerError, match="pre-tokenizer 'llama-bpe'.*supported: deepseek-llm, gpt-2, gpt2, olmo, qwen2"
    ):
        Tokenizer.from_gguf(f)


def test_runtime_refuses_a_file_without_tokenizer(tmp_path):
    f = _gguf_with(tmp_path / "none.gguf")
    with pytest.raises(TokenizerError, match="no tokenizer in the file"):
        Tokenizer.from_gguf(f)
