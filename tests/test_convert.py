"""The converter against tiny checkpoints of every supported architecture.

Each converted file is read back with gguf-py's GGUFReader and checked against an
expectation written here independently of convert/: the exact set of tensor names,
their shapes and types, their values (dequantized, within the type's error bound)
against the safetensors shards, the metadata keys and values, and the tokens. Then
the fallback for rows that do not divide into blocks, and the safety rules (no
overwrite, nothing left behind on failure, clear errors for broken checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

from convert import to_gguf
from convert.checkpoint import HFConfig
from convert.qtypes import BlockSizeFallbackWarning
from convert.to_gguf import UnusedTensorsWarning, convert, main
from qmoe.errors import ConversionError, UnsupportedArchitectureError
from tests.tiny_models import TINY_KINDS, build_tiny_model

REPO = Path(__file__).resolve().parent.parent
QT = GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
# (outtype, expert_type): every type, and the usual edge mix
OUTTYPES = [("f32", None), ("f16", None), ("bf16", None), ("q8_0", None), ("q4_0", None), ("q8_0", "q4_0")]
GGUF_ARCH = {
    "qwen3moe": "qwen3moe",
    "deepseek2-lite": "deepseek2",
    "deepseek2-qlora": "deepseek2",
    "phimoe": "phimoe",
    "mixtral": "llama",
    "olmoe": "olmoe",
}


# ---------------------------------------------------------------- expectations


def hf_state(hf_dir: Path) -> dict[str, np.ndarray]:
    state = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def hf_config(hf_dir: Path) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


def rope_halves_to_pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within a head of size d, row 2j <- j and 2j+1 <- j + d/2."""
    d = w.shape[0] // n_head
    order = [h * d + r // 2 + (r % 2) * (d // 2) for h in range(n_head) for r in range(d)]
    return w[order]


def deepseek_block(sd: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    hf, g = f"model.layers.{i}.", f"blk.{i}."
    nope, v, kv_lora, n_head = (
        cfg["qk_nope_head_dim"],
        cfg["v_head_dim"],
        cfg["kv_lora_rank"],
        cfg["num_attention_heads"],
    )
    kv_b = sd[hf + "self_attn.kv_b_proj.weight"]  # [n_head * (nope + v), kv_lora]
    out = {
        g + "attn_kv_a_mqa.weight": sd[hf + "self_attn.kv_a_proj_with_mqa.weight"],
        g + "attn_kv_a_norm.weight": sd[hf + "self_attn.kv_a_layernorm.weight"],
        g + "attn_k_b.weight": np.array(
            [
                [[kv_b[h * (nope + v) + j, c] for j in range(nope)] for c in range(kv_lora)]
                for h in range(n_head)
            ]
        ),
        g + "attn_v_b.weight": np.array(
            [
                [[kv_b[h * (nope + v) + nope + j, c] for c in range(kv_lora)] for j in range(v)]
                for h in range(n_head)
            ]
        ),
    }
    if cfg["q_lora_rank"] is None:
        out[g + "attn_q.weight"] = sd[hf + "self_attn.q_proj.weight"]
    else:
        out[g + "attn_q_a.weight"] = sd[hf + "self_attn.q_a_proj.weight"]
        out[g + "attn_q_a_norm.weight"] = sd[hf + "self_attn.q_a_layernorm.weight"]
        out[g + "attn_q_b.weight"] = sd[hf + "self_attn.q_b_proj.weight"]
    if i < cfg["first_k_dense_replace"]:
        for proj in ("gate", "up", "down"):
            out[g + f"ffn_{proj}.weight"] = sd[hf + f"mlp.{proj}_proj.weight"]
    else:
        out[g + "ffn_gate_inp.weight"] = sd[hf + "mlp.gate.weight"]
        for proj in ("gate", "up", "down"):
            out[g + f"ffn_{proj}_shexp.weight"] = sd[hf + f"mlp.shared_experts.{proj}_proj.weight"]
            out[g + f"ffn_{proj}_exps.weight"] = np.stack(
                [sd[hf + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg["n_routed_experts"])]
            )
    return out


def expected_tensors(kind: str, hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor the GGUF must hold, as float32 arrays in numpy order."""
    sd, cfg = hf_state(hf_dir), hf_config(hf_dir)
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        out[g + "attn_norm.weight"] = sd[hf + "input_layernorm.weight"]
        out[g + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[g + "attn_output.weight"] = sd[hf + "self_attn.o_proj.weight"]
        if kind.startswith("deepseek2"):
            out.update(deepseek_block(sd, cfg, i))
            continue
        for x in "qkv":
            out[g + f"attn_{x}.weight"] = sd[hf + f"self_attn.{x}_proj.weight"]
        moe = "block_sparse_moe" if kind in ("phimoe", "mixtral") else "mlp"
        projs = (
            {"gate": "w1", "up": "w3", "down": "w2"}
            if moe == "block_sparse_moe"
            else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        )
        n_expert = cfg.get("num_experts") or cfg["num_local_experts"]
        out[g + "ffn_gate_inp.weight"] = sd[hf + f"{moe}.gate.weight"]
        for proj, hf_proj in projs.items():
            out[g + f"ffn_{proj}_exps.weight"] = np.stack(
                [sd[hf + f"{moe}.experts.{e}.{hf_proj}.weight"] for e in range(n_expert)]
            )
        if kind in ("qwen3moe", "olmoe"):
            out[g + "attn_q_norm.weight"] = sd[hf + "self_attn.q_norm.weight"]
            out[g + "attn_k_norm.weight"] = sd[hf + "self_attn.k_norm.weight"]
        if kind == "mixtral":
            out[g + "attn_q.weight"] = rope_halves_to_pairs(
                out[g + "attn_q.weight"], cfg["num_attention_heads"]
            )
            out[g + "attn_k.weight"] = rope_halves_to_pairs(
                out[g + "attn_k.weight"], cfg["num_key_value_heads"]
            )
        if kind == "phimoe":
            for name, hf_name in (
                ("attn_norm", "input_layernorm"),
                ("ffn_norm", "post_attention_layernorm"),
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
                ("attn_output", "self_attn.o_proj"),
            ):
                out[g + f"{name}.bias"] = sd[hf + f"{hf_name}.bias"]
    if kind == "phimoe":
        out["output_norm.bias"] = sd["model.norm.bias"]
        out["output.bias"] = sd["lm_head.bias"]
        rope = cfg["rope_parameters"]
        out["rope_factors_long.weight"] = np.array(rope["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.array(rope["short_factor"], np.float32)
    return out


def expected_type(name: str, ndim: int, outtype: str, expert_type: str | None) -> GGMLQuantizationType:
    if ndim == 1 or name.endswith(("_norm.weight", ".bias")) or "ffn_gate_inp" in name:
        return QT.F32
    if "_exps." in name and expert_type:
        return TYPES[expert_type]
    return TYPES[outtype]


def expected_metadata(kind: str, hf_dir: Path) -> dict:
    """Every `{arch}.*` key with its value (the tiny configs in tests/tiny_models.py)."""
    n_vocab = hf_config(hf_dir)["vocab_size"]
    common = {
        "embedding_length": 64,
        "attention.head_count": 4,
        "expert_used_count": 2,
        "vocab_size": n_vocab,
        "context_length": 512,
        "block_count": 2,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }
    if kind == "qwen3moe":
        keys = common | {
            "feed_forward_length": 128,
            "attention.head_count_kv": 2,
            "attention.layer_norm_rms_epsilon": 1e-6,
            "rope.freq_base": 1e6,
            "expert_count": 8,
            "attention.key_length": 32,
            "attention.value_length": 32,
            "rope.dimension_count": 32,
            "expert_feed_forward_length": 64,
            "expert_weights_norm": True,
        }
    elif kind.startswith("deepseek2"):
        lite = kind == "deepseek2-lite"
        keys = common | {
            "block_count": 3,
            "feed_forward_length": 128,
            "attention.head_count_kv": 1,
            "attention.layer_norm_rms_epsilon": 1e-6,
            "rope.freq_base": 10000.0,
            "expert_count": 4 if lite else 8,
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0,
            "rope.scaling.original_context_length": 128,
            "rope.scaling.yarn_beta_fast": 32.0,
            "rope.scaling.yarn_beta_slow": 1.0,
            "rope.scaling.yarn_log_multiplier": 0.0707,
            "rope.dimension_count": 16,
            "attention.q_lora_rank": 0 if lite else 32,
            "attention.kv_lora_rank": 32,
            "attention.key_length": 48,
            "attention.value_length": 32,
            "attention.key_length_mla": 48,
            "attention.value_length_mla": 32,
            "leading_dense_block_count": 1,
            "expert_feed_forward_length": 64,
            "expert_shared_count": 2 if lite else 1,
            "expert_weights_scale": 2.5 if lite else 1.5,
            "expert_weights_norm": False,
            "expert_gating_func": 1,
        }
    elif kind == "phimoe":
        keys = common | {
            "context_length": 4096,
            "feed_forward_length": 64,
            "attention.head_count_kv": 2,
            "rope.freq_base": 10000.0,
            "expert_count": 4,
            "rope.dimension_count": 16,
            "rope.scaling.original_context_length": 1024,
            "rope.scaling.attn_factor": 1.1,
        }
    elif kind == "mixtral":
        keys = common | {
            "feed_forward_length": 64,
            "attention.head_count_kv": 2,
            "rope.freq_base": 1e6,
            "expert_count": 4,
            "rope.dimension_count": 16,
        }
    else:
        keys = common | {
            "feed_forward_length": 64,
            "attention.head_count_kv": 4,
            "rope.freq_base": 10000.0,
            "expert_count": 8,
            "rope.dimension_count": 16,
            "expert_weights_norm": False,
        }
    return {f"{GGUF_ARCH[kind]}.{k}": v for k, v in keys.items()}


# ---------------------------------------------------------------- checks


def assert_within_type_bound(
    name: str, got: np.ndarray, want: np.ndarray, qtype: GGMLQuantizationType
) -> None:
    err = np.abs(got - want)
    if qtype == QT.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    if qtype in (QT.F16, QT.BF16):
        rel = 2.0**-11 if qtype == QT.F16 else 2.0**-8  # half an ulp
        assert (err <= rel * np.abs(want) + 1e-7).all(), f"{name}: {qtype.name} error {err.max():.3g}"
        return
    # block types: per 32-value block, the error is bounded by the block's scale
    blocks_err, blocks_want = err.reshape(-1, 32), want.reshape(-1, 32)
    amax = np.abs(blocks_want).max(axis=1, keepdims=True)
    bound = amax / 127 * 0.6 if qtype == QT.Q8_0 else amax / 7
    assert (blocks_err <= bound + 1e-7).all(), (
        f"{name}: {qtype.name} error {err.max():.3g} over the block bound"
    )
    assert err.max() > 0, f"{name}: {qtype.name} values are exact, so nothing was quantized"


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def hf_tokens(hf_dir: Path) -> list[str]:
    if (hf_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        return [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


@pytest.mark.parametrize("outtype,expert_type", OUTTYPES)
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tensors_match_checkpoint(kind, outtype, expert_type, tiny_hf, tiny_gguf):
    hf_dir = tiny_hf(kind)
    fields, tensors = read_gguf(tiny_gguf(kind, outtype, expert_type))
    assert fields["general.architecture"] == GGUF_ARCH[kind]
    want = expected_tensors(kind, hf_dir)
    assert sorted(tensors) == sorted(want)
    for name, values in want.items():
        t = tensors[name]
        qtype = expected_type(name, values.ndim, outtype, expert_type)
        assert tuple(int(d) for d in reversed(t.shape)) == values.shape, name
        assert t.tensor_type == qtype, f"{name}: {t.tensor_type.name}, expected {qtype.name}"
        got = dequantize(t.data, t.tensor_type).reshape(values.shape)
        assert_within_type_bound(name, got, values, qtype)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_metadata_and_tokens(kind, tiny_hf, tiny_gguf):
    hf_dir = tiny_hf(kind)
    fields, _ = read_gguf(tiny_gguf(kind, "q8_0", "q4_0"))
    arch = GGUF_ARCH[kind]
    want = expected_metadata(kind, hf_dir)
    assert sorted(k for k in fields if k.startswith(f"{arch}.")) == sorted(want)
    for key, value in want.items():
        assert fields[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), key
    assert fields["general.file_type"] == 2  # MOSTLY_Q4_0: the experts' type, the bulk of the file
    assert fields["general.quantization_version"] == 2
    assert fields["general.name"] == hf_dir.name
    assert fields["tokenizer.ggml.model"] == ("llama" if kind in ("phimoe", "mixtral") else "gpt2")
    assert fields["tokenizer.ggml.tokens"] == hf_tokens(hf_dir)


def test_every_tensor_name_is_one_llama_cpp_knows(tiny_hf, tiny_gguf):
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    for kind in TINY_KINDS:
        arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == GGUF_ARCH[kind])
        known = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(3)}
        _, tensors = read_gguf(tiny_gguf(kind, "f32"))
        assert {name.rsplit(".", 1)[0] for name in tensors} <= known, kind


def test_bf16_checkpoint_converts_exactly_to_f32(tmp_path):
    hf_dir = build_tiny_model("mixtral", tmp_path / "hf", dtype=torch.bfloat16)
    out = convert(hf_dir, tmp_path / "m.gguf", outtype="f32", progress=False)
    _, tensors = read_gguf(out)
    from safetensors.torch import load_file as load_torch

    state = {}
    for shard in hf_dir.glob("*.safetensors"):
        state.update(load_torch(shard))
    want = state["model.layers.1.block_sparse_moe.experts.2.w2.weight"].float().numpy()
    got = tensors["blk.1.ffn_down_exps.weight"].data[2]
    np.testing.assert_array_equal(got, want)


def test_rows_not_multiple_of_block_fall_back_to_f16(tmp_path):
    hf_dir = build_tiny_model("qwen3moe", tmp_path / "hf", ff_not_multiple_of_32=True)
    with pytest.warns(BlockSizeFallbackWarning, match=r"ffn_down_exps\.weight: row length 48"):
        out = convert(hf_dir, tmp_path / "m.gguf", outtype="q8_0", expert_type="q4_0", progress=False)
    _, tensors = read_gguf(out)
    want = expected_tensors("qwen3moe", hf_dir)
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == QT.F16  # rows of 48
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == QT.Q4_0  # rows of 64
    t = tensors["blk.1.ffn_down_exps.weight"]
    got = dequantize(t.data, t.tensor_type).reshape(want[t.name].shape)
    assert_within_type_bound(t.name, got, want[t.name], QT.F16)


def test_k_quant_rows_fall_back_as_llama_cpp(tiny_hf, tmp_path):
    """Rows of 64 do not hold a 256-block: Q4_K falls back to Q5_0, as in llama.cpp."""
    with pytest.warns(
        BlockSizeFallbackWarning,
        match=r"blk\.0\.ffn_down_exps\.weight: row length 64 is not a multiple of Q4_K's block size 256; "
        "writing it as Q5_0",
    ):
        out = convert(tiny_hf("qwen3moe"), tmp_path / "m.gguf", outtype="q4_k", progress=False)
    fields, tensors = read_gguf(out)
    assert {t.tensor_type for t in tensors.values()} == {QT.F32, QT.Q5_0}
    assert fields["general.file_type"] == 14  # MOSTLY_Q4_K_S: llama.cpp has no plain Q4_K file type


def test_unknown_outtype_lists_the_choices(tiny_hf, tmp_path):
    with pytest.raises(ConversionError, match="--outtype 'q4_k_s' is not supported.*q4_k_m"):
        convert(tiny_hf("qwen3moe"), tmp_path / "m.gguf", outtype="q4_k_s", progress=False)
    with pytest.raises(ConversionError, match="--expert-type 'q4_k_m' is not supported"):
        convert(tiny_hf("qwen3moe"), tmp_path / "m.gguf", outtype="q8_0", expert_type="q4_k_m", progress=False)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- safety


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    """A private copy of the tiny qwen3moe checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_hf("qwen3moe"), tmp_path / "hf"))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".gguf" in p.name)


