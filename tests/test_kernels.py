"""qmoe.kernels against gguf-py's dequantization and a float64 numpy reference.

Tolerances (the accuracy contract of qmoe/kernels/__init__.py): dequantize is
bit-exact with gguf.quants.dequantize; a product's error is at most
REL_TOL * sum_i |w_i * x_i| per output, i.e. float32 rounding of the sum, with the
weights taken exactly as dequantized (activations are not quantized: these tests run the
exact products; tests/test_kernels_q8.py tests the integer ones).

gguf-py quantizes only some types, so the others (K-quants, IQ4, Q4_1, Q5_x) are
tested on random blocks: random bytes everywhere, fp16 scales drawn from a normal
distribution or, for the bit-exactness tests, from extremes (zero, subnormal, 65504).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.formats import FORMATS, KERNEL_TYPES
from qmoe.kernels import ops

QT = GGMLQuantizationType
TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0]  # quantized by gguf-py
BLOCK_TYPES = [QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS]
ALL_TYPES = TYPES + BLOCK_TYPES
REL_TOL = 1e-5
EXTREME_HALVES = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 1.0, -2.5, 65504.0, -65504.0], np.float16)


def random_blocks(qtype: QT, shape: tuple[int, ...], rng, extreme: bool = False, scale: float = 0.01) -> np.ndarray:
    """Raw rows [..., row_bytes] of random blocks of `qtype`; fp16 fields ~ scale * N(0, 1),
    or (extreme) half of them from EXTREME_HALVES."""
    fmt = FORMATS[qtype]
    *lead, n = shape
    n_blocks = int(np.prod(lead)) * (n // fmt.block)
    raw = rng.integers(0, 256, (n_blocks, fmt.block_bytes), dtype=np.uint8)
    for name in ("d", "m", "dmin"):
        if name in dict(fmt.fields):
            halves = (scale * rng.standard_normal(n_blocks)).astype(np.float16)
            if extreme:
                halves = np.where(rng.random(n_blocks) < 0.5, rng.choice(EXTREME_HALVES, n_blocks), halves)
            o = fmt.offset(name)
            raw[:, o : o + 2] = halves.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*lead, n // fmt.block * fmt.block_bytes)


def raw_weight(w: np.ndarray, qtype: QT, rng=None) -> np.ndarray:
    """float32 [..., n] -> the raw view qmoe.gguf_file hands out for this type: w quantized
    where gguf-py can, else random blocks of w's shape and scale."""
    if qtype in BLOCK_TYPES:
        rng = rng if rng is not None else np.random.default_rng(0)
        fmt = FORMATS[qtype]
        q_range = 31.0 if fmt.block == 32 else 127.0  # so that weights come out about w's size
        return random_blocks(qtype, w.shape, rng, scale=float(np.abs(w).mean()) * 2.5 / q_range)
    q = quantize(w, qtype)
    return q.view(np.uint16) if qtype == QT.BF16 else q


