"""The routed-experts reduction: tokens grouped by expert, each group's SwiGLU, the weighted sum.

Float sums depend on their order, so the order is fixed here, once, for every caller:

    ExpertGroups(ids)      the (token, expert) pairs grouped by expert: first the experts
                           that fewer than BLAS_MIN_TOKENS tokens chose (by ascending
                           expert), then the others (by ascending expert)
    add_expert_output(...) out[t] += weight * y for one group's tokens
    moe_ffn                every group at once: the small groups in one compiled call that
                           adds them in group order, then each BLAS group in turn
    stacked_moe_ffn        the same on a StackedExperts, weights checked once for every call
    route_moe_one          a decode step's softmax router and stacked_moe_ffn in one call
    expert_ffn             one expert's SwiGLU on its tokens (weight 1)

A caller that computes the groups itself, one expert at a time from wherever its slab
is (the expert store's tiers), gets moe_ffn's result bit for bit by calling
`expert_ffn` per group and `add_expert_output` in the groups' order: the compiled call
adds `weight * y` into the output exactly as `add_expert_output` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qmoe.errors import QmoeError
from qmoe.kernels import compiled
from qmoe.kernels.formats import check_qtype, row_bytes, weight_bytes
from qmoe.kernels.ops import (
    BLAS_MIN_TOKENS,
    _activations,
    _run,
    exact_products,
    matmul,
    q8_block,
    q8_products,
    tile_lanes,
)


class ExpertGroups:
    """The routed (token, expert) pairs of ids [T, k] grouped by expert, in summation order.

    Pair p = t * k + j is token t's j-th choice. Group g is expert `experts[g]` for the pairs
    `pairs[starts[g]:starts[g + 1]]`; the first `n_compiled` groups are those moe_ffn computes
    in one compiled call (fewer than BLAS_MIN_TOKENS tokens each).
    """

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids)
        self.k = ids.shape[1] if ids.ndim == 2 else 1
        if ids.size == self.k and self._one_token(ids.reshape(-1).tolist()):
            return
        pair_experts = ids.reshape(-1).astype(np.int64)
        pairs = np.argsort(pair_experts, kind="stable")  # by ascending expert
        starts = np.flatnonzero(np.diff(pair_experts[pairs], prepend=-1))
        counts = np.diff(starts, append=len(pairs))
        small = counts < BLAS_MIN_TOKENS
        order = np.concatenate((np.flatnonzero(small), np.flatnonzero(~small)))  # small groups first
        self.experts = pair_experts[pairs[starts[order]]]
        self.pairs = np.concatenate([pairs[s : s + c] for s, c in zip(starts[order], counts[order])] or [pairs])
        self.starts = np.concatenate(([0], np.cumsum(counts[order]))).astype(np.int64)
        self.n_compiled = int(small.sum())
        # A router's top-k chooses an expert once per token; the kernels also take ids that
        # repeat one within a token (counted twice), which add_expert_output must then sum in turn.
        tokens = self.pairs // self.k
        same_group = np.diff(np.repeat(np.arange(len(counts)), counts[order])) == 0
        self.distinct = not bool(np.any((np.diff(tokens) == 0) & same_group))

    def _one_token(self, chosen: list[int]) -> bool:
        """The groups of one token's k distinct experts (a decode step's): k groups of one pair,
        by ascending expert, as the general case makes them. Worked out on Python lists: for k
        numbers that is a few microseconds where the general case's numpy calls took 137 us a
        layer, and numpy's own sort and checks 20 us. False, with nothing set, when the token
        repeats an expert."""
        order = sorted(range(len(chosen)), key=chosen.__getitem__)  # stable: ties keep their order
        experts = [chosen[j] for j in order]
        if len(set(experts)) < len(experts):
            return False
        self.experts, self.pairs = np.array(experts, np.int64), np.array(order, np.int64)
        self.starts = np.arange(len(order) + 1, dtype=np.int64)
        self.n_compiled = len(order)  # groups of one pair, all below BLAS_MIN_TOKENS
        self.distinct = True
        return True

    def __len__(self) -> int:
        return len(self.experts)

    def group_pairs(self, g: int) -> np.ndarray:
        """Pair indices of group g."""
        return self.pairs[self.starts[g] : self.starts[g + 1]]

    def tokens(self, g: int) -> np.ndarray:
        """Token rows of group g, one per pair (a token that repeats an expert appears twice)."""
        return self.group_pairs(g) // self.k


def add_expert_output(
    out: np.ndarray, groups: ExpertGroups, g: int, y: np.ndarray, weights: np.ndarray
) -> None:
    """out[t] += weights[t, j] * y[i] for the i-th pair (t, j) of group g; y: [pairs of g, n_embd].

    With distinct tokens in every group (a router's choices) one indexed add does it;
    np.add.at, which sums repeated indices in turn, took 10 % of a long prompt's time."""
    pairs = groups.group_pairs(g)
    if groups.distinct:
        out[pairs // groups.k] += weights.reshape(-1)[pairs, None] * y
    else:
        np.add.at(out, pairs // groups.k, weights.reshape(-1)[pairs, None] * y)


def _experts(gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple, what: str):
    """Checked flat bytes of stacked expert weights [E, rows, row], and their sizes."""
    if len(qtypes) != 3:
        raise QmoeError(f"{what}: qtypes must be (gate, up, down), got {qtypes!r}")
    qtypes = tuple(check_qtype(q) for q in qtypes)
    flat, sizes = [], []
    for name, w, qtype in zip(("gate", "up", "down"), (gate, up, down), qtypes):
        if w.ndim != 3:
            raise QmoeError(f"{what}: {name} must be [experts, rows, row], got shape {list(w.shape)}")
        wb, n = weight_bytes(w, qtype, f"{what} {name}")
        flat.append(wb)
        sizes.append((w.shape[0], w.shape[1], n))  # (experts, rows, n)
    (e_g, n_ff, n_embd), (e_u, *up_rows_n), (e_d, *down_rows_n) = sizes
    if up_rows_n != [n_ff, n_embd] or down_rows_n != [n_embd, n_ff] or not e_g == e_u == e_d:
        raise QmoeError(
            f"{what}: expert shapes do not fit together: gate {sizes[0]}, up {sizes[1]}, down {sizes[2]} "
            "(experts, rows, row length); expected gate = up = [E, n_ff, n_embd], down = [E, n_embd, n_ff]"
        )
    row_nbytes = tuple(row_bytes(q, n) for q, (_, _, n) in zip(qtypes, sizes))
    return flat, qtypes, row_nbytes, e_g, n_embd, n_ff


def _moe_rows_types(qtypes: tuple, exact: bool | None) -> tuple:
    """moe_rows' qtypes, q8 and q8_blocks arguments. Gate and up share one quantized x, so up
    runs in float32 when its block differs from gate's (no llama.cpp mix does that)."""
    gate, up, down = qtypes
    q8 = [q8_products(q, exact) for q in qtypes]
    x_block = q8_block(gate if q8[0] else up)
    if q8[0] and q8[1] and q8_block(up) != x_block:
        q8[1] = False
    return tuple(int(q) for q in qtypes), tuple(q8), (x_block, q8_block(down))


def _blas_min_tokens(qtypes: tuple, exact: bool | None) -> int:
    """Tokens from which one expert's products go to BLAS: BLAS_MIN_TOKENS, or never when
    compiled.moe_rows computes all three products in tiles (integer Q8_0 products, tile_lanes
    set), which outrun dequantizing to float32 for BLAS at any count (A3B's experts on two
    AVX-512 VNNI cores, 64 tokens each: 159 GMAC/s in tiles, 64 through BLAS; 256 tokens: 166)."""
    tiled = tile_lanes() and all(int(q) == compiled.Q8_0 and q8_products(q, exact) for q in qtypes)
    return np.iinfo(np.int64).max if tiled else BLAS_MIN_TOKENS


@dataclass(frozen=True)
class StackedExperts:
    """A layer's stacked expert weights (raw [E, rows, row] gate, up, down), checked once.

    moe_ffn checks its weights and works out their row sizes on every call, some forty Python
    calls; a caller that computes with the same tensors step after step (a model's layer, an
    expert store's slots) makes this once and calls stacked_moe_ffn, which skips them. In a
    decode step every Python call after a weight product runs slowly (on the development VM a
    trivial one took 20 us instead of 0.4 after 8 ms of work), so this is worth it there.
    """

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    qtypes: tuple
    flat: tuple  # the three as flat read-only bytes (weight_bytes)
    row_bytes: tuple
    n_expert: int
    n_embd: int
    n_ff: int
    kernel_types: dict = field(default_factory=dict, compare=False)  # exact -> _moe_rows_types' answer

    def types(self, exact: bool | None) -> tuple:
        """_moe_rows_types(qtypes, exact), worked out once per setting of exact."""
        key = exact_products() if exact is None else exact
        if key not in self.kernel_types:
            self.kernel_types[key] = _moe_rows_types(self.qtypes, key)
        return self.kernel_types[key]

    @property
    def expert_bytes(self) -> int:
        """One expert's bytes: its gate, up and down rows."""
        return (self.row_bytes[0] + self.row_bytes[1]) * self.n_ff + self.row_bytes[2] * self.n_embd

    @classmethod
    def of(cls, gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple,
           what: str = "moe_ffn") -> StackedExperts:
        flat, qt, rb, n_expert, n_embd, n_ff = _experts(gate, up, down, qtypes, what)
        return cls(gate, up, down, qt, tuple(flat), rb, n_expert, n_embd, n_ff)


def moe_ffn(
    gate_exps: np.ndarray,
    up_exps: np.ndarray,
    down_exps: np.ndarray,
    qtypes: tuple,
    x: np.ndarray,
    expert_ids: np.ndarray,
    expert_weights: np.ndarray,
    slabs: np.ndarray | None = None,
    exact: bool | None = None,
) -> np.ndarray:
    """The routed experts' weighted sum for T tokens.

    gate_exps, up_exps: raw [E, n_ff, n_embd]; down_exps: raw [E, n_embd, n_ff];
    qtypes: their types (gate, up, down); x: float32 [T, n_embd];
    expert_ids: int [T, k]; expert_weights: float32 [T, k].
    out[t] = sum_j weights[t, j] * (silu(x[t] @ G_e.T) * (x[t] @ U_e.T)) @ D_e.T,  e = ids[t, j]
    -> float32 [T, n_embd], summed in ExpertGroups' order. Experts chosen by at least
    BLAS_MIN_TOKENS tokens run through BLAS (unless tiles compute them: _blas_min_tokens),
    all others in one compiled call that reads each of their weight rows once.
    slabs: int [n_ids], expert id -> its index in the stacked arrays, when these are not
    the model's tensors but slots of a cache (the expert store's tiers); the sums run in
    the order of the expert ids all the same, so the result is bit-identical.
    exact: float32 activations or integer products, as ops.matmul's `exact`.
    """
    experts = StackedExperts.of(gate_exps, up_exps, down_exps, qtypes)
    return stacked_moe_ffn(experts, x, expert_ids, expert_weights, slabs, exact)


def stacked_moe_ffn(experts: StackedExperts, x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
                    slabs: np.ndarray | None = None, exact: bool | None = None) -> np.ndarray:
    """moe_ffn on weights checked once (StackedExperts)."""
    flat, qt, rb, n_expert, n_embd, n_ff = (experts.flat, experts.qtypes, experts.row_bytes, experts.n_expert,
                                            experts.n_embd, experts.n_ff)
    n_ids = n_expert
    if slabs is not None:
        slabs = np.asarray(slabs, dtype=np.int64)
        n_ids = len(slabs)
    x = _activations(x, n_embd, "moe_ffn")
    ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
    weights = np.ascontiguousarray(expert_weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise QmoeError(
            f"moe_ffn: expert_ids {list(ids.shape)} and expert_weights {list(weights.shape)} must both be "
            f"[tokens = {x.shape[0]}, k]"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= n_ids):
        raise QmoeError(f"moe_ffn: expert ids must be in 0..{n_ids - 1}, got {ids.min()}..{ids.max()}")
    if slabs is not None and ids.size and (slabs[ids].min() < 0 or slabs[ids].max() >= n_expert):
        raise QmoeError(f"moe_ffn: the slabs of the chosen experts must be in 0..{n_expert - 1}")
    out = np.zeros((x.shape[0], n_embd), np.float32)
    if ids.size == 0:
        return out
    groups = ExpertGroups(ids)
    where = groups.experts if slabs is None else slabs[groups.experts]  # each group's weights
    n_small = groups.n_compiled if _blas_min_tokens(qt, exact) == BLAS_MIN_TOKENS else len(groups)
    if n_small:
        qt8, q8, q8_blocks = experts.types(exact)
        _run(
            compiled.moe_rows, n_small * experts.expert_bytes,
            *flat, qt8, rb, x, groups.k, groups.pairs[: groups.starts[n_small]], groups.starts[: n_small + 1],
            where[:n_small], weights.reshape(-1), n_ff, q8, q8_blocks, tile_lanes(), out,
        )  # fmt: skip
    for g in range(n_small, len(groups)):
        e = where[g]
        y = expert_ffn(experts.gate[e], experts.up[e], experts.down[e], qt, x[groups.tokens(g)], exact)
        add_expert_output(out, groups, g, y, weights)
    return out



def route_moe_one(experts: StackedExperts, x: np.ndarray, router: np.ndarray, k: int, normalize: bool,
                  scale: float = 1.0, exact: bool | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One token's softmax router and routed experts in one compiled call (compiled.route_moe_one):
    route_softmax_topk(x, router, k, normalize, scale), then stacked_moe_ffn on its choice.
    x float32 [1, n_embd], router float32 [n_expert, n_embd] -> (logits [1, E], ids int64 [1, k],
    weights [1, k], out [1, n_embd]), each equal to what the two calls give."""
    if x.shape != (1, experts.n_embd) or router.shape != (experts.n_expert, experts.n_embd) \
            or not 1 <= k <= experts.n_expert:
        raise QmoeError(f"route_moe_one: x [1, {experts.n_embd}], router [{experts.n_expert}, {experts.n_embd}] "
                        f"and 1 <= k <= {experts.n_expert} expected, got {list(x.shape)}, {list(router.shape)}, {k}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    logits = np.empty((1, experts.n_expert), np.float32)
    ids, weights = np.empty((1, k), np.int64), np.empty((1, k), np.float32)
    out = np.zeros((1, experts.n_embd), np.float32)
    qt8, q8, q8_blocks = experts.types(exact)
    _run(compiled.route_moe_one, k * experts.expert_bytes, x, router, k, normalize, np.float32(scale),
         *experts.flat, qt8, experts.row_bytes, experts.n_ff, q8, q8_blocks, logits, ids, weights, out)
    return logits, ids, weights, out

def stacked_expert_ffns(experts: StackedExperts, slots: list[int], xs: list[np.ndarray],
                        exact: bool | None = None) -> list[np.ndarray]:
    """expert_ffn of expert `slots[i]` of the stack on token rows xs[i], for every i, bit for bit.

    The ones with fewer than BLAS_MIN_TOKENS rows (_blas_min_tokens) run in one compiled call, as moe_ffn's
    small groups do, with k = 1 and weight 1 (so each group's output is y itself, as
    expert_ffn's): a store's layer computes many experts on a few tokens each, and one
    call per expert cost a layer-major prefill a fifth more time than the model without a
    store (A3B shapes, 16 tokens an expert; the calls' own time, fresh output arrays and
    waking the threads once per expert). The others run through expert_ffn's BLAS path."""
    outs: list[np.ndarray | None] = [None] * len(xs)
    small = []
    blas_min = _blas_min_tokens(experts.qtypes, exact)
    for i, (s, x) in enumerate(zip(slots, xs)):
        x = _activations(x, experts.n_embd, "stacked_expert_ffns")
        if len(x) < blas_min:
            small.append((i, s, x))
        else:
            outs[i] = expert_ffn(experts.gate[s], experts.up[s], experts.down[s], experts.qtypes, x, exact)
    if small:
        x = np.concatenate([x for _, _, x in small])
        starts = np.concatenate(([0], np.cumsum([len(x) for _, _, x in small]))).astype(np.int64)
        y = np.zeros_like(x)
        if len(x):
            qt8, q8, q8_blocks = experts.types(exact)
            _run(
                compiled.moe_rows, len(small) * experts.expert_bytes,
                *experts.flat, qt8, experts.row_bytes, x, 1, np.arange(len(x), dtype=np.int64), starts,
                np.array([s for _, s, _ in small], np.int64), np.ones(len(x), np.float32), experts.n_ff, q8,
                q8_blocks, tile_lanes(), y,
            )  # fmt: skip
        for (i, _, _), a, b in zip(small, starts[:-1], starts[1:]):
            outs[i] = y[a:b]
    return outs


def expert_ffn(
    gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple, x: np.ndarray, exact: bool | None = None
) -> np.ndarray:
    """One expert's SwiGLU for T token rows, from its slabs (stacked[e] views).

    gate, up: raw [n_ff, n_embd]; down: raw [n_embd, n_ff]; x: float32 [T, n_embd]
    -> silu(x @ G.T) * (x @ U.T) @ D.T, float32 [T, n_embd]. Fewer than BLAS_MIN_TOKENS
    tokens (_blas_min_tokens: any number, in tiles) run moe_ffn's compiled code (one expert,
    weight 1); more run three BLAS products.
    exact: as moe_ffn's.
    """
    flat, qt, rb, _, n_embd, n_ff = _experts(gate[None], up[None], down[None], qtypes, "expert_ffn")
    x = _activations(x, n_embd, "expert_ffn")
    n_tokens = x.shape[0]
    if n_tokens < _blas_min_tokens(qt, exact):
        out = np.zeros((n_tokens, n_embd), np.float32)
        if n_tokens:
            pairs = np.arange(n_tokens, dtype=np.int64)  # k = 1: pair p is token p, all of expert 0
            qt8, q8, q8_blocks = _moe_rows_types(qt, exact)
            _run(
                compiled.moe_rows, sum(f.nbytes for f in flat),
                *flat, qt8, rb, x, 1, pairs, np.array([0, n_tokens], np.int64), np.zeros(1, np.int64),
                np.ones(n_tokens, np.float32), n_ff, q8, q8_blocks, tile_lanes(), out,
            )  # fmt: skip
        return out
    g = matmul(gate, qt[0], x, exact=exact)
    u = matmul(up, qt[1], x, exact=exact)
    with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives silu = -0, as it should
        hidden = g / (1.0 + np.exp(-g)) * u  # silu(g) * u, [T, n_ff]
    return matmul(down, qt[2], hidden, exact=exact)
