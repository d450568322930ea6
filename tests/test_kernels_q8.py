"""The integer products (exact=False, the default): block formats times an 8-bit activation.

A few-token product of a block format quantizes x per block of the weight's format
(compiled.quantize_q8: x ~ xq * d, d ~ max |x| / 127, as llama.cpp's Q8_0 / Q8_1 / Q8_K)
and sums integers. So the result is the float product with x replaced by its quantized
values x_hat, to float32 rounding; Q4_1's and Q5_1's per-block offsets m multiply Q8_1's
block sum s (d times the sum of the block's xq, in fp16). That is what is asserted, and
with it the error the activation's quantization brings: at most about
sum_i |w_i| * d_i / 2 per output (d_i / 2: rounding to the integer; 32-blocks' d is
rounded to fp16, which moves x_hat by up to 127 * 2^-12 d more).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir

from qmoe import kernels
from qmoe.errors import QmoeError
from qmoe.formats import FORMATS
from qmoe.kernels import compiled, ops
from tests.test_kernels import BLOCK_TYPES, QT, assert_moe_close, exact, raw_weight, reference_moe, routing

Q8_TYPES = [QT.Q8_0, QT.Q4_0, *BLOCK_TYPES]
FLOAT_OFFSETS = {QT.Q4_1, QT.Q5_1}  # their offsets m multiply the float sums of x


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(77)


def quantized_activation(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, d per element): x as the integer products see it."""
    xq, xd, _, _ = compiled.quantize_q8(x, True, block)
    d = np.repeat(xd.astype(np.float64), block, axis=1)
    return xq.astype(np.float64) * d, d