def exact(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """The weights as gguf-py dequantizes them, float64."""
    as_bytes = raw.view(np.uint8) if qtype == QT.BF16 else raw
    return gguf_dequantize(as_bytes, qtype).astype(np.float64)


def assert_product_close(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """y ~ x @ w.T with error bounded by float32 rounding of each sum."""
    x = x.astype(np.float64)
    ref = x @ w.T
    bound = REL_TOL * (np.abs(x) @ np.abs(w).T) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert y.dtype == np.float32
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g}"


def silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def reference_expert(gate, up, down, x):  # float64 weights [n_ff, n_embd], [n_embd, n_ff]
    x = x.astype(np.float64)
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def exact_products():
    """The float-activation products, held here to float32 rounding (the integer products,
    the default, are tests/test_kernels_q8.py's)."""
    kernels.set_exact_products(True)
    yield
    kernels.set_exact_products(False)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows,n", [(1, 32), (33, 96), (97, 256)])
def test_dequantize_is_bit_exact(qtype, rows, n, rng):
    raw = raw_weight(rng.standard_normal((rows, n)).astype(np.float32), qtype)
    got = kernels.dequantize(raw, qtype)
    np.testing.assert_array_equal(got, exact(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("rows,n", [(1, 256), (9, 768)])
def test_dequantize_random_blocks_is_bit_exact(qtype, rows, n, rng):
    """Every bit pattern of quants and sub-scales, and extreme fp16 scales: the same float32 bits."""
    raw = random_blocks(qtype, (rows, n), rng, extreme=True)
    got = kernels.dequantize(raw, qtype)
    ref = gguf_dequantize(raw, qtype)
    assert got.dtype == np.float32 and got.shape == (rows, n)
    np.testing.assert_array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_subnormal_and_zero_scales(qtype, rng):
    """Tiny weights give fp16 scales below fp16's normal range, zero rows a zero scale."""
    w = 1e-4 * rng.standard_normal((4, 64)).astype(np.float32)
    w[1] = 0.0
    raw = raw_weight(w, qtype)
    np.testing.assert_array_equal(kernels.dequantize(raw, qtype), exact(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
@pytest.mark.parametrize("n", [1, 17, 50, 200])
def test_float_rows_of_any_length(qtype, n, rng):
    """Float rows need not be whole 32-element steps: the tail is handled element-wise."""
    raw = raw_weight(rng.standard_normal((5, n)).astype(np.float32), qtype)
    np.testing.assert_array_equal(kernels.dequantize(raw, qtype), exact(raw, qtype).astype(np.float32))
    x = rng.standard_normal((3, n)).astype(np.float32)
    assert_product_close(kernels.matmul(raw, qtype, x), exact(raw, qtype), x)


def test_dequantize_keeps_leading_dimensions(rng):
    vector = rng.standard_normal(40).astype(np.float32)  # a norm weight: 1-D, any length
    np.testing.assert_array_equal(kernels.dequantize(vector, QT.F32), vector)
    raw = raw_weight(rng.standard_normal((3, 5, 64)).astype(np.float32), QT.Q4_0)
    got = kernels.dequantize(raw, QT.Q4_0)
    assert got.shape == (3, 5, 64)
    np.testing.assert_array_equal(
        got, exact(raw.reshape(15, -1), QT.Q4_0).reshape(3, 5, 64).astype(np.float32)
    )


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("rows", [1, 33, 97])
@pytest.mark.parametrize("n_tokens", [1, 3, 17, ops.BLAS_MIN_TOKENS + 1])
def test_matmul(qtype, rows, n_tokens, rng):
    n = 512  # two super-blocks of 256
    raw = raw_weight(rng.standard_normal((rows, n)).astype(np.float32), qtype, rng)
    x = rng.standard_normal((n_tokens, n)).astype(np.float32)
    assert_product_close(kernels.matmul(raw, qtype, x), exact(raw, qtype), x)


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_0, QT.Q3_K, QT.IQ4_XS])
def test_matmul_paths_agree_at_the_blas_threshold(qtype, rng, monkeypatch):
    """Row kernel (T < BLAS_MIN_TOKENS) and dequantized BLAS tiles, with a last tile that is short."""
    monkeypatch.setattr(ops, "TILE_FLOATS", 7 * 256)  # 7 rows per tile, 45 rows = 6 tiles + 3
    raw = raw_weight(rng.standard_normal((45, 256)).astype(np.float32), qtype, rng)
    w = exact(raw, qtype)
    for n_tokens in (ops.BLAS_MIN_TOKENS - 1, ops.BLAS_MIN_TOKENS):
        x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
        assert_product_close(kernels.matmul(raw, qtype, x), w, x)


def test_matmul_accepts_raw_bytes_and_writes_out(rng):
    w = rng.standard_normal((7, 64)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.full((2, 7), np.nan, np.float32)
    result = kernels.matmul(w.view(np.uint8), QT.F32, x, out=out)
    assert result is out
    assert_product_close(out, w.astype(np.float64), x)


def test_empty_inputs():
    raw = raw_weight(np.ones((4, 32), np.float32), QT.Q8_0)
    assert kernels.matmul(raw, QT.Q8_0, np.zeros((0, 32), np.float32)).shape == (0, 4)
    assert kernels.dequantize(raw[:0], QT.Q8_0).shape == (0, 32)


def test_bad_inputs_raise_qmoe_errors():
    raw = raw_weight(np.ones((4, 64), np.float32), QT.Q4_0)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(QmoeError, match=r"IQ2_XXS is not supported by qmoe's kernels \(supported: F32, .*IQ4_XS\)"):
        kernels.matmul(raw, QT.IQ2_XXS, x)
    with pytest.raises(QmoeError, match=r"\[tokens, 64\]"):
        kernels.matmul(raw, QT.Q4_0, np.ones((1, 32), np.float32))
    with pytest.raises(QmoeError, match="must be float32 or raw uint8"):
        kernels.matmul(np.ones((4, 64), np.float64), QT.F32, x)
    with pytest.raises(QmoeError, match="whole number of 18-byte blocks"):
        kernels.matmul(raw[:, :20], QT.Q4_0, x)
    with pytest.raises(QmoeError, match="out must be"):
        kernels.matmul(raw, QT.Q4_0, x, out=np.empty((1, 5), np.float32))
    with pytest.raises(QmoeError, match="threads must be"):
        kernels.set_num_threads(0)


# ----------------------------------------------------------------------------- experts

N_EXPERT, N_EMBD, N_FF = 16, 256, 512  # rows of whole K-quant super-blocks
MIXED = (QT.Q4_0, QT.Q8_0, QT.F16)  # gate, up, down of different types: per-tensor dispatch
EXPERT_TYPES = {
    "q4_0": (QT.Q4_0,) * 3,
    "mixed": MIXED,
    "f32": (QT.F32,) * 3,
    "k_quants": (QT.Q4_K, QT.Q5_K, QT.Q6_K),
    "low_bits": (QT.Q2_K, QT.Q3_K, QT.IQ4_XS),
    "legacy": (QT.Q4_1, QT.Q5_0, QT.Q5_1),
}


@pytest.fixture(scope="module", params=list(EXPERT_TYPES.values()), ids=list(EXPERT_TYPES))
def experts(request, rng):
    """Stacked raw expert tensors and their exact float64 values."""
    qtypes = request.param
    shapes = [(N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_EMBD, N_FF)]
    raws = [raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), q, rng) for s, q in zip(shapes, qtypes)]
    exacts = [exact(r.reshape(-1, r.shape[-1]), q).reshape(s) for r, q, s in zip(raws, qtypes, shapes)]
    return raws, exacts, qtypes


def reference_moe(exacts, x, ids, weights):
    gate, up, down = exacts
    out = np.zeros((x.shape[0], N_EMBD))
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t], weights[t]):
            out[t] += wt * reference_expert(gate[e], up[e], down[e], x[t : t + 1])[0]
    return out


