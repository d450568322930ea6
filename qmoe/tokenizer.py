"""Text <-> token ids from the GGUF metadata alone, equal to the Hugging Face tokenizer.

Two vocabularies, as llama.cpp names them in `tokenizer.ggml.model`:

- "gpt2": byte-level BPE (Qwen3, DeepSeek-V2, OLMoE). The text is cut into pieces by the
  family's pre-tokenizer regexes (`tokenizer.ggml.pre` names them), each piece's UTF-8 bytes
  are spelled with the 256 printable characters of GPT-2's byte alphabet, and adjacent
  symbols are merged lowest merge-rank first.
- "llama": SentencePiece BPE (Mixtral, Phi-MoE). Spaces become "▁", a "▁" is prepended, and
  adjacent symbols are merged highest piece-score first; characters outside the vocabulary
  fall back to <0xNN> byte tokens.

In both, special tokens written in the text (e.g. "<|im_start|>") are matched first, and
the text between them is encoded on its own.

GGUF has no standard key for two things the Hugging Face tokenizer does, so the qmoe
converter records them (llama.cpp ignores unknown keys):
    qmoe.tokenizer.normalizer      "NFC" | "NFKC" | "NFD" | "NFKD": Unicode normalization
                                   applied to the text between special tokens (Qwen, OLMo
                                   declare NFC). Absent: none.
    qmoe.tokenizer.prepend_scheme  "first" | "never", for "llama" vocabularies: "first" when
                                   the tokenizer is not "legacy" (transformers then prepends
                                   "▁" only to the text fragment that starts the text, and
                                   only if it does not start with a space), "never" when the
                                   SentencePiece model has no dummy prefix. Absent:
                                   SentencePiece's own rule, a "▁" before every fragment, as
                                   llama.cpp and transformers (legacy) do.
"""

from __future__ import annotations

import heapq
import unicodedata
from collections.abc import Iterator

import regex
from gguf import TokenType

from qmoe.errors import GGUFFormatError, TokenizerError
from qmoe.gguf_file import STRING_ERRORS, GGUFFile

NORMALIZER_KEY = "qmoe.tokenizer.normalizer"
PREPEND_SCHEME_KEY = "qmoe.tokenizer.prepend_scheme"

NORMALIZERS = ("NFC", "NFKC", "NFD", "NFKD")
PREPEND_SCHEMES = ("first", "never")

# The regex GPT-2's byte-level pre-tokenizer uses, as Hugging Face's ByteLevel(use_regex=True).
GPT2_SPLIT_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# DeepSeek-LLM (also DeepSeek-V2): six splits in sequence. The letter class is written with
# escapes: Unicode normalization rewrites several of its code points (U+1F7D, U+1FBE, U+1FD3,
# U+1FDB, U+2126, U+212A) and would turn the ranges around them invalid.
DEEPSEEK_LLM_SPLIT_REGEXES = (
    "[\r\n]",
    (
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
        "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134"
        "\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
        "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
        "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+"
    ),
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)

# `tokenizer.ggml.pre` -> the regexes that split the text, applied one after the other to
# every piece the previous one left (Hugging Face's Split with behavior "isolated": matches
# and the text between them both become pieces). "gpt2", "gpt-2" (llama.cpp's name) and
# "olmo" share GPT-2's rules.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (GPT2_SPLIT_REGEX,),
    "gpt-2": (GPT2_SPLIT_REGEX,),
    "olmo": (GPT2_SPLIT_REGEX,),
    "qwen2": (QWEN2_SPLIT_REGEX,),
    "deepseek-llm": DEEPSEEK_LLM_SPLIT_REGEXES,
}

# Tokens that end a turn in the chat formats of the supported families, besides the EOS id.
_END_OF_TURN_TEXTS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|end|>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"}
)

_SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space
_MAX_CACHED_PIECES = 1 << 16


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes are shifted to U+0100 and beyond, so every byte
    string is spelled with visible characters (a space is "Ġ", a newline "Ċ")."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _merge_pairs(symbols: list[str], priority) -> list[str]:
    """Merge adjacent symbols until no pair has a priority, best (lowest) priority first
    and leftmost first among equals, as both BPE flavours do. `priority(left, right)`
    returns a sortable key or None. A heap over a linked list keeps long pieces (a
    paragraph of CJK text is one DeepSeek piece) near O(n log n)."""
    n = len(symbols)
    following = [*range(1, n), -1]
    preceding = list(range(-1, n - 1))
    heap = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            key = priority(symbols[left], symbols[right])
            if key is not None:
                heapq.heappush(heap, (key, left, symbols[left], symbols[right]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, left_text, right_text = heapq.heappop(heap)
        right = following[left]
        # Skip pairs made stale by an earlier merge on either side.
        if right < 0 or symbols[left] != left_text or symbols[right] != right_text:
            continue
        symbols[left] = left_text + right_text
        symbols[right] = ""
        following[left] = following[right]
        if following[right] >= 0:
            preceding[following[right]] = left
        push(preceding[left], left)
        push(left, following[left])
    return [s for s in symbols if s]


class _ByteLevelBPE:
    """The "gpt2" vocabulary: pre-tokenizer splits, byte alphabet, merges by rank."""

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: str, path):
        if pre not in PRE_TOKENIZER_SPLITS:
            raise TokenizerError(
                f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                f"supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
            )
        self.splits = [regex.compile(p) for p in PRE_TOKENIZER_SPLITS[pre]]
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TokenizerError(
                    f"{path}: merge {rank} {merge!r} is not two symbols separated by a space"
                )
            self.ranks.setdefault((left, right), rank)
        self.token_to_id = token_to_id
        self.alphabet = gpt2_byte_alphabet()
        self.alphabet_bytes = {c: b for b, c in self.alphabet.items()}
        self.cache: dict[str, list[int]] = {}
        self.path = path

    def pieces(self, text: str) -> list[str]:
        """Cut `text` by each split regex in turn; matches and the gaps between them are pieces."""
        pieces = [text]
        for split in self.splits:
            cut = []
            for piece in pieces:
                start = 0
                for match in split.finditer(piece):
                    if match.start() > start:
                        cut.append(piece[start : match.start()])
                    if match.end() > match.start():
                        cut.append(match.group())
                    start = match.end()
                if start < len(piece):
                    cut.append(piece[start:])
            pieces = cut
        return pieces

    def encode(self, text: str, at_text_start: bool) -> list[int]:
        ids = []
        for piece in self.pieces(text):
            cached = self.cache.get(piece)
            if cached is None:
                cached = self._encode_piece(piece)
                if len(self.cache) >= _MAX_CACHED_PIECES:
                    self.cache.clear()
                self.cache[piece] = cached
            ids.extend(cached)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        spelled = [self.alphabet[b] for b in piece.encode("utf-8", STRING_ERRORS)]
        symbols = _merge_pairs(spelled, lambda a, b: self.ranks.get((a, b)))
        ids = []
        for symbol in symbols:
            token_id = self.token_to_id.get(symbol)
            if token_id is None:
                raise TokenizerError(
                    f"{self.path}: the vocabulary has no token for the byte symbol {symbol!r}"
                )
            ids.append(token_id)
        return ids

    def normal_token_bytes(self, token: str) -> bytes:
        """A vocabulary token's bytes: its characters read back through the byte alphabet
        (a token with a character outside the alphabet stands for its own UTF-8, as
        Hugging Face's ByteLevel decoder reads it, and a token that is not valid UTF-8
        in the file for its bytes there; see gguf_file.STRING_ERRORS)."""
        try:
            return bytes(self.alphabet_bytes[c] for c in token)
        except KeyError:
            return token.encode("utf-8", STRING_ERRORS)

    def decode(self, parts: list[tuple[str, int]]) -> str:
        """Text of (token, type) pairs: all bytes joined, then read as UTF-8."""
        return b"".join(self.token_bytes(token, kind) for token, kind in parts).decode(
            "utf-8", errors="replace"
        )

    def token_bytes(self, token: str, kind: int) -> bytes:
        if kind == TokenType.NORMAL:
            return self.normal_token_bytes(token)
        return token.encode("utf-8", STRING_ERRORS)


class _SentencePieceBPE:
    """The "llama" vocabulary: spaces as "▁", a prepended "▁", merges by piece score,
    byte fallback."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        scores: list[float],
        prepend_scheme: str | None,
        unk_id: int | None,
        path,
    ):
        self.token_to_id = token_to_id
        self.scores = scores
        self.prepend_scheme = prepend_scheme  # None: SentencePiece's rule, see the module docstring
        self.byte_ids = [token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
        self.unk_id = unk_id
        self.path = path

    def encode(self, text: str, at_text_start: bool) -> list[int]:
        text = text.replace(" ", _SPACE_MARK)
        if self._prepends(text, at_text_start):
            text = _SPACE_MARK + text
        symbols = _merge_pairs(list(text), self._merge_priority)
        ids = []
        for symbol in symbols:
            token_id = self.token_to_id.get(symbol)
            if token_id is not None:
                ids.append(token_id)
                continue
            for b in symbol.encode("utf-8", STRING_ERRORS):
                byte_id = self.byte_ids[b] if self.byte_ids[b] is not None else self.unk_id
                if byte_id is None:
                    raise TokenizerError(
                        f"{self.path}: no token for {symbol!r}, no <0x{b:02X}> byte token and no <unk>"
                    )
                ids.append(byte_id)
        return ids

    def _prepends(self, text: str, at_text_start: bool) -> bool:
        if self.prepend_scheme is None:
            return True
        return self.prepend_scheme == "first" and at_text_start and not text.startswith(_SPACE_MARK)

    def _merge_priority(self, left: str, right: str):
        token_id = self.token_to_id.get(left + right)
        return None if token_id is None else -self.scores[token_id]

    def decode(self, parts: list[tuple[str, int]]) -> str:
        """Text of (token, type) pairs as transformers' Llama decoder writes it: "▁" is a
        space, a run of byte tokens is read as UTF-8 (one U+FFFD per byte if it is not
        valid), and one leading space, the prepended one, is dropped."""
        out: list[str] = []
        run = bytearray()
        for token, kind in parts:
            if kind == TokenType.BYTE:
                run.append(int(token[3:5], 16))
                continue
            if run:
                out.append(self._read_byte_run(run))
                run.clear()
            out.append(token.replace(_SPACE_MARK, " "))
        if run:
            out.append(self._read_byte_run(run))
        text = "".join(out)
        if self.prepend_scheme != "never" and text.startswith(" "):
            text = text[1:]
        return text

    @staticmethod
    def _read_byte_run(run: bytearray) -> str:
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def token_bytes(self, token: str, kind: int) -> bytes:
        if kind == TokenType.BYTE:
            return bytes([int(token[3:5], 16)])
        return token.replace(_SPACE_MARK, " ").encode("utf-8", STRING_ERRORS)


class Tokenizer:
    """Encode and decode with the vocabulary stored in a GGUF file.

    `encode` and `decode` give the Hugging Face tokenizer's results; `decode_token` gives
    one token's raw bytes, which a streaming printer feeds to an incremental UTF-8
    decoder (a character may span several tokens)."""

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int],
        encoder: _ByteLevelBPE | _SentencePieceBPE,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eot_ids: set[int],
        add_bos: bool,
        add_eos: bool,
        chat_template: str | None,
        normalizer: str | None,
    ):
        self.tokens = tokens
        self.token_types = token_types
        self._encoder = encoder
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._eos_ids = frozenset(({eos_id} if eos_id is not None else set()) | eot_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._chat_template = chat_template
        self._normalizer = normalizer
        # Tokens matched in the text before encoding: user-defined ones always, control and
        # unknown ones only when parsing special tokens. Longest first, so that at one
        # position the longest token wins, as Hugging Face's added-token matcher does.
        always = [i for i, t in enumerate(token_types) if t == TokenType.USER_DEFINED and tokens[i]]
        special = always + [
            i for i, t in enumerate(token_types) if t in (TokenType.CONTROL, TokenType.UNKNOWN) and tokens[i]
        ]
        self._text_to_special = {tokens[i]: i for i in special}
        self._special_pattern = self._alternation([tokens[i] for i in special])
        self._user_defined_pattern = self._alternation([tokens[i] for i in always])

    @staticmethod
    def _alternation(texts: list[str]) -> regex.Pattern | None:
        if not texts:
            return None
        return regex.compile("|".join(regex.escape(t) for t in sorted(set(texts), key=len, reverse=True)))

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Tokenizer:
        """The tokenizer described by `f`'s `tokenizer.*` metadata."""
        try:
            model = f.get("tokenizer.ggml.model")
            tokens = list(f.get("tokenizer.ggml.tokens"))
        except GGUFFormatError as e:
            raise TokenizerError(f"{f.path}: no tokenizer in the file ({e})") from e
        token_types = list(f.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
        if len(token_types) != len(tokens):
            raise TokenizerError(
                f"{f.path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
            )
        normalizer = f.get(NORMALIZER_KEY, None)
        if normalizer is not None and normalizer not in NORMALIZERS:
            raise TokenizerError(
                f"{f.path}: {NORMALIZER_KEY} is {normalizer!r}; expected one of {NORMALIZERS}"
            )

        def token_id(key: str) -> int | None:
            value = f.get(key, None)
            if value is not None and not 0 <= value < len(tokens):
                raise TokenizerError(
                    f"{f.path}: {key} is {value}, outside the {len(tokens)}-token vocabulary"
                )
            return value

        eot_ids = {token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")} - {None}
        eot_ids |= {
            i for i, t in enumerate(tokens) if t in _END_OF_TURN_TEXTS and token_types[i] == TokenType.CONTROL
        }
        return cls(
            tokens,
            token_types,
            _make_encoder(f, model, tokens, token_types, token_id("tokenizer.ggml.unknown_token_id")),
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_id=token_id("tokenizer.ggml.eos_token_id"),
            eot_ids=eot_ids,
            add_bos=bool(f.get("tokenizer.ggml.add_bos_token", model == "llama")),
            add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=f.get("tokenizer.chat_template", None),
            normalizer=normalizer,
        )

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS and the end-of-turn tokens (e.g. <|im_end|>)."""
        return self._eos_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = True, add_eos: bool | None = None
    ) -> list[int]:
        """Token ids of `text`. `add_bos`/`add_eos` default to what the model's tokenizer
        does; with `parse_special`, control tokens written in the text (e.g. "<|im_start|>")
        become their ids instead of being spelled out."""
        ids = []
        if (self.add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.append(self._bos_id)
        for start, fragment, special_id in self._fragments(text, parse_special):
            if special_id is not None:
                ids.append(special_id)
                continue
            if self._normalizer is not None:
                fragment = unicodedata.normalize(self._normalizer, fragment)
            ids.extend(self._encoder.encode(fragment, at_text_start=start == 0))
        if (self.add_eos if add_eos is None else add_eos) and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def _fragments(self, text: str, parse_special: bool) -> Iterator[tuple[int, str, int | None]]:
        """(offset, text, None) for plain text and (offset, text, id) for special tokens."""
        pattern = self._special_pattern if parse_special else self._user_defined_pattern
        start = 0
        if pattern is not None:
            for match in pattern.finditer(text):
                if match.start() > start:
                    yield start, text[start : match.start()], None
                yield match.start(), match.group(), self._text_to_special[match.group()]
                start = match.end()
        if start < len(text):
            yield start, text[start:], None

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`; with `skip_special`, control tokens (BOS, EOS, <|im_end|>...) are left out."""
        parts = []
        for i in ids:
            kind = self._type_of(i)
            if skip_special and kind in (TokenType.CONTROL, TokenType.UNKNOWN):
                continue
            parts.append((self.tokens[i], kind))
        return self._encoder.decode(parts)

    def decode_token(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for: a byte-fallback or byte-level token may be
        part of a multi-byte character, so stream these through an incremental UTF-8 decoder."""
        return self._encoder.token_bytes(self.tokens[token_id], self._type_of(token_id))

    def _type_of(self, token_id: int) -> int:
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the {len(self.tokens)}-token vocabulary")
        return self.token_types[token_id]


def _make_encoder(
    f: GGUFFile, model: str, tokens: list[str], token_types: list[int], unk_id: int | None
) -> _ByteLevelBPE | _SentencePieceBPE:
    """The encoder for vocabulary kind `model` ("gpt2" or "llama") from `f`'s metadata."""
    token_to_id: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token_types[i] != TokenType.UNUSED:
            token_to_id.setdefault(token, i)
    if model == "gpt2":
        merges = f.get("tokenizer.ggml.merges", None)
        if merges is None:
            raise TokenizerError(f"{f.path}: a 'gpt2' tokenizer needs tokenizer.ggml.merges")
        return _ByteLevelBPE(token_to_id, list(merges), f.get("tokenizer.ggml.pre", "default"), f.path)
    if model == "llama":
        scores = f.get("tokenizer.ggml.scores", None)
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(
                f"{f.path}: a 'llama' tokenizer needs one tokenizer.ggml.scores entry per token"
            )
        prepend_scheme = f.get(PREPEND_SCHEME_KEY, None)
        if prepend_scheme is not None and prepend_scheme not in PREPEND_SCHEMES:
            raise TokenizerError(
                f"{f.path}: {PREPEND_SCHEME_KEY} is {prepend_scheme!r}; expected one of {PREPEND_SCHEMES}"
            )
        if not f.get("tokenizer.ggml.add_space_prefix", True):
            prepend_scheme = "never"
        return _SentencePieceBPE(token_to_id, [float(s) for s in scores], prepend_scheme, unk_id, f.path)
    raise TokenizerError(
        f"{f.path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
        "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)"
    )
