"""Embedding a Hugging Face tokenizer in GGUF metadata, the way llama.cpp reads it.

Two kinds of tokenizer are written:

- tokenizer.json with a byte-level BPE model -> `tokenizer.ggml.model` "gpt2": tokens,
  token types, merges, and `tokenizer.ggml.pre`, the name of the pre-tokenizer rules.
  llama.cpp's own converter recognizes the rules by hashing how the *real* vocabulary
  tokenizes a test text, which cannot work for a small or retrained vocabulary; here the
  name comes from the split regexes tokenizer.json declares, and, only when those are not
  recognized, from the model family (config.json `model_type`).
- tokenizer.model (SentencePiece) -> "llama": tokens, scores, token types (<0xNN> byte
  pieces are BYTE, so the runtime can fall back to bytes).

Token types follow llama.cpp's converter: added tokens that are special, or look special
("<|...|>", "<｜...｜>"), are CONTROL; other added tokens USER_DEFINED; ids up to
config.json's `vocab_size` that no token uses are "[PAD<id>]" UNUSED, so that the token
count equals the embedding rows.

Besides the standard keys (special token ids, add_bos/add_eos, chat template), two qmoe
keys record what GGUF has no key for and the runtime needs to equal Hugging Face; see
qmoe/tokenizer.py for their meaning: `qmoe.tokenizer.normalizer` (Qwen and OLMo declare
NFC) and `qmoe.tokenizer.prepend_scheme` (where "▁" is prepended, for non-legacy
SentencePiece tokenizers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from qmoe.errors import ConversionError
from qmoe.tokenizer import (
    GPT2_SPLIT_REGEX,
    NORMALIZER_KEY,
    NORMALIZERS,
    PRE_TOKENIZER_SPLITS,
    PREPEND_SCHEME_KEY,
)

logger = logging.getLogger(__name__)

# config.json model_type -> the pre-tokenizer of that family's tokenizer, used when
# tokenizer.json's regexes are not recognized (and to name GPT-2's rules for OLMo).
FAMILY_PRE_TOKENIZER = {
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2",
    "qwen3": "qwen2",
    "qwen3_moe": "qwen2",
    "deepseek_v2": "deepseek-llm",
    "olmo": "olmo",
    "olmoe": "olmo",
}

_PAD_SCORE = -1000.0  # llama.cpp's score for padding and added SentencePiece tokens


@dataclass
class _Vocab:
    """A tokenizer as GGUF stores it, before writing."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None  # "llama" only
    merges: list[str] | None = None  # "gpt2" only
    pre: str | None = None  # "gpt2" only
    normalizer: str | None = None
    prepend_scheme: str | None = None  # "llama" only
    default_special_ids: dict[str, int] | None = None  # ids the tokenizer model itself names

    def id_of(self, text: str) -> int | None:
        for i, token in enumerate(self.tokens):
            if token == text and self.token_types[i] != TokenType.UNUSED:
                return i
        return None