def assert_moe_close(got, ref):
    """Experts chain three products and a silu: compare against the output's scale."""
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("n_tokens", [1, 3, 17, ops.BLAS_MIN_TOKENS + 1])
def test_expert_ffn_on_slabs_of_a_stacked_tensor(experts, n_tokens, rng):
    (gate, up, down), (g, u, d), qtypes = experts
    x = rng.standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    for e in (0, 7, N_EXPERT - 1):
        got = kernels.expert_ffn(gate[e], up[e], down[e], qtypes, x)
        assert_moe_close(got, reference_expert(g[e], u[e], d[e], x))


def routing(rng, n_tokens, k):
    """Scattered choices, the same expert for several tokens, and a token that picks one twice."""
    ids = np.stack([rng.choice(N_EXPERT, size=k, replace=False) for _ in range(n_tokens)])
    ids[:, 0] = 5  # every token shares expert 5
    if n_tokens > 2 and k > 1:
        ids[2, 1] = ids[2, 0]  # repeated within a token: counted twice
    weights = rng.random((n_tokens, k)).astype(np.float32)
    return ids.astype(np.int32), weights


@pytest.mark.parametrize(
    "n_tokens,k",
    [(1, 8), (1, 1), (3, 2), (17, 4), (ops.BLAS_MIN_TOKENS - 1, 3), (ops.BLAS_MIN_TOKENS + 1, 2)],
)
def test_moe_ffn(experts, n_tokens, k, rng):
    """Groups of 1 to TOKEN_TILE + tails; past BLAS_MIN_TOKENS, expert 5 (every token's) takes BLAS."""
    raws, exacts, qtypes = experts
    x = rng.standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, n_tokens, k)
    got = kernels.moe_ffn(*raws, qtypes, x, ids, weights)
    assert_moe_close(got, reference_moe(exacts, x, ids, weights))


