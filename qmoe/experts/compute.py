"""The models' `ExpertCompute` over the expert store: each routed expert computed where its slab is.

For every expert the router chose, the output comes from the compute tier (a hit),
from a slab on its way there (late: wait for it), or, on a miss, as `on_miss` says:
"wait" asked the store for the slab and waits; "cpu" (fast tier only) computes it
with the kernels from the quantized slab in the RAM pool, or in the mapped file when
there is no pool. Hits are computed first, so that their compute overlaps the
transfers of the rest, then the others as they arrive: each time the one waited for
comes, with every other that has come by then, in one kernel call.

Results do not depend on the tiers: the tokens are grouped and the experts' outputs
summed by the kernels' own `ExpertGroups` and `add_expert_output`, in moe_ffn's
order, and every expert on the kernel path is computed as `kernels.expert_ffn` computes
it (`stacked_expert_ffns` for several at once), so
the layer's output is bit-identical to the model without a store; so is it with the
CPU's simulated fast tier, which holds quantized slabs for the same kernels. When
every expert is ready in a tier of quantized slabs laid out as this layer's, the layer
is one `moe_ffn` call over the tier's slots. A dense fast tier (CUDA) is a compute path of its own (fp16
products); with on_miss "wait" every expert takes it, so its results are independent
of budgets and policy too; with "cpu" misses they mix both paths.
"""

from __future__ import annotations

import numpy as np

from qmoe import kernels
from qmoe.experts.cache import Entry
from qmoe.experts.store import ExpertStore, LayerClaims
from qmoe.experts.transfers import Tier
from qmoe.models.base import ExpertCompute