def add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """Write the tokenizer of the Hugging Face checkpoint in `hf_dir` into `writer`'s metadata.

    Reads tokenizer.json or tokenizer.model, tokenizer_config.json and config.json; raises
    ConversionError naming the file when the tokenizer is missing or of an unsupported kind."""
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "config.json") or {}
    tokenizer_config = _read_json(hf_dir / "tokenizer_config.json") or {}
    tokenizer_json = _read_json(hf_dir / "tokenizer.json")
    n_vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))

    if tokenizer_json is not None and _is_byte_level_bpe(tokenizer_json):
        vocab = _byte_level_bpe_vocab(hf_dir / "tokenizer.json", tokenizer_json, config.get("model_type"))
    elif (hf_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(hf_dir, tokenizer_json, tokenizer_config)
    elif tokenizer_json is not None:
        raise ConversionError(
            f"{hf_dir / 'tokenizer.json'}: model {tokenizer_json.get('model', {}).get('type')!r} without a "
            "ByteLevel pre-tokenizer is not supported and there is no tokenizer.model; supported: byte-level "
            "BPE tokenizer.json, SentencePiece tokenizer.model"
        )
    else:
        raise ConversionError(f"{hf_dir}: no tokenizer.json or tokenizer.model")
    _pad_to(vocab, n_vocab, hf_dir)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.normalizer is not None:
        writer.add_string(NORMALIZER_KEY, vocab.normalizer)
    if vocab.prepend_scheme is not None:
        writer.add_string(PREPEND_SCHEME_KEY, vocab.prepend_scheme)
        if vocab.prepend_scheme == "never":
            writer.add_add_space_prefix(False)

    special_ids = _special_token_ids(vocab, tokenizer_config, config)
    for kind, token_id in special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(_adds_bos(vocab, tokenizer_config, tokenizer_json, special_ids.get("bos")))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    chat_template = _chat_template(hf_dir, tokenizer_config)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special but that are control tokens."""
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _added_token_type(content: str, special: bool) -> int:
    return TokenType.CONTROL if special or _looks_special(content) else TokenType.USER_DEFINED


# --- byte-level BPE (tokenizer.json) -------------------------------------------------------


def _pre_tokenizer_steps(tokenizer_json: dict) -> list[dict]:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level_bpe(tokenizer_json: dict) -> bool:
    return tokenizer_json.get("model", {}).get("type") == "BPE" and any(
        step.get("type") == "ByteLevel" for step in _pre_tokenizer_steps(tokenizer_json)
    )


def _declared_splits(tokenizer_json: dict) -> tuple[str, ...] | None:
    """The regexes the pre-tokenizer splits by, in order, or None if it does anything else."""
    splits = []
    for step in _pre_tokenizer_steps(tokenizer_json):
        kind = step.get("type")
        if kind == "Split" and "Regex" in step.get("pattern", {}):
            if step.get("behavior") != "Isolated" or step.get("invert"):
                return None
            splits.append(step["pattern"]["Regex"])
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                return None
            if step.get("use_regex", True):
                splits.append(GPT2_SPLIT_REGEX)
        else:
            return None
    return tuple(splits)


def _pre_tokenizer_name(path: Path, tokenizer_json: dict, model_type: str | None) -> str:
    declared = _declared_splits(tokenizer_json)
    family = FAMILY_PRE_TOKENIZER.get(model_type or "")
    names = [name for name, splits in PRE_TOKENIZER_SPLITS.items() if splits == declared]
    if names:
        # "gpt2", "gpt-2" and "olmo" share their rules; the family picks the name llama.cpp
        # uses, and without one it is llama.cpp's "gpt-2" (its loader refuses "gpt2").
        if family in names:
            return family
        return "gpt-2" if "gpt-2" in names else names[0]
    if family is not None:
        logger.warning(
            "%s: pre-tokenizer %s not recognized; using %r, the rules of model type %r",
            path,
            json.dumps(tokenizer_json.get("pre_tokenizer"))[:200],
            family,
            model_type,
        )
        return family
    raise ConversionError(
        f"{path}: pre-tokenizer not recognized: {json.dumps(tokenizer_json.get('pre_tokenizer'))[:300]}; "
        f"supported split rules: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}, and model types "
        f"{', '.join(sorted(FAMILY_PRE_TOKENIZER))}"
    )


def _normalizer(path: Path, tokenizer_json: dict) -> str | None:
    """The Unicode normal form tokenizer.json applies before splitting, if any."""
    spec = tokenizer_json.get("normalizer")
    if spec is None:
        return None
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in NORMALIZERS:
        return kinds[0]
    raise ConversionError(f"{path}: normalizer {kinds} is not supported; supported: one of {NORMALIZERS}")


def _byte_level_bpe_vocab(path: Path, tokenizer_json: dict, model_type: str | None) -> _Vocab:
    model = tokenizer_json["model"]
    if not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: the BPE model has no vocab object")
    by_id: dict[int, tuple[str, int]] = {i: (text, TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = (
            added["content"],
            _added_token_type(added["content"], added.get("special", False)),
        )
    tokens, token_types = _dense(by_id)

    merges = []
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise ConversionError(
                f"{path}: merge {merge!r} has a space inside a symbol, which GGUF cannot store"
            )
        merges.append(f"{left} {right}")
    if not merges:
        raise ConversionError(f"{path}: byte-level BPE without merges")
    return _Vocab(
        model="gpt2",
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        pre=_pre_tokenizer_name(path, tokenizer_json, model_type),
        normalizer=_normalizer(path, tokenizer_json),
    )


def _dense(by_id: dict[int, tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Tokens and types for ids 0..max, "[PAD<id>]" UNUSED where an id has no token."""
    n = max(by_id) + 1 if by_id else 0
    tokens, token_types = [], []
    for i in range(n):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        token_types.append(int(kind))
    return tokens, token_types


# --- SentencePiece (tokenizer.model) -----------------------------------------------------


def _sentencepiece_vocab(hf_dir: Path, tokenizer_json: dict | None, tokenizer_config: dict) -> _Vocab:
    import sentencepiece

    path = hf_dir / "tokenizer.model"
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path}: not a readable SentencePiece model ({e})") from e

    by_id: dict[int, tuple[str, int]] = {}
    scores: dict[int, float] = {}
    for i in range(processor.get_piece_size()):
        if processor.is_unknown(i):
            kind = TokenType.UNKNOWN
        elif processor.is_control(i):
            kind = TokenType.CONTROL
        elif processor.is_unused(i):
            kind = TokenType.UNUSED
        elif processor.is_byte(i):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        by_id[i] = (processor.id_to_piece(i), kind)
        scores[i] = processor.get_score(i)

    # Tokens added on top of the SentencePiece model (Phi-3.5's <|user|>, <|end|>, ...).
    for token_id, content, special in _added_tokens(hf_dir, tokenizer_json, tokenizer_config):
        if token_id in by_id and by_id[token_id][1] != TokenType.NORMAL:
            continue  # <unk>, <s>, </s>, byte pieces keep SentencePiece's own type
        by_id[token_id] = (content, _added_token_type(content, special))
        scores[token_id] = _PAD_SCORE
    tokens, token_types = _dense(by_id)

    defaults = {
        "bos": processor.bos_id(),
        "eos": processor.eos_id(),
        "unk": processor.unk_id(),
        "pad": processor.pad_id(),
    }
    return _Vocab(
        model="llama",
        tokens=tokens,
        token_types=token_types,
        scores=[scores.get(i, _PAD_SCORE) for i in range(len(tokens))],
        prepend_scheme=_prepend_scheme(path, processor, tokenizer_config),
        default_special_ids={kind: i for kind, i in defaults.items() if i >= 0},
    )