@pytest.mark.parametrize("n_tokens", [1, 5, ops.BLAS_MIN_TOKENS + 1])
def test_moe_ffn_over_cache_slots_is_bit_identical(experts, n_tokens, rng):
    """The experts' slabs shuffled into other slots (as in the expert store's tiers), found by `slabs`."""
    raws, _, qtypes = experts
    x = rng.standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, n_tokens, 3)
    order = rng.permutation(N_EXPERT)  # slot i holds expert order[i]
    slots = [np.ascontiguousarray(raw[order]) for raw in raws]
    slab_of = np.argsort(order)
    got = kernels.moe_ffn(*slots, qtypes, x, ids, weights, slabs=slab_of)
    assert np.array_equal(got, kernels.moe_ffn(*raws, qtypes, x, ids, weights))
    with pytest.raises(QmoeError, match="slabs of the chosen experts"):
        kernels.moe_ffn(*slots, qtypes, x, ids, weights, slabs=np.full(N_EXPERT, N_EXPERT))


def test_moe_ffn_rejects_bad_routing(experts):
    raws, _, qtypes = experts
    x = np.ones((2, N_EMBD), np.float32)
    with pytest.raises(QmoeError, match="expert ids must be in 0..15"):
        kernels.moe_ffn(*raws, qtypes, x, np.array([[0], [N_EXPERT]]), np.ones((2, 1), np.float32))
    with pytest.raises(QmoeError, match="must both be"):
        kernels.moe_ffn(*raws, qtypes, x, np.zeros((2, 2), np.int64), np.ones((2, 1), np.float32))
    with pytest.raises(QmoeError, match="do not fit together|not a whole number of"):  # types differ: rows
        kernels.moe_ffn(raws[0], raws[1], raws[0], qtypes, x, np.zeros((2, 1), np.int64), np.ones((2, 1)))