def block_offsets(raw: np.ndarray, qtype: QT, n: int) -> np.ndarray:
    """Q4_1/Q5_1: each block's offset m (float64 [rows, n / 32]); zeros for other types."""
    rows = raw.shape[0]
    if qtype not in FLOAT_OFFSETS:
        return np.zeros((rows, n // 32))
    fmt = FORMATS[qtype]
    blocks = raw.reshape(rows, n // fmt.block, fmt.block_bytes)
    return np.ascontiguousarray(blocks[:, :, fmt.offset("m") : fmt.offset("m") + 2]).view(np.float16)[..., 0]


@pytest.mark.parametrize("qtype", Q8_TYPES)
@pytest.mark.parametrize("n_tokens", [1, 3, 6])
def test_integer_product_is_the_product_of_the_quantized_activation(qtype, n_tokens, rng):
    n = 512
    raw = raw_weight(0.3 * rng.standard_normal((40, n)).astype(np.float32), qtype, rng)
    w = exact(raw, qtype)
    m = block_offsets(raw, qtype, n).astype(np.float64)
    x = (rng.standard_normal((n_tokens, n)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    x_hat, d = quantized_activation(x, FORMATS[qtype].block)
    s = compiled.quantize_q8(x, True, FORMATS[qtype].block)[2].astype(np.float64)  # Q8_1's block sums
    got = kernels.matmul(raw, qtype, x, exact=False).astype(np.float64)

    w_scaled = w - np.repeat(m, 32, axis=1)  # the weights without their offsets
    ref = x_hat @ w_scaled.T + s @ m.T
    rounding = 1e-5 * (np.abs(x_hat) @ np.abs(w_scaled).T + np.abs(s) @ np.abs(m).T) + 1e-30
    assert np.all(np.abs(got - ref) <= rounding), (
        f"{qtype.name}: max error / bound {np.max(np.abs(got - ref) / rounding):.3g}"
    )

    float_ref = x.astype(np.float64) @ w.T
    x_err = 0.54 * d  # |x - x_hat|: half a step, and the fp16 rounding of a 32-block's d
    s_err = x_err.reshape(n_tokens, -1, 32).sum(-1) + 2.0**-11 * np.abs(s)
    quantization = x_err @ np.abs(w_scaled).T + s_err @ np.abs(m).T + rounding
    assert np.all(np.abs(got - float_ref) <= quantization)
    rel = np.linalg.norm(got - float_ref) / np.linalg.norm(float_ref)
    assert rel < 2e-2, f"{qtype.name}: relative error {rel:.3g}"


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q6_K, QT.IQ4_XS])
def test_token_tiles_equal_single_tokens(qtype, rng):
    """A tile of TOKEN_TILE activation rows decodes each block once: each row's result is its own."""
    raw = raw_weight(rng.standard_normal((24, 256)).astype(np.float32), qtype, rng)
    x = rng.standard_normal((compiled.TOKEN_TILE + 2, 256)).astype(np.float32)
    together = kernels.matmul(raw, qtype, x, exact=False)
    one_by_one = np.concatenate(
        [kernels.matmul(raw, qtype, x[t : t + 1], exact=False) for t in range(len(x))]
    )
    assert np.array_equal(together, one_by_one)


def test_the_process_setting_and_the_argument(rng):
    raw = raw_weight(rng.standard_normal((8, 256)).astype(np.float32), QT.Q4_K, rng)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    integer, floats = (
        kernels.matmul(raw, QT.Q4_K, x, exact=False),
        kernels.matmul(raw, QT.Q4_K, x, exact=True),
    )
    assert not np.array_equal(integer, floats)
    before = kernels.exact_products()
    try:
        kernels.set_exact_products(True)
        assert np.array_equal(kernels.matmul(raw, QT.Q4_K, x), floats)
        kernels.set_exact_products(False)
        assert np.array_equal(kernels.matmul(raw, QT.Q4_K, x), integer)
    finally:
        kernels.set_exact_products(before)
    f32 = rng.standard_normal((8, 256)).astype(np.float32)  # float formats have no integer product
    assert np.array_equal(
        kernels.matmul(f32, QT.F32, x, exact=False), kernels.matmul(f32, QT.F32, x, exact=True)
    )


N_EXPERT, N_EMBD, N_FF = 16, 256, 512


@pytest.mark.parametrize(
    "qtypes", [(QT.Q4_0,) * 3, (QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.IQ4_XS, QT.Q5_K, QT.Q5_0)]
)
@pytest.mark.parametrize("n_tokens,k", [(1, 8), (5, 2)])
def test_moe_ffn_on_integer_products(qtypes, n_tokens, k, rng):
    """Routed experts with integer products: close to the float reference (three chained
    products, each off by its activation's quantization), and expert_ffn equals moe_ffn's
    groups. Gate Q4_K / up Q5_K share a quantized x; IQ4_XS gate and Q5_K up as well."""
    shapes = [(N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_EMBD, N_FF)]
    raws = [
        raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), q, rng) for s, q in zip(shapes, qtypes)
    ]
    exacts = [exact(r.reshape(-1, r.shape[-1]), q).reshape(s) for r, q, s in zip(raws, qtypes, shapes)]
    x = rng.standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, n_tokens, k)
    got = kernels.moe_ffn(*raws, qtypes, x, ids, weights, exact=False)
    ref = reference_moe(exacts, x, ids, weights)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 3e-2, f"relative error {rel:.3g}"
    assert_moe_close(kernels.moe_ffn(*raws, qtypes, x, ids, weights, exact=True), ref)
    e = int(ids[0, 0])
    alone = kernels.expert_ffn(raws[0][e], raws[1][e], raws[2][e], qtypes, x[:1], exact=False)
    one = kernels.moe_ffn(*raws, qtypes, x[:1], np.array([[e]]), np.ones((1, 1), np.float32), exact=False)
    assert np.array_equal(alone, one)



@pytest.mark.parametrize("qtypes", [(QT.Q8_0,) * 3, (QT.Q4_K, QT.Q4_K, QT.Q6_K)])
@pytest.mark.parametrize("exact", [False, True])
def test_stacked_expert_ffns_is_expert_ffn_for_each(qtypes, exact, rng):
    """Several experts of a stack, each on its own rows (one expert twice, rows from 0 to past
    BLAS_MIN_TOKENS), in one call: each output equals expert_ffn's on that slab, bit for bit."""
    shapes = [(N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_EMBD, N_FF)]
    raws = [raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), q, rng) for s, q in zip(shapes, qtypes)]
    stacked = kernels.StackedExperts.of(*raws, qtypes)
    slots = [3, 0, 3, 11, 7, N_EXPERT - 1]
    counts = [1, 5, 4, 0, ops.BLAS_MIN_TOKENS + 2, 9]
    xs = [rng.standard_normal((n, N_EMBD)).astype(np.float32) for n in counts]
    got = kernels.stacked_expert_ffns(stacked, slots, xs, exact=exact)
    for s, x, y in zip(slots, xs, got):
        want = kernels.expert_ffn(raws[0][s], raws[1][s], raws[2][s], qtypes, x, exact=exact)
        assert y.shape == (len(x), N_EMBD) and np.array_equal(y, want)


@pytest.fixture
def tile_lanes():
    """set_tile_lanes for one test; the tiles' generic code runs where the CPU has no VNNI."""
    before = kernels.tile_lanes()
    yield kernels.set_tile_lanes
    kernels.set_tile_lanes(before)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("qtypes", [(QT.Q8_0,) * 3, (QT.Q8_0, QT.Q8_0, QT.Q4_K), (QT.Q4_K, QT.Q4_K, QT.Q8_0)])
