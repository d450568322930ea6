"""llama-quantize's per-tensor recipes for the K-quant and IQ4 mixes (Q4_K_M and friends).

A mix is not one type: `llama-quantize model.gguf Q4_K_M` gives most matrices Q4_K but
spends more bits where quantization hurts most (the output head, attn_v and ffn_down in
the first and last eighth of the layers and every third one between, attn_v/attn_k/
attn_output of 8-expert models). Files from here type every tensor exactly as
llama.cpp's recipe (src/llama-quant.cpp, llama_tensor_get_type) does for the same
model without an importance matrix, so they are the files users already know; the
test quantizes our F32 output with llama.cpp and compares every tensor's type.

Two details of llama.cpp that decide types and are mirrored here:
- tensors are visited sorted by block number, then by name, and attn_v's "more bits"
  layers count attn_v tensors in that order;
- a type whose block does not divide the row length falls back (`fallback`: Q4_K ->
  Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, ...; F16 if even that does not divide), after
  the recipe, for mixes and single types alike.

Only the mixes offered here are written down (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K,
IQ4_XS), for the architectures convert/archs/ writes (no Falcon rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

QT = GGMLQuantizationType
FT = LlamaFileType

# --outtype name -> llama.cpp file type, and the type most tensors of that mix get
MIXES: dict[str, LlamaFileType] = {
    "q2_k": FT.MOSTLY_Q2_K,
    "q3_k_m": FT.MOSTLY_Q3_K_M,
    "q4_k_m": FT.MOSTLY_Q4_K_M,
    "q5_k_m": FT.MOSTLY_Q5_K_M,
    "q6_k": FT.MOSTLY_Q6_K,
    "iq4_xs": FT.MOSTLY_IQ4_XS,
}
BASE_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    FT.MOSTLY_Q2_K: QT.Q2_K,
    FT.MOSTLY_Q3_K_M: QT.Q3_K,
    FT.MOSTLY_Q4_K_M: QT.Q4_K,
    FT.MOSTLY_Q5_K_M: QT.Q5_K,
    FT.MOSTLY_Q6_K: QT.Q6_K,
    FT.MOSTLY_IQ4_XS: QT.IQ4_XS,
}

# tensor_type_fallback: a type whose blocks do not fit the rows -> a 32-block type
_FALLBACK = {
    QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0,
    QT.Q3_K: QT.Q4_0,
    QT.Q4_K: QT.Q5_0,
    QT.Q5_K: QT.Q5_1,
    QT.Q6_K: QT.Q8_0,
}

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelFacts:
    """The hyperparameters llama.cpp's recipe looks at (as the GGUF will record them)."""

    arch: str  # general.architecture
    n_layer: int
    n_expert: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_llama_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (attn_v gets more bits): a dense 80-layer GQA Llama."""
        return (
            self.arch == "llama"
            and self.n_expert != 8
            and self.n_layer == 80
            and self.n_head != self.n_head_kv
        )


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """The type llama.cpp writes when `qtype`'s blocks do not divide `row_length` (else `qtype`)."""
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    substitute = _FALLBACK.get(qtype, qtype)
    return substitute if row_length % GGML_QUANT_SIZES[substitute][0] == 0 else QT.F16


def _block_of(name: str) -> int:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else -1


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category: broad roles by name (first match wins)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (
        ("attn_qkv.weight", "attn_v"),  # fused QKV and MLA's kv_b count as attn_v there too
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return category
    return "other"


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third layer between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def mix_types(
    tensors: dict[str, tuple[int, ...]], mix: LlamaFileType, model: ModelFacts
) -> dict[str, GGMLQuantizationType]:
    """Type of every quantized matrix in `tensors` (name -> numpy shape) under `mix`.

    `tensors` holds only the matrices that get quantized (not norms, routers, biases);
    the caller applies `fallback` to the result, as llama.cpp does after its recipe."""
    base = BASE_TYPE[mix]
    tied = "output.weight" not in tensors
    order = sorted(tensors, key=lambda name: (_block_of(name), name))
    n_attention_wv = sum(_category(name) == "attn_v" for name in order)
    i_attention_wv = i_ffn_down = 0
    types = {}
    for name in order:
        category = _category(name)
        row_length = tensors[name][-1]
        qtype = base
        if category == "output" or (tied and category == "token_embd"):
            if row_length % GGML_QUANT_SIZES[base][0] != 0:
                qtype = QT.Q8_0
            elif base != QT.Q8_0:
                qtype = QT.Q6_K
        elif category == "attn_v":
            qtype = _attn_v_type(mix, base, i_attention_wv, n_attention_wv, model)
            i_attention_wv += 1
        elif category == "attn_k" and model.n_expert == 8:
            qtype = QT.Q8_0
        elif category == "ffn_down":
            i_layer = _block_of(name) if model.n_expert > 1 else i_ffn_down
            qtype = _ffn_down_type(mix, base, i_layer, model.n_layer)
            i_ffn_down += 1
        elif category == "attn_output":
            if model.n_expert == 8:
                if mix in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ4_XS):
                    qtype = QT.Q5_K
            elif mix == FT.MOSTLY_Q2_K:
                qtype = QT.Q3_K
            elif mix == FT.MOSTLY_Q3_K_M:
                qtype = QT.Q4_K
        types[name] = qtype
    return types


def _attn_v_type(mix, base, i_attention_wv: int, n_attention_wv: int, model: ModelFacts):
    qtype = base
    if mix == FT.MOSTLY_Q2_K:
        qtype = QT.Q4_K if model.n_gqa >= 4 else QT.Q3_K
    elif mix == FT.MOSTLY_Q3_K_M:
        qtype = QT.Q5_K if i_attention_wv < 2 else QT.Q4_K
    elif mix == FT.MOSTLY_IQ4_XS and model.n_gqa >= 4:
        qtype = QT.Q5_K
    elif mix in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i_attention_wv, n_attention_wv):
        qtype = QT.Q6_K
    if model.is_llama_70b and qtype in (QT.Q3_K, QT.Q4_K):
        qtype = QT.Q5_K
    if model.n_expert == 8:
        qtype = QT.Q8_0
    return qtype


def _ffn_down_type(mix, base, i_layer: int, n_layer: int):
    if mix == FT.MOSTLY_Q2_K:
        return QT.Q3_K
    if mix == FT.MOSTLY_Q3_K_M:
        return QT.Q5_K if i_layer < n_layer // 16 else QT.Q4_K
    if mix in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M):
        return QT.Q6_K if _use_more_bits(i_layer, n_layer) else base
    if mix == FT.MOSTLY_IQ4_XS and i_layer < n_layer // 8:
        return QT.Q5_K
    return base
