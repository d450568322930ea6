"""Expert predictors: calibration format, training, metrics, evaluation, sidecar GGUF.

Everything is synthetic and small: routers are known functions of the input, so
the tests know what a correct predictor must achieve.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from qmoe.errors import GGUFFormatError, PredictorMismatchError, QmoeError
from qmoe.gguf_file import GGUFFile
from qmoe.predictor.calib_data import CalibData, CalibMeta, CalibrationDataError, CalibWriter, split_tokens
from qmoe.predictor.evaluate import METHODS, evaluate, format_table, plot_exact_match, write_json
from qmoe.predictor.metrics import (
    all_metrics,
    default_k_prime,
    exact_match,
    overprovisioned_exact_match,
    recall_at_k,
    top1_accuracy,
)
from qmoe.predictor.model import (
    INPUT_PRE_ATTN,
    INPUT_PREV_ROUTER,
    PredictorSet,
    build_predictor,
    default_hidden,
    fold_batchnorm,
    predict_scores,
)
from qmoe.predictor.runtime import KernelPredictors
from qmoe.predictor.sidecar import default_sidecar_path, load_sidecar, model_identity, write_sidecar
from qmoe.predictor.train import predictor_loss, rank_tiers, router_order, train_all, train_layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separated_linear_router(n_tokens: int, n_embd: int, n_expert: int, k: int, seed: int, gap: float = 0.5):
    """x [N, D] and the top-k [N, k] / logits [N, E] of a random linear router, keeping only
    tokens whose k-th and (k+1)-th logits differ by `gap`: no near-ties, so the router's choice
    is a learnable function and a working trainer must get almost every token exactly right."""
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((n_expert, n_embd)).astype(np.float32)
    x = rng.standard_normal((4 * n_tokens, n_embd)).astype(np.float32)
    logits = x @ router.T
    ordered = -np.sort(-logits, axis=1)
    keep = np.flatnonzero(ordered[:, k - 1] - ordered[:, k] > gap)[:n_tokens]
    assert len(keep) == n_tokens
    x, logits = x[keep], logits[keep]
    return x, np.argsort(-logits, axis=1)[:, :k], logits


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_on_hand_made_cases():
    true = np.array([[0, 1], [2, 3], [0, 3]])
    pred = np.array(
        [
            [9.0, 8.0, 1.0, 0.0],  # top-2 {0,1}: exact; best 0 is true
            [0.0, 5.0, 4.0, 1.0],  # top-2 {1,2}: one hit; best 1 is wrong; top-3 {1,2,3} holds {2,3}
            [1.0, 5.0, 4.0, 0.0],  # top-2 {1,2}: no hit; top-3 {0,1,2} misses 3
        ]
    )
    assert exact_match(pred, true) == pytest.approx(1 / 3)
    assert top1_accuracy(pred, true) == pytest.approx(1 / 3)
    assert recall_at_k(pred, true) == pytest.approx((2 + 1 + 0) / 6)
    assert overprovisioned_exact_match(pred, true, k_prime=3) == pytest.approx(2 / 3)
    assert overprovisioned_exact_match(pred, true, k_prime=4) == 1.0
    assert default_k_prime(2) == 3 and default_k_prime(8) == 12 and default_k_prime(6) == 9
    assert all_metrics(pred, true, k_prime=3) == {
        "exact_match": pytest.approx(1 / 3),
        "overprovisioned_exact_match": pytest.approx(2 / 3),
        "top1": pytest.approx(1 / 3),
        "recall_at_k": pytest.approx(0.5),
    }


def test_metrics_ignore_the_order_inside_top_k():
    true = np.array([[3, 0]])
    assert exact_match(np.array([[5.0, 0.0, 0.0, 9.0]]), true) == 1.0
    assert exact_match(np.array([[9.0, 0.0, 0.0, 5.0]]), true) == 1.0


# ---- loss pieces ---------------------------------------------------------------------------------


def test_rank_tiers_keep_the_papers_boundaries_and_scale_down():
    assert rank_tiers(128, 8) == (10, 30)
    assert rank_tiers(64, 6) == (10, 30)
    assert rank_tiers(16, 2) == (3, 9)
    assert rank_tiers(8, 2) == (3, 8)


def test_router_order_puts_the_chosen_experts_first():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7]])
    chosen = torch.tensor([[3, 2]])  # a router that did not pick the two best logits
    order, mask = router_order(scores, chosen)
    assert order.tolist() == [[3, 2, 0, 1]]
    assert mask.tolist() == [[False, False, True, True]]


def test_loss_prefers_the_router_ranking():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    topk = torch.tensor([[0, 1]])
    tiers = rank_tiers(8, 2)
    agreeing = predictor_loss(scores * 3, scores, topk, tiers)
    reversed_ = predictor_loss(-scores * 3, scores, topk, tiers)
    assert agreeing < reversed_


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [1, 2])
def test_training_learns_a_known_router(arch):
    x, topk, logits = separated_linear_router(5000, n_embd=16, n_expert=8, k=2, seed=arch)
    net, history = train_layer(
        x[:4000],
        topk[:4000],
        logits[:4000],
        n_expert=8,
        k=2,
        hidden=64,
        arch=arch,
        epochs=25,
        lr=3e-3,
        batch=256,
        device="cpu",
        patience=5,
        seed=0,
    )
    assert history and history[0]["val_exact_match"] <= max(h["val_exact_match"] for h in history)
    pred = predict_scores(fold_batchnorm(net), x[4000:]).numpy()
    assert exact_match(pred, topk[4000:]) > 0.97
    assert overprovisioned_exact_match(pred, topk[4000:]) > 0.99


def test_folded_batchnorm_equals_the_net_in_eval_mode():
    torch.manual_seed(0)
    net = build_predictor(n_embd=12, n_expert=6, hidden=20, arch=1)
    bn = net[1]
    bn.running_mean.copy_(torch.randn(20))
    bn.running_var.copy_(torch.rand(20) + 0.5)
    bn.weight.data.copy_(torch.randn(20))
    bn.bias.data.copy_(torch.randn(20))
    x = torch.randn(7, 12)
    with torch.no_grad():
        expected = net.eval()(x)
    assert torch.allclose(predict_scores(fold_batchnorm(net), x), expected, atol=1e-5)

    silu_net = build_predictor(n_embd=12, n_expert=6, hidden=20, arch=2)
    with torch.no_grad():
        assert torch.allclose(predict_scores(fold_batchnorm(silu_net), x), silu_net(x), atol=1e-5)


def test_default_hidden_follows_the_embedding_size():
    assert default_hidden(2048) == 1024
    assert default_hidden(4096) == 1024
    assert default_hidden(64) == 64


# ---- calibration data ----------------------------------------------------------------------------


def make_meta(**overrides) -> CalibMeta:
    fields = {
        "n_layers": 4,
        "moe_layers": (1, 2, 3),
        "n_embd": 8,
        "n_expert": 6,
        "k": 2,
        "model_identity": "abc",
    }
    return CalibMeta(**{**fields, **overrides})


def random_rows(rng, t: int, meta: CalibMeta):
    return (
        rng.standard_normal((t, meta.n_embd)).astype(np.float32),
        rng.standard_normal((t, meta.n_embd)).astype(np.float32),
        rng.standard_normal((t, meta.n_expert)).astype(np.float32),
        np.tile(np.arange(meta.k), (t, 1)),
    )


def test_calibration_round_trip(tmp_path):
    meta = make_meta()
    rng = np.random.default_rng(0)
    written = {layer: [] for layer in meta.moe_layers}
    with CalibWriter(tmp_path / "calib", meta, max_tokens=100) as writer:
        for t in (5, 7):
            for layer in meta.moe_layers:
                rows = random_rows(rng, t, meta)
                writer.append(layer, *rows)
                written[layer].append(rows)

    data = CalibData(tmp_path / "calib")
    assert data.n_tokens == 12 and data.moe_layers == (1, 2, 3) and data.meta.model_identity == "abc"
    assert data.previous_moe_layer(1) is None and data.previous_moe_layer(3) == 2
    for layer in meta.moe_layers:
        x_pre, x_router, scores, topk = (np.concatenate(parts) for parts in zip(*written[layer]))
        np.testing.assert_array_equal(data.x_pre(layer), x_pre.astype(np.float16))
        np.testing.assert_array_equal(data.x_router(layer), x_router.astype(np.float16))
        np.testing.assert_array_equal(data.scores(layer), scores)
        np.testing.assert_array_equal(data.topk(layer), topk)
        assert data.topk(layer).dtype == np.int16
    # preallocated for 100 rows, cut to 12 at close
    x_pre_file = tmp_path / "calib" / "layer_001" / "x_pre.npy"
    assert np.load(x_pre_file).shape == (12, 8)
    assert x_pre_file.stat().st_size < 100 * 8 * 2


def test_calibration_accepts_torch_tensors(tmp_path):
    meta = make_meta(moe_layers=(0,), n_layers=1)
    with CalibWriter(tmp_path / "c", meta, max_tokens=4) as writer:
        writer.append(
            0,
            torch.ones(2, 8, dtype=torch.bfloat16),
            torch.zeros(2, 8),
            torch.zeros(2, 6),
            torch.tensor([[4, 5], [0, 1]]),
        )
    assert CalibData(tmp_path / "c").topk(0).tolist() == [[4, 5], [0, 1]]


def test_calibration_errors(tmp_path):
    meta = make_meta()
    rng = np.random.default_rng(0)
    with pytest.raises(CalibrationDataError, match="no such calibration directory"):
        CalibData(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="meta.json"):
        CalibData(tmp_path / "empty")

    writer = CalibWriter(tmp_path / "w", meta, max_tokens=4)
    x_pre, x_router, scores, topk = random_rows(rng, 3, meta)
    with pytest.raises(CalibrationDataError, match="scores has shape"):
        writer.append(1, x_pre, x_router, scores[:, :5], topk)
    with pytest.raises(CalibrationDataError, match="not an MoE layer"):
        writer.append(0, x_pre, x_router, scores, topk)
    writer.append(1, x_pre, x_router, scores, topk)
    with pytest.raises(CalibrationDataError, match="max_tokens"):
        writer.append(1, x_pre, x_router, scores, topk)
    with pytest.raises(CalibrationDataError, match="different token counts"):
        writer.close()
    assert not any((tmp_path / "w").iterdir())  # the failed recording was removed
    (tmp_path / "w" / "notes.txt").write_text("x")
    with pytest.raises(CalibrationDataError, match="not empty"):
        CalibWriter(tmp_path / "w", meta, max_tokens=4)

    with CalibWriter(tmp_path / "ok", meta, max_tokens=4) as good:
        for layer in meta.moe_layers:
            good.append(layer, x_pre, x_router, scores, topk)
    record = json.loads((tmp_path / "ok" / "meta.json").read_text())
    (tmp_path / "ok" / "meta.json").write_text(json.dumps({**record, "n_expert": 7}))
    with pytest.raises(CalibrationDataError, match="scores.npy"):
        CalibData(tmp_path / "ok")


def test_split_is_deterministic_disjoint_and_in_blocks():
    train, heldout = split_tokens(100_000, 0.1)
    again_train, again_heldout = split_tokens(100_000, 0.1)
    np.testing.assert_array_equal(heldout, again_heldout)
    np.testing.assert_array_equal(train, again_train)
    assert len(np.intersect1d(train, heldout)) == 0 and len(train) + len(heldout) == 100_000
    assert abs(len(heldout) / 100_000 - 0.1) < 0.01
    # held out in whole runs of consecutive tokens, spread over the recording
    runs = np.split(heldout, np.flatnonzero(np.diff(heldout) != 1) + 1)
    assert min(len(run) for run in runs[:-1]) == 256
    assert heldout[0] < 10_000 and heldout[-1] > 90_000
    with pytest.raises(CalibrationDataError):
        split_tokens(1000, 1.5)


# ---- end to end: train, evaluate ----------------------------------------------------------------


def synthetic_recording(directory, n_tokens=4000, n_embd=16, n_expert=8, k=2, seed=0):
    """Three MoE layers (1, 2, 3; layer 0 dense). Attention is mimicked by adding to x_pre a small
    perturbation, and each layer's stream is only loosely related to the previous one, as in a real
    model: the pre-attention input should then beat the cross-layer one."""
    rng = np.random.default_rng(seed)
    meta = CalibMeta(
        n_layers=4, moe_layers=(1, 2, 3), n_embd=n_embd, n_expert=n_expert, k=k, model_identity="m"
    )
    routers = {layer: rng.standard_normal((n_expert, n_embd)).astype(np.float32) for layer in meta.moe_layers}
    stream = rng.standard_normal((n_tokens, n_embd)).astype(np.float32)
    with CalibWriter(directory, meta, max_tokens=n_tokens) as writer:
        for layer in meta.moe_layers:
            stream = 0.5 * stream + rng.standard_normal(stream.shape).astype(
                np.float32
            )  # previous layers' work
            x_pre = stream
            x_router = x_pre + 0.2 * rng.standard_normal(stream.shape).astype(np.float32)  # attention
            logits = x_router @ routers[layer].T
            writer.append(layer, x_pre, x_router, logits, np.argsort(-logits, axis=1)[:, :k])
    return CalibData(directory), routers


def test_train_all_and_evaluate_every_method(tmp_path):
    calib, routers = synthetic_recording(tmp_path / "calib")
    options = {"hidden": 32, "epochs": 4, "lr": 3e-3, "batch": 256, "device": "cpu", "progress": False}
    ours, histories = train_all(calib, **options)
    cross, _ = train_all(calib, input=INPUT_PREV_ROUTER, **options)
    assert sorted(ours.layers) == [1, 2, 3] and sorted(cross.layers) == [2, 3]
    assert set(histories) == {1, 2, 3} and all(histories.values())
    assert ours.input == INPUT_PRE_ATTN and ours.k_prime == 3 and ours.hidden == 32

    result = evaluate(calib, ours, routers, cross_layer_predictors=cross)
    assert result["methods"] == list(METHODS)
    assert result["n_train_tokens"] + result["n_heldout_tokens"] == 4000
    first = result["first_layer"]
    assert first["layer"] == 1
    assert "cross-layer-gate" not in first["methods"] and "cross-layer-trained" not in first["methods"]
    assert set(result["average"]) == set(METHODS)
    assert set(result["layers"]["2"]["pre-attn"]) == {
        "exact_match",
        "overprovisioned_exact_match",
        "top1",
        "recall_at_k",
    }
    # the recorded top-k is the router's choice on x_router (float16 storage flips only near-ties)
    assert min(result["router_check"].values()) > 0.98
    average = result["average"]
    assert average["pre-attn"]["exact_match"] > average["frequency"]["exact_match"]
    assert average["pre-attn"]["exact_match"] > average["cross-layer-gate"]["exact_match"]
    assert average["same-layer-gate"]["exact_match"] > average["cross-layer-gate"]["exact_match"]

    table = format_table(result)
    assert "first MoE layer (1)" in table and all(m in table for m in METHODS)
    write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["first_layer"]["layer"] == 1
    pytest.importorskip("matplotlib")
    plot_exact_match(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_predictors_of_another_model(tmp_path):
    calib, routers = synthetic_recording(tmp_path / "calib", n_tokens=1000)
    ours, _ = train_all(calib, hidden=8, epochs=1, device="cpu", progress=False)
    ours.model_identity = "another"
    with pytest.raises(PredictorMismatchError):
        evaluate(calib, ours, routers)


# ---- sidecar ------------------------------------------------------------------------------------


def write_tiny_gguf(path, name: str = "tiny") -> None:
    writer = GGUFWriter(path, "qwen3moe")
    writer.add_string("general.name", name)
    writer.add_uint32("qwen3moe.expert_count", 8)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.ones((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_predictor_set(identity: str, hidden: int, n_embd: int = 64, n_expert: int = 8, arch: int = 1):
    torch.manual_seed(0)
    layers = {}
    for layer in (1, 3):
        net = build_predictor(n_embd, n_expert, hidden, arch)
        net[-1].bias.data.copy_(torch.randn(n_expert))
        layers[layer] = fold_batchnorm(net)
    return PredictorSet(
        model_identity=identity,
        n_embd=n_embd,
        n_expert=n_expert,
        k=2,
        k_prime=3,
        arch=arch,
        input=INPUT_PRE_ATTN,
        heldout_fraction=0.1,
        layers=layers,
        route_counts={layer: np.arange(n_expert) * (layer + 1) for layer in (0, 1, 3)},  # layer 0: no predictor
        routed_tokens=1000,
    )


def test_model_identity_tracks_header_and_tensor_table(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf")
    write_tiny_gguf(tmp_path / "b.gguf")
    write_tiny_gguf(tmp_path / "c.gguf", name="other")
    identity = model_identity(tmp_path / "a.gguf")
    assert len(identity) == 64
    assert model_identity(tmp_path / "b.gguf") == identity
    assert model_identity(tmp_path / "c.gguf") != identity
    assert default_sidecar_path(tmp_path / "a.gguf") == tmp_path / "a.pred.gguf"


@pytest.mark.parametrize("weight_type, hidden", [("f16", 48), ("q8_0", 64), ("q8_0", 48)])
def test_sidecar_round_trip(tmp_path, weight_type, hidden):
    """hidden 48 is not a multiple of 32: under q8_0, fc2 (rows of 48) falls back to f16."""
    predictors = random_predictor_set("id-1", hidden, arch=1 if hidden == 64 else 2)
    path = tmp_path / "m.pred.gguf"
    write_sidecar(path, predictors, weight_type)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pred.gguf"]  # no temporary file left behind

    stored = GGUFFile(path)
    fc1_q8 = weight_type == "q8_0"
    fc2_q8 = weight_type == "q8_0" and hidden % 32 == 0
    assert stored.tensor("blk.1.pred_fc1.weight").qtype == (
        GGMLQuantizationType.Q8_0 if fc1_q8 else GGMLQuantizationType.F16
    )
    assert stored.tensor("blk.1.pred_fc2.weight").qtype == (
        GGMLQuantizationType.Q8_0 if fc2_q8 else GGMLQuantizationType.F16
    )
    assert stored.tensor("blk.1.pred_fc2.bias").qtype == GGMLQuantizationType.F32

    loaded = load_sidecar(path, "id-1")
    assert (loaded.n_embd, loaded.n_expert, loaded.k, loaded.k_prime) == (64, 8, 2, 3)
    assert (loaded.arch, loaded.activation, loaded.input, loaded.hidden) == (
        predictors.arch,
        predictors.activation,
        INPUT_PRE_ATTN,
        hidden,
    )
    assert loaded.heldout_fraction == 0.1 and sorted(loaded.layers) == [1, 3]
    assert loaded.routed_tokens == 1000 and sorted(loaded.route_counts) == [0, 1, 3]
    for layer, counts in predictors.route_counts.items():
        assert np.array_equal(loaded.route_counts[layer], counts)
    x = torch.randn(5, 64)
    for layer, weights in predictors.layers.items():
        back = loaded.layers[layer]
        for name, quantized in (("fc1_weight", fc1_q8), ("fc2_weight", fc2_q8)):
            original, restored = getattr(weights, name), getattr(back, name)
            # q8_0: within one step max|block|/127 (half a step, plus the f16 rounding of the scale)
            bound = original.abs().max() / 127 if quantized else original.abs() / 2048
            assert torch.all((restored - original).abs() <= bound + 1e-7), name
        assert torch.equal(back.fc1_bias, weights.fc1_bias) and torch.equal(back.fc2_bias, weights.fc2_bias)
        assert torch.allclose(loaded.predict(layer, x), predict_scores(weights, x), atol=0.05)

    # The runtime's CPU path (one compiled call on the file's raw blocks) ranks the experts as
    # the torch forward on the dequantized weights does.
    kernel = KernelPredictors(stored, loaded)
    for layer in loaded.layers:
        want = loaded.predict(layer, x).numpy()
        top = kernel.predict_topk(layer, x)
        assert top.shape == (5, loaded.k_prime)
        assert np.array_equal(top, np.argsort(-want, axis=1, kind="stable")[:, : loaded.k_prime]), layer
        assert np.array_equal(kernel.predict_topk(layer, x[1], 1), top[1:2, :1])


def test_sidecar_refuses_another_model_and_non_sidecars(tmp_path):
    write_tiny_gguf(tmp_path / "model.gguf")
    identity = model_identity(tmp_path / "model.gguf")
    write_sidecar(tmp_path / "model.pred.gguf", random_predictor_set(identity, hidden=32))
    assert load_sidecar(tmp_path / "model.pred.gguf", identity).model_identity == identity
    with pytest.raises(PredictorMismatchError, match="model.pred.gguf"):
        load_sidecar(tmp_path / "model.pred.gguf", "0" * 64)
    with pytest.raises(GGUFFormatError, match="predictor sidecar"):
        load_sidecar(tmp_path / "model.gguf", identity)
    assert issubclass(PredictorMismatchError, QmoeError)