def test_existing_output_needs_force(hf_copy, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="already exists.*--force"):
        convert(hf_copy, out, progress=False)
    assert out.read_bytes() == b"keep me"
    convert(hf_copy, out, force=True, progress=False)
    assert read_gguf(out)[0]["general.architecture"] == "qwen3moe"
    assert leftovers(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt(), "SIGTERM"])
def test_failed_conversion_leaves_no_file(failure, hf_copy, tmp_path, monkeypatch):
    produced = []
    real_produce = to_gguf._produce

    def failing_produce(*args):
        if len(produced) == 3:
            if failure == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise failure
        produced.append(args)
        return real_produce(*args)

    monkeypatch.setattr(to_gguf, "_produce", failing_produce)
    handler_before = signal.getsignal(signal.SIGTERM)
    expected = SystemExit if failure == "SIGTERM" else type(failure)
    with pytest.raises(expected):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_missing_shard_is_named(hf_copy, tmp_path):
    shard = sorted(hf_copy.glob("*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name}.*missing"):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)
    assert leftovers(tmp_path) == []


def test_missing_tensor_is_named(hf_copy, tmp_path):
    index_path = hf_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = hf_copy / index["weight_map"].pop(name)
    kept = {k: v for k, v in load_file(shard).items() if k != name}
    save_file(kept, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"model.safetensors.index.json.*{name}.*missing"):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)


