"""The Python API and the CLI on a tiny converted model: determinism, errors, output."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter

import qmoe
from qmoe.cli import main
from qmoe.errors import (
    ContextOverflowError,
    QmoeError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)

KIND = "qwen3moe"


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf(KIND, "q8_0")


@pytest.fixture(scope="module")
def model(model_path):
    return qmoe.load(model_path)


def test_greedy_generation_is_deterministic(model):
    a = model.generate("def main(", max_tokens=12)
    b = model.generate("def main(", max_tokens=12)
    assert isinstance(a, str) and a == b
    assert model.timings.prompt_tokens == len(model.tokenize("def main("))


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("import os", max_tokens=10, temperature=0.9, seed=7)
    b = model.generate("import os", max_tokens=10, temperature=0.9, seed=7)
    assert a == b


def test_greedy_follows_the_argmax_of_logits(model):
    ids = model.tokenize("class Foo:")
    generated = list(model.stream(ids, 5))
    for n, token in enumerate(generated):
        assert token == int(np.argmax(model.logits(ids + generated[:n])[-1]))


def test_tokenize_round_trip(model):
    text = "for i in range(10):\n    print(i)"
    assert model.detokenize(model.tokenize(text, add_bos=False)) == text


def test_logits_shape_and_bad_ids(model):
    out = model.logits([5, 6, 7])
    assert out.shape == (3, model.n_vocab) and out.dtype == np.float32
    with pytest.raises(QmoeError, match="outside the vocabulary"):
        model.logits([model.n_vocab + 3])


def test_prompt_longer_than_context_is_refused(model_path):
    small = qmoe.load(model_path, n_ctx=8)
    with pytest.raises(ContextOverflowError, match="do not fit the context of 8"):
        small.logits(list(range(3, 20)))
    with pytest.raises(ContextOverflowError):
        small.generate("a b c d e f g h i j k l m n o p", max_tokens=4)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_penalty": float("inf")}, "repeat_penalty"),
    ({"repeat_last_n": -1}, "repeat_last_n"),
])
def test_invalid_sampling_parameters_are_refused(model, kwargs, message):
    with pytest.raises(QmoeError, match=message):
        model.generate("x", max_tokens=2, **kwargs)


def test_cli_run_streams_and_prints_timings(model_path, capsys):
    assert main(["run", str(model_path), "-p", "def main(", "-n", "6", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def main(")
    assert "prompt eval" in err and "decode" in err and "peak RSS" in err


def test_cli_greedy_output_matches_api(model_path, model, capsys):
    main(["run", str(model_path), "-p", "x = ", "-n", "8"])
    out, _ = capsys.readouterr()
    assert out.rstrip("\n") == "x = " + model.generate("x = ", max_tokens=8)


def test_cli_info(model_path, capsys):
    assert main(["info", str(model_path)]) == 0
    out, _ = capsys.readouterr()
    assert "qwen3moe" in out and "Q8_0" in out and "predictors:" in out


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.gguf"), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.gguf" in err and "Traceback" not in err


def test_cli_checks_everything_before_it_prints(model_path, tmp_path, capsys):
    """Bad -n, a prompt that does not fit and a directory fail with one line and no echoed prompt."""
    prompt = "a b c d e f g h i j k l m n o p q r s t"
    for argv, message in [
        (["-p", prompt, "-n", "-3"], "-n/--n-predict must be >= 0, got -3"),
        (["-p", prompt, "-n", "4", "--ctx", "8"], "do not fit the context of 8"),
    ]:
        assert main(["run", str(model_path), *argv]) == 1
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("error:") == 1
    assert main(["run", str(tmp_path), "-p", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{tmp_path}: is a directory, not a GGUF file" in err


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*qwen3moe"):
        qmoe.load(path)


def test_unsupported_tensor_type_is_refused_in_one_line(tmp_path, capsys):
    """A type the kernels lack (here IQ2_XXS) is refused at load, naming the tensor and the types."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = tmp_path / "iq2.gguf"
    w = GGUFWriter(path, "qwen3moe")
    w.add_block_count(1)
    w.add_expert_count(4)
    w.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS][1]
    w.add_tensor(
        "blk.0.ffn_down_exps.weight", np.zeros((4, 8, block_bytes), np.uint8), raw_dtype=GGMLQuantizationType.IQ2_XXS
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UnsupportedTensorTypeError,
        match=r"tensor 'blk.0.ffn_down_exps.weight' has type IQ2_XXS, .*supported types: F32, .*Q4_K.*IQ4_XS$",
    ):
        qmoe.load(path)
    assert main(["run", str(path), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "IQ2_XXS" in err


def test_cli_chat_applies_the_template_and_ends_at_eof(model_path, model, capsys, monkeypatch):
    import io

    from qmoe.cli import render_chat

    prompt = render_chat(model, [{"role": "user", "content": "hi"}])
    assert "hi" in prompt and prompt != "hi"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["run", str(model_path), "--chat", "-p", "hi", "-n", "4"]) == 0
    assert "decode" in capsys.readouterr().err


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 0.5), (0, 1e-9)])
def test_sampler_handles_edge_settings(top_k, top_p):
    from qmoe.engine import Sampler, SamplingParams

    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=3))
    draws = {sampler(logits) for _ in range(200)}
    assert draws <= set(range(50))
    if top_k == 1 or top_p < 1e-6:
        assert draws == {int(np.argmax(logits))}


def test_repeat_penalty_discourages_recent_tokens():
    from qmoe.engine import Sampler, SamplingParams

    logits = np.array([3.0, 2.9, -1.0, 0.5], np.float32)
    assert Sampler(SamplingParams())(logits, [0, 0]) == 0  # off by default
    penalized = Sampler(SamplingParams(repeat_penalty=1.3))
    assert penalized(logits, [0]) == 1  # 3.0 / 1.3 < 2.9
    assert penalized(logits, [2]) == 0  # a negative logit gets more negative: still not chosen
    assert Sampler(SamplingParams(repeat_penalty=1.3, repeat_last_n=1))(logits, [0, 3]) == 0  # 0 is out of the window
    assert Sampler(SamplingParams(repeat_penalty=1.3, repeat_last_n=0))(logits, [0]) == 0  # no window
    assert logits[0] == 3.0  # the caller's logits are left alone


def test_repeat_penalty_changes_greedy_generation(model):
    plain = model.generate("def main(", max_tokens=12)
    assert model.generate("def main(", max_tokens=12, repeat_penalty=1.0) == plain
    assert model.generate("def main(", max_tokens=12, repeat_penalty=5.0) != plain


@pytest.mark.parametrize("store", [[], ["--ram-budget", "25%", "--prefetch", "pre-attn"]])
def test_ctrl_c_during_generation_exits_cleanly(store):
    """SIGINT while tokens stream: the run stops, prints its timings, exits 130, no traceback;
    with an expert store its threads do not keep the process alive."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # A shell's background job ignores SIGINT, and a child inherits that: give it the default,
    # as a terminal's foreground process has, whatever started the tests.
    run = subprocess.Popen(
        [sys.executable, "-m", "qmoe.cli", "run", "models/tiny-qwen3moe.gguf", "-p", "def main(", "-n", "2000",
         "--temp", "0.8", "--seed", "1", "-t", "1", *store],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    first = run.stdout.read(12)  # the prompt and the first generated tokens: it is generating
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    err = err.decode()
    assert first.startswith(b"def main(")
    assert run.returncode == 130, err
    assert "decode" in err and "peak RSS" in err and "Traceback" not in err