@pytest.mark.parametrize("parallel_min_bytes", [0, ops.PARALLEL_MIN_BYTES])
def test_thread_count_does_not_change_results(experts, rng, monkeypatch, parallel_min_bytes):
    """Each output is summed by one thread in a fixed order: bit-identical at 1 and 2 threads, with
    these small weights run in parallel (threshold 0) or on one thread (the default threshold)."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_BYTES", parallel_min_bytes)
    raws, _, qtypes = experts
    x = rng.standard_normal((3, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, 3, 4)
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        results.append(
            (kernels.moe_ffn(*raws, qtypes, x, ids, weights), kernels.matmul(raws[0][3], qtypes[0], x))
        )
        assert numba.get_num_threads() == threads  # the small-work rule restores the setting
    kernels.set_num_threads(2)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_concurrent_calls_from_two_threads(experts, rng):
    """A prefetch worker runs kernels beside the main thread: both must get their own right answer."""
    raws, exacts, qtypes = experts
    xs = [rng.standard_normal((1, N_EMBD)).astype(np.float32) for _ in range(2)]
    routes = [routing(rng, 1, 4) for _ in range(2)]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def work(i):
        for _ in range(20):
            results[i].append(kernels.moe_ffn(*raws, qtypes, xs[i], *routes[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        ref = reference_moe(exacts, xs[i], *routes[i])
        assert len(results[i]) == 20
        for got in results[i]:
            assert_moe_close(got, ref)


def test_every_supported_type_has_compiled_row_loops():
    from qmoe.kernels import compiled

    assert {int(q) for q in KERNEL_TYPES} == set(compiled.IR_FORMATS)


def test_format_table_agrees_with_gguf_py():
    from gguf import GGML_QUANT_SIZES

    for qtype, fmt in FORMATS.items():
        assert (fmt.block, fmt.block_bytes) == GGML_QUANT_SIZES[qtype], qtype.name


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.F16, QT.Q4_K, QT.IQ4_NL])
def test_mlp_top_k_ranks_like_the_float_network(activation, qtype, rng):
    import torch

    fc1 = rng.normal(size=(256, 512)).astype(np.float32)
    fc2 = rng.normal(size=(20, 256)).astype(np.float32)
    b1, b2 = rng.normal(size=256).astype(np.float32), rng.normal(size=20).astype(np.float32)
    raw1, raw2 = (
        np.ascontiguousarray(raw_weight(w, qtype, rng)).view(np.uint8).reshape(w.shape[0], -1) for w in (fc1, fc2)
    )
    x = rng.normal(size=(7, 512)).astype(np.float32)
    act = torch.nn.functional.gelu if activation == "gelu" else torch.nn.functional.silu
    w1, w2 = (torch.from_numpy(gguf_dequantize(r, qtype)) for r in (raw1, raw2))
    scores = (act(torch.from_numpy(x) @ w1.T + torch.from_numpy(b1)) @ w2.T + torch.from_numpy(b2)).numpy()
    got = kernels.MLPTopK(raw1, qtype, b1, raw2, qtype, b2, activation)(x, 5)
    assert got.dtype == np.int64 and got.shape == (7, 5)
    assert np.array_equal(got, np.argsort(-scores, axis=1, kind="stable")[:, :5])
    with pytest.raises(QmoeError, match="activation"):
        kernels.MLPTopK(raw1, qtype, b1, raw2, qtype, b2, "relu")
    with pytest.raises(QmoeError, match="shapes do not fit"):
        kernels.MLPTopK(raw1, qtype, b1[:3], raw2, qtype, b2, activation)
    with pytest.raises(QmoeError, match="count"):
        kernels.MLPTopK(raw1, qtype, b1, raw2, qtype, b2, activation)(x, 21)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_torch_is_bit_exact(qtype, rng):
    """The CUDA tier's torch dequantizer (run here on the CPU) gives gguf-py's float32 bits."""
    import torch

    if qtype in BLOCK_TYPES:
        raw = random_blocks(qtype, (5, 512), rng, extreme=True)
    else:
        raw = np.ascontiguousarray(raw_weight(rng.standard_normal((5, 512)).astype(np.float32), qtype))
    as_bytes = raw.view(np.uint8).reshape(5, -1)
    got = kernels.dequantize_torch(torch.from_numpy(as_bytes), qtype, 512).numpy()
    ref = exact(raw, qtype).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_expert_groups_know_whether_a_token_repeats_an_expert(rng):
    """add_expert_output's one indexed add is only for groups of distinct tokens."""
    ids, _ = routing(rng, 6, 3)  # token 2 picks expert 5 twice
    assert not kernels.ExpertGroups(ids).distinct
    top_k = np.stack([rng.choice(N_EXPERT, size=3, replace=False) for _ in range(6)])
    assert kernels.ExpertGroups(top_k).distinct
    out = np.zeros((6, 2), np.float32)
    groups = kernels.ExpertGroups(ids)
    weights = np.ones((6, 3), np.float32)
    for g in range(len(groups)):
        kernels.add_expert_output(out, groups, g, np.ones((len(groups.tokens(g)), 2), np.float32), weights)
    assert np.array_equal(out, np.full((6, 2), 3.0, np.float32))  # the repeat counted twice



def test_one_tokens_expert_groups_are_the_general_ones(rng, monkeypatch):
    """A decode step's groups come from a shortcut; they must be what the general case makes."""
    cases = [rng.choice(N_EXPERT, size=k, replace=False)[None] for k in (1, 3, 8)]
    cases += [np.array([[5, 2, 5]]), np.array([[4, 4]])]  # repeats take the general path
    made = [kernels.ExpertGroups(ids) for ids in cases]
    monkeypatch.setattr(kernels.ExpertGroups, "_one_token", lambda self, *args: False)
    for ids, fast in zip(cases, made):
        general = kernels.ExpertGroups(ids)
        for field in ("k", "experts", "pairs", "starts", "n_compiled", "distinct"):
            got, want = np.asarray(getattr(fast, field)), np.asarray(getattr(general, field))
            assert got.dtype == want.dtype and np.array_equal(got, want), (ids, field)