def test_shape_disagreeing_with_config_is_named(hf_copy, tmp_path):
    config = hf_config(hf_copy)
    config["moe_intermediate_size"] = 32
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError,
        match=r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.0\.mlp"
        r"\.experts\.0\.\w+_proj\.weight' has shape",
    ):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)


def test_truncated_shard_is_named(hf_copy, tmp_path):
    shard = max(hf_copy.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(ConversionError, match=f"{shard.name}: tensor .* ends at byte"):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)


def test_unsupported_architecture_lists_supported(hf_copy, tmp_path):
    config = hf_config(hf_copy)
    config["architectures"] = ["LlamaForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedArchitectureError, match="'LlamaForCausalLM'.*DeepseekV2ForCausalLM.*Qwen3Moe"
    ):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)


def test_unused_checkpoint_tensors_are_reported(hf_copy, tmp_path):
    save_file({"model.rotary_emb.inv_freq": np.ones(16, np.float32)}, hf_copy / "extra.safetensors")
    index_path = hf_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.rotary_emb.inv_freq"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.warns(UnusedTensorsWarning, match="1 checkpoint tensors .*model.rotary_emb.inv_freq"):
        convert(hf_copy, tmp_path / "m.gguf", progress=False)


def test_pre_v5_rope_config_is_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {"type": "yarn", "factor": 40, "mscale_all_dim": 0.707},
            }
        )
    )
    rope = HFConfig(path).rope()
    assert rope["rope_type"] == "yarn" and rope["rope_theta"] == 10000.0 and rope["factor"] == 40
    assert rope["original_max_position_embeddings"] == 4096


def test_cli_reports_errors_in_one_line(hf_copy, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"")
    assert main([str(hf_copy), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--force" in err


def test_cli_runs_as_a_script(hf_copy, tmp_path):
    out = tmp_path / "m.gguf"
    cmd = [
        sys.executable,
        str(REPO / "convert" / "to_gguf.py"),
        str(hf_copy),
        "-o",
        str(out),
        "--outtype",
        "q8_0",
        "--expert-type",
        "q4_0",
    ]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    tensors = read_gguf(out)[1]
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type == QT.Q4_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == QT.Q8_0