def _added_tokens(
    hf_dir: Path, tokenizer_json: dict | None, tokenizer_config: dict
) -> list[tuple[int, str, bool]]:
    """(id, content, special) of added tokens from tokenizer.json, tokenizer_config.json's
    added_tokens_decoder and added_tokens.json, the first source naming an id winning."""
    found: dict[int, tuple[str, bool]] = {}
    for added in (tokenizer_json or {}).get("added_tokens", []):
        found.setdefault(int(added["id"]), (added["content"], bool(added.get("special", False))))
    for token_id, added in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        found.setdefault(int(token_id), (added["content"], bool(added.get("special", False))))
    for content, token_id in (_read_json(hf_dir / "added_tokens.json") or {}).items():
        found.setdefault(int(token_id), (content, False))
    return [(i, content, special) for i, (content, special) in sorted(found.items())]


def _prepend_scheme(path: Path, processor, tokenizer_config: dict) -> str | None:
    """Where a "▁" is prepended, as transformers builds the tokenizer from the SentencePiece
    model (for Mixtral and Phi-MoE): before every text fragment (None, SentencePiece's own
    rule) for legacy tokenizers, the default; only at the start of the text ("first")
    otherwise; "never" without a dummy prefix. The model's normalizer settings are read
    by encoding probes, which needs no protobuf."""
    spaces = "".join(processor.encode(" a  b ", out_type=str))
    ligature = "".join(processor.encode("\ufb01", out_type=str))  # NFKC would make it "fi"
    if spaces not in ("\u2581a\u2581\u2581b\u2581", "\u2581\u2581a\u2581\u2581b\u2581") or "fi" in ligature:
        raise ConversionError(
            f"{path}: the SentencePiece model normalizes text (' a  b ' -> {spaces!r}, '\ufb01' -> "
            f"{ligature!r}); only Llama-style models (identity normalization, whitespace kept) are supported"
        )
    if not spaces.startswith("\u2581\u2581"):
        return "never"
    return None if tokenizer_config.get("legacy", True) else "first"


# --- special tokens, flags, chat template --------------------------------------------------


def _pad_to(vocab: _Vocab, n_vocab: int | None, hf_dir: Path) -> None:
    """Extend the vocabulary with "[PAD<id>]" tokens to config.json's vocab_size (the
    embedding rows), which llama.cpp requires to equal the token count."""
    if n_vocab is None:
        return
    if len(vocab.tokens) > n_vocab:
        raise ConversionError(
            f"{hf_dir}: the tokenizer has {len(vocab.tokens)} tokens but config.json's vocab_size is {n_vocab}"
        )
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(int(TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(_PAD_SCORE)


def _special_token_ids(vocab: _Vocab, tokenizer_config: dict, config: dict) -> dict[str, int]:
    """bos/eos/unk/pad ids: the token tokenizer_config.json names, else config.json's
    `<kind>_token_id`, else the id the SentencePiece model itself declares."""
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        entry = tokenizer_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        token_id = vocab.id_of(content) if isinstance(content, str) else None
        if token_id is None:
            declared = config.get(f"{kind}_token_id")
            if isinstance(declared, int) and 0 <= declared < len(vocab.tokens):
                token_id = declared
        if token_id is None and vocab.default_special_ids:
            token_id = vocab.default_special_ids.get(kind)
        if token_id is not None:
            ids[kind] = token_id
    return ids


def _adds_bos(vocab: _Vocab, tokenizer_config: dict, tokenizer_json: dict | None, bos_id: int | None) -> bool:
    """add_bos_token from tokenizer_config.json; without it, True for SentencePiece (the
    Llama tokenizer's default) and for a tokenizer.json whose post-processor template
    starts with the BOS token."""
    declared = tokenizer_config.get("add_bos_token")
    if isinstance(declared, bool):
        return declared
    if vocab.model == "llama":
        return True
    post = (tokenizer_json or {}).get("post_processor") or {}
    for processor in post.get("processors", [post]):
        if processor.get("type") == "TemplateProcessing" and bos_id is not None:
            first = (processor.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
            return first == vocab.tokens[bos_id]
    return False


def _chat_template(hf_dir: Path, tokenizer_config: dict) -> str | list | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json."""
    template = tokenizer_config.get("chat_template")
    if template is not None:
        return template
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return (_read_json(hf_dir / "chat_template.json") or {}).get("chat_template")