# ----------------------------------------------------------------------------- pointwise (norms, rope, router, attention)


def test_rms_norm_is_torchs(rng):
    x = rng.standard_normal((5, 3, 64)).astype(np.float32) * 3
    w = rng.standard_normal(64).astype(np.float32)
    xt = torch.from_numpy(x)
    ref = (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.from_numpy(w)).numpy()
    got = kernels.rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    with pytest.raises(QmoeError, match="rms_norm"):
        kernels.rms_norm(x, w[:32], 1e-6)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dim", [16, 32])  # a part of the head, or all of it
def test_rope_is_the_rotation_of_pairs(rng, neox, dim):
    x = rng.standard_normal((4, 3, 32)).astype(np.float32)
    angles = rng.uniform(0, 6, (10, dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = np.array([9, 0, 3, 3])
    got = kernels.rope(x, positions, cos, sin, dim, neox)
    half = dim // 2
    a_at = np.arange(half) if neox else 2 * np.arange(half)
    b_at = a_at + half if neox else a_at + 1
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    a, b = x[..., a_at], x[..., b_at]
    np.testing.assert_allclose(got[..., a_at], a * c - b * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[..., b_at], b * c + a * s, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[..., dim:], x[..., dim:])


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_is_torchs(rng, normalize):
    logits = rng.standard_normal((7, 64)).astype(np.float32) * 2
    ids, weights = kernels.softmax_topk(logits, 6, normalize, scale=2.5)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    ref_w, ref_ids = torch.topk(probs, 6, dim=-1)
    if normalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert np.array_equal(ids, ref_ids.numpy()) and ids.dtype == np.int64
    np.testing.assert_allclose(weights, (ref_w * 2.5).numpy(), rtol=1e-5)
    tied, _ = kernels.softmax_topk(np.zeros((1, 8), np.float32), 3, True)
    assert tied.tolist() == [[0, 1, 2]]  # equal logits: the lower indices first


def test_route_softmax_topk_is_the_product_then_softmax_topk(rng):
    x = rng.standard_normal((3, 96), dtype=np.float32)
    router = rng.standard_normal((40, 96), dtype=np.float32)
    logits, ids, weights = kernels.route_softmax_topk(x, router, 4, True, 1.5)
    np.testing.assert_allclose(logits, x @ router.T, rtol=1e-5, atol=1e-4)
    want_ids, want_weights = kernels.softmax_topk(logits, 4, True, 1.5)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_array_equal(weights, want_weights)
    with pytest.raises(QmoeError, match="route_softmax_topk"):
        kernels.route_softmax_topk(x, router[:, :32], 4, True)


@pytest.mark.parametrize("heads, heads_kv, n_keys", [(8, 2, 1), (32, 4, 37), (4, 1, 300)])
def test_one_query_attention_is_torchs(rng, heads, heads_kv, n_keys):
    """The decode step's compiled attention over the first n_keys positions of a cache buffer
    equals torch's SDPA (GQA) over those positions."""
    q = rng.standard_normal((heads, 64), dtype=np.float32)
    k = rng.standard_normal((heads_kv, n_keys + 5, 64), dtype=np.float32)
    v = rng.standard_normal((heads_kv, n_keys + 5, 48), dtype=np.float32)
    want = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q)[:, None], torch.from_numpy(k)[:, :n_keys], torch.from_numpy(v)[:, :n_keys],
        scale=0.125, enable_gqa=True)[:, 0]
    got = kernels.one_query_attention(q, k, v, n_keys, 0.125)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(QmoeError, match="one_query_attention"):
        kernels.one_query_attention(q, k[..., :32], v, n_keys, 0.125)  # keys of another width than the queries
    with pytest.raises(QmoeError, match="one_query_attention"):
        kernels.one_query_attention(q, k, v, n_keys + 6, 0.125)  # more keys than the buffer holds