class StoreExperts:
    """ExpertCompute over an ExpertStore; `file_experts` computes them when the mapped file holds them all."""

    def __init__(self, store: ExpertStore, file_experts: ExpertCompute):
        self.store = store
        self.file_experts = file_experts
        self.layouts = store.slabs.layouts  # each layer's slab layout (mixes vary ffn_down's type by layer)

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum: x [T, n_embd], ids and weights [T, k] -> [T, n_embd]."""
        store = self.store
        groups = kernels.ExpertGroups(ids)
        needed = [int(e) for e in groups.experts]
        if store.compute_tier is None:  # every expert is in the mapped file: as the model without a store
            store.count_file_layer(layer, needed)
            return self.file_experts(layer, x, ids, weights)
        claims = store.claim_layer(layer, needed)
        tier = store.compute_tier
        if not claims.waiting and not claims.on_cpu and not tier.dense and self.layouts[layer] == tier.layout:
            return self._all_ready(tier, claims, x, ids, weights)
        outputs = self._one_by_one(layer, tier, claims, {e: [x[groups.tokens(g)]] for g, e in enumerate(needed)})
        out = np.zeros_like(x)
        for g, e in enumerate(needed):
            kernels.add_expert_output(out, groups, g, outputs[e][0], weights)
        return out

    def over_segments(self, layer: int, xs: list[np.ndarray], ids: list[np.ndarray],
                      weights: list[np.ndarray]) -> list[np.ndarray]:
        """__call__ for each segment, every expert claimed once for all of them (layer-major prefill).

        Each expert computes each segment's tokens apart, as __call__ on that segment would
        (the kernels' path depends on how many tokens an expert has), and each segment's sum
        runs in its own groups' order: every result equals __call__'s bit for bit. While this
        layer computes, the store reads the next MoE layer ahead when the tier has room (read_ahead).
        """
        store = self.store
        groups = [kernels.ExpertGroups(i) for i in ids]
        inputs: dict[int, list[np.ndarray]] = {}  # expert -> its tokens' rows of each segment that chose it
        for x, g in zip(xs, groups):
            for n, e in enumerate(g.experts):
                inputs.setdefault(int(e), []).append(x[g.tokens(n)])
        needed = sorted(inputs)
        if store.compute_tier is None:
            store.count_file_layer(layer, needed)
            return self.file_experts.over_segments(layer, xs, ids, weights)
        claims = store.claim_layer(layer, needed)
        store.read_ahead(layer, len(needed))
        outputs = {e: iter(ys) for e, ys in self._one_by_one(layer, store.compute_tier, claims, inputs).items()}
        results = []
        for x, g, w in zip(xs, groups, weights):  # the segments in the order their inputs were listed
            out = np.zeros_like(x)
            for n, e in enumerate(g.experts):
                kernels.add_expert_output(out, g, n, next(outputs[int(e)]), w)
            results.append(out)
        return results

    def _all_ready(self, tier: Tier, claims: LayerClaims, x, ids, weights) -> np.ndarray:
        """Every expert is ready in quantized slots: one moe_ffn call with the slots for their ids."""
        slots = np.zeros(self.store.slabs.n_expert, np.int64)
        for e, entry in claims.ready:
            slots[e] = entry.slot
        try:
            return kernels.stacked_moe_ffn(tier.stacked, x, ids, weights, slabs=slots)
        finally:
            for _, entry in claims.ready:
                self.store.release(tier, entry)

    def _one_by_one(
        self, layer: int, tier: Tier, claims: LayerClaims, inputs: dict[int, list[np.ndarray]]
    ) -> dict[int, list[np.ndarray]]:
        """Each claimed expert's outputs [n, n_embd] on its inputs [n, n_embd] (one per segment):
        the hits first, together, then the rest as they arrive, each with those arrived beside it."""
        outputs = {}
        unused = claims.handles()
        try:
            if claims.ready:
                for _, entry in claims.ready:
                    unused.remove(entry)
                outputs |= self._compute_in(tier, layer, claims.ready, inputs)
            waiting = list(claims.waiting)
            while waiting:
                e, handle = waiting.pop(0)
                arrived = [(e, self.store.wait(handle, layer))]
                unused.remove(handle)
                for other, other_handle in list(waiting):
                    entry = self.store.arrived(other_handle)
                    if entry is not None:
                        waiting.remove((other, other_handle))
                        unused.remove(other_handle)
                        arrived.append((other, entry))
                outputs |= self._compute_in(tier, layer, arrived, inputs)
            for e in claims.on_cpu:
                outputs[e] = self._compute_on_cpu(layer, e, inputs[e])
        except BaseException:  # an error or Ctrl-C: do not leave slabs pinned for good
            self.store.unclaim(unused)
            raise
        return outputs

    def _compute_in(self, tier: Tier, layer: int, entries: list[tuple[int, Entry]],
                    inputs: dict[int, list[np.ndarray]]) -> dict[int, list[np.ndarray]]:
        """Compute the experts of entries pinned for us ((expert, entry) of `layer`), then release them.

        In a tier of quantized slots laid out as this layer's, all of them in one
        stacked_expert_ffns call: equal to one call per expert, and a layer-major prefill's
        layer computes a hundred experts on a few tokens each."""
        layout = self.layouts[layer]
        try:
            if tier.stacked is not None and layout == tier.layout:
                slots = [entry.slot for e, entry in entries for _ in inputs[e]]
                ys = iter(kernels.stacked_expert_ffns(tier.stacked, slots, [x for e, _ in entries for x in inputs[e]]))
                return {e: [next(ys) for _ in inputs[e]] for e, _ in entries}
            if tier is self.store.fast:
                return {e: [tier.compute(entry.slot, x, layout) for x in inputs[e]] for e, entry in entries}
            return {e: [kernels.expert_ffn(*tier.views(entry.slot, layout), layout.qtypes, x) for x in inputs[e]]
                    for e, entry in entries}
        finally:
            for _, entry in entries:
                self.store.release(tier, entry)

    def _compute_on_cpu(self, layer: int, expert: int, xs: list[np.ndarray]) -> list[np.ndarray]:
        """A fast-tier miss computed by the kernels from the quantized slab: pool (read if absent) or file."""
        pool = self.store.pool
        if pool is None:
            return [kernels.expert_ffn(*self.store.slabs.views(layer, expert), self.layouts[layer].qtypes, x) for x in xs]
        handle = self.store.claim_in_pool(layer, expert)
        try:
            entry = self.store.wait(handle, layer)
        except BaseException:
            self.store.unclaim([handle])
            raise
        return self._compute_in(pool, layer, [(expert, entry)], {expert: xs})[expert]