def test_q8_0_tiles_compute_what_the_row_loops_do(lanes, qtypes, tile_lanes, rng):
    """Q8_0 experts through tiles of token lanes: the same integer sums as the row loops, so
    the same result to float32 rounding; groups of 1 to 3 tiles, and ones below TILE_MIN_PAIRS
    left to the row loops, in one call (and a token that chooses an expert twice)."""
    shapes = [(N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_EMBD, N_FF)]
    raws = [raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), q, rng) for s, q in zip(shapes, qtypes)]
    n_tokens = 2 * lanes + 3
    x = (rng.standard_normal((n_tokens, N_EMBD)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    ids, weights = routing(rng, n_tokens, 3)
    ids[: lanes + 1, 1] = 9  # a group of lanes + 1 pairs: two tiles
    ids[lanes + 1 :, 1] = 10
    tile_lanes(0)
    rows = kernels.moe_ffn(*raws, qtypes, x, ids, weights, exact=False)
    tile_lanes(lanes)
    tiles = kernels.moe_ffn(*raws, qtypes, x, ids, weights, exact=False)
    assert not np.array_equal(tiles, rows)  # the tiles ran: their float sums go in another order
    # Float rounding alone, except where a hidden value fell within it of a rounding midpoint of
    # its 8-bit quantization: then the two paths' xq differ by one step there (seen: one token
    # of 35, 1.4e-4 of the output's scale, both 0.7 % off the exact product).
    scale = np.abs(rows).max()
    per_token = np.abs(tiles - rows).max(axis=1) / scale
    assert np.median(per_token) <= 2e-6 and per_token.max() <= 1e-3, per_token


@pytest.mark.parametrize("lanes", [8, 16])
def test_a_token_in_a_tile_computes_alone(lanes, tile_lanes, rng):
    """Every lane of a tile runs the same operations in the same order: a token's result does
    not depend on the other tokens of its tile, nor on its lane (the same rows in another
    order and with fewer neighbours give the same bits)."""
    shapes = [(1, N_FF, N_EMBD), (1, N_FF, N_EMBD), (1, N_EMBD, N_FF)]
    gate, up, down = (raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), QT.Q8_0, rng)[0] for s in shapes)
    qtypes = (QT.Q8_0,) * 3
    x = rng.standard_normal((lanes + 4, N_EMBD)).astype(np.float32)
    tile_lanes(lanes)
    together = kernels.expert_ffn(gate, up, down, qtypes, x, exact=False)
    order = np.arange(len(x))[::-3][: compiled.TILE_MIN_PAIRS]
    apart = kernels.expert_ffn(gate, up, down, qtypes, x[order], exact=False)
    assert np.array_equal(apart, together[order])
    tile_lanes(0)
    assert not np.array_equal(kernels.expert_ffn(gate, up, down, qtypes, x, exact=False), together)


@pytest.mark.parametrize("lanes", [8, 16])
def test_q8_0_matmul_tiles_compute_what_the_row_loops_do(lanes, tile_lanes, rng):
    """A prompt's Q8_0 projection in tiles (compiled.matmul_tiles): each token's row equals the
    row loops' product of that token alone to float32 rounding, rows past a multiple of
    TILE_ROWS and a last tile of one token included."""
    raw = raw_weight(0.3 * rng.standard_normal((4 * compiled.TILE_ROWS + 3, 512)).astype(np.float32), QT.Q8_0, rng)
    n_tokens = max(ops.BLAS_MIN_TOKENS, 3 * (lanes - 1)) + 1
    x = (rng.standard_normal((n_tokens, 512)) * rng.uniform(0.1, 3, (n_tokens, 1))).astype(np.float32)
    tile_lanes(lanes)
    tiles = kernels.matmul(raw, QT.Q8_0, x, exact=False)
    rows = np.concatenate([kernels.matmul(raw, QT.Q8_0, x[t : t + 1], exact=False) for t in range(n_tokens)])
    assert not np.array_equal(tiles, rows)
    np.testing.assert_allclose(tiles, rows, rtol=0, atol=2e-6 * np.abs(rows).max())


