"""Predictors embedded in a copy of the model (`train-predictors --embed`, `embed_predictors`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import qmoe
from qmoe.cli import main
from qmoe.errors import PredictorMismatchError, QmoeError
from qmoe.experts.options import OffloadOptions
from qmoe.gguf_file import GGUFFile
from qmoe.predictor import sidecar as sidecar_module
from qmoe.predictor.sidecar import (
    default_embedded_path,
    embed_predictors,
    load_sidecar,
    model_identity,
    predictor_source,
    write_embedded,
)

PROMPT = [5, 17, 99, 123, 42, 7, 30, 25]


def is_predictor_tensor(name: str) -> bool:
    return name.startswith("blk.") and ".pred_" in name


@pytest.fixture(scope="module")
def workdir(tiny_gguf, tmp_path_factory):
    """A model, a short calibration recording of it, and predictors trained on it as a sidecar."""
    root = tmp_path_factory.mktemp("embed")
    model = root / "model.gguf"
    shutil.copy(tiny_gguf("qwen3moe", "q8_0"), model)
    text = root / "corpus.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)))
    assert main(["calibrate", str(model), "--text", str(text), "--tokens", "400", "-o", str(root / "calib")]) == 0
    assert main(["train-predictors", str(model), "--data", str(root / "calib"), "--hidden", "32",
                 "--epochs", "1", "--device", "cpu", "--type", "q8_0"]) == 0
    return root, model, root / "model.pred.gguf"


@pytest.fixture(scope="module")
def embedded(workdir):
    """The model with its sidecar's predictors embedded, in a folder of its own (no sidecar beside it)."""
    root, model, sidecar = workdir
    (root / "out").mkdir()
    out = root / "out" / "embedded.gguf"
    embed_predictors(model, sidecar, out, progress=False)
    return out


def test_embedded_file_is_the_model_plus_the_predictors(workdir, embedded):
    _, model_path, sidecar_path = workdir
    model, sidecar, both = GGUFFile(model_path), GGUFFile(sidecar_path), GGUFFile(embedded)
    assert [p.name for p in embedded.parent.iterdir()] == ["embedded.gguf"]  # no temporary file left

    # Metadata: the model's keys in their order with their values, then the sidecar's own keys.
    model_keys = list(model.fields)
    predictor_keys = [k for k in sidecar.fields if k.startswith("qmoe-predictor.")]
    assert list(both.fields) == model_keys + predictor_keys
    assert all(both.fields[k] == model.fields[k] for k in model_keys)
    assert all(both.fields[k] == sidecar.fields[k] for k in predictor_keys)

    # Tensors: the model's first, in order, same bytes at the same offsets within the data section.
    model_names = list(model.tensors)
    assert list(both.tensors)[: len(model_names)] == model_names
    assert set(list(both.tensors)[len(model_names):]) == set(sidecar.tensors)
    model_base, both_base = model.tensors[model_names[0]].offset, both.tensors[model_names[0]].offset
    assert both_base > model_base  # the header grew ...
    for name in model_names:
        a, b = model.tensors[name], both.tensors[name]
        assert (a.qtype, a.shape, a.offset - model_base) == (b.qtype, b.shape, b.offset - both_base), name
        assert np.array_equal(a.data, b.data), name
    for name, t in sidecar.tensors.items():
        assert both.tensors[name].qtype == t.qtype and np.array_equal(both.tensors[name].data, t.data), name
    alignment = both.get("general.alignment", 32)
    assert all(t.offset % alignment == 0 for t in both.tensors.values())

    # ... and yet the identity, which the predictors are checked against, is the model's.
    identity = model_identity(model)
    assert model_identity(both) == identity
    assert identity != model_identity(sidecar)