def test_decode_attention_takes_both_paths(rng, monkeypatch):
    """causal_attention's one-token CPU path: the compiled kernel up to ONE_QUERY_MAX_KEYS cached
    tokens and torch's grouped products beyond agree with SDPA, both reading the cache buffers."""
    from qmoe.models.base import causal_attention

    q = torch.from_numpy(rng.standard_normal((8, 1, 32), dtype=np.float32))
    k = torch.from_numpy(rng.standard_normal((2, 50, 32), dtype=np.float32))
    v = torch.from_numpy(rng.standard_normal((2, 50, 16), dtype=np.float32))
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :40], v[:, :40], scale=0.2, enable_gqa=True)
    for max_keys in (40, 39):
        monkeypatch.setattr(kernels, "ONE_QUERY_MAX_KEYS", max_keys)
        got = causal_attention(q, k, v, 39, 0.2)
        np.testing.assert_allclose(got.numpy(), want.transpose(0, 1).reshape(1, -1).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtypes", [(QT.Q4_K, QT.Q4_K, QT.Q6_K, QT.Q4_K), (QT.Q8_0,) * 4, (QT.F16, QT.F16, QT.F16, QT.Q5_0)])
@pytest.mark.parametrize("exact_products", [False, True])
def test_attention_products_are_the_parts_in_turn(rng, qtypes, exact_products):
    """One token's attention in one call (AttentionProducts: the q, k, v products, decode_attention,
    the output product) gives the parts' result and the same caches, bit for bit; q, k, v of
    different activation blocks do not fit it."""
    n_embd, n_head, n_head_kv, d, position = 256, 4, 2, 64, 5
    shapes = [(n_head * d, n_embd), (n_head_kv * d, n_embd), (n_head_kv * d, n_embd), (n_embd, n_head * d)]
    ms = [kernels.Matrix.of(raw_weight(0.1 * rng.standard_normal(s).astype(np.float32), q, rng), q)
          for s, q in zip(shapes, qtypes)]
    x = rng.standard_normal((1, n_embd)).astype(np.float32)
    cos, sin = (rng.standard_normal((16, d // 2)).astype(np.float32) for _ in range(2))
    caches = [rng.standard_normal((n_head_kv, 16, d)).astype(np.float32) for _ in range(2)]
    q_norm, k_norm = (rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2))
    args = (q_norm, k_norm, kernels.NORM_HEAD, 1e-6, 0.0, cos, sin, position, d, True)
    products = kernels.AttentionProducts(*ms)
    assert products.fits(exact_products)
    mine = [c.copy() for c in caches]
    got = products(x, n_head, *args, *mine, 0.125, exact=exact_products)
    q, k, v = kernels.matmul_many(ms[:3], x, exact=exact_products)
    heads = kernels.decode_attention(q.reshape(n_head, d), k.reshape(n_head_kv, d), v.reshape(n_head_kv, d),
                                     *args, *caches, 0.125)
    assert np.array_equal(got, kernels.matmul_matrix(ms[3], heads.reshape(1, -1), exact=exact_products))
    assert all(np.array_equal(a, b) for a, b in zip(mine, caches))
    if not exact_products:
        mixed = kernels.AttentionProducts(ms[0], ms[1], kernels.Matrix.of(
            raw_weight(rng.standard_normal(shapes[2]).astype(np.float32), QT.Q8_0, rng), QT.Q8_0), ms[3])
        assert qtypes[0] == QT.Q8_0 or not mixed.fits(exact_products)  # 256- and 32-blocks of x

@pytest.mark.parametrize("n_tokens", [1, 5, ops.BLAS_MIN_TOKENS])
def test_matmul_many_is_each_matmul(rng, n_tokens):
    """Weights of one form share a compiled call (up to MATMUL_WEIGHTS, the rest in the next);
    others, and many tokens, go one by one: every result is matmul's, bit for bit."""
    qtypes = [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.F32, QT.Q4_K, QT.Q5_K, QT.Q2_K]
    rows = [48, 16, 32, 8, 24, 16, 40]
    weights = [(raw_weight(0.2 * rng.standard_normal((r, 256)).astype(np.float32), q, rng), q)
               for r, q in zip(rows, qtypes)]
    x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
    got = kernels.matmul_many(weights, x)
    for (w, q), y in zip(weights, got):
        assert np.array_equal(y, kernels.matmul(w, q, x)), q.name