@pytest.mark.parametrize("triple,cpu,lanes,vnni,wanted", [
    ("x86_64-unknown-linux-gnu", "icelake-server", 16, True, r"vpdpbusd\s.*zmm"),  # AVX-512 VNNI
    ("x86_64-unknown-linux-gnu", "alderlake", 8, True, r"vpdpbusd\s.*ymm"),  # AVX-VNNI
    ("x86_64-unknown-linux-gnu", "haswell", 8, False, r"vpmaddwd"),  # no VNNI: widened bytes' multiply-adds
    ("aarch64-unknown-linux-gnu", "generic", 16, False, r"\bsmull\b"),  # NEON's widening multiplies
])
def test_q8_0_tiles_byte_dot_lowers_for_each_target(triple, cpu, lanes, vnni, wanted):
    """The tiles' byte dot (_dot_bytes) compiles to vpdpbusd where the target has VNNI and to
    generic vector code elsewhere (ARM included)."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    module = ir.Module(name="tile_dot")
    module.triple = triple
    vi32 = ir.VectorType(ir.IntType(32), lanes)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [vi32.as_pointer()] * 3), "dot")
    builder = ir.IRBuilder(fn.append_basic_block())
    acc, u, s = (builder.load(a) for a in fn.args)
    builder.store(compiled._dot_bytes(builder, acc, u, s, lanes, vnni), fn.args[0])
    builder.ret_void()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    asm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=2).emit_assembly(parsed)
    assert re.search(wanted, asm), f"{triple} {cpu}: no {wanted}"
    assert ("vpdpbusd" in asm) == vnni


def test_q8_0_tiles_without_vnni_are_right_too(tmp_path):
    """The tiles' generic byte dot computes what vpdpbusd does: the three tile tests above,
    compiled for Haswell (AVX2, no VNNI) in a fresh process."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse4.2")
    tests = [f"{__file__}::{name}" for name in ("test_q8_0_tiles_compute_what_the_row_loops_do",
                                                 "test_a_token_in_a_tile_computes_alone",
                                                 "test_q8_0_matmul_tiles_compute_what_the_row_loops_do")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.parametrize("qtypes", [(QT.Q4_0,) * 3, (QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q8_0,) * 3])
@pytest.mark.parametrize("exact_products", [False, True])
def test_route_moe_one_is_the_router_then_the_experts(qtypes, exact_products, rng):
    """A decode step's router and experts in one call give what route_softmax_topk and then
    stacked_moe_ffn give, bit for bit (k = 1 too: one group)."""
    shapes = [(N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_FF, N_EMBD), (N_EXPERT, N_EMBD, N_FF)]
    raws = [raw_weight(0.2 * rng.standard_normal(s).astype(np.float32), q, rng) for s, q in zip(shapes, qtypes)]
    stacked = kernels.StackedExperts.of(*raws, qtypes)
    router = rng.standard_normal((N_EXPERT, N_EMBD)).astype(np.float32)
    x = rng.standard_normal((1, N_EMBD)).astype(np.float32)
    for k, normalize, scale in ((4, True, 1.0), (1, False, 2.5)):
        logits, ids, weights, out = kernels.route_moe_one(stacked, x, router, k, normalize, scale, exact_products)
        want = kernels.route_softmax_topk(x, router, k, normalize, scale)
        for got_part, want_part in zip((logits, ids, weights), want):
            assert np.array_equal(got_part, want_part)
        assert np.array_equal(out, kernels.stacked_moe_ffn(stacked, x, ids, weights, exact=exact_products))
    with pytest.raises(QmoeError, match="route_moe_one"):
        kernels.route_moe_one(stacked, x, router[:, :128], 2, True)

def test_quantize_q8_blocks(rng):
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block: d = 0, quants 0
    for block in (32, 256):
        xq, xd, xs, xb = compiled.quantize_q8(x, True, block)
        amax = np.abs(x).reshape(2, -1, block).max(-1)
        assert xq.dtype == np.int8 and np.abs(xq).max() == 127
        assert np.array_equal(
            xq, np.rint(x * np.repeat(np.float32(127) / np.maximum(amax, 1e-30), block, axis=1))
        )
        want_d = (
            (amax / np.float32(127)).astype(np.float16)
            if block == 32
            else np.float32(1) / (np.float32(127) / amax)
        )
        assert np.array_equal(
            xd, np.where(amax > 0, want_d, 0).astype(np.float32)
        )  # fp16 d as ggml's Q8_0 stores it
        sums = xq.reshape(2, -1, 32).sum(-1)
        np.testing.assert_array_equal(
            xs, (np.repeat(amax / np.float32(127), block // 32, axis=1) * sums).astype(np.float16)
        )
        assert np.array_equal(xb, xq.reshape(2, -1, 16).sum(-1))
    assert all(a.shape[0] == 0 for a in compiled.quantize_q8(x, False, 32))


def _group_products_ir(triple: str, avx2: bool, vnni: bool) -> str:
    """Every integer format's group decoding and integer dot, in a module for `triple`, as the
    row loops build them (byte products for unsigned formats, and for all of them on AVX2;
    VNNI's dot instruction where a group has no sub-scales)."""
    module = ir.Module(name="q8_groups")
    module.triple = triple
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, compiled._vi8_group.as_pointer(), compiled._vi32_i.as_pointer()])
    fn = ir.Function(module, fnty, "groups")
    builder = ir.IRBuilder(fn.append_basic_block())
    w, xq, out = fn.args
    acc = ir.Constant(compiled._vi32_i, [0] * compiled._I_LANES)
    x_group = builder.load(xq)
    halves = builder.bitcast(xq, compiled._vi8.as_pointer())
    x_lo, x_hi = builder.load(halves), builder.load(builder.gep(halves, [ir.Constant(ir.IntType(64), 1)]))
    xb_lo, xb_hi = ir.Constant(i32, 3), ir.Constant(i32, 5)
    for fmt in compiled.Q8_FORMATS.values():
        for s in range(fmt.block // compiled._GROUP):
            lo, hi = fmt.group(builder, w, s)
            if lo.ushift is not None or avx2:
                acc, offset = compiled._group_isum_bytes(builder, lo, hi, x_group, xb_lo, xb_hi, avx2, vnni, acc)
                if offset is not None:
                    acc = builder.insert_element(acc, offset, ir.Constant(i32, 0))
            else:
                acc = builder.add(acc, compiled._group_isum(builder, lo, hi, x_lo, x_hi))
    builder.store(acc, out)
    builder.ret_void()
    return str(module)


@pytest.mark.parametrize(
    "triple,cpu,wanted",
    [
        (
            "aarch64-unknown-linux-gnu",
            "generic",
            ("smull", "ushll", r"\btbl"),
        ),  # NEON: widening multiplies, IQ4's lookup
        # AVX2 without AVX-512: byte products, their sub-scales, IQ4's lookup, the signed formats' signs
        ("x86_64-unknown-linux-gnu", "haswell", ("vpmaddubsw", "vpmaddwd", "vpshufb", "vpsignb")),
        # AVX-VNNI (a laptop's Alder Lake): the dot instruction, the byte products for the sub-scales
        ("x86_64-unknown-linux-gnu", "alderlake", ("vpdpbusd", "vpmaddubsw", "vpsignb")),
    ],
)
def test_integer_products_lower_for_arm_and_avx2(triple, cpu, wanted):
    """The integer row loops' IR is generic vectors on ARM (and a byte shuffle where the target
    has one), with AVX2's byte products (and VNNI's dot) called by name on x86: it compiles for
    ARM, for an AVX2-only x86 and for one with AVX-VNNI into their integer multiply-adds."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    module = llvm.parse_assembly(_group_products_ir(triple, avx2=triple.startswith("x86_64"), vnni=cpu == "alderlake"))
    module.verify()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=2)
    asm = machine.emit_assembly(module)
    for instruction in wanted:
        assert re.search(instruction, asm), f"{triple}: no {instruction}"
    assert "zmm" not in asm


def test_blas_products_multiply_the_quantized_activation(rng, monkeypatch):
    """Many tokens go to dequantize + BLAS, on the activation the integer products see: the
    same result to float rounding as the row kernels, so batch size does not change a prompt."""
    raw = raw_weight(rng.standard_normal((8, 256)).astype(np.float32), QT.Q4_K, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    rows = kernels.matmul(raw, QT.Q4_K, x, exact=False)
    monkeypatch.setattr(ops, "BLAS_MIN_TOKENS", 2)
    blas = kernels.matmul(raw, QT.Q4_K, x, exact=False)
    np.testing.assert_allclose(blas, rows, rtol=0, atol=1e-5 * np.abs(rows).max())
    assert not np.allclose(blas, kernels.matmul(raw, QT.Q4_K, x, exact=True), rtol=0, atol=1e-5 * np.abs(rows).max())


def test_integer_products_without_avx2_are_right_too(tmp_path):
    """The byte products' generic form (ARM's, and any x86 without AVX2) computes the same: the
    products test above, compiled for Ivy Bridge (AVX and F16C, no AVX2) in a fresh process."""
    env = dict(os.environ, NUMBA_CPU_NAME="ivybridge", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+sse2,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+f16c")
    test = f"{__file__}::test_integer_product_is_the_product_of_the_quantized_activation"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