def test_embedded_predictors_equal_the_sidecars(workdir, embedded):
    _, model, sidecar = workdir
    identity = model_identity(model)
    ours, theirs = load_sidecar(embedded, identity), load_sidecar(sidecar, identity)
    for field in ("model_identity", "n_embd", "n_expert", "k", "k_prime", "arch", "input", "heldout_fraction"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert sorted(ours.layers) == sorted(theirs.layers)
    for layer, weights in theirs.layers.items():
        for part in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            assert torch.equal(getattr(ours.layers[layer], part), getattr(weights, part)), (layer, part)


def test_embedding_again_replaces_the_predictors(workdir, embedded, tmp_path):
    _, model, _ = workdir
    again = tmp_path / "again.gguf"
    embed_predictors(embedded, embedded, again, progress=False)  # predictors of an embedded file, into its model
    assert list(GGUFFile(again).fields) == list(GGUFFile(embedded).fields)
    assert list(GGUFFile(again).tensors) == list(GGUFFile(embedded).tensors)
    assert again.read_bytes() == embedded.read_bytes()
    assert model_identity(again) == model_identity(model)


def test_runtime_reads_the_embedded_file_like_the_model(workdir, embedded):
    _, model, _ = workdir
    with qmoe.load(model) as plain:
        reference = plain.logits(PROMPT)
    with qmoe.load(embedded) as m:
        assert np.array_equal(m.logits(PROMPT), reference)
    options = OffloadOptions(ram_budget="50%", prefetch="pre-attn")
    with qmoe.load(embedded, offload=options) as m:  # no sidecar beside it: the embedded predictors
        assert np.array_equal(m.logits(PROMPT), reference)
        assert m.offload_stats()["total"]["predicted"] > 0


def test_predictor_source_order(workdir, embedded, tmp_path):
    _, model, sidecar = workdir
    assert predictor_source(GGUFFile(embedded)) == embedded
    assert predictor_source(GGUFFile(embedded), sidecar) == sidecar  # explicit first
    beside = tmp_path / "embedded.pred.gguf"
    shutil.copy(sidecar, beside)
    assert predictor_source(GGUFFile(embedded)) == embedded  # embedded before the sidecar beside the model
    assert predictor_source(GGUFFile(model)) == sidecar
    with pytest.raises(QmoeError, match="needs predictors.*nor are predictors embedded"):
        predictor_source(GGUFFile(shutil.copy(model, tmp_path / "lone.gguf")))
    with pytest.raises(QmoeError, match="missing.pred.gguf does not exist"):
        predictor_source(GGUFFile(model), tmp_path / "missing.pred.gguf")


def test_predictors_of_another_model_are_refused(workdir, embedded, tiny_gguf, tmp_path):
    _, _, sidecar = workdir
    other = tiny_gguf("olmoe", "q8_0")
    with pytest.raises(PredictorMismatchError, match="train predictors for this model"):
        embed_predictors(other, sidecar, tmp_path / "wrong.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PredictorMismatchError, match="embedded.gguf"):
        load_sidecar(embedded, model_identity(other))


def test_no_partial_file_when_interrupted(workdir, tmp_path, monkeypatch):
    _, model, sidecar = workdir

    class InterruptedBar:
        """A progress bar on which the user presses Ctrl-C once the first tensor is copied."""

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(sidecar_module, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        embed_predictors(model, sidecar, tmp_path / "out.gguf", progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_embedded(model, load_sidecar(sidecar, model_identity(model)), tmp_path / "out.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_never_replaces_an_input(workdir, embedded, tmp_path):
    _, model, sidecar = workdir
    with pytest.raises(QmoeError, match="is the input"):
        embed_predictors(model, sidecar, model, overwrite=True, progress=False)
    with pytest.raises(QmoeError, match="already exists; pass --force"):
        embed_predictors(model, sidecar, embedded, progress=False)
    with pytest.raises(QmoeError, match="output directory does not exist"):
        embed_predictors(model, sidecar, tmp_path / "no" / "out.gguf", progress=False)


def test_cli_embed_then_evaluate_and_describe(workdir, capsys):
    root, model, _ = workdir
    calib = str(root / "calib")
    train = ["train-predictors", str(model), "--data", calib, "--hidden", "32", "--epochs", "1",
             "--device", "cpu", "--embed"]
    assert main(train) == 0
    out = default_embedded_path(model)
    assert out == root / "model.pred-embedded.gguf" and out.exists()
    assert model_identity(out) == model_identity(model)
    assert load_sidecar(out, model_identity(model)).hidden == 32

    # eval-predictors finds the embedded predictors (there is no sidecar beside this file)
    assert main(["eval-predictors", str(out), "--data", calib, "--json", str(root / "eval.json")]) == 0
    assert "pre-attn" in json.loads((root / "eval.json").read_text())["methods"]
    main(["info", str(out)])
    assert "predictors:    embedded in the model file" in capsys.readouterr().out

    # an existing embedded file is kept unless --force; the model itself never is an output
    before = out.stat().st_mtime_ns
    assert main(train) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == before
    assert main(train + ["--force"]) == 0
    assert main(train + ["-o", str(model), "--force"]) == 1
    assert "is the input" in capsys.readouterr().err
    assert main(train[:-1] + ["-o", str(model)]) == 1  # nor for a sidecar
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_llama_cpp_refuses_the_embedded_file(workdir, embedded, monkeypatch, capfd):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import llama_cpp.llama_cpp as low_level

    default_params = low_level.llama_model_default_params

    def without_extra_buffers():  # as in test_llama_cpp.py: the AMX/repack buffers crash on tiny shapes
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(low_level, "llama_model_default_params", without_extra_buffers)
    _, model, _ = workdir
    llama_cpp.Llama(str(model), n_ctx=32, n_threads=1, verbose=False).close()  # the original loads
    capfd.readouterr()
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(str(embedded), n_ctx=32, n_threads=1, verbose=True)
    assert "wrong number of tensors" in capfd.readouterr().err  # the predictor tensors, which it does not know
