"""calibrate -> train-predictors -> eval-predictors through the CLI, on a tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qmoe
from qmoe.cli import main
from qmoe.errors import PredictorMismatchError
from qmoe.predictor.calib_data import CalibData
from qmoe.predictor.sidecar import load_sidecar, model_identity

METHODS = {"pre-attn", "cross-layer-gate", "same-layer-gate", "cross-layer-trained", "frequency"}


@pytest.fixture(scope="module")
def workdir(tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    model = root / "model.gguf"
    shutil.copy(tiny_gguf("qwen3moe", "q8_0"), model)
    text = root / "corpus.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    return root, model, text


def test_calibration_records_what_the_router_does(workdir):
    root, model, text = workdir
    assert main(["calibrate", str(model), "--text", str(text), "--self-generate", "64", "--tokens", "1500",
                 "-o", str(root / "calib")]) == 0
    calib = CalibData(root / "calib")
    m = qmoe.load(model)
    assert calib.n_tokens == 1500 and calib.moe_layers == tuple(m.net.moe_layers)
    assert calib.meta.model_identity == model_identity(model)
    layer = calib.moe_layers[0]
    router = m.net.blocks[layer].ffn.router.numpy()
    # The recorded top-k is what the router picks from the recorded router input.
    logits = calib.x_router(layer)[:200].astype(np.float32) @ router.T
    agree = (np.sort(np.argsort(-logits, axis=1)[:, : calib.meta.k], 1) == np.sort(calib.topk(layer)[:200], 1))
    assert agree.all(axis=1).mean() > 0.97


def test_train_and_evaluate_predictors(workdir, capsys):
    root, model, _ = workdir
    assert main(["train-predictors", str(model), "--data", str(root / "calib"), "--hidden", "64",
                 "--epochs", "3", "--cross-layer-output", str(root / "xlayer.pred.gguf")]) == 0
    sidecar = root / "model.pred.gguf"
    assert sidecar.exists()
    # The sidecar counts the calibration's routing, every MoE layer over every token.
    calib, predictors = CalibData(root / "calib"), load_sidecar(sidecar, model_identity(model))
    assert predictors.routed_tokens == calib.n_tokens and sorted(predictors.route_counts) == list(calib.moe_layers)
    for layer in calib.moe_layers:
        assert np.array_equal(predictors.route_counts[layer],
                              np.bincount(calib.topk(layer).reshape(-1), minlength=calib.meta.n_expert))
    assert main(["eval-predictors", str(model), "--data", str(root / "calib"), "--cross-layer",
                 str(root / "xlayer.pred.gguf"), "--json", str(root / "eval.json")]) == 0
    result = json.loads((root / "eval.json").read_text())
    assert set(result["methods"]) == METHODS
    first = result["first_layer"]["methods"]
    assert "pre-attn" in first and "cross-layer-gate" not in first
    for metrics in result["average"].values():
        assert 0.0 <= metrics["exact_match"] <= 1.0
    out = capsys.readouterr().out
    assert "pre-attn" in out
    main(["info", str(model)])
    assert "model.pred.gguf" in capsys.readouterr().out
    # `qmoe plan` takes the routing from those counts.
    assert main(["plan", str(model), "--ram", "50%", "-t", "1"]) == 0
    assert f"routing: route counts of {calib.n_tokens} calibration tokens (model.pred.gguf)" in capsys.readouterr().out


def test_predictors_of_another_model_are_refused(workdir, tiny_gguf, capsys):
    root, _, _ = workdir
    other = root / "other.gguf"
    shutil.copy(tiny_gguf("olmoe", "q8_0"), other)
    with pytest.raises(PredictorMismatchError, match="train predictors for this model"):
        load_sidecar(root / "model.pred.gguf", model_identity(other))
    # `qmoe plan` refuses them when asked for them, and says why it forecasts uniform routing
    # when they merely lie beside the model.
    assert main(["plan", str(other), "--predictors", str(root / "model.pred.gguf")]) == 1
    assert "train predictors for this model" in capsys.readouterr().err
    shutil.copy(root / "model.pred.gguf", root / "other.pred.gguf")
    assert main(["plan", str(other), "--ram", "50%", "-t", "1"]) == 0
    assert "routing: uniform (" in capsys.readouterr().out
